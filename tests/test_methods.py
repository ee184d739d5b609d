"""The training methods (softprompt/methods/) on both tiny models: each trains and lowers the
loss, exports what it computes, saves what it trained, resumes bit for bit and starts from an
earlier run with --init-from; and the training that selects for quality (--eval-steps,
--metric-for-best, --lr-scheduler cosine)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from softprompt import checkpoint, methods
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.encode import adds_bos, encode_dataset
from softprompt.errors import SoftPromptError
from softprompt.evaluation import SOFT, System, evaluate
from softprompt.generation import generate
from softprompt.inputs import rows_loss, tokens_kv
from softprompt.prefix import KVPrefix
from softprompt.prompt import init_prompt, load_prompt_tensor
from softprompt.tasks import Task, make_example, render_input
from softprompt.training import LOG_FILE, train

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
YES = Task("custom", "{source}\nOut:", "target", instruction="Answer yes", max_new_tokens=4,
           stop="\n")

# (method options, learning rate on the tiny models)
VARIANTS = {
    "prompt": ({"method": "prompt"}, 0.3),
    "ptuning": ({"method": "ptuning"}, 0.01),
    "ptuning-lstm": ({"method": "ptuning", "encoder": "lstm", "encoder_hidden_size": 16}, 0.01),
    "residual": ({"method": "residual", "encoder_hidden_size": 8}, 0.3),
    "prefix": ({"method": "prefix"}, 0.1),
    "prefix-zero": ({"method": "prefix", "prefix_init": "zero"}, 0.1),
    "prefix-projection": ({"method": "prefix", "prefix_projection": True,
                           "encoder_hidden_size": 16}, 0.01),
}


@pytest.fixture(scope="module")
def records():
    return read_records(SAMPLES / "translation" / "train.jsonl", limit=16)


def _yes(records) -> list[dict]:
    return [{"source": r["source"], "target": "yes yes"} for r in records]


def _responsive(model) -> None:
    """Scale the weight matrices by 10: a fresh tiny model barely reacts to its input."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)


def _pcfg(variant: str, **kw) -> PromptConfig:
    return PromptConfig(**{"num_virtual_tokens": 4, **VARIANTS[variant][0], **kw})


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "warmup_steps": 0, **kw})


def _same(a, b) -> bool:
    """Bit-identical PromptLikes."""
    if isinstance(a, KVPrefix) or isinstance(b, KVPrefix):
        return isinstance(a, KVPrefix) and isinstance(b, KVPrefix) and torch.equal(a.kv, b.kv)
    return torch.equal(a, b)


def _timeless(log) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in log]


# --- every method trains ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_lowers_the_loss_and_leaves_the_model_alone(tiny, records, tmp_path,
                                                                variant):
    model, tok, _ = tiny
    _responsive(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _yes(records[:8])
    result = train(model, tok, YES, data, tmp_path / "out", validation_records=data,
                   prompt_config=_pcfg(variant), progress=False,
                   train_config=_cfg(epochs=4, batch_size=8, lr=VARIANTS[variant][1],
                                     patience=4))
    losses = [e["train_loss"] for e in result.log if e["event"] == "epoch"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    assert isinstance(result.prompt, KVPrefix) == variant.startswith("prefix")
    meta = json.loads((tmp_path / "out" / "softprompt.json").read_text(encoding="utf-8"))
    assert meta["method"] == VARIANTS[variant][0]["method"]
    assert meta["train_args"]["method"] == meta["method"]
    for option, value in VARIANTS[variant][0].items():
        assert meta["train_args"][option] == value


def test_api_takes_the_method_and_its_options(tiny, tmp_path):
    from softprompt import api

    model, tok, _ = tiny
    train_file = SAMPLES / "translation" / "train.jsonl"
    result = api.train("translation", train_file, tmp_path / "out", loaded=(model, tok),
                       progress=False, method="ptuning", encoder="lstm", encoder_hidden_size=8,
                       num_virtual_tokens=4, epochs=1, max_train_examples=4, batch_size=4,
                       lr_scheduler="cosine")
    assert result.meta.method == "ptuning" and result.prompt.shape == (4, 32)
    assert result.meta.train_args["encoder"] == "lstm"
    with pytest.raises(SoftPromptError, match="--prefix-projection is an option of --method "
                                              "prefix"):
        api.train("translation", train_file, tmp_path / "x", loaded=(model, tok),
                  method="residual", prefix_projection=True)


def test_lr_defaults_per_method(tiny, records, tmp_path):
    model, tok, _ = tiny
    for method, lr in (("prompt", 0.03), ("ptuning", 0.003), ("residual", 0.03),
                       ("prefix", 0.01)):
        result = train(model, tok, YES, _yes(records[:4]), tmp_path / method, progress=False,
                       prompt_config=PromptConfig(num_virtual_tokens=4, method=method),
                       train_config=TrainConfig(epochs=1, batch_size=4, warmup_steps=0))
        assert result.meta.train_args["lr"] == lr
        assert result.log[0]["lr"] == lr


# --- what each method computes and exports ----------------------------------------------------


def _perturb(module: torch.nn.Module) -> None:
    """Move every parameter off its start (as training would), seeded."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_is_forward_detached(tiny, variant):
    model, tok, _ = tiny
    module = methods.build(_pcfg(variant), model, tok("Answer yes").input_ids, seed=0)
    _perturb(module)
    live, exported = module(), module.export()
    live_tensor = live.kv if isinstance(live, KVPrefix) else live
    assert live_tensor.requires_grad
    exported_tensor = exported.kv if isinstance(exported, KVPrefix) else exported
    assert not exported_tensor.requires_grad and exported_tensor.dtype == torch.float32
    assert torch.equal(exported_tensor, live_tensor.detach())


def test_starts(tiny):
    """residual starts at its init embeddings exactly; a text prefix is the text's keys and
    values repeated to P tokens, with or without a projection."""
    model, tok, _ = tiny
    ids = tok("Answer yes", add_special_tokens=False).input_ids
    p = len(ids) + 2  # the text is repeated to P
    residual = methods.build(_pcfg("residual", init="text", num_virtual_tokens=p), model, ids,
                             seed=0)
    expected = init_prompt(model.get_input_embeddings().weight, p, "text", ids).embeddings
    assert torch.equal(residual(), expected)
    text_kv = tokens_kv(model, (ids * 2)[:p]).kv
    for variant in ("prefix", "prefix-projection"):
        prefix = methods.build(_pcfg(variant, num_virtual_tokens=p), model, ids, seed=0)
        assert torch.equal(prefix().kv, text_kv), variant
    zero = methods.build(_pcfg("prefix-zero"), model, ids, seed=0)
    assert not zero().kv.any()


@pytest.mark.parametrize("variant", ["ptuning", "residual", "prefix-projection"])
def test_saved_prompt_gives_the_loss_the_training_saw(tiny, records, tmp_path, variant):
    """The collapsed, saved and reloaded artefact scores the validation loss that training
    logged for the live module."""
    model, tok, _ = tiny
    _responsive(model)
    val = _yes(records[8:12])
    result = train(model, tok, YES, _yes(records[:8]), tmp_path / "out", validation_records=val,
                   prompt_config=_pcfg(variant), progress=False,
                   train_config=_cfg(epochs=2, lr=VARIANTS[variant][1]))
    saved, meta = load_prompt_tensor(tmp_path / "out")
    assert _same(saved, result.prompt) and meta.method == VARIANTS[variant][0]["method"]
    rows = encode_dataset(YES, val, tok, 4, 512, "validation").rows
    with torch.no_grad():
        loss, count = rows_loss(model, saved, rows, tok.pad_token_id, int(adds_bos(tok)))
    assert loss.item() / count == pytest.approx(meta.metrics["val_loss"], abs=2e-6)



@pytest.mark.parametrize("variant", ["ptuning", "ptuning-lstm", "residual", "prefix",
                                     "prefix-projection"])
def test_training_inside_an_enclosing_autocast_moves_every_weight(tiny, records, tmp_path,
                                                                 variant):
    """compare() trains inside its bf16 precision context. Autocast keeps its bfloat16 copies
    of trainable weights until the outermost region ends, so without clearing them after each
    step an encoder's Linear layers were read as they stood at the first step (p-tuning did
    not learn at all in RESULTS.md's e3fb5b2 run). Inside and outside must log the same run."""
    model, tok, _ = tiny
    _responsive(model)
    data = _yes(records[:8])

    def run(name: str, enclosing: bool) -> list[dict]:
        cfg = _cfg(epochs=3, batch_size=4, lr=VARIANTS[variant][1], bf16=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enclosing):
            result = train(model, tok, YES, data, tmp_path / name, prompt_config=_pcfg(variant),
                           train_config=cfg, progress=False)
        return _timeless(result.log)

    inside, outside = run("inside", True), run("outside", False)
    assert inside == outside
    saved = [load_prompt_tensor(tmp_path / name)[0] for name in ("inside", "outside")]
    assert _same(*saved)
    losses = [e["loss"] for e in outside if e["event"] == "step"]
    assert len(set(losses)) == len(losses)  # the same batches again score differently

# --- resume -----------------------------------------------------------------------------------


def _cut_to(out: Path, copy: Path, step: int) -> None:
    """``copy``: ``out`` as a run killed right after writing ``checkpoint-<step>``."""
    shutil.copytree(out, copy)
    for s, path in checkpoint.list_checkpoints(copy):
        if s > step:
            shutil.rmtree(path)


@pytest.mark.parametrize("variant", ["ptuning", "ptuning-lstm", "residual", "prefix",
                                     "prefix-projection"])
def test_resume_of_every_method_is_bit_identical(tiny, records, tmp_path, variant):
    model, tok, _ = tiny
    _responsive(model)

    def run(out: Path, resume: bool):
        return train(model, tok, YES, _yes(records[:12]), out, resume=resume,
                     validation_records=_yes(records[12:16]), prompt_config=_pcfg(variant),
                     progress=False,
                     train_config=_cfg(epochs=2, lr=VARIANTS[variant][1], warmup_steps=2,
                                       save_steps=1, save_total_limit=10))

    reference = run(tmp_path / "ref", resume=False)
    _cut_to(tmp_path / "ref", tmp_path / "cut", step=4)  # in epoch 2, Adam well under way
    resumed = run(tmp_path / "cut", resume=True)
    assert _same(resumed.prompt, reference.prompt)
    assert _timeless(resumed.log) == _timeless(reference.log)
    ckpt = checkpoint.load(tmp_path / "cut" / "checkpoint-6")
    names = {k[len("param."):] for k in ckpt.tensors if k.startswith("param.")}
    assert names == {n for n, _ in methods.build(_pcfg(variant), model, [5], 0).named_parameters()}
    assert all(f"adam.{n}.exp_avg" in ckpt.tensors for n in names)


def test_resume_with_another_method_is_refused(tiny, records, tmp_path):
    model, tok, _ = tiny
    kw = {"progress": False, "train_config": _cfg(epochs=1)}
    train(model, tok, YES, _yes(records[:4]), tmp_path / "out", prompt_config=_pcfg("prompt"),
          **kw)
    with pytest.raises(SoftPromptError, match=r"\(--method prompt\) holds other parameters "
                                              r"than this run \(--method residual\)"):
        train(model, tok, YES, _yes(records[:4]), tmp_path / "out", resume=True,
              prompt_config=_pcfg("residual"), **kw)


# --- --init-from ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["prompt", "ptuning", "residual", "prefix",
                                     "prefix-projection"])
def test_init_from_starts_at_the_trained_prompt(tiny, records, tmp_path, variant):
    model, tok, model_dir = tiny
    _responsive(model)
    first = train(model, tok, YES, _yes(records[:8]), tmp_path / "first", progress=False,
                  prompt_config=_pcfg(variant), model_name=str(model_dir),
                  train_config=_cfg(lr=VARIANTS[variant][1]))
    config = _pcfg(variant, init_from=str(tmp_path / "first"))
    module = methods.build(config, model, None, seed=3, model_name=str(model_dir))
    if variant == "ptuning":  # a new encoder: its input embeddings start at the prompt
        assert torch.equal(module.embeddings, first.prompt)
    else:
        assert _same(module.export(), first.prompt)
    second = train(model, tok, YES, _yes(records[8:16]), tmp_path / "second", progress=False,
                   prompt_config=config, model_name=str(model_dir),
                   train_config=_cfg(lr=VARIANTS[variant][1]))
    assert second.meta.train_args["init_from"] == str(tmp_path / "first")
    assert not _same(second.prompt, first.prompt)


def test_init_from_refuses_another_method_model_or_shape(tiny, records, tmp_path):
    model, tok, model_dir = tiny
    trained = tmp_path / "trained"
    train(model, tok, YES, _yes(records[:4]), trained, progress=False, model_name="tiny-a",
          prompt_config=_pcfg("prompt"), train_config=_cfg())

    def start(**kw):
        name = kw.pop("model_name", "tiny-a")
        return methods.build(_pcfg(**{"variant": "prompt", "init_from": str(trained), **kw}),
                             model, None, seed=0, model_name=name)

    with pytest.raises(SoftPromptError, match=r"holds a 'prompt' prompt, this run trains "
                                              r"--method residual"):
        start(variant="residual")
    with pytest.raises(SoftPromptError, match=r"trained on --model tiny-a, this run uses "
                                              r"--model tiny-b"):
        start(model_name="tiny-b")
    with pytest.raises(SoftPromptError, match=r"shape \[4, 32\], this run needs \[6, 32\]"):
        start(num_virtual_tokens=6)
    with pytest.raises(SoftPromptError, match="not found"):
        methods.build(_pcfg("prompt", init_from=str(tmp_path / "nothing")), model, None, 0)
    # The API refuses before it loads a model (there is none by that name).
    from softprompt import api

    with pytest.raises(SoftPromptError, match="holds a 'prompt' prompt"):
        api.train("translation", SAMPLES / "translation" / "train.jsonl", tmp_path / "x",
                  model="tiny-a", method="prefix", init_from=str(trained))


def test_options_of_another_method_are_refused():
    for options, flag in (({"encoder": "lstm"}, "--encoder"),
                          ({"prefix_projection": True}, "--prefix-projection"),
                          ({"prefix_init": "zero"}, "--prefix-init"),
                          ({"encoder_hidden_size": 8}, "--encoder-hidden-size")):
        with pytest.raises(SoftPromptError, match=flag):
            PromptConfig(method="prompt", **options)
    with pytest.raises(SoftPromptError, match="--init sets .* use --prefix-init"):
        PromptConfig(method="prefix", init="random")
    PromptConfig(method="prefix", init="random", prefix_projection=True)  # E starts random
    with pytest.raises(SoftPromptError, match="--method must be one of prompt, ptuning"):
        PromptConfig(method="lora")
    with pytest.raises(SoftPromptError, match="--lr-scheduler must be one of linear, cosine"):
        TrainConfig(lr_scheduler="step")


# --- training that selects for quality --------------------------------------------------------


def test_eval_steps_validate_within_epochs_and_keep_the_best_by_step(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    out = tmp_path / "out"
    val = [{"source": r["source"], "target": "German"} for r in records[8:12]]
    result = train(model, tok, YES, _yes(records[:8]), out, validation_records=val,
                   prompt_config=_pcfg("prompt", init="random"), progress=False,
                   train_config=_cfg(epochs=2, batch_size=2, lr=1.0, eval_steps=3, patience=9,
                                     save_total_limit=1))
    validations = [r for r in result.log if r["event"] != "step"]
    # 4 steps per epoch: evaluations at steps 3 and 6, epoch ends at 4 and 8.
    assert [(r["event"], r["step"]) for r in validations] == [
        ("eval", 3), ("epoch", 4), ("eval", 6), ("epoch", 8)]
    losses = [r["val_loss"] for r in validations]
    best = validations[losses.index(min(losses))]
    assert result.meta.metrics["best_step"] == best["step"]
    assert result.meta.metrics["val_loss"] == pytest.approx(best["val_loss"])
    # Learning "yes" soon hurts "German": the best is a validation within an epoch
    # (deterministic; checked on both tiny models).
    assert best["event"] == "eval"
    kept = checkpoint.load(out / f"checkpoint-{best['step']}")  # the best is never pruned
    saved, _ = load_prompt_tensor(out)
    assert torch.equal(saved, kept.tensors["param.embeddings"])
    assert torch.equal(saved, result.prompt)


def test_patience_counts_validations(tiny, records, tmp_path):
    model, tok, _ = tiny
    # A learning rate below float32 resolution: every validation after the first is no better.
    result = train(model, tok, YES, _yes(records[:8]), tmp_path / "out",
                   validation_records=_yes(records[8:10]), prompt_config=_pcfg("prompt"),
                   progress=False,
                   train_config=_cfg(epochs=3, batch_size=2, lr=1e-30, eval_steps=1,
                                     patience=2))
    assert [r["step"] for r in result.log if r["event"] == "step"] == [1, 2, 3]
    assert [r["event"] for r in result.log if r["event"] != "step"] == ["eval"] * 3
    assert result.meta.metrics["best_step"] == 1 and result.meta.metrics["epochs_run"] == 0


def test_resume_after_eval_steps_is_bit_identical(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)

    def run(out: Path, resume: bool):
        return train(model, tok, YES, _yes(records[:8]), out, resume=resume,
                     validation_records=_yes(records[8:12]), prompt_config=_pcfg("residual"),
                     progress=False,
                     train_config=_cfg(epochs=2, batch_size=2, lr=0.3, eval_steps=3,
                                       save_total_limit=10))

    reference = run(tmp_path / "ref", resume=False)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "ref")] == [3, 4, 6, 8]
    for step in (3, 6):  # right after a validation within an epoch
        _cut_to(tmp_path / "ref", tmp_path / f"cut{step}", step)
        resumed = run(tmp_path / f"cut{step}", resume=True)
        assert _same(resumed.prompt, reference.prompt)
        assert _timeless(resumed.log) == _timeless(reference.log)
        assert resumed.meta.metrics == {**reference.meta.metrics,
                                        "train_seconds": resumed.meta.metrics["train_seconds"]}


def _own_outputs(model, tok, records) -> list[dict]:
    """Records whose target is what the model generates behind the prompt a fresh run starts
    from: the metric is at its best from the start, while the loss keeps falling."""
    start = methods.build(_pcfg("prompt", init="random"), model, None, seed=0).export()
    texts = [render_input(YES, make_example(YES, r)) for r in records]
    outputs = generate(model, tok, texts, start, GenerationConfig(max_new_tokens=4),
                       stop=YES.stop)
    return [{"source": r["source"], "target": o.strip()} for r, o in zip(records, outputs)
            if o.strip()]


def test_metric_for_best_selects_by_generation(tiny, records, tmp_path):
    model, tok, _ = tiny
    _responsive(model)
    data = _own_outputs(model, tok, records)
    assert len(data) >= 8
    out = tmp_path / "out"
    result = train(model, tok, YES, data, out, validation_records=data[:6],
                   prompt_config=_pcfg("prompt", init="random"), progress=False,
                   train_config=_cfg(epochs=2, batch_size=4, lr=0.03, eval_steps=1,
                                     patience=20, metric_for_best="token_overlap",
                                     save_total_limit=20))
    validations = [r for r in result.log if r["event"] != "step"]
    scores = [r["val_token_overlap"] for r in validations]
    losses = [r["val_loss"] for r in validations]
    by_metric = validations[scores.index(max(scores))]["step"]
    by_loss = validations[losses.index(min(losses))]["step"]
    assert by_metric != by_loss, (scores, losses)  # the two selections differ here
    metrics = result.meta.metrics
    assert metrics["best_step"] == by_metric
    assert metrics["val_token_overlap"] == pytest.approx(max(scores))
    # The logged metric is what evaluating the saved prompt on the validation records gives.
    saved, _ = load_prompt_tensor(out)
    again = evaluate(model, tok, YES, data[:6], System(SOFT, saved), max_length=512)
    assert again.metrics["token_overlap"] == pytest.approx(max(scores), abs=1e-4)


def test_flags_the_run_cannot_honour_are_refused_before_training(tiny, records, tmp_path):
    model, tok, _ = tiny
    data = _yes(records[:4])
    for cfg, method, message in (
            (_cfg(metric_for_best="bleu"), "prompt",
             "--metric-for-best must be loss or token_overlap for task custom"),
            (_cfg(metric_for_best="token_overlap"), "prompt",
             "--metric-for-best needs validation data"),
            (_cfg(eval_steps=2), "prompt", "--eval-steps needs validation data"),
            (_cfg(gradient_checkpointing=True), "prefix",
             "--gradient-checkpointing does not work with --method prefix")):
        with pytest.raises(SoftPromptError, match=message):
            train(model, tok, YES, data, tmp_path / "out", train_config=cfg, progress=False,
                  prompt_config=_pcfg(method))
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_lr_schedules(tiny, records, tmp_path, scheduler):
    model, tok, _ = tiny
    result = train(model, tok, YES, _yes(records[:12]), tmp_path / "out", progress=False,
                   prompt_config=_pcfg("prompt"),
                   train_config=_cfg(epochs=2, batch_size=2, lr=0.1, warmup_steps=2,
                                     lr_scheduler=scheduler))
    lrs = [r["lr"] for r in result.log if r["event"] == "step"]
    decay = [k / 10 for k in range(10)]  # 12 steps: 2 of warm-up, then 10 of decay
    after = ([0.1 * 0.5 * (1 + math.cos(math.pi * d)) for d in decay] if scheduler == "cosine"
             else [0.1 * (1 - d) for d in decay])
    assert lrs == pytest.approx([0.05, 0.1] + after, abs=1e-12)
    assert (LOG_FILE, scheduler) == (LOG_FILE, result.meta.train_args["lr_scheduler"])


# --- data parallel ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [["--method", "residual", "--encoder-hidden-size", "8"],
                                     ["--method", "prefix", "--prefix-projection",
                                      "--encoder-hidden-size", "8"]])
def test_two_processes_match_one_for_methods_with_several_parameters(tiny_dirs, tmp_path,
                                                                     options):
    """Every parameter's gradient is summed over the processes (not only the first one's)."""
    from test_distributed import _data, _launch, _single, _train_args

    if shutil.which("accelerate") is None and not (Path(sys.executable).parent
                                                   / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    data = _data(tmp_path, 16)
    one = _single(_train_args(tiny_dirs["llama"], data, tmp_path / "one", 8, *options))
    assert one.returncode == 0, one.stderr
    two = _launch(2, _train_args(tiny_dirs["llama"], data, tmp_path / "two", 4, *options))
    assert two.returncode == 0, two.stderr
    saved = [load_prompt_tensor(tmp_path / name)[0] for name in ("one", "two")]
    tensors = [s.kv if isinstance(s, KVPrefix) else s for s in saved]
    torch.testing.assert_close(tensors[1], tensors[0], atol=1e-6, rtol=0)
    logs = [[json.loads(x) for x in (tmp_path / name / LOG_FILE).read_text().splitlines()]
            for name in ("one", "two")]
    steps = [[r["grad_norm"] for r in log if r["event"] == "step"] for log in logs]
    assert steps[1] == pytest.approx(steps[0], rel=1e-5)
