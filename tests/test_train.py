"""Training on the tiny real models: the base model never changes, the prompt learns, and the
optimisation is the same however it is split (accumulation, checkpointing, bf16 autocast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt import api, checkpoint
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.encode import encode_dataset, encode_example
from softprompt.errors import SoftPromptError
from softprompt.generation import cut_at_stop, generate, generate_reference
from softprompt.inputs import plain_head
from softprompt.prompt import CONFIG_FILE, PROMPT_FILE, init_prompt, load_prompt_tensor
from softprompt.tasks import Task, get_task, make_example, render_input
from softprompt.training import LOG_FILE, train

TRANSLATION = get_task("translation")
YES = Task("custom", "{source}\nOut:", "target")  # the target is always "yes yes"


SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"


@pytest.fixture(scope="module")
def records():
    return read_records(SAMPLES / "translation" / "train.jsonl", limit=16)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 1, "batch_size": 4, "lr": 0.03, "warmup_steps": 0}
    return TrainConfig(**{**base, **kw})


def _pcfg(**kw) -> PromptConfig:
    return PromptConfig(**{"num_virtual_tokens": 4, "init": "random", **kw})


def _responsive(model) -> None:
    """Scale every weight matrix by 10. A freshly initialised model (std 0.02) predicts an
    almost uniform distribution whatever its input, so no prompt can move its loss much; with
    larger weights the prompt has real influence and there is something to learn."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)


def _yes(records) -> list[dict]:
    return [{"source": r["source"], "target": "yes yes"} for r in records]


def _epochs(log) -> list[dict]:
    return [r for r in log if r["event"] == "epoch"]


def _steps(log) -> list[dict]:
    return [r for r in log if r["event"] == "step"]


# --- the frozen model -------------------------------------------------------------------------


def test_base_model_is_bit_for_bit_unchanged_and_prompt_changes(tiny, records, tmp_path):
    model, tok, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initial = init_prompt(model.get_input_embeddings().weight, 4, "random", seed=0).embeddings
    result = train(model, tok, TRANSLATION, records[:8], tmp_path / "out",
                   prompt_config=_pcfg(), train_config=_cfg(epochs=2), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"
    for name, p in model.named_parameters():
        assert not p.requires_grad, f"{name} requires grad"
        assert p.grad is None, f"{name} got a gradient"
    assert not model.training
    assert len(_steps(result.log)) == 4
    assert result.prompt.shape == initial.shape and result.prompt.dtype == torch.float32
    assert not torch.allclose(result.prompt, initial.detach(), atol=1e-3)
    assert all(0 < s["loss"] < 20 and s["grad_norm"] > 0 for s in _steps(result.log))


def test_loss_goes_down_on_a_learnable_pattern(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    data = _yes(records[:8])
    result = train(model, tok, YES, data, tmp_path / "out", validation_records=data,
                   prompt_config=_pcfg(), progress=False,
                   train_config=_cfg(epochs=5, batch_size=8, lr=0.3, patience=5))
    epochs = _epochs(result.log)
    train_losses = [e["train_loss"] for e in epochs]
    val_losses = [e["val_loss"] for e in epochs]
    assert len(epochs) == 5
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    assert val_losses[-1] < val_losses[0] - 0.3, val_losses
    assert all(b < a for a, b in zip(val_losses, val_losses[1:])), val_losses
    assert result.meta.metrics["best_epoch"] == 5


# --- the same optimisation however it is split ------------------------------------------------


def test_gradient_accumulation_gives_the_same_prompt(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)  # gradients large enough that a wrong normalisation would show
    runs = []
    for i, (batch, accum) in enumerate([(4, 1), (2, 2), (1, 4)]):
        runs.append(train(model, tok, TRANSLATION, records[:8], tmp_path / str(i),
                          prompt_config=_pcfg(), progress=False,
                          train_config=_cfg(epochs=2, batch_size=batch,
                                            gradient_accumulation_steps=accum)))
    reference = runs[0]
    for other in runs[1:]:
        torch.testing.assert_close(other.prompt, reference.prompt, atol=1e-5, rtol=0)
        for a, b in zip(_steps(reference.log), _steps(other.log)):
            assert (a["target_tokens"], a["tokens"]) == (b["target_tokens"], b["tokens"])
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_prompt(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    calls = []
    attention.register_forward_hook(lambda *_: calls.append(1))
    runs, counts = [], []
    # Checkpointing first, on a fresh model: the once-per-model logits probe (plain_head, two
    # forwards) runs inside the trainer's layer modes and must not switch checkpointing off.
    for checkpointing in (True, False):
        calls.clear()
        runs.append(train(model, tok, TRANSLATION, records[:8], tmp_path / str(checkpointing),
                          prompt_config=_pcfg(), progress=False,
                          train_config=_cfg(epochs=1, gradient_checkpointing=checkpointing)))
        counts.append(len(calls))
    # 2 steps: with checkpointing every layer's forward is recomputed in the backward pass
    # (2 x 2 calls, after the probe's 2); without, 2 calls.
    assert counts == [2 + 4, 2]
    assert plain_head(model)
    torch.testing.assert_close(runs[1].prompt, runs[0].prompt, atol=1e-6, rtol=0)
    for a, b in zip(_steps(runs[0].log), _steps(runs[1].log)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_compiled_layers_give_the_same_prompt_and_are_undone(tiny, records, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, tok, _ = tiny
    _responsive(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    compiled_during = []
    layers[0].register_forward_pre_hook(
        lambda mod, args: compiled_during.append(mod._compiled_call_impl is not None))
    from torch._dynamo.utils import counters

    runs, graphs = [], []
    for compile_ in (False, True):
        graphs.append(counters["stats"]["unique_graphs"])
        runs.append(train(model, tok, TRANSLATION, records[:8], tmp_path / str(compile_),
                          validation_records=records[8:12], prompt_config=_pcfg(), progress=False,
                          train_config=_cfg(epochs=1, compile=compile_)))
    # The compiled run really compiled graphs and ran compiled layers, and left the caller's
    # model eager again.
    assert counters["stats"]["unique_graphs"] > graphs[1] == graphs[0]
    assert compiled_during and not any(compiled_during[:len(compiled_during) // 2])
    assert compiled_during[-1] and all(m._compiled_call_impl is None for m in layers)
    torch.testing.assert_close(runs[1].prompt, runs[0].prompt, atol=1e-5, rtol=0)
    for a, b in zip(_steps(runs[0].log), _steps(runs[1].log)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_layer_modes_are_undone_when_training_fails(tiny):
    from softprompt.models import decoder_layers
    from softprompt.training import layer_modes

    model, _, _ = tiny
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError, match="stopped"):
        with layer_modes(model, checkpointing=True, compile=True):
            assert model.is_activation_checkpointing and all(m.training for m in layers)
            assert all(m._compiled_call_impl is not None for m in layers)
            raise RuntimeError("stopped")
    assert not model.is_activation_checkpointing and not any(m.training for m in layers)
    assert all(m._compiled_call_impl is None for m in layers) and not model.training


def test_compile_refuses_checkpointing_and_sharding():
    for other in ("gradient_checkpointing", "shard_model"):
        with pytest.raises(SoftPromptError, match="cannot be combined"):
            TrainConfig(compile=True, **{other: True})


def test_bf16_autocast_loss_is_close_to_float32(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    losses = []
    for bf16 in (False, True):
        result = train(model, tok, TRANSLATION, records[:4], tmp_path / str(bf16),
                       prompt_config=_pcfg(), train_config=_cfg(bf16=bf16), progress=False)
        losses.append(_steps(result.log)[0]["loss"])  # the loss before any update
        assert result.prompt.dtype == torch.float32
    fp32, bf16 = losses
    assert bf16 != fp32  # autocast really ran the model in bfloat16
    assert bf16 == pytest.approx(fp32, rel=1e-2)


# --- what is saved ----------------------------------------------------------------------------


def test_output_directory_contents(tiny, records, tmp_path):
    model, tok, model_dir = tiny
    out = tmp_path / "out"
    result = train(model, tok, TRANSLATION, records[:8], out, validation_records=records[8:12],
                   prompt_config=_pcfg(), train_config=_cfg(epochs=2), model_name=str(model_dir),
                   progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["checkpoint-2", "checkpoint-4", CONFIG_FILE, LOG_FILE, PROMPT_FILE])
    meta = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    assert {"model", "task", "num_virtual_tokens", "init", "train_args", "metrics",
            "versions"} <= set(meta)
    assert meta["model"] == str(model_dir)
    assert meta["task"] == TRANSLATION.to_dict()
    assert meta["num_virtual_tokens"] == 4 and meta["hidden_size"] == 32
    assert meta["init"] == "random"
    assert meta["train_args"]["lr"] == 0.03 and meta["train_args"]["epochs"] == 2
    assert meta["train_args"]["num_virtual_tokens"] == 4
    assert meta["metrics"]["epochs_run"] == 2 and meta["metrics"]["steps"] == 4
    assert "val_loss" in meta["metrics"] and "train_loss" in meta["metrics"]
    assert {"torch", "transformers", "softprompt"} <= set(meta["versions"])

    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert log == result.log
    steps, epochs = _steps(log), _epochs(log)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [s["epoch"] for s in steps] == [1, 1, 2, 2]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 2), (2, 4)]
    assert all({"loss", "lr", "grad_norm", "tokens", "target_tokens"} <= set(s) for s in steps)
    assert all({"train_loss", "val_loss"} <= set(e) for e in epochs)

    tensor, _ = load_prompt_tensor(out)
    assert torch.equal(tensor, result.prompt)
    ckpt = checkpoint.latest(out)
    assert ckpt.step == 4 and ckpt.state["log"] == log


def test_saved_prompt_generates_exactly_like_the_in_memory_one(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    result = train(model, tok, TRANSLATION, records[:8], tmp_path / "out",
                   prompt_config=_pcfg(), train_config=_cfg(epochs=2, lr=0.3), progress=False)
    pm = api.load_prompt(tmp_path / "out", loaded=(model, tok))
    assert torch.equal(pm.prompt, result.prompt)
    assert pm.task == TRANSLATION
    sources = [r["source"] for r in records[8:12]]
    texts = [render_input(TRANSLATION, make_example(TRANSLATION, r)) for r in records[8:12]]
    cfg = GenerationConfig(max_new_tokens=8)
    in_memory = generate(model, tok, texts, result.prompt, cfg, stop=TRANSLATION.stop)
    assert pm.generate(sources, max_new_tokens=8) == in_memory
    assert pm.generate([dict(r) for r in records[8:12]], max_new_tokens=8) == in_memory
    # And both are what greedy decoding without any cache gives, cut at the task's stop string.
    reference = [cut_at_stop(tok.decode(generate_reference(model, tok, text, result.prompt, 8),
                                        skip_special_tokens=True), TRANSLATION.stop)[0]
                 for text in texts]
    assert in_memory == reference and all(in_memory)


def test_early_stopping_saves_the_best_prompt(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    # Learning "yes yes" makes the unrelated validation target less likely after an epoch or
    # two (checked for both tiny models; the run is deterministic).
    val = [{"source": r["source"], "target": "German"} for r in records[8:12]]
    out = tmp_path / "out"
    result = train(model, tok, YES, _yes(records[:8]), out, validation_records=val,
                   prompt_config=_pcfg(), progress=False,
                   train_config=_cfg(epochs=8, lr=1.0, patience=1))
    val_losses = [e["val_loss"] for e in _epochs(result.log)]
    best_epoch = val_losses.index(min(val_losses)) + 1
    metrics = result.meta.metrics
    assert metrics["best_epoch"] == best_epoch
    assert metrics["val_loss"] == pytest.approx(min(val_losses))
    # Stopped after `patience` epochs without improvement, well before the 8 epochs.
    assert metrics["epochs_run"] == len(val_losses) == best_epoch + 1 < 8
    assert val_losses[-1] > min(val_losses) + 1e-3

    saved, _ = load_prompt_tensor(out)
    assert torch.equal(saved, result.prompt)
    best_ckpt = checkpoint.load(out / f"checkpoint-{metrics['best_step']}")
    last_ckpt = checkpoint.latest(out)
    assert last_ckpt.step > best_ckpt.step
    assert torch.equal(saved, best_ckpt.tensors["param.embeddings"])
    assert torch.equal(saved, last_ckpt.tensors["best_prompt"])
    assert not torch.allclose(saved, last_ckpt.tensors["param.embeddings"])  # not the last prompt


def test_patience_is_the_number_of_epochs_without_improvement(tiny, records, tmp_path):
    model, tok, _ = tiny
    # A learning rate far below float32 resolution: the prompt and the validation loss stay
    # exactly the same, so every epoch after the first is a bad one.
    result = train(model, tok, TRANSLATION, records[:4], tmp_path / "out",
                   validation_records=records[4:6], prompt_config=_pcfg(), progress=False,
                   train_config=_cfg(epochs=5, lr=1e-30, patience=0))
    assert result.meta.metrics["epochs_run"] == 2 and result.meta.metrics["best_epoch"] == 1
    result = train(model, tok, TRANSLATION, records[:4], tmp_path / "out2",
                   validation_records=records[4:6], prompt_config=_pcfg(), progress=False,
                   train_config=_cfg(epochs=5, lr=1e-30, patience=2))
    assert result.meta.metrics["epochs_run"] == 3


def test_refuses_an_output_dir_holding_a_prompt_unless_overwrite(tiny, records, tmp_path):
    model, tok, _ = tiny
    out = tmp_path / "out"
    first = train(model, tok, TRANSLATION, records[:8], out, prompt_config=_pcfg(),
                  train_config=_cfg(), progress=False)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SoftPromptError, match="already holds a prompt; pass --overwrite"):
        train(model, tok, TRANSLATION, records[:8], out, prompt_config=_pcfg(),
              train_config=_cfg(seed=1), progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot

    second = train(model, tok, TRANSLATION, records[:4], out, prompt_config=_pcfg(),
                   train_config=_cfg(seed=1), progress=False, overwrite=True)
    assert not torch.equal(first.prompt, second.prompt)
    saved, meta = load_prompt_tensor(out)
    assert torch.equal(saved, second.prompt) and meta.train_args["seed"] == 1
    # The old run's checkpoints are gone; only the new one's remain.
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [1]


def test_refuses_an_output_path_that_is_a_file(tiny, records, tmp_path):
    model, tok, _ = tiny
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(SoftPromptError, match="is a file"):
        train(model, tok, TRANSLATION, records[:4], path, train_config=_cfg(), progress=False)
    assert path.read_text() == "keep me"


# --- fitting examples into --max-length -------------------------------------------------------


def test_long_source_is_truncated_and_the_target_kept(tiny):
    _, tok, _ = tiny
    target = "Der Hund schläft."
    record = {"source": " ".join(["The big brown dog sleeps under the table."] * 60),
              "target": target}
    example = make_example(TRANSLATION, record)
    full = encode_example(TRANSLATION, example, tok)
    assert len(full.input_ids) > 300 and not full.truncated
    enc = encode_example(TRANSLATION, example, tok, num_virtual_tokens=4, max_length=48)
    assert enc.truncated
    assert len(enc.input_ids) + len(enc.target_ids) + 4 <= 48
    assert enc.target_ids == tok(" " + target, add_special_tokens=False).input_ids + [
        tok.eos_token_id]
    text = tok.decode(enc.input_ids, skip_special_tokens=True)
    assert text.startswith("English: The big brown dog") and text.endswith("\nGerman:")
    assert enc.input_ids[:1] == full.input_ids[:1]  # BOS (llama) survives the cut
    ids, labels = enc.ids_and_labels()
    assert [t for t in labels if t != -100] == enc.target_ids and len(ids) == len(labels)


def test_too_long_target_is_skipped_with_a_message(tiny, records, tmp_path, capsys):
    model, tok, _ = tiny
    long_source = {"source": " ".join(["The big brown dog sleeps."] * 60), "target": "Hund."}
    long_target = {"source": "Hi.", "target": " ".join(["Der Hund schläft."] * 40)}
    data = [{"source": "It rains.", "target": "Es regnet."}, long_source, long_target]
    result = train(model, tok, TRANSLATION, data, tmp_path / "out", prompt_config=_pcfg(),
                   train_config=_cfg(max_length=48), progress=False)
    err = capsys.readouterr().err
    assert ("training: 1 of 3 examples had their source truncated to fit --max-length 48; "
            "1 skipped (target too long)") in err
    step = _steps(result.log)[0]
    assert step["tokens"] <= 2 * (48 - 4)  # two rows kept, each within the budget
    encoded = encode_dataset(TRANSLATION, data, tok, 4, 48, "training")
    assert (len(encoded.rows), encoded.truncated, encoded.skipped) == (2, 1, 1)


def test_nothing_fits_is_an_error_before_anything_is_written(tiny, tmp_path):
    model, tok, _ = tiny
    data = [{"source": "Hi.", "target": " ".join(["Der Hund schläft."] * 40)}]
    with pytest.raises(SoftPromptError, match="no training example fits in --max-length 48"):
        train(model, tok, TRANSLATION, data, tmp_path / "out", prompt_config=_pcfg(),
              train_config=_cfg(max_length=48), progress=False)
    assert not (tmp_path / "out").exists()


def test_task_without_truncate_field_skips_long_inputs_with_a_message(tiny, records, tmp_path,
                                                                        capsys):
    model, tok, _ = tiny
    data = [{"source": "It rains.", "target": "x"},
            {"source": " ".join(["The big brown dog."] * 60), "target": "x"}]
    train(model, tok, YES, data, tmp_path / "out", prompt_config=_pcfg(),
          train_config=_cfg(max_length=48), progress=False)
    err = capsys.readouterr().err
    assert "0 of 2 examples had their input truncated" in err
    assert "1 skipped (too long; the task cuts no field)" in err
