"""Training checkpoints: ``checkpoint-<step>/`` directories that survive SIGKILL.

Each checkpoint is staged in a temporary directory and renamed into place, so it is complete
or absent. ``state.json`` records a SHA-256 per file; a checkpoint whose files do not match is
reported and skipped in favour of the previous good one. Tensors go to safetensors and
everything else to JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from softprompt import atomic
from softprompt.faults import crash_point

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint restores: tensors (prompt, Adam moments, RNG) and JSON state."""

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(output_dir: Path, step: int, tensors: dict[str, torch.Tensor],
         state: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>`` atomically. Tensors must be CPU and contiguous."""
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


def rng_state() -> dict[str, torch.Tensor]:
    """Torch's CPU RNG state as a tensor (the only randomness training uses)."""
    return {"rng.torch": torch.get_rng_state()}


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
