"""The servable prompts: trained prompt directories (or PEFT adapters) under one root.

Every directory directly under ``--prompts`` that holds a trained prompt is a servable prompt
named by the directory. Names cannot leave the root (no ``..``, no absolute paths, no symlink
pointing outside); the engine checks each tensor (shape, hidden size, finite values) when the
server registers it, and the server skips a directory that fails with a one-line warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from softprompt.errors import SoftPromptError
from softprompt.interop import ADAPTER_CONFIG
from softprompt.prefix import PromptLike
from softprompt.prompt import CONFIG_FILE, load_prompt_tensor
from softprompt.tasks import Task

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServedPrompt:
    """A prompt the server can use: its tensor ``[P, H]`` or KV prefix, task and where it came
    from."""

    name: str
    tensor: PromptLike
    task: Task
    path: Path
    key: str = ""  # the engine's cache key (sha256 of the tensor)
    method: str = "prompt"  # the method that trained it (prompt, ptuning, residual, prefix)


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


def load_served(root: Path, name: str) -> ServedPrompt:
    """Load one prompt directory ``root/name`` (its tensor is checked against the model when
    the engine registers it: :meth:`softprompt.engine.Engine.add_prompt`)."""
    path = confined(root, name)
    if not any((path / f).is_file() for f in (CONFIG_FILE, ADAPTER_CONFIG)):
        raise SoftPromptError(f"prompt {name!r}: no {CONFIG_FILE} or {ADAPTER_CONFIG} in {path}")
    tensor, meta = load_prompt_tensor(path)
    return ServedPrompt(name, tensor, Task.from_dict(meta.task), path, method=meta.method)


def candidates(root: Path) -> list[str]:
    """The names of the directories under ``root`` that hold a prompt's config."""
    if not root.is_dir():
        raise SoftPromptError(f"--prompts {root} is not a directory")
    return [child.name for child in sorted(root.iterdir())
            if child.is_dir() and any((child / f).exists() for f in (CONFIG_FILE, ADAPTER_CONFIG))]
