"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): trainable input embeddings ``E``
``[P, H]`` pass through a prompt encoder, and the encoder's output is the prompt.

The encoder is an MLP (``Linear(H, h) - ReLU - Linear(h, h) - ReLU - Linear(h, H)``, the
default) or a 2-layer bidirectional LSTM over the P positions followed by
``Linear(2h, 2h) - ReLU - Linear(2h, H)``; ``h`` is ``--encoder-hidden-size`` (default H).
The encoder couples the virtual tokens, which is what is meant to make optimisation steadier
than tuning each embedding on its own. Only the output ``[P, H]`` is saved.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.config import Encoder, PromptConfig
from softprompt.methods.base import PromptMethod, embedding_init, hidden_size, seeded


class PTuning(PromptMethod):
    """``forward() = encoder(E)``: ``[P, H]``."""

    name = "ptuning"

    def __init__(self, embeddings: torch.Tensor, encoder: Encoder, encoder_hidden_size: int,
                 seed: int = 0):
        super().__init__()
        hidden = embeddings.shape[1]
        h = encoder_hidden_size
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())  # [P, H]
        with seeded(seed):
            self.lstm = (nn.LSTM(hidden, h, num_layers=2, bidirectional=True, batch_first=True)
                         if encoder is Encoder.LSTM else None)
            width = 2 * h if self.lstm is not None else h
            head = [nn.Linear(hidden, h), nn.ReLU()] if self.lstm is None else []
            self.head = nn.Sequential(*head, nn.Linear(width, width), nn.ReLU(),
                                      nn.Linear(width, hidden))

    def forward(self) -> torch.Tensor:
        x = self.embeddings  # [P, H]
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # [1, P, H] -> [P, 2h]
        return self.head(x)  # [P, H]

    @classmethod
    def create(cls, config: PromptConfig, model, init_ids: list[int] | None,
               seed: int) -> PTuning:
        return cls(embedding_init(config, model, init_ids, seed), config.encoder,
                   config.encoder_hidden_size or hidden_size(model), seed)

    @classmethod
    def from_trained(cls, config: PromptConfig, model, artefact: torch.Tensor,
                     seed: int) -> PTuning:
        """The encoder's input embeddings start at the trained prompt; the encoder is new
        (only its output was saved), so the run does not start exactly at the artefact."""
        return cls(artefact, config.encoder, config.encoder_hidden_size or hidden_size(model),
                   seed)
