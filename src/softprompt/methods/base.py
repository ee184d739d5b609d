"""What every training method is: an ``nn.Module`` that holds the trained parameters.

``forward()`` returns the differentiable prompt the loss sees, ``export()`` the detached
float32 prompt that is saved: a ``[P, H]`` tensor (methods prompt, ptuning, residual) or a
:class:`~softprompt.prefix.KVPrefix` (method prefix). Reparameterisations exist only while
training: what they export is the collapsed prompt, so inference never sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch

from softprompt.config import PromptConfig


class PromptMethod(torch.nn.Module):
    """Base class of the methods in this package (see :func:`softprompt.methods.build`)."""

    name: ClassVar[str]

    def forward(self):  # -> PromptLike, differentiable
        raise NotImplementedError

    def export(self):
        """The prompt as saved: ``forward()`` detached, float32, on its own storage.

        Computed with autograd on, as in training: some kernels (the LSTM's) take another
        path under ``no_grad`` and would differ in the last bits. Outside autocast, so that
        the saved prompt is the same whatever region the caller is in (compare() runs inside
        its bf16 precision context, ``softprompt train`` does not)."""
        device = next(self.parameters()).device.type
        with torch.enable_grad(), torch.autocast(device, enabled=False):
            return detached(self.forward())

    @classmethod
    def create(cls, config: PromptConfig, model, init_ids: list[int] | None,
               seed: int) -> PromptMethod:
        """A fresh prompt for ``model`` as ``config`` says (``init_ids``: the init text)."""
        raise NotImplementedError

    @classmethod
    def from_trained(cls, config: PromptConfig, model, artefact, seed: int) -> PromptMethod:
        """Start from ``artefact``, the exported prompt of an earlier run (``--init-from``)."""
        raise NotImplementedError


def detached(prompt):
    """A detached float32 copy of a PromptLike (``[P, H]`` tensor or KV prefix)."""
    from softprompt.prefix import KVPrefix

    if isinstance(prompt, KVPrefix):
        return KVPrefix(prompt.kv.detach().to(torch.float32).clone())
    return prompt.detach().to(torch.float32).clone()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build layers from ``seed`` without touching the process's RNG (the trainer's data
    order and checkpoints rely on it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def embedding_init(config: PromptConfig, model, init_ids: list[int] | None,
                   seed: int) -> torch.Tensor:
    """``[P, H]`` float32 start values as ``--init`` says (see :func:`init_prompt`)."""
    from softprompt.prompt import init_prompt

    table = model.get_input_embeddings().weight
    return init_prompt(table, config.num_virtual_tokens, config.init, init_ids,
                       seed).embeddings.detach()
