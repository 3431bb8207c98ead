"""Block offload: some DiT blocks' frozen weights live in CPU memory and visit the device only to run.

The "block swap" of the common Wan trainers and samplers: with the first n blocks offloaded, the device
holds the other blocks, the adapters and at most two offloaded blocks at a time (the one running and
the next). Forward hooks on each block do the moving, so it works the same under gradient checkpointing,
where backward runs each block's forward again: the hooks fire then too and copy the weights back in.

On CUDA the CPU copies are pinned and the next block's copy runs on a side stream while the current
block computes. On the CPU the same code runs with plain synchronous copies, so the tests can check it.
The adapters' tensors (lora/lora.py) never move: they are small, and the optimizer holds them.

Limits: call offload_blocks after load / quantize_fp8 / inject / set_stage (adapters injected later
would be made in CPU memory: .remove() the hooks and call offload_blocks again, which moves them) and
never move the DiT with .to() afterwards. Training without gradient checkpointing works but saves
nothing: autograd keeps every block's device copy until backward.
"""
import functools

import torch
import torch.nn as nn
from torch import Tensor

from lora.lora import LoRALinear


def base_tensors(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of each parameter and buffer of a block, except the adapters' own."""
    # A LoRALinear's own tensors are basis / coeff / residual; its frozen `base` is a child module, visited
    # on its own by modules(), so its weight is listed.
    return [(module, name) for module in block.modules() if not isinstance(module, LoRALinear)
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]


class BlockOffload:
    """Forward hooks that give each offloaded block device copies of its weights while it runs."""

    def __init__(self, blocks: nn.ModuleList, offloaded: list[int], device: torch.device):
        self.device = device
        self.num_blocks = len(blocks)
        # Block index -> [(module, name, home)]: home is the CPU tensor the module holds between calls.
        self.homes = {i: [(module, name, getattr(module, name)) for module, name in base_tensors(blocks[i])]
                      for i in offloaded}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.prefetched: tuple[int, list[Tensor], torch.cuda.Event | None] | None = None
        self.previous: int | None = None   # the block that ran last: tells forward from the backward recompute
        self.hooks = []
        for i, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(functools.partial(self.before_block, i)))
            # always_call: checkpoint's recompute may stop a block midway by raising; the homes go back anyway.
            self.hooks.append(block.register_forward_hook(functools.partial(self.after_block, i), always_call=True))

    def copy_in(self, i: int) -> tuple[list[Tensor], torch.cuda.Event | None]:
        """Start copying block i's weights to the device: on the side stream on CUDA, at once on the CPU."""
        with torch.cuda.stream(self.stream):   # a no-op context without a stream
            copies = [home.to(self.device, non_blocking=True, copy=True) for _, _, home in self.homes[i]]
        event = None if self.stream is None else self.stream.record_event()
        return copies, event

    def next_block(self, i: int) -> int:
        """The block likely to run after block i, whose copy can start now."""
        # Forward runs blocks 0..L-1; checkpointing recomputes them L-1..0 in backward, starting with the
        # block that ran last. A wrong guess costs one copy that does not overlap, never a wrong result.
        backward = self.previous is not None and (i == self.previous - 1 or i == self.previous == self.num_blocks - 1)
        return i - 1 if backward else i + 1

    def before_block(self, i: int, block: nn.Module, args: tuple) -> None:
        if i in self.homes:
            if self.prefetched is not None and self.prefetched[0] == i:
                _, copies, event = self.prefetched
                self.prefetched = None
            else:
                copies, event = self.copy_in(i)
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)       # the block's kernels start once its weights have arrived
                for copy in copies:
                    copy.record_stream(compute)  # memory made on the side stream, freed only after this use
            for (module, name, home), copy in zip(self.homes[i], copies):
                # A new tensor object, not home.data = copy: autograd may keep it after the homes are back.
                setattr(module, name,
                        nn.Parameter(copy, requires_grad=False) if isinstance(home, nn.Parameter) else copy)
        j = self.next_block(i)
        self.previous = i
        if j in self.homes:
            self.prefetched = (j, *self.copy_in(j))   # replaces an unused guess, if any

    def after_block(self, i: int, block: nn.Module, args: tuple, output) -> None:
        # The device copies live on only while autograd still holds them (a recompute's backward does).
        for module, name, home in self.homes.get(i, []):
            setattr(module, name, home)

    def remove(self) -> None:
        """Take the hooks off; the offloaded weights stay in CPU memory (offload_blocks again to run it)."""
        for hook in self.hooks:
            hook.remove()
        self.prefetched = None


def offload_blocks(dit: nn.Module, n: int, device: torch.device | str) -> BlockOffload:
    """Move the DiT to `device` except the frozen weights of its first n blocks, kept in CPU memory
    (pinned on CUDA) and copied to the device for each run of their block."""
    if not 0 <= n <= len(dit.blocks):
        raise ValueError(f"offload_blocks: n must be in [0, {len(dit.blocks)}] (the DiT's blocks), got {n}")
    device = torch.device(device)
    offloaded = {(module, name) for block in dit.blocks[:n] for module, name in base_tensors(block)}
    for module in dit.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if (module, name) not in offloaded:
                tensor.data = tensor.data.to(device)   # in place: optimizers and hooks keep the same tensors
            elif tensor.requires_grad:
                raise ValueError(f"offload_blocks: {name} of an offloaded block is trainable; only frozen "
                                 "weights can move (the optimizer would update a copy): call set_stage first")
            else:
                # Pinned (page-locked) memory is what lets a copy to the GPU run asynchronously (pinning
                # a pinned tensor returns it: offloading again copies nothing).
                tensor.data = tensor.data.cpu().pin_memory() if device.type == "cuda" else tensor.data.cpu()
    return BlockOffload(dit.blocks, list(range(n)), device)
