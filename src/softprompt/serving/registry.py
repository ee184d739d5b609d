"""The servable prompts: trained prompt directories under one root, checked before use.

Every directory directly under ``--prompts`` that holds a trained prompt is a servable prompt
named by the directory. Names cannot leave the root (no ``..``, no absolute paths, no symlink
pointing outside), and each tensor is checked for shape, hidden size and finite values before
the engine sees it; a directory that fails is skipped with a one-line warning.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.errors import SoftPromptError
from softprompt.prompt import CONFIG_FILE, check_hidden_size, load_prompt_tensor
from softprompt.tasks import Task

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServedPrompt:
    """A prompt the server can use: its tensor ``[P, H]``, task and where it came from."""

    name: str
    tensor: torch.Tensor
    task: Task
    path: Path
    key: str = ""  # the engine's cache key (sha256 of the tensor)


def confined(root: Path, name: str) -> Path:
    """``root / name``, refusing names that could reach outside ``root``."""
    if not NAME.match(name) or name in (".", ".."):
        raise SoftPromptError(f"prompt name {name!r} is not allowed; use letters, digits, "
                              f"'.', '_' and '-' (the directory's name under --prompts)")
    root = root.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise SoftPromptError(f"prompt {name!r} resolves outside --prompts; remove the link")
    return path


def load_served(root: Path, name: str, hidden_size: int) -> ServedPrompt:
    """Load and check one prompt directory ``root/name``."""
    path = confined(root, name)
    if not (path / CONFIG_FILE).is_file():
        raise SoftPromptError(f"prompt {name!r}: no {CONFIG_FILE} in {path}")
    tensor, meta = load_prompt_tensor(path)
    check_hidden_size(tensor, hidden_size, str(path))
    if not torch.isfinite(tensor).all():
        raise SoftPromptError(f"prompt {name!r}: the tensor holds non-finite values")
    return ServedPrompt(name, tensor, Task.from_dict(meta.task), path)


def discover(root: Path, hidden_size: int) -> list[ServedPrompt]:
    """Every loadable prompt directory under ``root``; the others are skipped with a warning."""
    if not root.is_dir():
        raise SoftPromptError(f"--prompts {root} is not a directory")
    found = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or not (child / CONFIG_FILE).exists():
            continue
        try:
            found.append(load_served(root, child.name, hidden_size))
        except SoftPromptError as exc:
            print(f"warning: skipping {child}: {exc}", file=sys.stderr)
    return found
