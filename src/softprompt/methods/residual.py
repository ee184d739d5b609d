"""Residual prompt tuning (Razdaibiedina et al. 2023): ``P = E + LayerNorm(up(ReLU(down(E))))``.

``E`` ``[P, H]`` are trainable embeddings; ``down`` ``H -> m`` and ``up`` ``m -> H`` form a
bottleneck MLP shared by the P tokens (``m``: ``--encoder-hidden-size``, default
``min(H, 400)``); the skip connection keeps the prompt close to ``E`` while the MLP couples
the tokens. Only the collapsed ``P`` ``[P, H]`` is saved.

Start: the LayerNorm's scale and shift are zero-initialised, so at step 0 the MLP branch is
exactly zero and ``P == E`` == the ``--init`` embeddings (or the ``--init-from`` prompt). We do
not zero the up-projection instead: a LayerNorm of an all-zero input has a gradient of
``1/sqrt(eps)`` (about 300x) and would blow the first steps up. With the scale at zero the
first gradient reaches only the LayerNorm's scale and shift, the MLP follows from step 2 (as
with ReZero-style zero-initialised residual branches).
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.config import PromptConfig
from softprompt.methods.base import PromptMethod, embedding_init, hidden_size, seeded

DEFAULT_BOTTLENECK = 400


class ResidualPrompt(PromptMethod):
    """``forward() = E + norm(up(relu(down(E))))``: ``[P, H]``."""

    name = "residual"

    def __init__(self, embeddings: torch.Tensor, bottleneck: int, seed: int = 0):
        super().__init__()
        hidden = embeddings.shape[1]
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())  # [P, H]
        with seeded(seed):
            self.down = nn.Linear(hidden, bottleneck)
            self.up = nn.Linear(bottleneck, hidden)
        self.norm = nn.LayerNorm(hidden)
        nn.init.zeros_(self.norm.weight)  # the branch starts at exactly zero (see above)
        nn.init.zeros_(self.norm.bias)

    def forward(self) -> torch.Tensor:
        e = self.embeddings  # [P, H]
        return e + self.norm(self.up(torch.relu(self.down(e))))  # [P, H]

    @classmethod
    def _bottleneck(cls, config: PromptConfig, model) -> int:
        return config.encoder_hidden_size or min(hidden_size(model), DEFAULT_BOTTLENECK)

    @classmethod
    def create(cls, config: PromptConfig, model, init_ids: list[int] | None,
               seed: int) -> ResidualPrompt:
        return cls(embedding_init(config, model, init_ids, seed), cls._bottleneck(config, model),
                   seed)

    @classmethod
    def from_trained(cls, config: PromptConfig, model, artefact: torch.Tensor,
                     seed: int) -> ResidualPrompt:
        """Starts exactly at the trained prompt (the branch is zero at step 0)."""
        return cls(artefact, cls._bottleneck(config, model), seed)
