"""fp8 base weights: the DiT's block linears stored in float8_e4m3fn, upcast layer by layer in forward.

Halves the memory of a bf16 DiT (the 14B model: ~28 GB -> ~14 GB) at the cost of fp8's 3-bit mantissa
(a relative rounding error of up to 2^-4 per weight). Only the storage is fp8: each layer upcasts its
weight to the compute dtype (bf16 or fp32) just before its matmul, as ComfyUI does on GPUs without fp8
matmuls. The adapters of lora/lora.py wrap an FP8Linear like an nn.Linear and stay fp32 (never merged).

Each output row (one output feature) has its own fp32 scale, so every row uses fp8's whole range:
W[o, i] ~ weight[o, i] * scale[o]. ComfyUI's fp8 files carry one scale per tensor (or none);
model/loader.py keeps their fp8 bits and repeats that scale over the rows.
Build it with model/loader.py's fp8=True or quantize_fp8 after any .to(dtype): Module.to(bf16) would
upcast the fp8 weights too (fp8 is a floating-point dtype to PyTorch). .to(device) is fine.
Shapes: in / out the layer's feature sizes, "..." any leading dims (B, L).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max   # 448: the largest finite e4m3fn value (it has no inf)


def to_fp8(weight: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(fp8 weight (out, in), fp32 scale (out, 1)) for the weight `weight * scale` (scale: one value or one per row).

    An e4m3fn weight keeps its bits, with `scale` (a file's scale_weight; 1 without one) as every row's
    scale. Any other weight (bf16, fp32, e5m2) is dequantized and quantized again, one scale per row.
    """
    rows = weight.shape[0]
    if scale is None:
        scale = torch.ones((), device=weight.device)
    scale = scale.float().reshape(-1, 1).to(weight.device)        # (1, 1) or (out, 1)
    if weight.dtype == FP8:
        return weight, scale.expand(rows, 1).contiguous()
    w = weight.float() * scale                                     # (out, in) fp32
    # The row's largest |w| maps to 448; the clamp keeps an all-zero row finite (0 / tiny = 0).
    row_scale = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    return (w / row_scale).to(FP8), row_scale                      # rounded to nearest by the cast


def upcast(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight in `dtype`: the fp8 values times their row scale, in fp32 and rounded once."""
    return (weight.float() * scale).to(dtype)


class FP8Matmul(torch.autograd.Function):
    """x @ W^T + bias with W upcast from fp8 here and again in backward; only x gets a gradient.

    A plain F.linear on the upcast weight would keep that copy for backward: with every layer's kept,
    a training step would hold the whole DiT in bf16 again. This keeps the fp8 weight instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, upcast(weight, scale, x.dtype), bias)      # (..., out); autocast applies as usual

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        weight, scale = ctx.saved_tensors
        # dL/dx = dL/dy @ W; the base weight and bias are frozen, so they get none.
        return grad @ upcast(weight, scale, grad.dtype), None, None, None   # (..., in)


class FP8Linear(nn.Module):
    """A frozen linear layer with its weight in float8_e4m3fn and one fp32 scale per output row."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)   # (out, in) float8_e4m3fn
        self.register_buffer("scale", scale)                      # (out, 1) fp32
        # The bias is stored in the compute dtype (model/loader.py's dtype=): it says what the layer computes in.
        self.bias = nn.Parameter(bias, requires_grad=False)       # (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        if linear.bias is None:
            raise ValueError("FP8Linear: the layer has no bias (every Wan DiT block linear has one)")
        weight, scale = to_fp8(linear.weight.detach())
        return cls(weight, scale, linear.bias.detach())

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype

    def forward(self, x: Tensor) -> Tensor:
        return FP8Matmul.apply(x.to(self.compute_dtype), self.weight, self.scale, self.bias)   # (..., out)

    def extra_repr(self) -> str:
        out_dim, in_dim = self.weight.shape
        return f"in_features={in_dim}, out_features={out_dim}, compute_dtype={self.compute_dtype}"


def quantize_fp8(dit: nn.Module) -> None:
    """Replace every nn.Linear inside dit.blocks by an FP8Linear, in place; the rest of the DiT is unchanged.

    The block linears (self_attn / cross_attn q k v o, ffn.0, ffn.2) hold ~98% of the weights. The
    embeddings, the time MLPs and the head stay in their dtype (fp32 under model/loader.py's policy).
    Adapters injected before keep working: their frozen base is the nn.Linear that is replaced.
    """
    for name, module in list(dit.blocks.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(dit.blocks.get_submodule(parent), child, FP8Linear.from_linear(module))
