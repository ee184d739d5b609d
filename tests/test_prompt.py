"""The soft prompt tensor: initialisation, save/load, and refusing what does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from softprompt import api
from softprompt.config import PromptInit
from softprompt.errors import SoftPromptError
from softprompt.generation import cut_at_stop, generate_reference
from softprompt.models import load_model
from softprompt.prompt import (
    CONFIG_FILE,
    PROMPT_FILE,
    TENSOR_KEY,
    PromptMeta,
    SoftPrompt,
    check_hidden_size,
    init_prompt,
    load_meta,
    load_prompt_tensor,
    save_prompt,
)
from softprompt.tasks import get_task


def _table(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def _meta(prompt: torch.Tensor, model_name: str = "tiny") -> PromptMeta:
    return PromptMeta(model=model_name, task=get_task("translation").to_dict(),
                      num_virtual_tokens=prompt.shape[0], hidden_size=prompt.shape[1])


# --- initialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cut", "exact", "repeat"])
def test_text_init_repeats_or_cuts_the_init_token_embeddings(tiny, how):
    model, tok, _ = tiny
    ids = tok("Translate the following sentence", add_special_tokens=False).input_ids
    n = len(ids)
    assert n > 3
    p = {"cut": n - 2, "exact": n, "repeat": 2 * n + 1}[how]
    soft = init_prompt(_table(model), p, PromptInit.TEXT, ids)
    assert soft.embeddings.shape == (p, model.config.hidden_size)
    expected_ids = (ids * 3)[:p]
    assert torch.equal(soft.embeddings.detach(), _table(model)[expected_ids])


def test_text_init_needs_token_ids(tiny):
    model, _, _ = tiny
    with pytest.raises(SoftPromptError, match="init-text"):
        init_prompt(_table(model), 4, "text", [])


def test_vocab_init_rows_are_embeddings_of_low_ids_and_seeded(tiny):
    model, _, _ = tiny
    table = _table(model)
    a = init_prompt(table, 12, PromptInit.VOCAB, seed=3).embeddings.detach()
    b = init_prompt(table, 12, PromptInit.VOCAB, seed=3).embeddings.detach()
    c = init_prompt(table, 12, PromptInit.VOCAB, seed=4).embeddings.detach()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    low = table[:5000]
    for row in a:
        matches = (low == row).all(dim=1).nonzero().flatten()
        assert len(matches) >= 1, "a vocab-initialised row is not an embedding row"
        assert int(matches[0]) < 5000


def test_vocab_init_only_samples_the_5000_lowest_ids():
    # A table where row i is filled with i: the sampled rows give their ids directly.
    table = torch.arange(20000, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
    soft = init_prompt(table, 200, PromptInit.VOCAB, seed=0)
    ids = soft.embeddings[:, 0]
    assert ids.max() < 5000 and ids.min() >= 0
    assert len(ids.unique()) > 50  # really sampled, not one row repeated


def test_random_init_matches_table_std_and_is_seeded(tiny):
    model, _, _ = tiny
    table = _table(model)
    p = 64  # enough values (64 x 32) for the std to be estimated well
    a = init_prompt(table, p, PromptInit.RANDOM, seed=5).embeddings.detach()
    b = init_prompt(table, p, PromptInit.RANDOM, seed=5).embeddings.detach()
    c = init_prompt(table, p, PromptInit.RANDOM, seed=6).embeddings.detach()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.std().item() == pytest.approx(table.std().item(), rel=0.1)
    bound = table.std().item() * 3**0.5
    assert a.abs().max().item() <= bound + 1e-6  # uniform on [-bound, bound]
    # Not copied from the table: random values are (almost surely) no embedding rows.
    assert not any((table == row).all(dim=1).any() for row in a)


def test_init_from_bf16_table_gives_float32(tiny):
    model, tok, _ = tiny
    table = _table(model).to(torch.bfloat16)
    ids = tok("hello", add_special_tokens=False).input_ids
    for init in PromptInit:
        soft = init_prompt(table, 4, init, ids, seed=0)
        assert soft.embeddings.dtype == torch.float32
        assert soft().requires_grad


def test_soft_prompt_refuses_non_matrix():
    with pytest.raises(SoftPromptError, match=r"\[P, H\]"):
        SoftPrompt(torch.zeros(2, 3, 4))


# --- save / load ------------------------------------------------------------------------------


def test_save_load_roundtrip_is_bit_identical(tmp_path):
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 1e-3
    prompt[0, 0] = 1e-40  # subnormal and extreme values survive too
    prompt[1, 1] = -3.4e38
    meta = _meta(prompt)
    meta.metrics = {"val_loss": 1.5}
    save_prompt(tmp_path, SoftPrompt(prompt), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPT_FILE, CONFIG_FILE]
    loaded, loaded_meta = load_prompt_tensor(tmp_path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, prompt)
    assert loaded_meta.model == "tiny"
    assert loaded_meta.num_virtual_tokens == 5 and loaded_meta.hidden_size == 32
    assert loaded_meta.metrics == {"val_loss": 1.5}
    assert loaded_meta.task == get_task("translation").to_dict()
    assert {"torch", "transformers", "softprompt", "python"} <= set(loaded_meta.versions)
    # No temporary files left beside them.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bf16_prompt_is_saved_and_loaded_as_float32(tmp_path):
    prompt = torch.randn(3, 8).to(torch.bfloat16)
    save_prompt(tmp_path, prompt, _meta(prompt))
    with safe_open(str(tmp_path / PROMPT_FILE), "pt") as f:
        assert f.get_tensor(TENSOR_KEY).dtype == torch.float32
    loaded, _ = load_prompt_tensor(tmp_path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, prompt.float())


def test_prompt_with_bf16_model_stays_float32(tiny, tmp_path):
    _, tok, model_dir = tiny
    model, tok = load_model(str(model_dir), dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = tok("Translate", add_special_tokens=False).input_ids
    soft = init_prompt(_table(model), 4, "text", ids)
    save_prompt(tmp_path, soft, _meta(soft.embeddings.detach()))
    pm = api.load_prompt(tmp_path, loaded=(model, tok))
    assert pm.prompt.dtype == torch.float32
    assert torch.equal(pm.prompt, soft.embeddings.detach())
    out = pm.generate("A dog runs.", max_new_tokens=3, repetition_penalty=1.0)
    # The cached bf16 decoding gives the uncached reference's greedy tokens (no decoding
    # controls: the reference has none).
    ref = generate_reference(model, tok, pm.render("A dog runs."), pm.prompt, 3)
    assert len(ref) == 3
    assert out == cut_at_stop(tok.decode(ref, skip_special_tokens=True), pm.task.stop)[0]


def test_save_refuses_shape_that_disagrees_with_meta(tmp_path):
    prompt = torch.zeros(4, 8)
    meta = PromptMeta(model="m", task={}, num_virtual_tokens=5, hidden_size=8)
    with pytest.raises(SoftPromptError, match="does not match"):
        save_prompt(tmp_path, prompt, meta)
    assert not (tmp_path / PROMPT_FILE).exists()


# --- refusing prompts that do not fit ---------------------------------------------------------


def test_check_hidden_size():
    check_hidden_size(torch.zeros(4, 32), 32, "p")
    with pytest.raises(SoftPromptError, match="hidden size 32 does not match the model's 16"):
        check_hidden_size(torch.zeros(4, 32), 16, "p")


def test_load_prompt_refuses_a_model_of_another_width(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok, _ = tiny
    soft = init_prompt(_table(model), 4, "random")
    save_prompt(tmp_path / "p", soft, _meta(soft.embeddings.detach()))
    # Works with the model it was made for...
    assert api.load_prompt(tmp_path / "p", loaded=(model, tok)).prompt.shape == (4, 32)
    # ...and is refused by a model whose hidden size differs.
    narrow = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16,
                                        n_layer=1, n_head=2)).eval()
    with pytest.raises(SoftPromptError, match="hidden size 32 does not match the model's 16"):
        api.load_prompt(tmp_path / "p", loaded=(narrow, tok))


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    ("[1, 2, 3]", "must hold a JSON object, got list"),
    ('{"task": {}, "num_virtual_tokens": 4, "hidden_size": 32}', "'model' must be a string"),
    ('{"model": "m", "task": {}, "hidden_size": 32}', "'num_virtual_tokens' must be an integer"),
    ('{"model": "m", "task": "translation", "num_virtual_tokens": 4, "hidden_size": 32}',
     "'task' must be an object"),
])
def test_invalid_softprompt_json_is_refused(tmp_path, content, match):
    prompt = torch.zeros(4, 32)
    save_prompt(tmp_path, prompt, _meta(prompt))
    (tmp_path / CONFIG_FILE).write_bytes(content.encode("latin-1"))
    with pytest.raises(SoftPromptError, match=match):
        load_prompt_tensor(tmp_path)


def test_missing_or_mismatched_prompt_files_are_refused(tmp_path):
    with pytest.raises(SoftPromptError, match="not found"):
        load_meta(tmp_path)
    prompt = torch.zeros(4, 32)
    save_prompt(tmp_path, prompt, _meta(prompt))
    # The JSON claims another shape than the tensor has.
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    raw["num_virtual_tokens"] = 5
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(SoftPromptError, match=r"shape \[4, 32\] != \[5, 32\]"):
        load_prompt_tensor(tmp_path)
    # A corrupt tensor file.
    raw["num_virtual_tokens"] = 4
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    (tmp_path / PROMPT_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(SoftPromptError, match="not a valid safetensors file"):
        load_prompt_tensor(tmp_path)
    (tmp_path / PROMPT_FILE).unlink()
    with pytest.raises(SoftPromptError, match="not found"):
        load_prompt_tensor(tmp_path)
