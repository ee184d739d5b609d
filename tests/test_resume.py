"""Kill training with SIGKILL at chosen points, resume, and get the same prompt bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt import checkpoint
from softprompt.errors import SoftPromptError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "softprompt" / "samples" / "translation"


def _data(tmp_path: Path) -> tuple[Path, Path]:
    rows = (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join(rows[:20]) + "\n", encoding="utf-8")
    val.write_text("\n".join(rows[20:26]) + "\n", encoding="utf-8")
    return train, val


def _train(model_dir: Path, train: Path, val: Path, out: Path, *extra: str,
           crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SOFTPROMPT_CRASH_AT", None)
    if crash:
        env["SOFTPROMPT_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "softprompt", "train", "--task", "translation",
           "--train", str(train), "--validation", str(val), "--output", str(out),
           "--model", str(model_dir), "--epochs", "3", "--batch-size", "4",
           "--num-virtual-tokens", "4", "--save-steps", "2", "--save-total-limit", "2",
           "--lr", "0.05", "--warmup-steps", "2", "--patience", "5", "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _prompt(out: Path) -> torch.Tensor:
    return load_file(str(out / "prompt.safetensors"))["prompt_embeddings"]


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume-ref")
    train, val = _data(tmp)
    out = tmp / "uninterrupted"
    proc = _train(tiny_dirs["llama"], train, val, out)
    assert proc.returncode == 0, proc.stderr
    return train, val, out


@pytest.mark.parametrize("crash", ["step:3", "step:9", "checkpoint:2", "write:4", "write:9"])
def test_sigkill_then_resume_is_bit_identical(reference, tiny_dirs, tmp_path, crash):
    train, val, ref_out = reference
    out = tmp_path / "run"
    killed = _train(tiny_dirs["llama"], train, val, out, crash=crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Whatever the kill left behind is either complete or ignored: no temp dirs count.
    for _, path in checkpoint.list_checkpoints(out):
        checkpoint.load(path)
    resumed = _train(tiny_dirs["llama"], train, val, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(_prompt(out), _prompt(ref_out))
    ref_log = [json.loads(x) for x in (ref_out / "log.jsonl").read_text().splitlines()]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    drop = ("seconds", "tokens_per_s")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in log]
            == [{k: v for k, v in r.items() if k not in drop} for r in ref_log])


def _as_format_2(path: Path) -> None:
    """Rewrite a checkpoint as format 2 wrote it: the prompt method's one parameter as
    ``prompt``, its Adam state as ``adam.<key>``, no ``method`` or ``best.score``, patience
    counted in ``bad_epochs``."""
    from safetensors.torch import save_file

    tensors = load_file(str(path / checkpoint.TENSORS_FILE))
    old = {"prompt": tensors.pop("param.embeddings")}
    for key in [k for k in tensors if k.startswith("adam.embeddings.")]:
        old["adam." + key[len("adam.embeddings."):]] = tensors.pop(key)
    assert set(tensors) == {"best_prompt", "rng.torch"}, set(tensors)
    save_file({**old, **tensors}, str(path / checkpoint.TENSORS_FILE))
    meta = json.loads((path / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
    state = meta["state"]
    state["version"] = 2
    del state["method"], state["best"]["score"]
    state["best"]["bad_epochs"] = state["best"].pop("bad_evals")
    meta["sha256"][checkpoint.TENSORS_FILE] = checkpoint._sha256(path / checkpoint.TENSORS_FILE)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint as the first trainer wrote it: format 2's tensors, no version or
    global batch, and the epoch's running loss inside ``best``."""
    _as_format_2(path)
    meta = json.loads((path / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
    state = meta["state"]
    stats = state.pop("epoch_stats")
    state["best"].update(epoch_loss=stats["loss_sum"], epoch_tokens=stats["target_tokens"])
    del state["version"], state["global_batch"]
    (path / checkpoint.STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


@pytest.mark.parametrize("rewrite", [_as_format_1, _as_format_2])
def test_checkpoint_in_an_older_format_resumes_bit_identical(reference, tiny_dirs, tmp_path,
                                                             rewrite):
    train, val, ref_out = reference
    out = tmp_path / "run"
    killed = _train(tiny_dirs["llama"], train, val, out, crash="step:9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    newest = checkpoint.list_checkpoints(out)[-1][1]
    assert newest.name == "checkpoint-8"  # in the middle of epoch 2: its running loss counts
    rewrite(newest)
    resumed = _train(tiny_dirs["llama"], train, val, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {newest} (epoch 2, step 8)" in resumed.stderr
    assert torch.equal(_prompt(out), _prompt(ref_out))
    drop = ("seconds", "tokens_per_s")
    ref_log = [json.loads(x) for x in (ref_out / "log.jsonl").read_text().splitlines()]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert ([{k: v for k, v in r.items() if k not in drop} for r in log]
            == [{k: v for k, v in r.items() if k not in drop} for r in ref_log])


def test_resume_with_another_global_batch_is_refused(tiny_dirs, tmp_path):
    """The data order depends on the global batch: a changed one must not silently resume."""
    import re

    from softprompt.config import PromptConfig, TrainConfig
    from softprompt.data import read_records
    from softprompt.models import load_model
    from softprompt.tasks import get_task
    from softprompt.training import train

    model, tok = load_model(str(tiny_dirs["gpt2"]))
    records, task = read_records(SAMPLE / "train.jsonl", limit=8), get_task("translation")
    out = tmp_path / "out"

    def run(batch_size: int, accumulation: int, resume: bool):
        return train(model, tok, task, records, out, progress=False, resume=resume,
                     prompt_config=PromptConfig(num_virtual_tokens=4, init="random"),
                     train_config=TrainConfig(epochs=2, batch_size=batch_size, warmup_steps=0,
                                              gradient_accumulation_steps=accumulation))

    first = run(4, 1, resume=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    message = ("checkpoint-4 was written with global batch 4 (--batch-size 4 x 1 process x "
               "--gradient-accumulation-steps 1), this run has 8 (--batch-size 4 x 1 process x "
               "--gradient-accumulation-steps 2); resume with the same --batch-size x processes "
               "x --gradient-accumulation-steps")
    with pytest.raises(SoftPromptError, match=re.escape(message)):
        run(4, 2, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # The same global batch split another way is the same run: nothing left to train.
    again = run(2, 2, resume=True)
    assert torch.equal(again.prompt, first.prompt) and again.log == first.log


def test_checkpoints_pruned_and_best_kept(reference):
    _, _, out = reference
    steps = [s for s, _ in checkpoint.list_checkpoints(out)]
    assert 2 <= len(steps) <= 3  # the newest two, plus the best if it is older
    assert steps[-1] == 15  # 20 examples / 4 = 5 steps per epoch, 3 epochs


def test_corrupt_checkpoint_falls_back_to_previous(reference, tmp_path, capsys):
    import shutil

    _, _, out = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    found = checkpoint.list_checkpoints(copy)
    newest = found[-1][1] / checkpoint.TENSORS_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    ckpt = checkpoint.latest(copy)
    assert ckpt is not None and ckpt.step == found[-2][0]
    assert "corrupt" in capsys.readouterr().err


def test_resume_without_checkpoint_starts_fresh(tiny_dirs, tmp_path):
    train, val = _data(tmp_path)
    out = tmp_path / "fresh"
    proc = _train(tiny_dirs["gpt2"], train, val, out, "--resume", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert "starting from scratch" in proc.stderr


def test_nan_loss_stops_with_clear_message(tiny_dirs, tmp_path):
    from softprompt.config import TrainConfig
    from softprompt.data import read_records
    from softprompt.models import load_model
    from softprompt.tasks import get_task
    from softprompt.training import train

    # An absurd learning rate blows GPT-2's activations up to inf/nan within a few steps.
    # (Llama's RMSNorm maps a huge prompt to zeros instead, so it needs no such guard here.)
    model, tok = load_model(str(tiny_dirs["gpt2"]))
    records = read_records(SAMPLE / "train.jsonl", limit=16)
    with pytest.raises(SoftPromptError, match=r"loss became (nan|inf) at step \d+"):
        train(model, tok, get_task("translation"), records, tmp_path / "nan",
              train_config=TrainConfig(lr=1e30, epochs=3, batch_size=4, warmup_steps=0,
                                       max_grad_norm=0),
              progress=False)
    assert not (tmp_path / "nan" / "prompt.safetensors").exists()  # no bad prompt saved
