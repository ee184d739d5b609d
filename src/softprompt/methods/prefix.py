"""Prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022): trained keys and values in
front of every decoder layer, a :class:`~softprompt.prefix.KVPrefix`
``[L, 2, kv_heads, P, head_dim]``.

Start (``--prefix-init``):

* ``text`` (default): the keys/values that the init text (``--init-text``, default the task's
  hard prompt), repeated or cut to P tokens, leaves in the cache: one forward pass
  (:func:`softprompt.inputs.tokens_kv`). The prefix then stands for that instruction exactly.
  On the bundled model (issue #11) this started at the text prompt's loss and reached a lower
  validation loss than prompt tuning, where PEFT's random init started and ended far worse;
* ``zero``: all zeros; ``random``: standard normal, as PEFT's prefix embedding starts.

``--prefix-projection`` (PEFT's ``prefix_projection``): the prefix is
``start + MLP(E)``, ``E`` ``[P, H]`` trainable embeddings (from ``--init``), the MLP
``Linear(H, h) - Tanh - Linear(h, L * 2 * kv_heads * head_dim)`` (``h``:
``--encoder-hidden-size``, default H), its output ``[P, L * 2 * kv * hd]`` read in PEFT's
order (layer ``i``'s keys at ``2i``, values at ``2i + 1``). The last layer starts at zero, so
the run starts exactly at the ``text``/``zero`` start; with ``random`` it keeps PyTorch's
default init and the start is ``MLP(E)``, as in PEFT. Saved collapsed: a plain KV prefix.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from softprompt.config import PrefixInit, PromptConfig, PromptInit
from softprompt.errors import SoftPromptError
from softprompt.methods.base import PromptMethod, embedding_init, hidden_size, seeded
from softprompt.prefix import KVPrefix, kv_shape


class PrefixTuning(PromptMethod):
    """``forward()``: ``KVPrefix(kv)``, or ``KVPrefix(start + MLP(E))`` with a projection."""

    name = "prefix"

    def __init__(self, start: torch.Tensor, embeddings: torch.Tensor | None = None,
                 projection_size: int = 0, zero_last: bool = True, seed: int = 0):
        super().__init__()
        start = start.detach().to(torch.float32).clone()  # [L, 2, kv, P, hd]
        if embeddings is None:
            self.kv = nn.Parameter(start)
            return
        layers, _, kv_heads, _, head_dim = start.shape
        self.register_buffer("start", start)
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())  # [P, H]
        with seeded(seed):
            self.mlp = nn.Sequential(nn.Linear(embeddings.shape[1], projection_size), nn.Tanh(),
                                     nn.Linear(projection_size, layers * 2 * kv_heads * head_dim))
        if zero_last:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self) -> KVPrefix:
        if not hasattr(self, "mlp"):
            return KVPrefix(self.kv)
        layers, _, kv_heads, p, head_dim = self.start.shape
        out = self.mlp(self.embeddings)  # [P, L * 2 * kv * hd]
        kv = out.view(p, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)  # [L, 2, kv, P, hd]
        return KVPrefix(self.start + kv)

    @classmethod
    def create(cls, config: PromptConfig, model, init_ids: list[int] | None,
               seed: int) -> PrefixTuning:
        return cls._with_start(start_kv(config, model, init_ids, seed), config, model, init_ids,
                               seed, zero_last=config.prefix_init is not PrefixInit.RANDOM)

    @classmethod
    def from_trained(cls, config: PromptConfig, model, artefact: KVPrefix,
                     seed: int) -> PrefixTuning:
        """Starts exactly at the trained prefix (with a projection: its zero last layer)."""
        return cls._with_start(artefact.kv, config, model, None, seed, zero_last=True)

    @classmethod
    def _with_start(cls, start: torch.Tensor, config: PromptConfig, model,
                    init_ids: list[int] | None, seed: int, zero_last: bool) -> PrefixTuning:
        if not config.prefix_projection:
            return cls(start)
        if config.init is PromptInit.TEXT and not init_ids:  # --init-from: no text at hand
            config = replace(config, init=PromptInit.RANDOM)
        return cls(start, embedding_init(config, model, init_ids, seed),
                   config.encoder_hidden_size or hidden_size(model), zero_last, seed)


def start_kv(config: PromptConfig, model, init_ids: list[int] | None,
             seed: int) -> torch.Tensor:
    """``[L, 2, kv_heads, P, head_dim]`` float32 on the CPU as ``--prefix-init`` says
    (``random`` with a projection starts at zero: the projection's output is the start)."""
    p = config.num_virtual_tokens
    layers, kv_heads, head_dim = kv_shape(model.config)
    shape = (layers, 2, kv_heads, p, head_dim)
    if config.prefix_init is PrefixInit.TEXT:
        if not init_ids:
            raise SoftPromptError("--prefix-init text needs a non-empty --init-text")
        from softprompt.inputs import tokens_kv

        ids = (init_ids * -(-p // len(init_ids)))[:p]  # repeated or cut to P tokens
        return tokens_kv(model, ids).kv.to("cpu", torch.float32)
    if config.prefix_init is PrefixInit.ZERO or config.prefix_projection:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)
