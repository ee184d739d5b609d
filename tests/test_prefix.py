"""Parity tests for KV prefixes (prefix tuning): every layout gives the same logits, loss,
gradient and greedy output, and a prefix computed from text stands for that text exactly."""

from __future__ import annotations

import pytest
import torch

from softprompt.batching import collate
from softprompt.config import GenerationConfig
from softprompt.encode import adds_bos
from softprompt.errors import SoftPromptError
from softprompt.generation import generate, generate_reference
from softprompt.inputs import (
    IGNORE_INDEX,
    build_prompt_cache,
    full_logits,
    prompted_batch,
    right_padded_batch,
    rows_loss,
    target_loss,
    tokens_kv,
)
from softprompt.prefix import KVPrefix, check_fits, content_key, kv_shape, num_virtual_tokens
from softprompt.tasks import get_task

TEXTS = ["A dog runs on the beach.", "Two children play football in a park near the river.",
         "Rain."]


def _prefix(model, p=4, seed=1, scale=0.5) -> KVPrefix:
    layers, kv_heads, head_dim = kv_shape(model.config)
    gen = torch.Generator().manual_seed(seed)
    return KVPrefix(torch.randn(layers, 2, kv_heads, p, head_dim, generator=gen) * scale)


def test_prefix_from_text_stands_for_the_text(tiny):
    """The KV of a text, as a prefix, gives the logits the model gives after that text."""
    model, tok, _ = tiny
    text = tok("Summary: Answer:", add_special_tokens=False).input_ids
    ids = tok("A dog runs.", add_special_tokens=False).input_ids
    prefix = tokens_kv(model, text)
    assert prefix.num_virtual_tokens == len(text)
    input_ids = torch.tensor([ids])
    batch = prompted_batch(model, prefix, input_ids, torch.ones_like(input_ids))
    with torch.no_grad():
        ours = full_logits(model, batch)[0]  # [T, V]
        plain = model(input_ids=torch.tensor([text + ids])).logits[0, len(text):]
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


def _rows(tok, texts):
    """Encoded (ids, labels) rows: the first half of each text is input, the rest target."""
    rows = []
    for t in texts:
        ids = tok(t).input_ids
        half = max(1, len(ids) // 2)
        rows.append((ids, [IGNORE_INDEX] * half + ids[half:]))
    return rows


def test_training_layout_loss_and_gradient_match_reference_layout(tiny):
    model, tok, _ = tiny
    bos = int(adds_bos(tok))
    rows = _rows(tok, TEXTS)
    kv = _prefix(model).kv.requires_grad_()
    loss, count = rows_loss(model, KVPrefix(kv), rows, tok.pad_token_id, bos)
    loss.backward()
    train_grad = kv.grad.clone()
    kv.grad = None
    left = collate(rows, tok.pad_token_id, "cpu", side="left")
    batch = prompted_batch(model, KVPrefix(kv), left["input_ids"], left["attention_mask"],
                           left["labels"], bos)
    ref_loss, ref_count = target_loss(model, batch)
    ref_loss.backward()
    assert count == ref_count > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train_grad, kv.grad, rtol=1e-4, atol=1e-6)
    assert train_grad.abs().sum() > 0


def test_right_padded_rows_put_tokens_from_position_p(tiny):
    model, tok, _ = tiny
    prefix = _prefix(model, p=3)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    batch = right_padded_batch(model, prefix, ids, ids.clone())
    assert batch.position_ids.tolist() == [[3, 4, 5], [3, 4, 5]]
    assert batch.attention_mask is None and batch.inputs_embeds.shape[1] == 3
    assert batch.cache.get_seq_length() == 3


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_generation_matches_uncached_reference(tiny, batch_size):
    model, tok, _ = tiny
    prefix = _prefix(model, p=5, scale=1.0)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=batch_size)
    ours = generate(model, tok, TEXTS, prefix, cfg)
    for text, out in zip(TEXTS, ours):
        ref = generate_reference(model, tok, text, prefix, 8)
        assert out == tok.decode(ref, skip_special_tokens=True).strip()
    # The prefix matters: the plain model continues differently.
    assert ours != generate(model, tok, TEXTS, None, cfg)


def test_prompt_cache_of_a_prefix_holds_bos_after_it(tiny):
    model, tok, _ = tiny
    prefix = _prefix(model, p=4)
    bos = tok.bos_token_id if adds_bos(tok) else None
    cache = build_prompt_cache(model, prefix, bos)
    assert cache.length == 4 + (bos is not None)
    torch.testing.assert_close(cache.layers[0][0][:, :, :4], prefix.kv[0, 0].unsqueeze(0))


def test_check_fits_refuses_a_prefix_for_another_model(tiny):
    model, _, _ = tiny
    layers, kv_heads, head_dim = kv_shape(model.config)
    check_fits(_prefix(model), model)
    wrong = KVPrefix(torch.zeros(layers + 1, 2, kv_heads, 3, head_dim))
    with pytest.raises(SoftPromptError, match="use the --model the prefix was trained on"):
        check_fits(wrong, model)
    with pytest.raises(SoftPromptError, match="layers, 2, kv_heads"):
        KVPrefix(torch.zeros(2, 3, 4))


def test_content_key_tells_kinds_and_values_apart(tiny):
    model, _, _ = tiny
    a, b = _prefix(model, seed=1), _prefix(model, seed=2)
    assert content_key(a) == content_key(KVPrefix(a.kv.clone()))
    assert content_key(a) != content_key(b)
    flat = a.kv.reshape(-1, model.config.hidden_size)
    assert content_key(flat) != content_key(KVPrefix(flat.reshape(a.kv.shape)))
    assert num_virtual_tokens(a) == 4 and num_virtual_tokens(None) == 0


def test_engine_mixes_prefixes_prompts_and_the_bare_model(tiny):
    """Rows behind KV prefixes of different lengths, a [P, H] prompt and nothing share one
    batch; each output equals its request generated alone."""
    from softprompt.engine import Engine, SamplingParams

    model, tok, _ = tiny
    with torch.no_grad():  # a fresh tiny model barely listens to its input; scaled, it does
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    prompts = {"kv3": _prefix(model, p=3, seed=3, scale=2.0),
               "kv6": _prefix(model, p=6, seed=6, scale=2.0),
               "emb4": torch.randn(4, model.config.hidden_size,
                                   generator=torch.Generator().manual_seed(4)) * 0.7}
    engine = Engine(model, tok, max_batch_size=16)
    for name, prompt in prompts.items():
        engine.add_prompt(name, prompt)
    names = [None, "kv3", "kv6", "emb4"]
    jobs = [(TEXTS[i % len(TEXTS)], names[i % len(names)]) for i in range(8)]
    outs = engine.generate([t for t, _ in jobs], [n for _, n in jobs],
                           SamplingParams(max_new_tokens=8))
    cfg = GenerationConfig(max_new_tokens=8)
    expected = [generate(model, tok, [t], prompts.get(n), cfg)[0] for t, n in jobs]
    assert outs == expected
    assert len(set(outs)) > 3
    assert engine.virtual_tokens("kv6") == 6


def test_prefix_directory_round_trip_and_old_directories(tiny, tmp_path):
    """A prefix saves as prefix.safetensors and loads as the same KVPrefix; a directory written
    before prefixes (no ``method``) still loads as a [P, H] prompt."""
    import json

    from softprompt.prompt import (
        CONFIG_FILE,
        PREFIX_FILE,
        PROMPT_FILE,
        PromptMeta,
        load_prompt_tensor,
        save_prompt,
    )

    model, _, _ = tiny
    prefix = _prefix(model, p=3)
    layers, kv_heads, head_dim = kv_shape(model.config)
    meta = PromptMeta(model="m", task={"template": "{text}"}, num_virtual_tokens=3,
                      hidden_size=model.config.hidden_size, method="prefix", num_layers=layers,
                      num_key_value_heads=kv_heads, head_dim=head_dim)
    save_prompt(tmp_path, prefix, meta)
    loaded, got = load_prompt_tensor(tmp_path)
    assert isinstance(loaded, KVPrefix) and got.method == "prefix"
    assert torch.equal(loaded.kv, prefix.kv)
    assert (tmp_path / PREFIX_FILE).is_file() and not (tmp_path / PROMPT_FILE).exists()
    # Overwritten by a [P, H] prompt: the prefix file goes, the prompt loads.
    plain = PromptMeta(model="m", task={"template": "{text}"}, num_virtual_tokens=2,
                       hidden_size=model.config.hidden_size)
    save_prompt(tmp_path, torch.ones(2, model.config.hidden_size), plain)
    assert not (tmp_path / PREFIX_FILE).exists()
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    del raw["method"], raw["num_layers"], raw["num_key_value_heads"], raw["head_dim"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))  # as written before this change
    tensor, old = load_prompt_tensor(tmp_path)
    assert old.method == "prompt" and tensor.shape == (2, model.config.hidden_size)
    with pytest.raises(SoftPromptError, match="KV prefix is saved with method 'prefix'"):
        save_prompt(tmp_path, prefix, plain)
    raw.update(method="prefix")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(SoftPromptError, match="'num_layers' must be an integer"):
        load_prompt_tensor(tmp_path)


def test_prompted_model_generates_behind_a_saved_prefix(tiny, tmp_path):
    from softprompt.api import load_prompt
    from softprompt.prompt import PromptMeta, save_prompt

    model, tok, model_dir = tiny
    prefix = _prefix(model, p=4, scale=1.0)
    layers, kv_heads, head_dim = kv_shape(model.config)
    save_prompt(tmp_path, prefix, PromptMeta(
        model=str(model_dir), task=get_task("translation").to_dict(),
        num_virtual_tokens=4, hidden_size=model.config.hidden_size, method="prefix",
        num_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim))
    pm = load_prompt(tmp_path, loaded=(model, tok))
    out = pm.generate(TEXTS[0], max_new_tokens=6)
    text = pm.render(TEXTS[0])
    cfg = GenerationConfig(**{**pm.task.generation_defaults(), "max_new_tokens": 6})
    assert out == generate(model, tok, [text], prefix, cfg, stop=pm.task.stop)[0]
