"""PEFT interop: exported adapters load in PEFT with our logits; PEFT's adapters load here with
PEFT's logits; the config PEFT would write; what PEFT cannot express is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)

from softprompt import api, interop
from softprompt.cli import main
from softprompt.encode import adds_bos, encode_example
from softprompt.errors import SoftPromptError
from softprompt.inputs import full_logits, prompted_batch
from softprompt.models import load_model
from softprompt.prefix import KVPrefix, kv_shape
from softprompt.prompt import (
    CONFIG_FILE,
    PREFIX_FILE,
    PROMPT_FILE,
    PromptMeta,
    load_prompt_tensor,
    save_prompt,
)
from softprompt.tasks import get_task, make_example

P = 5
RECORD = {"source": "A dog is running on the beach.", "target": "Ein Hund rennt am Strand."}


def _ids(tokenizer) -> tuple[torch.Tensor, int]:
    """``[1, T]`` ids of a translation example with its target, and the input length."""
    task = get_task("translation")
    enc = encode_example(task, make_example(task, RECORD), tokenizer)
    return torch.tensor([enc.input_ids + enc.target_ids]), len(enc.input_ids)


def ours(model, tokenizer, prompt) -> torch.Tensor:
    """Our logits ``[T, V]`` for the example's tokens (the uncached reference path)."""
    ids, _ = _ids(tokenizer)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        batch = prompted_batch(model, prompt, ids, mask, bos_offset=int(adds_bos(tokenizer)))
        logits = full_logits(model, batch)[0]
    if isinstance(prompt, torch.Tensor):  # drop the prompt's positions
        bos = int(adds_bos(tokenizer))
        logits = torch.cat([logits[:bos], logits[bos + prompt.shape[0]:]])
    return logits


def peft_logits(peft_model, tokenizer) -> torch.Tensor:
    """PEFT's logits ``[T, V]`` for the example's tokens."""
    ids, _ = _ids(tokenizer)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits[-ids.shape[1]:]  # PROMPT_TUNING returns the virtual tokens' positions too


def assert_target_logits_close(a: torch.Tensor, b: torch.Tensor, tokenizer) -> None:
    _, n_input = _ids(tokenizer)
    target = slice(n_input - 1, a.shape[0] - 1)  # the positions that predict target tokens
    assert a.shape == b.shape
    diff = (a[target] - b[target]).abs().max().item()
    assert diff < 1e-4, diff


def _prompt_dir(path: Path, model_dir: Path, prompt, method: str = "prompt") -> Path:
    """Our prompt directory holding ``prompt`` (a [P, H] tensor or a KVPrefix)."""
    meta = PromptMeta(model=str(model_dir), task=get_task("translation").to_dict(),
                      num_virtual_tokens=P, method=method,
                      hidden_size=32 if isinstance(prompt, KVPrefix) else prompt.shape[1])
    if isinstance(prompt, KVPrefix):
        meta.method = "prefix"
        meta.num_layers, _, meta.num_key_value_heads, _, meta.head_dim = prompt.kv.shape
    save_prompt(path, prompt, meta)
    return path


def _random_prefix(model, seed: int = 3) -> KVPrefix:
    layers, heads, head_dim = kv_shape(model.config)
    gen = torch.Generator().manual_seed(seed)
    return KVPrefix(torch.randn(layers, 2, heads, P, head_dim, generator=gen))


def _random_prompt(model, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    return torch.randn(P, hidden, generator=gen) * 0.5


def _peft_saved(model, config, path: Path, seed: int = 2) -> Path:
    """An adapter saved by PEFT itself, with non-trivial random weights."""
    pm = get_peft_model(model, config)
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    pm.save_pretrained(str(path))
    return path


def _peft_load(model_dir: Path, adapter: Path):
    base, _ = load_model(str(model_dir))
    return PeftModel.from_pretrained(base, str(adapter)).eval()


# --- adapter_config.json as PEFT writes it ----------------------------------------------------


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_adapter_config_has_exactly_peft_s_fields_and_values(tiny, tmp_path, kind):
    model, _, model_dir = tiny
    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
              if kind == "PROMPT_TUNING"
              else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    saved = _peft_saved(model, config, tmp_path / "peft")
    theirs = json.loads((saved / interop.ADAPTER_CONFIG).read_text())
    shape = interop.ModelShape.from_config(model.config)
    mine = interop.peft_adapter_config(kind, shape, P, theirs["base_model_name_or_path"])
    assert mine == theirs


def test_grouped_query_prefix_uses_key_value_heads(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]))
    shape = interop.ModelShape.from_config(model.config)
    assert (shape.kv_heads, shape.num_attention_heads, shape.head_dim) == (2, 4, 8)
    config = interop.peft_adapter_config("PREFIX_TUNING", shape, P, None)
    assert (config["num_attention_heads"], config["token_dim"]) == (2, 16)


def test_prefix_layout_is_peft_s_get_prompt(tiny, tmp_path):
    # PEFT's own reshape of its [P, L*2*token_dim] tensor into the cache it hands the model.
    model, _, _ = tiny
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape))
    cfg = pm.peft_config["default"]
    kv = interop.prefix_from_peft(weight.detach(), cfg.num_layers, cfg.num_attention_heads)
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=1)
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys[0], kv[i, 0]) and torch.equal(layer.values[0], kv[i, 1])
    assert torch.equal(interop.prefix_to_peft(kv), weight.detach())


# --- export: ours -> PEFT ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "ptuning", "residual"])
def test_exported_prompt_gives_our_logits_in_peft(tiny_dirs, tmp_path, method):
    # GPT-2's tokenizer adds no BOS: our [P | tokens] is PEFT's PROMPT_TUNING layout. The
    # reparameterised methods are saved collapsed to [P, H], so they export the same way.
    model, tok = load_model(str(tiny_dirs["gpt2"]))
    prompt = _random_prompt(model)
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["gpt2"], prompt, method)
    out = interop.export_peft(src, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [interop.ADAPTER_CONFIG, interop.ADAPTER_WEIGHTS, CONFIG_FILE])
    assert json.loads((out / interop.ADAPTER_CONFIG).read_text())["peft_type"] == "PROMPT_TUNING"
    pm = _peft_load(tiny_dirs["gpt2"], out)
    assert_target_logits_close(ours(model, tok, prompt), peft_logits(pm, tok), tok)
    assert load_prompt_tensor(out)[1].method == method  # our softprompt.json rides along


@pytest.mark.parametrize("options", [{"method": "prompt"}, {"method": "ptuning"},
                                     {"method": "residual"}, {"method": "prefix"},
                                     {"method": "prefix", "prefix_projection": True}],
                         ids=["prompt", "ptuning", "residual", "prefix", "prefix-projection"])
def test_every_trained_method_exports_with_peft_parity(tiny_dirs, tmp_path, samples, options):
    """Trained here by each method (two steps), saved, exported: PEFT gives our logits, and
    importing the export gives back the saved tensor."""
    model, tok = load_model(str(tiny_dirs["gpt2"]))
    out = tmp_path / "ours"
    result = api.train("translation", samples / "translation" / "train.jsonl", out,
                       model=str(tiny_dirs["gpt2"]), loaded=(model, tok), epochs=1,
                       batch_size=4, max_train_examples=8, num_virtual_tokens=P,
                       precision="fp32", progress=False, **options)
    saved, meta = load_prompt_tensor(out)
    assert meta.method == options["method"] and meta.metrics["steps"] == 2
    peft_dir = interop.export_peft(out, tmp_path / "peft")
    pm = _peft_load(tiny_dirs["gpt2"], peft_dir)
    assert_target_logits_close(ours(model, tok, saved), peft_logits(pm, tok), tok)
    interop.import_peft(peft_dir, tmp_path / "back")
    back, back_meta = load_prompt_tensor(tmp_path / "back")
    assert back_meta.method == meta.method
    a, b = ((x.kv if isinstance(x, KVPrefix) else x) for x in (back, result.prompt))
    assert torch.equal(a, b)


def test_exported_prefix_gives_our_logits_in_peft(tiny, tmp_path):
    # Llama: grouped-query attention (2 key/value heads for 4 query heads) and a BOS that
    # follows the prefix in both layouts.
    model, tok, model_dir = tiny
    prefix = _random_prefix(model)
    out = interop.export_peft(_prompt_dir(tmp_path / "ours", model_dir, prefix),
                              tmp_path / "peft")
    config = json.loads((out / interop.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    pm = _peft_load(model_dir, out)
    assert_target_logits_close(ours(model, tok, prefix), peft_logits(pm, tok), tok)


def test_peft_prefix_adapter_gives_peft_s_logits_here(tiny, tmp_path):
    model, tok, model_dir = tiny
    base, _ = load_model(str(model_dir))
    saved = _peft_saved(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    expected = peft_logits(_peft_load(model_dir, saved), tok)
    direct, meta = load_prompt_tensor(saved)  # used in place, as every command does
    assert isinstance(direct, KVPrefix) and meta.method == "prefix"
    assert_target_logits_close(ours(model, tok, direct), expected, tok)
    interop.import_peft(saved, tmp_path / "ours", model=str(model_dir))
    assert (tmp_path / "ours" / PREFIX_FILE).is_file()
    imported, _ = load_prompt_tensor(tmp_path / "ours")
    assert torch.equal(imported.kv, direct.kv)


def test_peft_prefix_with_projection_is_saved_projected(tiny_dirs, tmp_path):
    # PEFT runs its prefix MLP before saving, so the adapter holds the final prefix.
    model, tok = load_model(str(tiny_dirs["llama"]))
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                prefix_projection=True, encoder_hidden_size=16)
    pm = get_peft_model(model, config)
    pm.save_pretrained(str(tmp_path / "peft"))
    expected = peft_logits(_peft_load(tiny_dirs["llama"], tmp_path / "peft"), tok)
    base, _ = load_model(str(tiny_dirs["llama"]))
    prefix, _ = load_prompt_tensor(tmp_path / "peft")
    assert_target_logits_close(ours(base, tok, prefix), expected, tok)


def test_prefix_round_trip_is_exact(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["llama"]))
    prefix = _random_prefix(model)
    interop.export_peft(_prompt_dir(tmp_path / "ours", tiny_dirs["llama"], prefix),
                        tmp_path / "peft")
    interop.import_peft(tmp_path / "peft", tmp_path / "back")
    back, meta = load_prompt_tensor(tmp_path / "back")
    assert torch.equal(back.kv, prefix.kv) and meta.task["name"] == "translation"


def test_prefix_export_refuses_another_model_s_shape(tiny_dirs, tmp_path):
    gpt2, _ = load_model(str(tiny_dirs["gpt2"]))
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["gpt2"], _random_prefix(gpt2))
    with pytest.raises(SoftPromptError, match="does not fit") as err:
        interop.export_peft(src, tmp_path / "peft", model=str(tiny_dirs["llama"]))
    assert "\n" not in str(err.value)


def test_export_of_a_prompt_after_bos_is_refused(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["llama"]))
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["llama"], _random_prompt(model))
    with pytest.raises(SoftPromptError, match="before BOS") as err:
        interop.export_peft(src, tmp_path / "peft")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "peft" / interop.ADAPTER_CONFIG).exists()


def test_export_refuses_to_overwrite_and_a_wrong_model(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["gpt2"], _random_prompt(model))
    interop.export_peft(src, tmp_path / "peft")
    with pytest.raises(SoftPromptError, match="--overwrite"):
        interop.export_peft(src, tmp_path / "peft")
    interop.export_peft(src, tmp_path / "peft", overwrite=True)
    bad = _prompt_dir(tmp_path / "wide", tiny_dirs["gpt2"], torch.zeros(P, 48))
    with pytest.raises(SoftPromptError, match="hidden size 48"):
        interop.export_peft(bad, tmp_path / "peft2")


# --- import and direct use: PEFT -> ours ------------------------------------------------------


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING"])
def test_peft_prompt_tuning_adapter_gives_peft_s_logits_here(tiny, tmp_path, peft_type):
    # P_TUNING saves its encoder's output: [P, H] embeddings used exactly as PROMPT_TUNING's.
    model, tok, model_dir = tiny
    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                 prompt_tuning_init=PromptTuningInit.RANDOM)
              if peft_type == "PROMPT_TUNING"
              else PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                       encoder_hidden_size=16))
    base, _ = load_model(str(model_dir))
    saved = _peft_saved(base, config, tmp_path / "peft")
    expected = peft_logits(_peft_load(model_dir, saved), tok)
    meta = interop.import_peft(saved, tmp_path / "ours", model=str(model_dir))
    prompt, loaded_meta = load_prompt_tensor(tmp_path / "ours")
    assert loaded_meta.model == str(model_dir) and loaded_meta.task["template"] == "{text}"
    if adds_bos(tok):  # Llama: PEFT's [P | BOS | tokens], kept exactly as a KV prefix
        assert getattr(meta, "method", None) == "prefix"
        assert not isinstance(prompt, torch.Tensor)
    else:
        assert torch.equal(prompt, load_prompt_tensor(saved)[0])
    assert_target_logits_close(ours(model, tok, prompt), expected, tok)


def test_peft_adapter_directory_is_a_prompt_directory(tiny_dirs, tmp_path):
    model, tok = load_model(str(tiny_dirs["gpt2"]))
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    saved = _peft_saved(model, config, tmp_path / "peft")
    expected = peft_logits(_peft_load(tiny_dirs["gpt2"], saved), tok)
    pm = api.load_prompt(saved, device="cpu", dtype="float32")  # the Python API, as generate
    assert pm.model_name == str(tiny_dirs["gpt2"])
    assert_target_logits_close(ours(pm.model, tok, pm.prompt), expected, tok)
    assert isinstance(pm.generate("A dog runs.", max_new_tokens=3), str)


def test_peft_prompt_tuning_before_bos_is_refused_until_imported(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["llama"]))
    saved = _peft_saved(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    with pytest.raises(SoftPromptError, match="softprompt import"):
        load_prompt_tensor(saved)


def test_an_adapter_without_base_model_is_refused_in_place_but_imports(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    saved = _peft_saved(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    config = json.loads((saved / interop.ADAPTER_CONFIG).read_text())
    (saved / interop.ADAPTER_CONFIG).write_text(json.dumps(
        {**config, "base_model_name_or_path": None}))
    with pytest.raises(SoftPromptError, match="names no base model.*--model M"):
        load_prompt_tensor(saved)
    meta = interop.import_peft(saved, tmp_path / "ours", model=str(tiny_dirs["gpt2"]))
    assert meta.model == str(tiny_dirs["gpt2"])
    stored, _ = interop.read_adapter(saved, check_layout=False)
    assert torch.equal(load_prompt_tensor(tmp_path / "ours")[0], stored)


def test_export_then_import_round_trips_tensor_and_task(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    prompt = _random_prompt(model)
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["gpt2"], prompt)
    interop.export_peft(src, tmp_path / "peft")
    interop.import_peft(tmp_path / "peft", tmp_path / "back")
    back, meta = load_prompt_tensor(tmp_path / "back")
    assert torch.equal(back, prompt)
    assert meta.task == get_task("translation").to_dict()


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LORA"}, "not a prompt"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "CAUSAL_LM"),
    ({"num_virtual_tokens": 7}, r"says \[7, 32\]"),
    ({"num_transformer_submodules": 2}, "encoder-decoder"),
])
def test_adapters_we_cannot_read_are_refused_in_one_line(tiny_dirs, tmp_path, change, message):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    saved = _peft_saved(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    config = json.loads((saved / interop.ADAPTER_CONFIG).read_text())
    (saved / interop.ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(SoftPromptError, match=message) as err:
        load_prompt_tensor(saved)
    assert "\n" not in str(err.value)


def test_a_pickled_adapter_is_never_loaded(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    saved = _peft_saved(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    (saved / interop.ADAPTER_WEIGHTS).rename(saved / "adapter_model.bin")
    with pytest.raises(SoftPromptError, match="pickle"):
        load_prompt_tensor(saved)


# --- the CLI ----------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_cli_export_and_import(tiny_dirs, tmp_path, capsys):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    prompt = _random_prompt(model)
    src = _prompt_dir(tmp_path / "ours", tiny_dirs["gpt2"], prompt)
    assert _cli(["export", str(src), "--format", "peft", "--output", str(tmp_path / "a")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    assert _cli(["import", str(tmp_path / "a"), "--output", str(tmp_path / "b"),
                 "--task", "qa"]) == 0
    back, meta = load_prompt_tensor(tmp_path / "b")
    assert torch.equal(back, prompt) and meta.task["name"] == "qa"
    assert (tmp_path / "b" / PROMPT_FILE).is_file()
    assert _cli(["import", str(tmp_path / "a"), "--output", str(tmp_path / "b")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_server_registry_and_pool_take_adapter_directories(tiny_dirs, tmp_path):
    from softprompt.serving.registry import candidates, load_served

    model, tok = load_model(str(tiny_dirs["llama"]))
    root = tmp_path / "prompts"
    _peft_saved(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                root / "peft-prefix")
    interop.export_peft(_prompt_dir(tmp_path / "ours", tiny_dirs["llama"], _random_prefix(model)),
                        root / "exported")
    assert candidates(root) == ["exported", "peft-prefix"]
    served = load_served(root, "peft-prefix")
    assert isinstance(served.tensor, KVPrefix) and served.task.template == "{text}"
    pool = api.load_prompts({"a": root / "peft-prefix", "b": root / "exported"},
                            model=str(tiny_dirs["llama"]), device="cpu", dtype="float32")
    batched = pool.generate(["A dog runs.", {"source": "Two cats."}], prompts=["a", "b"],
                            max_new_tokens=4)
    alone = api.load_prompt(root / "peft-prefix", device="cpu", dtype="float32").generate(
        "A dog runs.", max_new_tokens=4)
    assert batched[0] == alone


@pytest.mark.slow
def test_bundled_model_round_trips_with_peft_logits(tmp_path):
    # SmolLM2-135M: no BOS (a [P, H] prompt exports), grouped-query attention (3 of 9 heads).
    from softprompt.inputs import tokens_kv

    model, tok = load_model("smollm2-135m")
    ids = tok("Translate the following sentence into German", add_special_tokens=False).input_ids
    prompt = model.get_input_embeddings().weight[ids[:P]].detach().clone()
    with torch.no_grad():
        prefix = tokens_kv(model, ids[:P])
    for kind, value in (("prompt", prompt), ("prefix", prefix)):
        meta = PromptMeta(model="smollm2-135m", task=get_task("translation").to_dict(),
                          num_virtual_tokens=P, hidden_size=model.config.hidden_size)
        if kind == "prefix":
            meta.method = "prefix"
            meta.num_layers, _, meta.num_key_value_heads, _, meta.head_dim = value.kv.shape
        save_prompt(tmp_path / kind, value, meta)
        out = interop.export_peft(tmp_path / kind, tmp_path / f"{kind}-peft")
        pm = PeftModel.from_pretrained(model, str(out)).eval()
        assert_target_logits_close(ours(model, tok, value), peft_logits(pm, tok), tok)
        model = pm.get_base_model()
        back, _ = load_prompt_tensor(out)  # the adapter in place of our directory
        assert torch.equal(back.kv if kind == "prefix" else back,
                           value.kv if kind == "prefix" else value)
    saved = _peft_saved(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft-saved")
    base = PeftModel.from_pretrained(model, str(saved)).eval()
    expected = peft_logits(base, tok)
    interop.import_peft(saved, tmp_path / "imported", model="smollm2-135m")
    imported, _ = load_prompt_tensor(tmp_path / "imported")
    assert_target_logits_close(ours(base.get_base_model(), tok, imported), expected, tok)


def test_cli_generate_and_evaluate_take_an_adapter(tiny_dirs, tmp_path, samples, capsys):
    model, _ = load_model(str(tiny_dirs["llama"]))
    saved = _peft_saved(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                        tmp_path / "peft")
    assert _cli(["generate", "--prompt", str(saved), "--input", "A dog runs.",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    said = capsys.readouterr().out.strip()
    assert said == api.load_prompt(saved, device="cpu", dtype="float32").generate(
        "A dog runs.", max_new_tokens=3)
    assert _cli(["evaluate", "--prompt", str(saved), "--task", "translation", "--test",
                 str(samples / "translation" / "test.jsonl"), "--limit", "2",
                 "--max-new-tokens", "3", "--output", str(tmp_path / "eval"), "--quiet",
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["system"] == "soft prompt"
