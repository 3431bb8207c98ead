"""Training on several processes with PyTorch's own engine: `torchrun` starts them, torch.distributed
connects them, FSDP2 (`fully_shard`) shards frozen weights. Knows nothing of LoRA or of the method.

The pattern train.py follows (docs/performance.md#many-gpus):
  - every process ("rank") draws the same step's samples from the same seeded generators and
    trains on its own share of them: N ranks x micro-batch 1 is exactly one process x 1 x N;
  - after the step's micro-batches, the trainable gradients are SUMMED over the ranks (each
    sample's loss weight already divides by the step's sample count), then each rank takes the
    same optimizer step, so the trainable tensors stay identical everywhere;
  - frozen linears can be sharded: each rank holds 1/N of them, gathered just for their forward
    (and its recompute in backward) and released after;
  - only rank 0 writes files; the others wait at a barrier where they need what it wrote.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the number of processes, its GPU index on the node."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_ranks(device: str, timeout_s: float) -> Ranks:
    """Join the process group torchrun set up (WORLD_SIZE > 1 in the environment); one process: no group.

    A rank that dies leaves the others blocked in a collective: `timeout_s` bounds that wait, then
    they fail with an error instead of hanging (gloo notices a closed connection much sooner).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    return ranks


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def shard_frozen_linears(model: nn.Module, ranks: Ranks) -> list[nn.Module]:
    """FSDP2-shard every frozen nn.Linear of the model over the ranks; trainable tensors stay whole.

    Each linear is its own FSDP unit: its weight is gathered right before its forward (also the
    recompute of a checkpointed block) and freed after, so a rank holds 1/N of the frozen linears
    plus one gathered layer at a time. Returns the sharded modules (call `reshard_all` after backward).
    """
    from torch.distributed.fsdp import fully_shard
    sharded = []
    for module in model.modules():
        if type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters()):
            fully_shard(module, reshard_after_forward=True)
            sharded.append(module)
    return sharded


def reshard_all(sharded: list[nn.Module]) -> None:
    """Free the gathered weights again: frozen FSDP units are not resharded by a backward pass."""
    for module in sharded:
        module.reshard()


def sum_gradients(params: list[torch.Tensor], ranks: Ranks) -> None:
    """Sum the gradients of `params` over the ranks, in one flat all-reduce."""
    if ranks.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def sum_values(values: list[float], ranks: Ranks) -> list[float]:
    """Python floats summed over the ranks (e.g. the parts of a step's loss, for the log)."""
    if ranks.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj` (any picklable object), in rank order, on every rank."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def share(total: int, ranks: Ranks) -> slice:
    """This rank's contiguous share of `total` items (the first ranks take one more when it does not divide)."""
    base, extra = divmod(total, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))
