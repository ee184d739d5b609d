"""Prompt tuning (Lester et al. 2021): the ``[P, H]`` input embeddings are the parameters."""

from __future__ import annotations

import torch

from softprompt.config import PromptConfig
from softprompt.methods.base import PromptMethod, embedding_init
from softprompt.prompt import SoftPrompt


class PromptTuning(SoftPrompt, PromptMethod):
    """One parameter, ``embeddings`` ``[P, H]`` float32; ``forward()`` returns it."""

    name = "prompt"

    @classmethod
    def create(cls, config: PromptConfig, model, init_ids: list[int] | None,
               seed: int) -> PromptTuning:
        return cls(embedding_init(config, model, init_ids, seed))

    @classmethod
    def from_trained(cls, config: PromptConfig, model, artefact: torch.Tensor,
                     seed: int) -> PromptTuning:
        return cls(artefact)
