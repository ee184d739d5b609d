"""Data parallel training under `accelerate launch`: 2 CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import os
import shutil
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


def _train_args(model_dir: Path, data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--task", "translation", "--train", str(data), "--output", str(out),
            "--model", str(model_dir), "--batch-size", str(batch_size), "--epochs", "2",
            "--num-virtual-tokens", "4", "--lr", "0.05", "--warmup-steps", "1",
            "--save-steps", "1", "--quiet", *extra]


def _launch(n: int, args: list[str], crash: str | None = None) -> subprocess.CompletedProcess:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if not Path(accelerate).exists():
        accelerate = shutil.which("accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "0", "-m", "softprompt", *args]
    return subprocess.run(cmd, env=_env(crash), capture_output=True, text=True, timeout=300)


def _single(args: list[str], crash: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softprompt", *args], env=_env(crash),
                          capture_output=True, text=True, timeout=300)


def _prompt(out: Path) -> torch.Tensor:
    return load_file(str(out / "prompt.safetensors"))["prompt_embeddings"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dp") / "train.jsonl"
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()[:16]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


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
    two, one = _prompt(out), _prompt(single_run)
    assert not torch.equal(two, torch.zeros_like(two))
    torch.testing.assert_close(two, one, atol=TOLERANCE, rtol=0)


def test_checkpoint_from_two_processes_resumes_on_one(tiny_dirs, data, single_run, tmp_path):
    out = tmp_path / "resumed"
    # Both ranks SIGKILL themselves at their third step; the launcher then fails.
    killed = _launch(2, _train_args(tiny_dirs["llama"], data, out, 4), crash="step:3")
    assert killed.returncode != 0
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    resumed = _single(_train_args(tiny_dirs["llama"], data, out, 8, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    torch.testing.assert_close(_prompt(out), _prompt(single_run), atol=TOLERANCE, rtol=0)


def test_sharded_model_matches_one_process(tiny_dirs, data, single_run, tmp_path):
    """--shard-model: each decoder layer's weights split over 2 processes (FSDP2)."""
    out = tmp_path / "sharded"
    proc = _launch(2, _train_args(tiny_dirs["llama"], data, out, 4, "--shard-model"))
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(_prompt(out), _prompt(single_run), atol=TOLERANCE, rtol=0)


def test_uneven_last_batch_keeps_ranks_in_step(tiny_dirs, tmp_path):
    """18 examples, global batch 8: the last step has 2 rows, so rank 1 has none there."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:18]) + "\n")
    for extra in ((), ("--shard-model",)):
        out = tmp_path / f"uneven{len(extra)}"
        proc = _launch(2, _train_args(tiny_dirs["gpt2"], data, out, 4, "--validation",
                                      str(data), *extra))
        assert proc.returncode == 0, proc.stderr
        assert (out / "prompt.safetensors").is_file()
