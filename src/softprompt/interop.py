"""PEFT interop: our prompt directories to and from PEFT adapter directories.

PEFT 0.21 writes a prompt-learning adapter as ``adapter_config.json`` plus
``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings``:

* ``PROMPT_TUNING`` (and ``P_TUNING``, saved collapsed the same way): ``[P, H]`` input
  embeddings, put **before everything** (``[P | BOS? | tokens]``, positions from 0);
* ``PREFIX_TUNING``: ``[P, L * 2 * token_dim]``. PEFT's ``get_prompt`` views it as
  ``[P, L * 2, heads, head_dim]`` and permutes to ``[L * 2, heads, P, head_dim]``: row ``2i``
  is layer ``i``'s keys, ``2i + 1`` its values, stored as the cache stores them. For
  grouped-query models ``_prepare_prompt_learning_config`` sets ``heads`` to the key/value
  heads and ``token_dim = head_dim * kv_heads``. A prompt-projection MLP is run before saving,
  so a saved adapter always holds the final prefix.

Ours keep a ``[P, H]`` prompt after BOS (``[BOS? | P | tokens]``); for a tokenizer that adds no
BOS (GPT-2, SmolLM2) the two layouts are the same computation, so export is exact there and is
refused elsewhere. A PEFT ``PROMPT_TUNING`` adapter for a model whose tokenizer does add BOS is
imported as the key/value prefix its virtual tokens produce (one forward), which is exactly
what PEFT computes. A KV prefix (``[L, 2, kv_heads, P, head_dim]``) maps to ``PREFIX_TUNING``
and back without loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from softprompt import atomic
from softprompt.errors import SoftPromptError
from softprompt.prompt import read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
PEFT_VERSION = "0.21.2"  # the version whose format we write (and read)
EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING")  # [P, H], before BOS
PREFIX_TYPE = "PREFIX_TUNING"
# What an adapter without our softprompt.json is used with: the input text as it is.
PLAIN_TASK = {"name": "text", "template": "{text}", "target_field": "target"}

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ModelShape", "is_peft_adapter",
           "prefix_to_peft", "prefix_from_peft", "peft_adapter_config", "read_adapter",
           "export_peft", "import_peft"]


# --- the model's shape, as PEFT reads it -----------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers PEFT's ``_prepare_prompt_learning_config`` reads from a model config."""

    num_layers: int
    hidden_size: int  # PROMPT_TUNING's token_dim
    num_attention_heads: int  # PROMPT_TUNING's num_attention_heads (the query heads)
    kv_heads: int  # PREFIX_TUNING's num_attention_heads
    head_dim: int  # PREFIX_TUNING's token_dim is kv_heads * head_dim

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Follow PEFT 0.21's ``_prepare_prompt_learning_config`` for a decoder-only model."""
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        raw = raw.get("text_config") or raw

        def first(*names: str) -> int:
            for name in names:
                if raw.get(name) is not None:
                    return int(raw[name])
            raise SoftPromptError(f"model config has none of {list(names)}; PEFT cannot "
                                  f"describe this model's prompt")

        layers = getattr(config, "num_hidden_layers", None)
        layers = int(layers) if layers is not None else first("num_hidden_layers", "num_layers",
                                                              "n_layer")
        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head", "num_heads")
        if raw.get("global_head_dim") is not None or raw.get("per_layer_config") is not None:
            raise SoftPromptError("this model's layers have different key/value shapes; "
                                  "PEFT's prefix layout cannot express one prefix for all")
        if raw.get("num_key_value_heads") is not None:
            kv_heads = int(raw["num_key_value_heads"])
            head_dim = int(raw["head_dim"]) if raw.get("head_dim") is not None else hidden // heads
        else:  # PEFT keeps token_dim = hidden and heads = query heads (multi-head attention)
            kv_heads, head_dim = heads, hidden // heads
        return cls(layers, hidden, heads, kv_heads, head_dim)


# --- tensor layouts ---------------------------------------------------------------------------


def prefix_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """Our prefix ``[L, 2, kv_heads, P, head_dim]`` -> PEFT's ``[P, L * 2 * kv_heads * head_dim]``.

    The inverse of PEFT's ``view(P, L * 2, heads, head_dim).permute(2, 0, 3, 1, 4)`` (batch
    dimension left out): flatten ``(L, 2)`` into ``L * 2`` (keys at ``2i``, values at ``2i + 1``),
    then move P first.
    """
    layers, two, heads, p, head_dim = kv.shape
    assert two == 2, kv.shape
    return (kv.reshape(layers * 2, heads, p, head_dim)  # [L*2, heads, P, hd]
            .permute(2, 0, 1, 3)  # [P, L*2, heads, hd]
            .reshape(p, layers * 2 * heads * head_dim).contiguous())


def prefix_from_peft(weight: torch.Tensor, num_layers: int, kv_heads: int) -> torch.Tensor:
    """PEFT's ``[P, L * 2 * token_dim]`` -> ours ``[L, 2, kv_heads, P, head_dim]``
    (``head_dim = token_dim // kv_heads``), as PEFT's ``get_prompt`` reshapes it."""
    p, width = weight.shape
    head_dim = width // (num_layers * 2 * kv_heads)
    return (weight.reshape(p, num_layers * 2, kv_heads, head_dim)  # [P, L*2, heads, hd]
            .permute(1, 2, 0, 3)  # [L*2, heads, P, hd]
            .reshape(num_layers, 2, kv_heads, p, head_dim).contiguous())


# --- adapter_config.json ---------------------------------------------------------------------


def peft_adapter_config(peft_type: str, shape: ModelShape, num_virtual_tokens: int,
                        base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json`` with exactly the fields PEFT 0.21's ``save_pretrained`` writes
    for a causal LM (tests/test_interop.py compares it with PEFT's own output)."""
    common = {"auto_mapping": None, "base_model_name_or_path": base_model,
              "inference_mode": True, "modules_to_save": None, "num_layers": shape.num_layers,
              "num_transformer_submodules": 1, "num_virtual_tokens": num_virtual_tokens,
              "peft_type": peft_type, "peft_version": PEFT_VERSION, "revision": None,
              "task_type": "CAUSAL_LM"}
    if peft_type == "PROMPT_TUNING":
        extra = {"num_attention_heads": shape.num_attention_heads,
                 "token_dim": shape.hidden_size, "prompt_tuning_init": "RANDOM",
                 "prompt_tuning_init_text": None, "tokenizer_kwargs": None,
                 "tokenizer_name_or_path": None}
    elif peft_type == PREFIX_TYPE:
        token_dim = shape.kv_heads * shape.head_dim
        extra = {"num_attention_heads": shape.kv_heads, "token_dim": token_dim,
                 "encoder_hidden_size": token_dim, "init_weights": None,
                 "prefix_projection": False}
    else:
        raise SoftPromptError(f"cannot write a {peft_type} adapter; PROMPT_TUNING or "
                              f"PREFIX_TUNING")
    return dict(sorted({**common, **extra}.items()))


def is_peft_adapter(directory: str | Path) -> bool:
    """A directory holding ``adapter_config.json`` and none of our tensor files."""
    from softprompt.prompt import PREFIX_FILE, PROMPT_FILE

    d = Path(directory)
    return (d / ADAPTER_CONFIG).is_file() and not any(
        (d / name).exists() for name in (PROMPT_FILE, PREFIX_FILE))


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SoftPromptError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SoftPromptError(f"{path} must hold a JSON object")
    kind = config.get("peft_type")
    if kind not in (*EMBEDDING_TYPES, PREFIX_TYPE):
        raise SoftPromptError(f"{path}: peft_type {kind!r} is not a prompt; only PROMPT_TUNING, "
                              f"P_TUNING and PREFIX_TUNING adapters hold one")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise SoftPromptError(f"{path}: task_type {config.get('task_type')!r}; only CAUSAL_LM "
                              f"adapters fit a causal LM")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise SoftPromptError(f"{path}: num_transformer_submodules "
                              f"{config['num_transformer_submodules']} (encoder-decoder); only 1 "
                              f"fits a causal LM")
    for key in ("num_virtual_tokens", "token_dim"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise SoftPromptError(f"{path}: {key} must be a positive integer, got "
                                  f"{config.get(key)!r}")
    if kind == PREFIX_TYPE:
        for key in ("num_layers", "num_attention_heads"):
            if not isinstance(config.get(key), int) or config[key] < 1:
                raise SoftPromptError(f"{path}: {key} must be a positive integer, got "
                                      f"{config.get(key)!r}")
    return config


def _read_weights(directory: Path, config: dict[str, Any]) -> torch.Tensor:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = directory / "adapter_model.bin"
        hint = (f"{pickled.name} is a pickle, which softprompt never loads: re-save it with "
                f"PEFT's save_pretrained(..., safe_serialization=True)" if pickled.exists()
                else "the adapter is incomplete")
        raise SoftPromptError(f"{path} not found; {hint}")
    weight = read_tensor(path, PEFT_KEY)
    p, dim = config["num_virtual_tokens"], config["token_dim"]
    width = dim if config["peft_type"] != PREFIX_TYPE else config["num_layers"] * 2 * dim
    if list(weight.shape) != [p, width]:
        raise SoftPromptError(f"{path}: {PEFT_KEY} has shape {list(weight.shape)}, "
                              f"{ADAPTER_CONFIG} says [{p}, {width}]")
    if config["peft_type"] == PREFIX_TYPE and dim % config["num_attention_heads"]:
        raise SoftPromptError(f"{path}: token_dim {dim} is not a multiple of "
                              f"num_attention_heads {config['num_attention_heads']}")
    if not torch.isfinite(weight).all():
        raise SoftPromptError(f"{path}: {PEFT_KEY} holds NaN or infinite values")
    return weight


# --- the model an adapter belongs to ----------------------------------------------------------


def _model_files(name: str):
    """``(config, tokenizer)`` of ``--model`` without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from softprompt import models

    if not name:
        raise SoftPromptError("the adapter names no base model (base_model_name_or_path is "
                              "null); pass --model")
    path = models.resolve(name)
    offline = not Path(path).is_dir() and not models._hub_reachable()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SoftPromptError(f"--model {name!r}: cannot read its config and tokenizer "
                              f"({first}); pass a --model that exists here") from None
    return config, tokenizer


def _base_model_name(name: str) -> str:
    """What PEFT records as ``base_model_name_or_path``: the name the weights load from (for
    the bundled model, its converted directory, which ``from_pretrained`` can open)."""
    from softprompt import models

    return str(models.bundled_model_dir(name)) if name in models.BUNDLED else name


def _our_model_name(base: str | None) -> str:
    """``base_model_name_or_path`` -> ``--model``: the bundled model's directory back to its
    alias, anything else as written."""
    from softprompt import models

    for alias in models.BUNDLED:
        if base and Path(base) == models.cache_dir() / "models" / alias:
            return alias
    return base or ""


def start_prefix(model, embeddings: torch.Tensor):
    """The KV prefix ``[L, 2, kv_heads, P, head_dim]`` that ``[P, H]`` virtual tokens put
    first (positions ``0..P-1``, before BOS) leave in every layer: one forward, float32.

    This is PEFT's PROMPT_TUNING computation for the virtual tokens, so a model whose tokenizer
    adds BOS gets PEFT's outputs from it (``[prefix | BOS | tokens]``).
    """
    from softprompt.inputs import build_prompt_cache
    from softprompt.prefix import KVPrefix

    cache = build_prompt_cache(model, embeddings, None)
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in cache.layers])  # [L, 2, h, P, d]
    return KVPrefix(kv.to("cpu", torch.float32))


# --- reading an adapter as a prompt ----------------------------------------------------------


def _adapter_meta(directory: Path, config: dict[str, Any], weight: torch.Tensor,
                  prefix_shape: tuple[int, int, int] | None):
    """A PromptMeta for an adapter: our ``softprompt.json`` beside it (written by
    :func:`export_peft`) gives task, model and metrics; PEFT's config gives the rest."""
    from softprompt.prompt import CONFIG_FILE, PromptMeta, library_versions

    ours: dict[str, Any] = {}
    if (directory / CONFIG_FILE).is_file():
        try:
            ours = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SoftPromptError(f"{directory / CONFIG_FILE} is not valid JSON ({exc})") from None
        ours = ours if isinstance(ours, dict) else {}
    fields: dict[str, Any] = {
        "model": ours.get("model") or _our_model_name(config.get("base_model_name_or_path")),
        "task": ours.get("task") if isinstance(ours.get("task"), dict) else dict(PLAIN_TASK),
        "num_virtual_tokens": weight.shape[0],
        "hidden_size": ours.get("hidden_size") or config["token_dim"],
        "init": ours.get("init") or f"peft:{config['peft_type']}",
        "train_args": ours.get("train_args") or {"peft": config},
        "metrics": ours.get("metrics") or {},
        "versions": ours.get("versions") or library_versions(),
    }
    if prefix_shape is not None:
        layers, heads, head_dim = prefix_shape
        fields.update(method="prefix", num_layers=layers, num_key_value_heads=heads,
                      head_dim=head_dim)
    elif ours.get("method"):
        fields["method"] = ours["method"]
    known = set(PromptMeta.__dataclass_fields__)
    return PromptMeta(**{k: v for k, v in fields.items() if k in known})


def _adds_bos(name: str) -> bool:
    from softprompt.encode import adds_bos

    return adds_bos(_model_files(name)[1])


def read_adapter(directory: str | Path, *, check_layout: bool = True):
    """A PEFT adapter directory -> ``(PromptLike, PromptMeta)``, as our directories load.

    PREFIX_TUNING becomes a ``KVPrefix``; PROMPT_TUNING / P_TUNING a ``[P, H]`` prompt where the
    base model's tokenizer adds no BOS (the layouts coincide). Where it adds BOS, PEFT's
    virtual tokens precede BOS and only ``softprompt import`` (which runs the model once) can
    keep that exactly, so this refuses (unless ``check_layout`` is off: inspection reads the
    tensor as stored).
    """
    d = Path(directory)
    config = _read_config(d)
    weight = _read_weights(d, config)
    if config["peft_type"] == PREFIX_TYPE:
        from softprompt.prefix import KVPrefix

        layers, heads = config["num_layers"], config["num_attention_heads"]
        meta = _adapter_meta(d, config, weight, (layers, heads, config["token_dim"] // heads))
        return KVPrefix(prefix_from_peft(weight, layers, heads)), meta
    meta = _adapter_meta(d, config, weight, None)
    if not check_layout:
        return weight, meta
    hint = f"convert it with `softprompt import {d} --model M --output DIR` and use DIR"
    if not meta.model:
        raise SoftPromptError(f"{d}: the adapter names no base model, so whether its "
                              f"tokenizer adds BOS (which decides where PEFT's virtual tokens "
                              f"sit) is unknown; {hint}")
    try:
        bos = _adds_bos(meta.model)
    except SoftPromptError as exc:
        raise SoftPromptError(f"{d}: cannot check whether the base model's tokenizer adds BOS "
                              f"({exc}); {hint}") from None
    if bos:
        raise SoftPromptError(
            f"{d}: PEFT puts this {config['peft_type']} adapter's virtual tokens before BOS and "
            f"{meta.model}'s tokenizer adds BOS; convert it once with `softprompt import {d} "
            f"--output DIR` (exact, as a key/value prefix) and use DIR")
    return weight, meta


# --- commands --------------------------------------------------------------------------------


def _check_output(output: Path, overwrite: bool, what: tuple[str, ...]) -> None:
    atomic.check_writable(output)
    held = [name for name in what if (output / name).exists()]
    if held and not overwrite:
        raise SoftPromptError(f"{output} already holds {held[0]}; pass --overwrite to replace it")


def export_peft(directory: str | Path, output: str | Path, *, model: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the prompt in ``directory`` as a PEFT 0.21 adapter in ``output``.

    ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT's ``save_pretrained``
    writes them (PROMPT_TUNING for a ``[P, H]`` prompt, PREFIX_TUNING for a KV prefix), and our
    ``softprompt.json`` beside them (PEFT ignores it; it keeps the task for our commands).
    ``model`` overrides the model recorded with the prompt. Returns ``output``.
    """
    from softprompt.encode import adds_bos
    from softprompt.prompt import CONFIG_FILE, load_prompt_tensor

    prompt, meta = load_prompt_tensor(directory)
    name = model or meta.model
    out = Path(output)
    _check_output(out, overwrite, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    config, tokenizer = _model_files(name)
    shape = ModelShape.from_config(config)
    if isinstance(prompt, torch.Tensor):
        if prompt.shape[1] != shape.hidden_size:
            raise SoftPromptError(f"{directory}: prompt hidden size {prompt.shape[1]} does not "
                                  f"match {name}'s {shape.hidden_size}; pass the --model it was "
                                  f"trained on")
        if adds_bos(tokenizer):
            raise SoftPromptError(
                f"{name}'s tokenizer adds BOS and our prompt follows it, but PEFT's "
                f"PROMPT_TUNING puts virtual tokens before BOS: PEFT would compute something "
                f"else, so this prompt cannot be exported exactly")
        peft_type, weight = "PROMPT_TUNING", prompt
    else:
        expected = [shape.num_layers, 2, shape.kv_heads, prompt.kv.shape[3], shape.head_dim]
        if list(prompt.kv.shape) != expected:
            raise SoftPromptError(f"{directory}: prefix shape {list(prompt.kv.shape)} does not "
                                  f"fit {name} ({expected}); pass the --model it was trained on")
        peft_type, weight = PREFIX_TYPE, prefix_to_peft(prompt.kv)
    adapter = peft_adapter_config(peft_type, shape, weight.shape[0], _base_model_name(name))
    weights = save({PEFT_KEY: weight.detach().to("cpu", torch.float32).contiguous()},
                   metadata={"format": "pt"})
    atomic.write_bytes(out / ADAPTER_WEIGHTS, weights)
    atomic.write_json(out / CONFIG_FILE, {**meta.__dict__, "model": name})
    atomic.write_text(out / ADAPTER_CONFIG, json.dumps(adapter, indent=2, sort_keys=True) + "\n")
    return out


def import_peft(adapter: str | Path, output: str | Path, *, model: str | None = None,
                task: Any = None, overwrite: bool = False):
    """Convert the PEFT adapter directory ``adapter`` into our prompt directory ``output``.

    ``model`` overrides ``base_model_name_or_path``; ``task`` (a name or Task) is recorded
    for generate/evaluate (default: the task of our softprompt.json beside the adapter, else
    the plain ``{text}`` task). A PROMPT_TUNING adapter for a tokenizer that adds BOS becomes
    the exact KV prefix of its virtual tokens (the model runs once, on the CPU in float32).
    Returns the saved PromptMeta.
    """
    from softprompt import models
    from softprompt.prompt import CONFIG_FILE, PREFIX_FILE, PROMPT_FILE, save_prompt
    from softprompt.tasks import Task, get_task

    d = Path(adapter)
    if not (d / ADAPTER_CONFIG).is_file():
        raise SoftPromptError(f"{d / ADAPTER_CONFIG} not found: ADAPTER must be a PEFT adapter "
                              f"directory")
    config = _read_config(d)
    weight = _read_weights(d, config)
    out = Path(output)
    _check_output(out, overwrite, (CONFIG_FILE, PROMPT_FILE, PREFIX_FILE))
    if config["peft_type"] == PREFIX_TYPE:
        prompt, meta = read_adapter(d)
    else:
        prompt, meta = weight, _adapter_meta(d, config, weight, None)
    name = model or meta.model
    if isinstance(prompt, torch.Tensor) and _adds_bos(name):
        lm, _ = models.load_model(name, dtype="float32", device="cpu")
        if weight.shape[1] != lm.get_input_embeddings().weight.shape[1]:
            raise SoftPromptError(f"{d}: token_dim {weight.shape[1]} does not match {name}'s "
                                  f"hidden size; pass the --model it was trained on")
        prompt = start_prefix(lm, weight)
        layers, _, heads, _, head_dim = prompt.kv.shape
        meta = _adapter_meta(d, config, weight, (layers, heads, head_dim))
    meta.model = name
    if task is not None:
        meta.task = (task if isinstance(task, Task) else get_task(task)).to_dict()
    save_prompt(out, prompt, meta)
    return meta
