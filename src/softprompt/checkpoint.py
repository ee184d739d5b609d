"""Training checkpoints: ``checkpoint-<step>/`` directories that survive SIGKILL.

A checkpoint holds a :class:`TrainState`: the prompt, Adam's moments, torch's RNG, the position
in the data, the best prompt so far and the log. Each checkpoint is staged in a temporary
directory and renamed into place, so it is complete or absent. ``state.json`` records a SHA-256
per file; a checkpoint whose files do not match is reported and skipped in favour of the
previous good one. Tensors go to safetensors and everything else to JSON: nothing is ever
unpickled.

``state.json`` format 2 adds ``version``, ``global_batch`` and ``epoch_stats``; format 1 (no
``version``; the epoch's running loss kept inside ``best``) is still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from softprompt import atomic
from softprompt.errors import SoftPromptError
from softprompt.faults import crash_point
from softprompt.prompt import SoftPrompt

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
STATE_VERSION = 2
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass(frozen=True)
class GlobalBatch:
    """Examples per optimizer step and how they are split. The data order depends on the size
    only, so a run may resume on another process count if the size stays the same."""

    batch_size: int  # --batch-size: examples per micro-batch on each process
    processes: int
    accumulation: int  # --gradient-accumulation-steps

    @property
    def size(self) -> int:
        return self.batch_size * self.processes * self.accumulation

    def __str__(self) -> str:
        return (f"{self.size} (--batch-size {self.batch_size} x {self.processes} "
                f"process{'es' if self.processes != 1 else ''} x --gradient-accumulation-steps "
                f"{self.accumulation})")


@dataclass
class Best:
    """The best epoch so far by validation loss (without validation: the latest epoch)."""

    val_loss: float = math.inf
    step: int = -1
    epoch: int = -1  # 1-based, as in the log
    bad_epochs: int = 0  # epochs since the validation loss last improved

    def out_of_patience(self, patience: int) -> bool:
        """``patience`` epochs in a row without improvement (at least one)."""
        return self.bad_epochs > 0 and self.bad_epochs >= patience


@dataclass
class EpochStats:
    """Running totals of the epoch in progress, for its ``train_loss``."""

    loss_sum: float = 0.0  # summed target cross-entropy of the steps taken
    target_tokens: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.target_tokens)


@dataclass
class TrainState:
    """Everything that changes during training and that a resumed run continues from.

    Torch's RNG is process-wide: :func:`save` captures it and :func:`restore` sets it back.
    """

    prompt: SoftPrompt  # the trained [P, H] parameter
    optimizer: torch.optim.Optimizer  # Adam over ``prompt``
    best_prompt: torch.Tensor  # [P, H], the prompt of ``best.epoch``
    batch: GlobalBatch  # the step size that ``step_in_epoch`` counts in
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps of ``epoch`` already taken
    global_step: int = 0
    best: Best = field(default_factory=Best)
    epoch_stats: EpochStats = field(default_factory=EpochStats)
    log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpoint:
    """One verified checkpoint as stored: tensors (prompt, Adam moments, RNG) and JSON state."""

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def save(output_dir: Path, state: TrainState) -> Path:
    """Write ``state`` as ``checkpoint-<global_step>`` (atomically; kept if it already exists)."""
    tensors = {"prompt": state.prompt.embeddings, "best_prompt": state.best_prompt,
               **_adam_tensors(state.optimizer), "rng.torch": torch.get_rng_state()}
    # ``examples_in_epoch`` counts whole global batches (format 1 has the same field).
    json_state = {"version": STATE_VERSION, "global_step": state.global_step,
                  "epoch": state.epoch,
                  "examples_in_epoch": state.step_in_epoch * state.batch.size,
                  "global_batch": asdict(state.batch), "world_size": state.batch.processes,
                  "best": asdict(state.best), "epoch_stats": asdict(state.epoch_stats),
                  "log": state.log}
    return _write(output_dir, state.global_step, tensors, json_state)


def restore(ckpt: Checkpoint, state: TrainState) -> None:
    """Continue ``state`` (fresh, with this run's prompt shape and global batch) from ``ckpt``.

    Raises:
        SoftPromptError: the prompt's shape or the global batch differs from this run's.
    """
    saved, prompt = ckpt.state, ckpt.tensors["prompt"]
    if list(prompt.shape) != list(state.prompt.embeddings.shape):
        raise SoftPromptError(f"{ckpt.path}: prompt shape {list(prompt.shape)} does not match "
                              f"--num-virtual-tokens/model {list(state.prompt.embeddings.shape)}")
    if "global_batch" in saved and GlobalBatch(**saved["global_batch"]).size != state.batch.size:
        raise SoftPromptError(f"{ckpt.path} was written with global batch "
                              f"{GlobalBatch(**saved['global_batch'])}, this run has "
                              f"{state.batch}; resume with the same --batch-size x processes x "
                              f"--gradient-accumulation-steps")
    with torch.no_grad():
        state.prompt.embeddings.copy_(prompt)
    _restore_adam(state.optimizer, ckpt.tensors)
    if "rng.torch" in ckpt.tensors:
        torch.set_rng_state(ckpt.tensors["rng.torch"])
    best_prompt = ckpt.tensors.get("best_prompt", prompt)
    state.best_prompt = best_prompt.to(state.prompt.embeddings.device).clone()
    state.global_step, state.epoch = saved["global_step"], saved["epoch"]
    state.step_in_epoch = saved["examples_in_epoch"] // state.batch.size
    best = saved["best"]
    state.best = Best(best["val_loss"], best["step"], best["epoch"], best["bad_epochs"])
    stats = saved.get("epoch_stats") or {"loss_sum": best.get("epoch_loss", 0.0),
                                         "target_tokens": best.get("epoch_tokens", 0)}
    state.epoch_stats = EpochStats(**stats)
    state.log = saved["log"]


def _adam_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's state of its one parameter (step, moments), as ``adam.<name>`` tensors."""
    inner = opt.state_dict()["state"].get(0, {})
    return {f"adam.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone()
            for k, v in inner.items()}


def _restore_adam(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    inner = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
    if inner:
        sd = opt.state_dict()
        sd["state"] = {0: inner}
        opt.load_state_dict(sd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(output_dir: Path, step: int, tensors: dict[str, torch.Tensor],
           state: dict[str, Any]) -> Path:
    final = output_dir / f"{PREFIX}{step}"
    if final.exists():  # the same step saved twice (e.g. save-steps at an epoch end)
        return final
    with atomic.staged_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / TENSORS_FILE))
        crash_point("checkpoint")
        meta = {"step": step, "state": state, "sha256": {TENSORS_FILE: _sha256(tmp / TENSORS_FILE)}}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint directory, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def load(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raise ValueError if it is incomplete or corrupt."""
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        for name, digest in meta["sha256"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} checksum mismatch")
        tensors = load_file(str(path / TENSORS_FILE))
        return Checkpoint(int(meta["step"]), tensors, meta["state"], path)
    except Exception as exc:  # missing files, bad JSON, safetensors' own error types
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def latest(output_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported on stderr and skipped."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return load(path)
        except ValueError as exc:
            print(f"warning: {path} is corrupt ({exc}); trying the previous checkpoint",
                  file=sys.stderr)
    return None


def prune(output_dir: Path, keep: int, protect: set[int] = frozenset()) -> None:
    """Delete all but the newest ``keep`` checkpoints, never those in ``protect`` (the best)."""
    found = list_checkpoints(output_dir)
    for step, path in found[:-keep] if keep > 0 else found:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)
