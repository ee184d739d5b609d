"""inspect: nearest vocabulary tokens, norm percentiles, similarity and prefix-norm plots, for
our prompt directories and PEFT adapters, from Python and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

import softprompt
from softprompt.cli import main
from softprompt.errors import SoftPromptError
from softprompt.inspection import PromptInspection, inspect_prompt
from softprompt.models import load_model
from softprompt.prefix import KVPrefix, kv_shape
from softprompt.prompt import PromptMeta, save_prompt
from softprompt.tasks import get_task

PNG = b"\x89PNG\r\n\x1a\n"


def _save(path, model_dir, prompt) -> None:
    meta = PromptMeta(model=str(model_dir), task=get_task("translation").to_dict(),
                      num_virtual_tokens=0, hidden_size=0)
    if isinstance(prompt, KVPrefix):
        meta.method = "prefix"
        meta.num_layers, _, meta.num_key_value_heads, meta.num_virtual_tokens, meta.head_dim = (
            prompt.kv.shape)
        meta.hidden_size = 32
    else:
        meta.num_virtual_tokens, meta.hidden_size = prompt.shape
    save_prompt(path, prompt, meta)


def test_nearest_tokens_find_the_tokens_a_prompt_was_made_of(tiny, tmp_path):
    model, tok, model_dir = tiny
    table = model.get_input_embeddings().weight.detach()
    ids = tok(" German", add_special_tokens=False).input_ids + [7, 42]
    prompt = table[ids].clone()
    prompt[-1] *= 3.0  # same direction, larger norm: still its own nearest token
    _save(tmp_path / "p", model_dir, prompt)
    result = inspect_prompt(tmp_path / "p", top_k=3)
    assert isinstance(result, PromptInspection) and result.method == "prompt"
    assert [t.nearest[0].token_id for t in result.tokens] == ids
    assert all(abs(t.nearest[0].cosine - 1) < 1e-4 for t in result.tokens)
    assert all(len(t.nearest) == 3 for t in result.tokens)
    assert result.tokens[0].nearest[0].token == tok.decode([ids[0]])
    norms = table.norm(dim=-1)
    for t, row in zip(result.tokens, prompt):
        expected = float((norms < row.norm()).float().mean() * 100)
        assert t.norm_percentile == pytest.approx(expected, abs=0.1)
    assert result.tokens[-1].norm_percentile > 90  # 3x a table row's norm
    sim = torch.tensor(result.similarity)
    assert sim.shape == (len(ids), len(ids))
    assert torch.allclose(sim.diagonal(), torch.ones(len(ids)), atol=1e-4)
    assert "nearest tokens" in result.format()


def test_prefix_norms_per_layer_and_plot(tiny_dirs, tmp_path):
    model, _ = load_model(str(tiny_dirs["llama"]))
    layers, heads, head_dim = kv_shape(model.config)
    kv = torch.ones(layers, 2, heads, 4, head_dim)
    kv[1, 1] *= 3.0  # layer 1's values: norm 3x
    _save(tmp_path / "p", tiny_dirs["llama"], KVPrefix(kv))
    result = inspect_prompt(tmp_path / "p", plot=tmp_path / "plot.png")
    full = (heads * head_dim) ** 0.5
    assert result.method == "prefix" and result.tokens == []
    assert result.key_norms == [[pytest.approx(full)] * 4] * layers
    assert result.value_norms[1] == [pytest.approx(3 * full)] * 4
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG)
    assert "layer" in result.format()


def test_works_on_peft_adapters(tiny_dirs, tmp_path):
    # A PROMPT_TUNING adapter of a BOS model is shown as stored (no layout question here).
    for config in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)):
        model, _ = load_model(str(tiny_dirs["llama"]))
        out = tmp_path / config.peft_type.value
        get_peft_model(model, config).save_pretrained(str(out))
        result = inspect_prompt(out, top_k=2)
        assert result.num_virtual_tokens == 4
        assert result.method == ("prefix" if config.peft_type.value == "PREFIX_TUNING"
                                 else "prompt")


def test_cli_prints_table_json_and_plot(tiny_dirs, tmp_path, capsys):
    model, _ = load_model(str(tiny_dirs["gpt2"]))
    _save(tmp_path / "p", tiny_dirs["gpt2"], model.get_input_embeddings().weight[:6].detach())
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(tmp_path / "p"), "--top-k", "2", "--json",
              "--plot", str(tmp_path / "sim.png")])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tokens"]) == 6 and len(data["tokens"][0]["nearest"]) == 2
    assert data["plot"] == str(tmp_path / "sim.png")
    assert (tmp_path / "sim.png").read_bytes().startswith(PNG)
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "p")])
    assert "nearest tokens (cosine)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(tmp_path / "p"), "--plot", str(tmp_path / "x.jpg")])
    assert exit_.value.code == 2 and ".png" in capsys.readouterr().err


def test_python_api_is_exported_and_checks_top_k(tmp_path):
    assert softprompt.inspect_prompt is inspect_prompt
    with pytest.raises(SoftPromptError, match="--top-k"):
        inspect_prompt(tmp_path, top_k=0)
