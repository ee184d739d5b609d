"""Training checkpoints: ``checkpoint-<step>/`` directories that survive SIGKILL.

A checkpoint holds a :class:`TrainState`: the method's parameters, Adam's moments, torch's RNG,
the position in the data, the best prompt so far and the log. Each checkpoint is staged in a
temporary directory and renamed into place, so it is complete or absent. ``state.json``
records a SHA-256 per file; a checkpoint whose files do not match is reported and skipped in
favour of the previous good one. Tensors go to safetensors and everything else to JSON:
nothing is ever unpickled.

Tensors (format 3): ``param.<name>`` per parameter of the method module (any number),
``buffer.<name>`` per buffer, ``adam.<name>.<key>`` per parameter's Adam state,
``best_prompt`` (``[P, H]``) or ``best_prefix`` (``[L, 2, kv_heads, P, head_dim]``) and
``rng.torch``; ``state.json`` adds ``method`` and ``best.score``. Formats 1 and 2 (the prompt
method only: tensors ``prompt``, ``best_prompt``, ``adam.<key>``) are still read; format 2
added ``version``, ``global_batch`` and ``epoch_stats``, format 1 kept the epoch's running loss
inside ``best``.
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
from softprompt.prefix import KVPrefix

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
STATE_VERSION = 3
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
    """The best validation so far by ``--metric-for-best`` (without validation: the latest
    epoch)."""

    val_loss: float = math.inf  # the validation loss of the best validation
    step: int = -1
    epoch: int = -1  # 1-based, as in the log
    bad_evals: int = 0  # validations since the score last improved
    score: float = -math.inf  # higher is better: -val_loss, or the metric for best

    def out_of_patience(self, patience: int) -> bool:
        """``patience`` validations in a row without improvement (at least one)."""
        return self.bad_evals > 0 and self.bad_evals >= patience

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Best:
        """Formats 1 and 2 counted ``bad_epochs`` and selected on the loss alone."""
        return cls(saved["val_loss"], saved["step"], saved["epoch"],
                   saved.get("bad_evals", saved.get("bad_epochs", 0)),
                   saved.get("score", -saved["val_loss"]))


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

    prompt: torch.nn.Module  # the method module (softprompt.methods): the trained parameters
    optimizer: torch.optim.Optimizer  # Adam over ``prompt.parameters()``, in their order
    best_prompt: Any  # PromptLike, the exported prompt of ``best.step``
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
    params = dict(state.prompt.named_parameters())
    best = state.best_prompt
    tensors = {**{f"param.{name}": p for name, p in params.items()},
               **{f"buffer.{name}": b for name, b in state.prompt.named_buffers()},
               **_adam_tensors(state.optimizer, list(params)),
               **({"best_prompt": best} if torch.is_tensor(best) else {"best_prefix": best.kv}),
               "rng.torch": torch.get_rng_state()}
    # ``examples_in_epoch`` counts whole global batches (format 1 has the same field).
    json_state = {"version": STATE_VERSION, "method": getattr(state.prompt, "name", "prompt"),
                  "global_step": state.global_step, "epoch": state.epoch,
                  "examples_in_epoch": state.step_in_epoch * state.batch.size,
                  "global_batch": asdict(state.batch), "world_size": state.batch.processes,
                  "best": asdict(state.best), "epoch_stats": asdict(state.epoch_stats),
                  "log": state.log}
    return _write(output_dir, state.global_step, tensors, json_state)


def restore(ckpt: Checkpoint, state: TrainState) -> None:
    """Continue ``state`` (fresh, with this run's method module and global batch) from ``ckpt``.

    Raises:
        SoftPromptError: the parameters (method, options, shapes) or the global batch differ
            from this run's.
    """
    saved = ckpt.state
    params, adam = _saved_parameters(ckpt.tensors)
    _check_parameters(ckpt, params, state.prompt)
    if "global_batch" in saved and GlobalBatch(**saved["global_batch"]).size != state.batch.size:
        raise SoftPromptError(f"{ckpt.path} was written with global batch "
                              f"{GlobalBatch(**saved['global_batch'])}, this run has "
                              f"{state.batch}; resume with the same --batch-size x processes x "
                              f"--gradient-accumulation-steps")
    with torch.no_grad():
        for name, p in state.prompt.named_parameters():
            p.copy_(params[name])
        for name, b in state.prompt.named_buffers():  # e.g. a projected prefix's start
            b.copy_(ckpt.tensors.get(f"buffer.{name}", b))
    _restore_adam(state.optimizer, [adam.get(name, {}) for name, _ in
                                    state.prompt.named_parameters()])
    if "rng.torch" in ckpt.tensors:
        torch.set_rng_state(ckpt.tensors["rng.torch"])
    state.best_prompt = _saved_best(ckpt.tensors, state)
    state.global_step, state.epoch = saved["global_step"], saved["epoch"]
    state.step_in_epoch = saved["examples_in_epoch"] // state.batch.size
    best = saved["best"]
    state.best = Best.from_json(best)
    stats = saved.get("epoch_stats") or {"loss_sum": best.get("epoch_loss", 0.0),
                                         "target_tokens": best.get("epoch_tokens", 0)}
    state.epoch_stats = EpochStats(**stats)
    state.log = saved["log"]


def _saved_parameters(tensors: dict[str, torch.Tensor],
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``{name: tensor}`` and ``{name: {adam key: tensor}}`` of any format: formats 1 and 2
    held the prompt method's one parameter as ``prompt`` and its Adam state as ``adam.<key>``."""
    if "prompt" in tensors:
        adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
        return {"embeddings": tensors["prompt"]}, {"embeddings": adam}
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            name, _, inner = key[len("adam."):].rpartition(".")
            adam.setdefault(name, {})[inner] = value
    return params, adam


def _check_parameters(ckpt: Checkpoint, params: dict[str, torch.Tensor],
                      module: torch.nn.Module) -> None:
    saved = {k: list(v.shape) for k, v in params.items()}
    mine = {k: list(p.shape) for k, p in module.named_parameters()}
    if saved == mine:
        return
    method = ckpt.state.get("method", "prompt")
    diff = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
    raise SoftPromptError(f"{ckpt.path} (--method {method}) holds other parameters than this "
                          f"run (--method {getattr(module, 'name', '?')}): "
                          f"{', '.join(f'{k} {saved.get(k)} vs {mine.get(k)}' for k in diff)}; "
                          f"resume with the method, options and --num-virtual-tokens it was "
                          f"written with")


def _saved_best(tensors: dict[str, torch.Tensor], state: TrainState):
    """The best prompt so far, as the PromptLike the module exports."""
    device = next(state.prompt.parameters()).device
    if "best_prefix" in tensors:
        return KVPrefix(tensors["best_prefix"].to(device).clone())
    return tensors.get("best_prompt", tensors.get("prompt")).to(device).clone()


def _adam_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Adam's state of each parameter (step, moments), as ``adam.<name>.<key>`` tensors;
    ``names`` are the parameters' names in the optimizer's order."""
    states = opt.state_dict()["state"]
    return {f"adam.{name}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone()
            for i, name in enumerate(names) for k, v in states.get(i, {}).items()}


def _restore_adam(opt: torch.optim.Optimizer, states: list[dict[str, torch.Tensor]]) -> None:
    """Set Adam's state of parameter ``i`` to ``states[i]`` (empty: not stepped yet)."""
    sd = opt.state_dict()
    sd["state"] = {i: inner for i, inner in enumerate(states) if inner}
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
