"""Training methods: one small module each, all behind :func:`build`.

=========  ============================================  =====================================
method     trained parameters                            saved (``export()``)
=========  ============================================  =====================================
prompt     ``embeddings`` ``[P, H]``                     the embeddings, ``[P, H]``
ptuning    ``embeddings`` + an MLP or LSTM encoder       the encoder's output, ``[P, H]``
residual   ``embeddings`` + a bottleneck MLP + LayerNorm ``E + LN(MLP(E))``, ``[P, H]``
prefix     a key/value prefix (or an MLP that makes it)  a KV prefix ``[L, 2, kv, P, hd]``
=========  ============================================  =====================================

Each is a :class:`~softprompt.methods.base.PromptMethod`: ``forward()`` gives the
differentiable prompt for the loss, ``export()`` the detached one that is saved.
"""

from __future__ import annotations

from pathlib import Path

import torch

from softprompt.config import Method, PromptConfig, PromptInit
from softprompt.errors import SoftPromptError
from softprompt.methods.base import PromptMethod, detached
from softprompt.methods.prefix import PrefixTuning
from softprompt.methods.prompt import PromptTuning
from softprompt.methods.ptuning import PTuning
from softprompt.methods.residual import ResidualPrompt
from softprompt.prefix import kv_shape

METHODS: dict[Method, type[PromptMethod]] = {
    Method.PROMPT: PromptTuning,
    Method.PTUNING: PTuning,
    Method.RESIDUAL: ResidualPrompt,
    Method.PREFIX: PrefixTuning,
}


def init_token_ids(config: PromptConfig, task, tokenizer) -> list[int] | None:
    """Token ids of the init text (``--init-text``, else the task's hard prompt or template),
    or None when no init uses them."""
    uses_text = config.init is PromptInit.TEXT or (
        config.method is Method.PREFIX and config.prefix_init.value == "text")
    if not uses_text:
        return None
    text = config.init_text or task.instruction or task.template
    return tokenizer(text, add_special_tokens=False).input_ids


def build(config: PromptConfig, model, init_ids: list[int] | None, seed: int,
          model_name: str | None = None) -> PromptMethod:
    """A fresh method module for ``model`` (float32, on the CPU), or with ``--init-from`` one
    that starts from that directory's trained prompt (``model_name``: this run's ``--model``,
    which the directory's must equal)."""
    cls = METHODS[config.method]
    # The start values (a prefix's init text is one forward pass) are the same whatever
    # autocast region the caller is in: compare() trains inside its bf16 precision context.
    with torch.autocast(model.device.type, enabled=False):
        if config.init_from:
            artefact = load_init_from(config, model, model_name)
            return cls.from_trained(config, model, artefact, seed)
        return cls.create(config, model, init_ids, seed)


def check_init_from(config: PromptConfig, model_name: str | None = None) -> None:
    """Refuse an ``--init-from`` directory of another method or model before the model loads
    (its shape is checked against the model by :func:`load_init_from`)."""
    from softprompt.prompt import load_meta

    directory = Path(config.init_from)
    meta = load_meta(directory)
    if meta.method != config.method.value:
        raise SoftPromptError(f"--init-from {directory} holds a {meta.method!r} prompt, this "
                              f"run trains --method {config.method.value}; start from a "
                              f"directory of the same method")
    if model_name is not None and meta.model != model_name:
        raise SoftPromptError(f"--init-from {directory} was trained on --model {meta.model}, "
                              f"this run uses --model {model_name}; start from a prompt of "
                              f"the same model")


def load_init_from(config: PromptConfig, model, model_name: str | None = None):
    """The PromptLike saved in ``--init-from``, refused in one line if its method, model or
    shape differs from this run's."""
    from softprompt.prompt import load_prompt_tensor

    check_init_from(config, model_name)
    artefact, _ = load_prompt_tensor(config.init_from)
    expected = expected_shape(config, model)
    shape = list(artefact.kv.shape if hasattr(artefact, "kv") else artefact.shape)
    if shape != expected:
        raise SoftPromptError(f"--init-from {config.init_from} holds a prompt of shape {shape}, "
                              f"this run needs {expected} (--num-virtual-tokens "
                              f"{config.num_virtual_tokens} on this model); match them")
    return artefact


def expected_shape(config: PromptConfig, model) -> list[int]:
    """The exported prompt's shape: ``[P, H]``, or ``[L, 2, kv_heads, P, head_dim]``."""
    if config.method is Method.PREFIX:
        layers, kv_heads, head_dim = kv_shape(model.config)
        return [layers, 2, kv_heads, config.num_virtual_tokens, head_dim]
    return [config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1]]


__all__ = ["METHODS", "PromptMethod", "build", "check_init_from", "detached", "init_token_ids",
           "load_init_from",
           "PromptTuning", "PTuning", "ResidualPrompt", "PrefixTuning"]
