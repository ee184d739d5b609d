"""The bundled SmolLM2-135M end to end, and the crash-safe writes its conversion cache uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from softprompt import atomic, models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.generation import cut_at_stop, generate, generate_reference
from softprompt.prompt import init_prompt, load_prompt_tensor
from softprompt.tasks import get_task, make_example, render_input
from softprompt.training import train

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"


@pytest.mark.slow
def test_bundled_smollm2_trains_and_generates(tmp_path):
    # The first run converts the GGUF into $SOFTPROMPT_CACHE (tens of seconds), later runs
    # load the cached safetensors.
    model, tok = models.load_model("smollm2-135m")
    assert models.bundled_model_dir().joinpath("config.json").is_file()
    assert all(not p.requires_grad for p in model.parameters())
    task = get_task("translation")
    records = read_records(SAMPLES / "translation" / "train.jsonl", limit=4)
    init_ids = tok(task.instruction, add_special_tokens=False).input_ids
    initial = init_prompt(model.get_input_embeddings().weight, 4, "text", init_ids).embeddings
    result = train(model, tok, task, records, tmp_path / "out",
                   prompt_config=PromptConfig(num_virtual_tokens=4),
                   train_config=TrainConfig(epochs=1, batch_size=2, max_length=96,
                                            warmup_steps=0),
                   model_name="smollm2-135m", progress=False)
    steps = [r for r in result.log if r["event"] == "step"]
    assert len(steps) == 2 and all(0 < s["loss"] < 20 for s in steps)
    assert result.prompt.shape == (4, model.config.hidden_size)
    assert not torch.allclose(result.prompt, initial.detach())
    saved, meta = load_prompt_tensor(tmp_path / "out")
    assert torch.equal(saved, result.prompt) and meta.model == "smollm2-135m"

    text = render_input(task, make_example(task, {"source": "The cat sleeps.", "target": "-"}))
    (out,) = generate(model, tok, [text], result.prompt, GenerationConfig(max_new_tokens=5),
                      stop=task.stop)
    # The cached, batched decoding gives the uncached reference's greedy tokens.
    ref = generate_reference(model, tok, text, result.prompt, 5)
    assert out == cut_at_stop(tok.decode(ref, skip_special_tokens=True), task.stop)[0]
    assert out and len(ref) == 5  # five real tokens, no early EOS
    assert len(tok(out, add_special_tokens=False).input_ids) <= 5


# --- the conversion cache is written atomically -----------------------------------------------


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_staged_dir_renames_into_place_on_success(tmp_path):
    final = tmp_path / "cache" / "model"
    with atomic.staged_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".model.")
        assert not final.exists()  # nothing visible until the block succeeds
        (tmp / "config.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(b"\x00" * 10)
    assert _entries(final) == ["config.json", "weights.bin"]
    assert _entries(final.parent) == ["model"]  # no temporary directory left


def test_staged_dir_leaves_nothing_when_the_block_fails(tmp_path):
    final = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError, match="conversion failed"):
        with atomic.staged_dir(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("conversion failed")
    assert not final.exists()
    assert _entries(final.parent) == []


def test_staged_dir_keeps_a_target_that_appeared_meanwhile(tmp_path):
    final = tmp_path / "model"
    with atomic.staged_dir(final) as tmp:
        (tmp / "mine").write_text("staged")
        final.mkdir()  # another process finished the same conversion first
        (final / "theirs").write_text("done")
    assert _entries(final) == ["theirs"]
    assert _entries(tmp_path) == ["model"]


def test_write_bytes_replaces_atomically_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic.write_bytes(path, b"old")
    atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert _entries(path.parent) == ["f.bin"]
    with pytest.raises(TypeError):
        atomic.write_bytes(path, "not bytes")  # fails half way: after the temp file exists
    assert path.read_bytes() == b"new"
    assert _entries(path.parent) == ["f.bin"]
    atomic.write_json(tmp_path / "x.json", {"ü": [1]})
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == '{\n  "ü": [\n    1\n  ]\n}\n'


class _Loader:
    """Stands in for the GGUF loader (which takes tens of seconds) with a tiny saved model;
    ``fail`` makes saving the converted model crash half way."""

    def __init__(self, real, source: Path, fail: bool = False):
        self.real, self.source, self.fail, self.calls = real, source, fail, 0

    def from_pretrained(self, path, gguf_file=None, **kwargs):
        assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.calls += 1
        obj = self.real.from_pretrained(self.source, **kwargs)
        if self.fail and hasattr(obj, "save_pretrained"):
            original = obj.save_pretrained

            def save_then_crash(directory, **kw):
                original(directory, **kw)
                raise OSError("disk full")

            obj.save_pretrained = save_then_crash
        return obj


@pytest.mark.parametrize("fail", [False, True])
def test_bundled_conversion_is_atomic(tiny_dirs, tmp_path, monkeypatch, fail):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    source = tiny_dirs["llama"]
    model_loader = _Loader(AutoModelForCausalLM, source, fail)
    monkeypatch.setattr(models, "AutoModelForCausalLM", model_loader)
    monkeypatch.setattr(models, "AutoTokenizer", _Loader(AutoTokenizer, source))
    cache = tmp_path / "cache" / "models"
    if fail:
        with pytest.raises(OSError, match="disk full"):
            models.bundled_model_dir()
        assert _entries(cache) == []  # neither a half-written model nor a temporary dir
        return
    target = models.bundled_model_dir()
    assert target == cache / "smollm2-135m"
    assert _entries(cache) == ["smollm2-135m"]
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert models.bundled_model_dir() == target and model_loader.calls == 1  # converted once
    monkeypatch.undo()
    model, _ = models.load_model(str(target))
    original, _ = models.load_model(str(source))
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_bundled_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert models.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "softprompt"


def test_unknown_hub_id_without_a_hub_is_one_clear_error(monkeypatch):
    """No hub reachable (its address points at a closed port on loopback): no minute of
    retries, one line that says how to use a local directory."""
    import time

    from softprompt.errors import SoftPromptError
    from softprompt.models import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1")
    start = time.monotonic()
    with pytest.raises(SoftPromptError, match=r"not reachable.*--model \./models/"):
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 20
