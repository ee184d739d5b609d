"""A trained prompt on disk: its tensor and the JSON that describes it.

Saved as ``prompt.safetensors`` (key ``prompt_embeddings``, ``[P, H]`` float32: the methods
prompt, ptuning and residual) or ``prefix.safetensors`` (key ``prefix``, ``[L, 2, kv_heads, P,
head_dim]`` float32: a :class:`~softprompt.prefix.KVPrefix` from prefix tuning), beside
``softprompt.json`` (method, model, task, template, P, init, training arguments, metrics,
library versions). A directory without ``method`` (written before prefix tuning existed) holds
a ``prompt``. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from softprompt import atomic
from softprompt.config import PromptInit
from softprompt.errors import SoftPromptError
from softprompt.prefix import KVPrefix, PromptLike

PROMPT_FILE = "prompt.safetensors"
PREFIX_FILE = "prefix.safetensors"
CONFIG_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
PREFIX_KEY = "prefix"
FORMAT_VERSION = 1


class SoftPrompt(torch.nn.Module):
    """Holds the learned prompt. ``forward()`` returns it: ``[P, H]`` float32."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        if embeddings.dim() != 2:
            raise SoftPromptError(f"a soft prompt is [P, H]; got shape {list(embeddings.shape)}")
        self.embeddings = torch.nn.Parameter(embeddings.detach().to(torch.float32).clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def forward(self) -> torch.Tensor:
        return self.embeddings


def init_prompt(embedding_table: torch.Tensor, num_virtual_tokens: int,
                init: PromptInit | str = PromptInit.TEXT, init_token_ids: list[int] | None = None,
                seed: int = 0) -> SoftPrompt:
    """Build a prompt from the model's input embedding table ``[V, H]``.

    Args:
        embedding_table: the frozen input embeddings ``[V, H]``.
        num_virtual_tokens: P.
        init: ``text`` (embeddings of ``init_token_ids`` repeated or cut to P), ``vocab``
            (P tokens sampled from the 5,000 lowest ids, seeded) or ``random`` (uniform,
            scaled to the table's std).
        init_token_ids: token ids of the init text (required for ``text``).
        seed: seed for ``vocab`` and ``random``.
    """
    init = PromptInit(init)
    table = embedding_table.detach().to(torch.float32)
    vocab_size, _ = table.shape
    gen = torch.Generator().manual_seed(seed)
    if init is PromptInit.TEXT:
        if not init_token_ids:
            raise SoftPromptError("--init text needs a non-empty --init-text")
        ids = torch.tensor(init_token_ids, dtype=torch.long)
        reps = -(-num_virtual_tokens // len(ids))  # ceil
        ids = ids.repeat(reps)[:num_virtual_tokens]
        values = table[ids]
    elif init is PromptInit.VOCAB:
        ids = torch.randint(0, min(5000, vocab_size), (num_virtual_tokens,), generator=gen)
        values = table[ids]
    else:
        # U(-a, a) has std a / sqrt(3); match the table's std.
        bound = table.std().item() * 3**0.5
        values = (torch.rand(num_virtual_tokens, table.shape[1], generator=gen) * 2 - 1) * bound
    return SoftPrompt(values)


@dataclass
class PromptMeta:
    """What ``softprompt.json`` holds besides the tensor."""

    model: str
    task: dict[str, Any]
    num_virtual_tokens: int
    hidden_size: int
    init: str = "text"
    train_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    method: str = "prompt"  # prompt | ptuning | residual | prefix (absent before prefixes)
    # A KV prefix's cache shape (None for [P, H] prompts).
    num_layers: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None

    @property
    def is_prefix(self) -> bool:
        return self.method == "prefix"

    def tensor_shape(self) -> list[int]:
        """The shape the saved tensor must have."""
        if self.is_prefix:
            return [self.num_layers, 2, self.num_key_value_heads, self.num_virtual_tokens,
                    self.head_dim]
        return [self.num_virtual_tokens, self.hidden_size]


def library_versions() -> dict[str, str]:
    import transformers

    import softprompt

    return {"softprompt": softprompt.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def prompt_exists(directory: str | Path) -> bool:
    d = Path(directory)
    return any((d / name).exists() for name in (PROMPT_FILE, PREFIX_FILE, CONFIG_FILE))


def save_prompt(directory: str | Path, prompt: SoftPrompt | PromptLike, meta: PromptMeta) -> None:
    """Write the tensor file (``prompt.safetensors`` or, for a :class:`KVPrefix`,
    ``prefix.safetensors``) then ``softprompt.json``, each atomically; the other kind's tensor
    file, left by an earlier run in the directory, is removed."""
    if isinstance(prompt, KVPrefix):
        tensor, name, key = prompt.kv, PREFIX_FILE, PREFIX_KEY
        if not meta.is_prefix:
            raise SoftPromptError(f"a KV prefix is saved with method 'prefix', not "
                                  f"{meta.method!r}")
    else:
        tensor = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
        name, key = PROMPT_FILE, TENSOR_KEY
        if meta.is_prefix:
            raise SoftPromptError("method 'prefix' saves a KV prefix, got a [P, H] tensor")
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    if list(tensor.shape) != meta.tensor_shape():
        raise SoftPromptError(f"prompt shape {list(tensor.shape)} does not match its config "
                              f"{meta.tensor_shape()}")
    meta.versions = meta.versions or library_versions()
    directory = Path(directory)
    atomic.write_bytes(directory / name, save({key: tensor}))
    (directory / (PROMPT_FILE if name == PREFIX_FILE else PREFIX_FILE)).unlink(missing_ok=True)
    atomic.write_json(directory / CONFIG_FILE, meta.__dict__)


def load_meta(directory: str | Path) -> PromptMeta:
    """Read and validate ``softprompt.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise SoftPromptError(f"{path} not found: --prompt must be a directory written by "
                              f"`softprompt train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SoftPromptError(f"{path} is not valid JSON ({exc}); re-run training or restore "
                              f"the file") from None
    if not isinstance(raw, dict):
        raise SoftPromptError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    required = {"model": (str, "a string"), "task": (dict, "an object"),
                "num_virtual_tokens": (int, "an integer"), "hidden_size": (int, "an integer")}
    if raw.get("method") == "prefix":
        required.update({k: (int, "an integer")
                         for k in ("num_layers", "num_key_value_heads", "head_dim")})
    for key, (kind, described) in required.items():
        if not isinstance(raw.get(key), kind):
            raise SoftPromptError(f"{path}: field {key!r} must be {described}, "
                                  f"got {raw.get(key)!r}")
    if not isinstance(raw.get("method", "prompt"), str):
        raise SoftPromptError(f"{path}: field 'method' must be a string, got {raw['method']!r}")
    known = set(PromptMeta.__dataclass_fields__)
    return PromptMeta(**{k: v for k, v in raw.items() if k in known})


def load_prompt_tensor(directory: str | Path) -> tuple[PromptLike, PromptMeta]:
    """Load the trained prompt (``[P, H]`` tensor or :class:`KVPrefix`) and its meta,
    checking they agree. A PEFT adapter directory (``adapter_config.json``) loads too
    (softprompt.interop)."""
    from softprompt import interop

    if interop.is_peft_adapter(directory):
        return interop.read_adapter(directory)
    meta = load_meta(directory)
    name, key = (PREFIX_FILE, PREFIX_KEY) if meta.is_prefix else (PROMPT_FILE, TENSOR_KEY)
    path = Path(directory) / name
    if not path.is_file():
        raise SoftPromptError(f"{path} not found beside {CONFIG_FILE} (method "
                              f"{meta.method!r})")
    tensor = read_tensor(path, key)
    expected = meta.tensor_shape()
    if list(tensor.shape) != expected:
        raise SoftPromptError(f"{path}: tensor shape {list(tensor.shape)} != {expected} in "
                              f"{CONFIG_FILE}")
    return (KVPrefix(tensor) if meta.is_prefix else tensor), meta


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """The float32 tensor ``key`` of the safetensors file ``path``, or a one-line error."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise SoftPromptError(f"{path} is not a valid safetensors file ({exc})") from None
    if key not in tensors:
        raise SoftPromptError(f"{path} holds no {key!r} tensor (keys: {sorted(tensors)})")
    return tensors[key].to(torch.float32)


def check_hidden_size(tensor: torch.Tensor, hidden_size: int, source: str | None = None) -> None:
    """Refuse a ``[P, H]`` prompt whose ``H`` is not the model's embedding width.

    The one width check: loading a prompt directory (``source`` names its file) and merging
    a prompt into model inputs (inputs.py) both call it.
    """
    if tensor.shape[-1] != hidden_size:
        where = f"{source}: " if source else ""
        raise SoftPromptError(
            f"{where}prompt hidden size {tensor.shape[-1]} does not match the model's "
            f"{hidden_size}; use the --model the prompt was trained on"
        )
