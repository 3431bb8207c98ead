"""Memory of a LoRA training micro-step, measured, not estimated: what `bench.py --plan` tabulates.

Our WanDiT with a rank-8 Set-and-Sequence adapter runs train.py's forward, loss and backward on fake
tensors (FakeTensorMode: shapes and dtypes, no data), and LiveTensorBytes follows every tensor
storage from its creation to its release. Weights and adapter + AdamW bytes are counted from the
real parameter list. docs/performance.md#memory-of-a-training-micro-step-bench-py-plan says what
each column means and how the count was checked against a real 1.3B step (within 1.2%).
bench.py's peak-memory columns come from peak_memory: LiveTensorBytes on the CPU, CUDA's own
counter on a GPU.
Shapes: C latent channels, F H W latent frames/height/width, L tokens.
"""
import dataclasses
import math
import weakref

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora.lora import inject, set_stage
from model.config import PRESETS, DiTConfig
from model.dit import WanDiT
from model.flow import flow_matching_loss
from model.loader import storage_dtype

RANK = 8                # the LoRA rank planned for: the paper's, train.py's default for Wan


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active; the CPU stand-in for max_memory_allocated."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}   # storage address -> bytes, while the storage lives

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place op) allocated nothing.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = {t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for storage in new:   # (meta tensors hold no memory; fake ones say "cpu" and are counted)
            if storage._cdata not in inputs and storage._cdata not in self.sizes:
                self.sizes[storage._cdata] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage._cdata)   # storages keep their Python object
        return out


def peak_memory(fn, device: torch.device) -> int:
    """Bytes a call of fn needs on top of what is allocated before it (on the CPU: LiveTensorBytes)."""
    if device.type != "cuda":
        with LiveTensorBytes() as tracker:
            fn()
        return tracker.peak
    torch.cuda.synchronize()    # CUDA work is asynchronous: let what came before finish first
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


PLAN_PRESETS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
PLAN_FRAMES = (33, 49, 81)
CARDS_GIB = (24, 48, 80)
HEADROOM = 0.9        # the share of a card a plan may fill: CUDA context, workspaces, fragmentation take the rest
PREFETCH_BLOCKS = 2   # copies of offloaded blocks on the device: the one running and the next, copied in meanwhile
GIB = 2**30
ADAPTER_TENSORS = ("basis", "coeff", "residual")


def plan_model(cfg: DiTConfig, dtype: torch.dtype, stage: str, device: str = "cpu") -> WanDiT:
    """Our DiT with load_wan's dtypes (small modules fp32), random weights and a rank-8 adapter in `stage`."""
    with torch.device("meta"):
        model = WanDiT(cfg)     # shapes only: a 14B model costs nothing here
    for name, param in list(model.named_parameters()):
        module_name, _, key = name.rpartition(".")
        # Under FakeTensorMode a fake tensor: still no memory. On real tensors normal_ also touches
        # every page, so the process's resident memory sees the weights.
        values = torch.empty_like(param, dtype=storage_dtype("dit", name, dtype), device=device)
        setattr(model.get_submodule(module_name), key, nn.Parameter(values.normal_(std=0.02)))
    inject(model, rank=RANK)
    set_stage(model, stage)
    return model.train()


def weight_bytes(model: WanDiT, fp8: bool, offload: int, shard: int = 1) -> int:
    """Frozen weights resident on the device; `offload` blocks live on the CPU and are streamed in one by one;
    `shard` ranks of --shard-base each hold 1/shard of every frozen linear, plus the one gathered to run."""
    def nbytes(name: str, param: torch.Tensor) -> int:
        # fp8: the frozen block linears at 1 byte per weight (their biases, the norms and the rest unchanged)
        is_block_linear = name.startswith("blocks.") and name.endswith("base.weight")
        return param.numel() * (1 if fp8 and is_block_linear else param.element_size())
    frozen = {name: nbytes(name, p) for name, p in model.named_parameters() if not name.endswith(ADAPTER_TENSORS)}
    if shard > 1:
        linears = {name: n for name, n in frozen.items() if name.startswith("blocks.") and name.endswith("base.weight")}
        return sum(frozen.values()) - sum(linears.values()) * (shard - 1) // shard + max(linears.values())
    block = sum(n for name, n in frozen.items() if name.startswith("blocks.0."))
    return sum(frozen.values()) - offload * block + min(offload, PREFETCH_BLOCKS) * block


def adapter_bytes(model: WanDiT) -> int:
    """All adapter tensors (fp32), plus the gradient and AdamW's two moments of the trainable ones."""
    params = [p for name, p in model.named_parameters() if name.endswith(ADAPTER_TENSORS)]
    return sum(p.nbytes * (4 if p.requires_grad else 1) for p in params)


def step_activations(model: WanDiT, latent: tuple[int, ...], dtype: torch.dtype, grad_ckpt: bool) -> dict:
    """Tensor bytes one micro-step (batch 1: train.py's forward under autocast, loss, backward) holds for
    backward when the forward ends, and its peak; weights, adapters and their gradients are not counted."""
    model.gradient_checkpointing = grad_ckpt
    for param in model.parameters():
        if param.requires_grad:   # as left by an earlier micro-step: counted by adapter_bytes, not here
            param.grad = torch.zeros_like(param)
    cfg = model.cfg
    with LiveTensorBytes() as tracker:
        x0 = torch.randn(1, *latent)                                        # (B, C, F, H, W)
        context = torch.randn(1, cfg.text_len, cfg.text_dim).to(dtype)     # (B, S, text_dim)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_matching_loss(model, x0, torch.randn_like(x0), torch.rand(1), context).sum()
        # What is still alive is what autograd saved (with checkpointing: the block inputs), plus inputs
        # and the scalar loss. Counted here, not by saved-tensor hooks: the DiT's own hooks would hide it.
        held = tracker.live
        loss.backward()
    return {"held": held, "peak": tracker.peak}


def measure_activations(cfg: DiTConfig, latent: tuple[int, ...], dtype: torch.dtype, grad_ckpt: bool, stage: str,
                        full_depth: bool = False) -> dict:
    """step_activations of our DiT on fake CPU tensors; from 2- and 3-block models unless full_depth."""
    # Fake CPU tensors pick the kernels a CPU run would (flash attention, never an L x L matrix) and take
    # CPU autocast. All blocks are alike, so from 2 blocks on each one adds the same bytes (a 1-block
    # model peaks elsewhere): two depths give the line, equal to the full-depth measurement to the byte
    # (tests/test_plan.py) in a fraction of the time.
    depths = [cfg.num_layers] if full_depth or cfg.num_layers <= 3 else [2, 3]
    counts = []
    for depth in depths:
        with FakeTensorMode():
            model = plan_model(dataclasses.replace(cfg, num_layers=depth), dtype, stage)
            counts.append(step_activations(model, latent, dtype, grad_ckpt))
    if len(counts) == 1:
        return counts[0]
    two, three = counts
    return {key: two[key] + (cfg.num_layers - 2) * (three[key] - two[key]) for key in two}


def plan_rows(presets, frame_counts, height: int | None, width: int | None, stage: str,
              offloads: list[int | None], full_depth: bool = False) -> list[dict]:
    """One row per preset x frames x checkpointing x weight format x blocks offloaded (None: all)."""
    rows = []
    for name in presets:
        cfg = PRESETS[name]
        h, w = height or cfg.height, width or cfg.width
        model = plan_model(cfg.dit, torch.bfloat16, stage, device="meta")   # the full size: bytes of weights
        adapter = adapter_bytes(model)
        blocks = sorted({cfg.dit.num_layers if n is None else n for n in offloads})
        if not 0 <= blocks[0] <= blocks[-1] <= cfg.dit.num_layers:
            raise ValueError(f"--offload: {name} has {cfg.dit.num_layers} blocks, got {offloads}")
        for frames in frame_counts:
            latent = (cfg.dit.in_dim, (frames - 1) // cfg.vae.temporal_factor + 1,
                      h // cfg.vae.spatial_factor, w // cfg.vae.spatial_factor)   # (C, F, H, W)
            tokens = math.prod(n // p for n, p in zip(latent[1:], cfg.dit.patch_size))    # L
            for ckpt in (False, True):
                acts = measure_activations(cfg.dit, latent, torch.bfloat16, ckpt, stage, full_depth)
                for fp8 in (False, True):
                    for offload in blocks:
                        weights = weight_bytes(model, fp8, offload)
                        rows.append({"model": name, "frames": frames, "tokens": tokens, "ckpt": ckpt, "fp8": fp8,
                                     "offload": offload, "weights": weights, "adapter": adapter,
                                     "held": acts["held"], "activations": acts["peak"],
                                     "total": weights + adapter + acts["peak"]})
    return rows


def format_plan(rows: list[dict]) -> str:
    """The markdown table of plan_rows; a card fits when the total is at most HEADROOM of it."""
    head = ["| model | frames (L) | grad ckpt | weights | offloaded blocks | weights GiB | adapter+AdamW GiB "
            "| held for backward GiB | activation peak GiB | total GiB | fits (GiB cards) |", "|" + "---|" * 11]
    lines = []
    for r in rows:
        fits = " ".join(str(card) for card in CARDS_GIB if r["total"] <= HEADROOM * card * GIB) or "none"
        cells = [r["model"].removeprefix("wan2.1-t2v-"), f"{r['frames']} ({r['tokens']})", "on" if r["ckpt"] else "off",
                 "fp8" if r["fp8"] else "bf16", str(r["offload"]),
                 *(f"{r[key] / GIB:.2f}" for key in ("weights", "adapter", "held", "activations", "total")), fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines)
