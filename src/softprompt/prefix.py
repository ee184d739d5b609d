"""What a trained prompt is at inference: a ``[P, H]`` prompt or a key/value prefix.

The methods ``prompt``, ``ptuning`` and ``residual`` all end as a ``[P, H]`` float32 tensor of
input embeddings (reparameterisations collapse to it when saved); ``prefix`` ends as a
:class:`KVPrefix`, keys and values for every decoder layer. :data:`PromptLike` is either.
Generation, evaluation and the serving engine turn both into the same thing, the prefix's
key/value cache (:func:`softprompt.inputs.build_prompt_cache`), so nothing downstream of
loading asks which method trained a prompt.

Where each sits in a row:

* ``[P, H]`` prompt: ``[BOS? | P virtual tokens | tokens..]``, the virtual tokens take
  positions like any token (after BOS where the tokenizer adds one);
* KV prefix: ``[P prefix slots | BOS? | tokens..]``. The slots have no positions of their own
  (their keys are used as stored, never rotated again); the first real token takes position
  ``P``. This is PEFT's PREFIX_TUNING layout (the model's cache position starts at the past
  length), so an exported prefix gives PEFT the same logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from softprompt.errors import SoftPromptError

__all__ = ["KVPrefix", "PromptLike", "num_virtual_tokens", "check_fits", "content_key",
           "kv_shape"]


@dataclass(frozen=True, eq=False)
class KVPrefix:
    """A key/value prefix for every decoder layer.

    ``kv``: ``[L, 2, kv_heads, P, head_dim]``; ``kv[i, 0]`` are layer ``i``'s keys and
    ``kv[i, 1]`` its values, exactly as the model's cache holds them (for RoPE models the keys
    are already rotated). Stored float32; may require grad while training.
    """

    kv: torch.Tensor

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise SoftPromptError(f"a KV prefix is [layers, 2, kv_heads, P, head_dim]; got "
                                  f"shape {list(self.kv.shape)}")

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.kv.shape[2]

    @property
    def head_dim(self) -> int:
        return self.kv.shape[4]

    def layers(self, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``[1, kv_heads, P, head_dim]`` (a cache's rows)."""
        kv = self.kv.to(device=device, dtype=dtype)
        return [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])]

    def detach(self) -> KVPrefix:
        """A float32 copy on the CPU, cut from the autograd graph (what is saved)."""
        return KVPrefix(self.kv.detach().to("cpu", torch.float32).clone())

    def to(self, *args, **kwargs) -> KVPrefix:
        return KVPrefix(self.kv.to(*args, **kwargs))


PromptLike = torch.Tensor | KVPrefix


def num_virtual_tokens(prompt: PromptLike | None) -> int:
    """``P``: the positions (or cache slots) the prompt takes in front of each input."""
    if prompt is None:
        return 0
    return prompt.num_virtual_tokens if isinstance(prompt, KVPrefix) else prompt.shape[0]


def kv_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a model's key/value cache, from its config."""
    config = getattr(config, "get_text_config", lambda: config)()
    heads = config.num_attention_heads  # GPT-2's config maps n_head etc. to these names
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def check_fits(prompt: PromptLike, model, source: str | None = None) -> None:
    """Refuse a prompt that does not fit ``model``: a ``[P, H]`` prompt whose ``H`` is not the
    embedding width, or a KV prefix whose layers, key/value heads or head size differ."""
    from softprompt.prompt import check_hidden_size

    if not isinstance(prompt, KVPrefix):
        check_hidden_size(prompt, model.get_input_embeddings().weight.shape[1], source)
        return
    expected = kv_shape(model.config)
    got = (prompt.num_layers, prompt.num_key_value_heads, prompt.head_dim)
    if got != expected:
        where = f"{source}: " if source else ""
        raise SoftPromptError(
            f"{where}KV prefix has (layers, kv heads, head dim) {got} but the model has "
            f"{expected}; use the --model the prefix was trained on")


def content_key(prompt: PromptLike) -> str:
    """sha256 of the prompt's method kind, shape and float32 bytes: equal keys, equal prompt."""
    tensor = prompt.kv if isinstance(prompt, KVPrefix) else prompt
    kind = "prefix" if isinstance(prompt, KVPrefix) else "prompt"
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{kind}:{list(data.shape)}:".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()
