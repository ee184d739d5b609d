"""Several processes: Accelerate's process state, gradient all-reduce, layer sharding.

One process is the common case; under ``accelerate launch`` or ``torchrun`` each process takes a
slice of every optimizer step and the prompt gradient is summed across processes. Without CUDA
the processes talk over gloo on the CPU.
"""

from __future__ import annotations

import os

import torch

from softprompt.errors import SoftPromptError
from softprompt.models import decoder_layers


def distributed_state():
    """Accelerate's process state: one process, or one of several under ``accelerate launch``
    / ``torchrun``. Without CUDA the processes talk over gloo on the CPU."""
    from accelerate import PartialState

    use_cpu = (not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    return PartialState(cpu=use_cpu)


def all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def shard_layers(model, device: torch.device) -> None:
    """Shard each decoder layer's frozen weights across processes (FSDP2 ``fully_shard``) and
    put the whole model on ``device``, the process's own.

    The layers hold nearly all of a model's weights; embeddings, final norm and head stay whole
    on every process. Each layer gathers its weights for its forward and backward and frees
    them after, so a model too large for one device trains its prompt on several.

    The model may arrive on the CPU (loaded there so that no process puts all of it on its
    accelerator): ``fully_shard`` moves each layer's shard to the mesh's device as it shards
    it, and only then do the unsharded modules follow, so an accelerator never holds more than
    one whole layer besides its shards. Without CUDA everything stays on the CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise SoftPromptError(f"--shard-model: no decoder layers found in "
                              f"{type(model).__name__}; train without it")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in layers:
        # Each layer is its own FSDP root, and a root keeps its weights gathered after its
        # forward unless told otherwise: then every process would hold the whole model.
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    for module in model.modules():
        if id(module) not in in_layers:  # its own weights and buffers, not its children's
            module._apply(lambda t: t.to(device), recurse=False)


def same_count(count: int, device: torch.device, sharded: bool) -> int:
    """With a sharded model every rank must run as many forwards as the busiest one."""
    if not sharded:
        return count
    t = torch.tensor([count], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)
