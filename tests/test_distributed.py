"""Data parallel training under `accelerate launch`: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "softprompt" / "samples" / "translation" / "train.jsonl"
TOLERANCE = 1e-6  # float summation order differs between one and two processes

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None and
                                not (Path(sys.executable).parent / "accelerate").exists(),
                                reason="accelerate CLI not installed")


def _env(crash: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SOFTPROMPT_CRASH_AT", None)
    if crash:
        env["SOFTPROMPT_CRASH_AT"] = crash
    return env


def _train_args(model_dir: Path, data: tuple[Path, Path], out: Path, batch_size: int,
                *extra: str) -> list[str]:
    train, val = data
    return ["train", "--task", "translation", "--train", str(train), "--validation", str(val),
            "--output", str(out), "--model", str(model_dir), "--batch-size", str(batch_size),
            "--epochs", "2", "--num-virtual-tokens", "4", "--lr", "0.05", "--warmup-steps", "1",
            "--save-steps", "1", "--quiet",
            "--precision", "fp32",  # the sums compared at 1e-6, not bfloat16's rounding
            *extra]


def _launch(n: int, args: list[str], crash: str | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``softprompt ARGS`` (or of the script ARGS[0] if it is a .py
    file); the processes are stopped if they run past ``timeout`` (a deadlock)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if not Path(accelerate).exists():
        accelerate = shutil.which("accelerate")
    target = args if args[0].endswith(".py") else ["-m", "softprompt", *args]
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "0", *target]
    proc = subprocess.Popen(cmd, env=_env(crash), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: the launcher stops its workers (each runs in a session of its own).
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{n} processes still running after {timeout} s (deadlocked?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _single(args: list[str], crash: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softprompt", *args], env=_env(crash),
                          capture_output=True, text=True, timeout=300)


def _prompt(out: Path) -> torch.Tensor:
    return load_file(str(out / "prompt.safetensors"))["prompt_embeddings"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_training(out: Path, reference: Path) -> None:
    """The same prompt, step losses and validation losses (up to float summation order)."""
    prompt = _prompt(out)
    assert not torch.equal(prompt, torch.zeros_like(prompt))
    torch.testing.assert_close(prompt, _prompt(reference), atol=TOLERANCE, rtol=0)
    log, ref_log = _log(out), _log(reference)
    assert [(r["event"], r["step"]) for r in log] == [(r["event"], r["step"]) for r in ref_log]
    for key in ("loss", "val_loss"):  # logged rounded to 6 places
        values = [r[key] for r in log if key in r]
        assert values == pytest.approx([r[key] for r in ref_log if key in r], abs=5e-6)


def _data(directory: Path, n_train: int) -> tuple[Path, Path]:
    """``n_train`` training examples, and 9 validation examples: 5 on the first process and 4
    on the second, so at batch 4 one process validates 2 batches and the other 1."""
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()
    train, val = directory / "train.jsonl", directory / "val.jsonl"
    train.write_text("\n".join(rows[:n_train]) + "\n", encoding="utf-8")
    val.write_text("\n".join(rows[18:27]) + "\n", encoding="utf-8")
    return train, val


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return _data(tmp_path_factory.mktemp("dp"), 16)


@pytest.fixture(scope="module")
def single_run(tiny_dirs, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp-single") / "out"
    proc = _single(_train_args(tiny_dirs["llama"], data, out, 8))
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_processes_match_one_with_same_global_batch(tiny_dirs, data, single_run, tmp_path):
    out = tmp_path / "two"
    proc = _launch(2, _train_args(tiny_dirs["llama"], data, out, 4))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("saved prompt") == 1  # only the main process reports
    _assert_same_training(out, single_run)


def test_checkpoint_from_two_processes_resumes_on_one(tiny_dirs, data, single_run, tmp_path):
    out = tmp_path / "resumed"
    # Both ranks SIGKILL themselves at their third step; the launcher then fails.
    killed = _launch(2, _train_args(tiny_dirs["llama"], data, out, 4), crash="step:3")
    assert killed.returncode != 0
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    # The same global batch (1 x 8 instead of 2 x 4): the same data order.
    resumed = _single(_train_args(tiny_dirs["llama"], data, out, 8, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    _assert_same_training(out, single_run)


def test_sharded_model_matches_one_process(tiny_dirs, data, single_run, tmp_path):
    """--shard-model: each decoder layer's weights split over 2 processes (FSDP2); a process
    with fewer validation batches runs dummy ones to join the other's all-gathers."""
    out = tmp_path / "sharded"
    proc = _launch(2, _train_args(tiny_dirs["llama"], data, out, 4, "--shard-model"))
    assert proc.returncode == 0, proc.stderr
    _assert_same_training(out, single_run)


# --- a step with no rows for one process -------------------------------------------------------
# 18 examples at global batch 8: steps of 8, 8 and 2 rows, and in the short one the second
# process has none. Where that step falls depends on the seed: seed 1 puts it first in epoch 1;
# seed 3 puts it last in epoch 1 and first in epoch 2.


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Path]:
    return _data(tmp_path_factory.mktemp("uneven"), 18)


@pytest.fixture(scope="module")
def one_process(tiny_dirs, uneven, tmp_path_factory):
    """``f(seed)``: the output of a 1-process run at batch 8 on the 18 examples (run once)."""
    runs: dict[int, Path] = {}

    def run(seed: int) -> Path:
        if seed not in runs:
            out = tmp_path_factory.mktemp(f"uneven-one-{seed}") / "out"
            proc = _single(_train_args(tiny_dirs["llama"], uneven, out, 8, "--seed", str(seed)))
            assert proc.returncode == 0, proc.stderr
            runs[seed] = out
        return runs[seed]

    return run


def test_step_without_rows_for_a_process_matches_one_process(tiny_dirs, uneven, one_process,
                                                             tmp_path):
    """Seed 1: the very first step leaves the second process without rows (it used to
    all-reduce a gradient that did not exist yet, and crash)."""
    out = tmp_path / "two"
    proc = _launch(2, _train_args(tiny_dirs["llama"], uneven, out, 4, "--seed", "1"))
    assert proc.returncode == 0, proc.stderr
    _assert_same_training(out, one_process(1))


def test_resume_right_before_a_step_without_rows(tiny_dirs, uneven, one_process, tmp_path):
    """Seed 3: killed at the first step of epoch 2, which has no rows for the second process;
    the resumed processes start with that step (with a fresh optimizer and no gradient)."""
    out = tmp_path / "resumed"
    args = _train_args(tiny_dirs["llama"], uneven, out, 4, "--seed", "3")
    killed = _launch(2, args, crash="step:4")
    assert killed.returncode != 0
    assert max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == 3
    resumed = _launch(2, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    _assert_same_training(out, one_process(3))


# --- on_epoch_end with a sharded model ---------------------------------------------------------

SHARDED_WITH_CALLBACK = """
import sys
from pathlib import Path

import torch

from softprompt.config import PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.distributed import distributed_state
from softprompt.encode import adds_bos, encode_dataset
from softprompt.inputs import rows_loss
from softprompt.models import load_model
from softprompt.tasks import get_task
from softprompt.training import train

model_dir, train_path, probe_path, out = sys.argv[1:]
model, tok = load_model(model_dir)
task = get_task("translation")
probe = encode_dataset(task, read_records(probe_path)[:3], tok, 4, 512, "probe").rows
rank = distributed_state().process_index


@torch.no_grad()
def on_epoch_end(epoch, prompt):
    # Forwards through every decoder layer: each needs all processes.
    loss_sum, count = rows_loss(model, prompt, probe, tok.pad_token_id, int(adds_bos(tok)),
                                prompt.device)
    with open(Path(out).parent / f"calls-{rank}.txt", "a") as f:
        f.write(f"{epoch}\\n")
    return {"probe_loss": loss_sum.item() / count}


train(model, tok, task, read_records(train_path), out,
      prompt_config=PromptConfig(num_virtual_tokens=4),
      train_config=TrainConfig(batch_size=4, epochs=2, lr=0.05, warmup_steps=1, seed=1,
                               shard_model=True),
      progress=False, on_epoch_end=on_epoch_end)
"""


def test_on_epoch_end_with_a_sharded_model(tiny_dirs, uneven, tmp_path):
    """--shard-model: on_epoch_end runs forwards through the sharded layers, so it runs on
    every process (on the main one alone it waited forever for the others), and gets what the
    unsharded model computes. No validation: the layers are sharded when it is called."""
    from softprompt.encode import adds_bos, encode_dataset
    from softprompt.inputs import rows_loss
    from softprompt.models import load_model
    from softprompt.tasks import get_task

    script, out = tmp_path / "sharded.py", tmp_path / "sharded"
    script.write_text(SHARDED_WITH_CALLBACK, encoding="utf-8")
    proc = _launch(2, [str(script), str(tiny_dirs["llama"]), *map(str, uneven), str(out)],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        assert (tmp_path / f"calls-{rank}.txt").read_text() == "1\n2\n"
    epochs = [r for r in _log(out) if r["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("probe_loss" in e for e in epochs)
    # Without validation the saved prompt is the last epoch's: its probe loss, unsharded.
    model, tok = load_model(str(tiny_dirs["llama"]))
    records = [json.loads(line) for line in uneven[1].read_text().splitlines()]
    probe = encode_dataset(get_task("translation"), records[:3], tok, 4, 512, "probe").rows
    with torch.no_grad():
        loss_sum, count = rows_loss(model, _prompt(out), probe, tok.pad_token_id,
                                    int(adds_bos(tok)))
    assert epochs[-1]["probe_loss"] == pytest.approx(loss_sum.item() / count, rel=1e-6)
