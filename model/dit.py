"""The Wan2.1 text-to-video diffusion transformer (DiT), in plain PyTorch.

Follows the original Wan2.1 `WanModel` (wan/modules/model.py), described in
docs/wan.md#dit. Module and parameter names equal the original checkpoint
keys (blocks.N.self_attn.q, norm3, ffn.0, head.head, ...), so original and ComfyUI weights and LoRAs
load without renaming. Where the original and diffusers differ numerically, this file follows the
original: a float64 timestep sinusoid, fp32 modulation and an fp32 residual stream, and RoPE angles
computed in float64. With bf16 weights, model/loader.py keeps the time MLPs, modulation tables, head
and norms in fp32; forward casts each sublayer's input itself, so it runs with or without autocast.

Shapes: B batch, C channels, F H W latent frames/height/width (after patchify the token grid is
F x H/2 x W/2, written f h w), L = f*h*w video tokens, S text tokens (cfg.text_len after padding),
D model width, N heads, d = D/N head dim.
"""
import math

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.functional import layer_norm, pad, scaled_dot_product_attention
from torch.utils.checkpoint import checkpoint

from model.config import DiTConfig

ROPE_THETA = 10000.0


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[cos(t*w), sin(t*w)] with w_i = 10000^(-i/(dim/2)): (B,) -> (B, dim) float32."""
    # The original builds this in float64 and casts at the end; diffusers stays in fp32, which
    # differs by up to 3e-5 at t ~ 1000.
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64)[:, None] * omega[None, :]                  # (B, dim/2)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()  # (B, dim), cos first


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, normalized in fp32 (the original WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # Scaled in fp32 and returned in x's dtype, whatever the weight's (fp32 under model/loader.py's policy).
        return (normed * self.weight.float()).type_as(x)


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input or weight dtype (the original WanLayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        # Returns fp32: every caller feeds it the fp32 residual stream and keeps working in fp32.
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


# ---- 3D rotary position embedding (docs/wan.md#3d-rope) ----
def rope_angles(grid: tuple[int, int, int], rope_dims: tuple[int, int, int],
                device: torch.device) -> Tensor:
    """Rotation angle of every (token, pair), float64 (L, d/2); pairs are laid out [t | h | w]."""
    per_axis = []
    for size, axis_dim in zip(grid, rope_dims):
        # Each axis takes its frequencies from its OWN sub-dim d_a: w_j = theta^(-2j/d_a).
        two_j = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device)
        omega = ROPE_THETA ** (-two_j / axis_dim)                           # (d_a/2,)
        positions = torch.arange(size, dtype=torch.float64, device=device)  # plain 0..size-1
        per_axis.append(positions[:, None] * omega[None, :])                # (size, d_a/2)
    f, h, w = grid
    t_angle, h_angle, w_angle = per_axis
    angles = torch.cat([t_angle[:, None, None, :].expand(f, h, w, -1),      # frame index f
                        h_angle[None, :, None, :].expand(f, h, w, -1),      # row index h
                        w_angle[None, None, :, :].expand(f, h, w, -1)],     # column index w
                       dim=-1)                                              # (f, h, w, d/2)
    return rearrange(angles, "f h w j -> (f h w) j")  # same token order as patchify


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2j], x[2j+1]) of q or k: (B, N, L, d), math in fp32.

    rotation: (L, d/2) complex64, cos + i*sin of each (token, pair) angle.
    """
    # Interleaved, NOT rotate-half: pair j is the complex number x[2j] + i*x[2j+1], and rotating it by
    # an angle is one complex product (as the original Wan code does it): one kernel instead of six
    # real passes (re*cos - im*sin, re*sin + im*cos), and the same bits.
    pairs = torch.view_as_complex(rearrange(x.float(), "b n l (j two) -> b n l j two", two=2))  # (B, N, L, d/2)
    rotated = torch.view_as_real(pairs * rotation)                                              # (B, N, L, d/2, 2)
    return rearrange(rotated, "b n l j two -> b n l (j two)").type_as(x)


class RoPE3D(nn.Module):
    """Holds the (cos, sin) tables of each latent grid seen so far, so they are built only once."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.rope_dims = cfg.rope_dims  # (44, 42, 42) for d = 128
        self.max_len = cfg.rope_max_len
        # Not a buffer: derived data, must stay out of the state dict. A training run sees one grid,
        # a sampler a handful, so the cache stays tiny.
        self.tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (grid, device)
        if key not in self.tables:
            if max(grid) > self.max_len:
                raise ValueError(f"RoPE3D: token grid {grid} exceeds rope_max_len={self.max_len} "
                                 "on some axis")
            angles = rope_angles(grid, self.rope_dims, device)            # (L, d/2) float64
            self.tables[key] = (angles.cos().float(), angles.sin().float())  # applied in fp32
        return self.tables[key]


# ---- attention ----
class Attention(nn.Module):
    """Multi-head attention projections with RMSNorm on q and k taken over all heads at once."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        # Each projection is its own module (never fused) so that a LoRA wrapper can replace it.
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # Weight of size D, normalized BEFORE the head split (diffusers: "rms_norm_across_heads").
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def split_heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b l (n d) -> b n l d", n=self.num_heads)

    def merge_heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n l d -> b l (n d)")


class SelfAttention(Attention):
    """Video tokens attend to each other, positions given by 3D RoPE on q and k."""

    def forward(self, x: Tensor, rotation: Tensor) -> Tensor:
        q = apply_rope(self.split_heads(self.norm_q(self.q(x))), rotation)  # (B, N, L, d)
        k = apply_rope(self.split_heads(self.norm_k(self.k(x))), rotation)  # (B, N, L, d)
        v = self.split_heads(self.v(x))                                     # (B, N, L, d)
        # In x's dtype, the compute dtype: a projection with an adapter answers in fp32 (lora/lora.py).
        q, k, v = q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)
        out = scaled_dot_product_attention(q, k, v)  # non-causal, scale 1/sqrt(d); (B, N, L, d)
        return self.o(self.merge_heads(out))         # (B, L, D)


class CrossAttention(Attention):
    """Video tokens attend to the text tokens; no RoPE and no mask (padding rows take part)."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = self.split_heads(self.norm_q(self.q(x)))        # (B, N, L, d)
        k = self.split_heads(self.norm_k(self.k(context)))  # (B, N, S, d)
        v = self.split_heads(self.v(context))               # (B, N, S, d)
        q, k, v = q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)  # as in SelfAttention
        out = scaled_dot_product_attention(q, k, v)         # (B, N, L, d)
        return self.o(self.merge_heads(out))                # (B, L, D)


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, plain cross-attention to text, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNormFP32(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        # The cross-attention LayerNorm is the one WITH affine weights, and the original calls it
        # norm3 (diffusers calls it norm2: model/keymaps.py swaps them).
        self.norm3 = LayerNormFP32(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNormFP32(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        # This block's own learned offsets to the time projection e0, which all blocks share.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rotation: Tensor) -> Tensor:
        # x: (B, L, D) fp32 residual stream; e0: (B, 6, D) fp32; context: (B, S, D) in the compute dtype
        modulation = self.modulation.float() + e0  # (B, 6, D), in fp32 whatever the weight dtype
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = modulation.chunk(6, dim=1)  # each (B, 1, D)
        # Norms and modulation run in fp32; each sublayer gets its input in the compute dtype, that of
        # the text embedding's output (what bf16 autocast would cast it to anyway), so bf16 weights
        # also run without autocast.
        dtype = context.dtype

        y = self.self_attn((self.norm1(x) * (1 + scale_msa) + shift_msa).to(dtype), rotation)  # (B, L, D)
        x = x + y.float() * gate_msa  # gated adds stay in fp32, as in the original

        x = x + self.cross_attn(self.norm3(x).to(dtype), context).float()  # no modulation, no gate

        y = self.ffn((self.norm2(x) * (1 + scale_mlp) + shift_mlp).to(dtype))  # (B, L, D)
        return x + y.float() * gate_mlp


class Head(nn.Module):
    """Final modulated LayerNorm and the linear map from D to one patch of velocity values."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNormFP32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # Uses e (B, D), the time embedding itself, not the per-block projection e0.
        shift, scale = (self.modulation.float() + e[:, None, :]).chunk(2, dim=1)  # each (B, 1, D)
        y = self.norm(x) * (1 + scale) + shift                                      # (B, L, D)
        # The original runs the head in fp32 even under bf16 autocast.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(y.to(self.head.weight.dtype)).float()  # (B, L, pt*ph*pw*C)


class CheckpointedInput:
    """Saved-tensor hooks for one checkpointed block call: keep its input x in another dtype and/or on the CPU.

    torch.utils.checkpoint saves a block's inputs through these hooks and keeps them until backward
    recomputes the block. Only x, the (B, L, D) fp32 residual stream, is converted: e0, context and
    rotation are the same tensors for every block, so they are kept once whatever happens. The forward
    pass uses x as it is; only the recompute in backward starts from the stored copy.
    """

    def __init__(self, x: Tensor, dtype: torch.dtype | None, offload: bool):
        self.x = x
        self.dtype = x.dtype if dtype is None else dtype
        self.device = torch.device("cpu") if offload else x.device

    def pack(self, tensor: Tensor) -> tuple[Tensor, torch.dtype | None, torch.device | None]:
        if tensor is not self.x:
            return tensor, None, None
        # non_blocking: from CUDA the copy lands in pinned CPU memory and overlaps the next block; it is
        # only read back by a copy queued after it on the same stream. No copy at all if nothing changes.
        return tensor.detach().to(self.device, self.dtype, non_blocking=True), tensor.dtype, tensor.device

    @staticmethod
    def unpack(packed: tuple[Tensor, torch.dtype | None, torch.device | None]) -> Tensor:
        tensor, dtype, device = packed
        return tensor if dtype is None else tensor.to(device, dtype, non_blocking=True)


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT: predicts the flow-matching velocity of latents x at time t given text."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)  # non-overlapping patches
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # One projection of the time embedding to the 6 modulation vectors, shared by every block.
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RoPE3D(cfg)  # no parameters: not in the state dict
        self.gradient_checkpointing = False
        # What a checkpointed block keeps of its input x until backward (CheckpointedInput): x as is, or in
        # this dtype (bf16 halves it), and in CPU memory if activation_offload.
        self.activation_dtype: torch.dtype | None = None
        self.activation_offload = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The original WanModel.init_weights, plus the modulation tables' own init."""
        # Every linear (attention, FFN, time projection, head): xavier-uniform, zero bias.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv is a linear map of one flattened (C, pt, ph, pw) patch; its bias keeps
        # PyTorch's default init, as in the original.
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        # The two embedding MLPs use small normal weights instead.
        for embedding in (self.text_embedding, self.time_embedding):
            for module in embedding:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        # Modulation tables ~ N(0, 1/D). Unlike DiT's adaLN-Zero the gates are NOT zeroed; only the
        # output layer is, so a fresh model predicts velocity 0 (a fine start for a toy from scratch).
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.cfg.dim**-0.5)
        nn.init.normal_(self.head.modulation, std=self.cfg.dim**-0.5)
        nn.init.zeros_(self.head.head.weight)
        # RMSNorm / LayerNorm weights stay 1 (and norm3's bias 0), from their constructors.

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the blocks' linears (model/loader.py keeps some small modules fp32 whatever it is)."""
        # Under autocast the linears compute in the autocast dtype instead.
        return self.patch_embedding.weight.dtype

    def patchify(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, C, F, H, W) latents -> (B, L, D) tokens in (f, h, w) row-major order, plus the grid."""
        x = self.patch_embedding(x)  # (B, D, f, h, w)
        grid = tuple(x.shape[2:])
        return rearrange(x, "b d f h w -> b (f h w) d"), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(B, L, pt*ph*pw*C) -> (B, C, F, H, W); a token's values are read as (pt, ph, pw, C), C fastest."""
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        return rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """Velocity (B, C, F, H, W) fp32 for latents x (B, C, F, H, W), timesteps t (B,) in [0, 1000]
        and text states context (B, S <= text_len, text_dim)."""
        B, C, F, H, W = x.shape
        S = context.shape[1]
        if any(size % p for size, p in zip((F, H, W), self.cfg.patch_size)):
            raise ValueError(f"WanDiT: latent size (F, H, W)={(F, H, W)} is not divisible by "
                             f"patch_size={self.cfg.patch_size}")
        if S > self.cfg.text_len:
            raise ValueError(f"WanDiT: got {S} text rows, more than text_len={self.cfg.text_len}")
        if t.shape != (B,):
            raise ValueError(f"WanDiT: t must have shape ({B},), got {tuple(t.shape)}")

        # Time: e feeds the head, e0 = the 6 modulation vectors every block offsets. The original
        # computes both in fp32 even under bf16 autocast, so autocast is off here.
        # (Each MLP then runs in its weights' dtype: fp32 under model/loader.py's precision policy.)
        with torch.autocast(x.device.type, enabled=False):
            sinusoid = timestep_sinusoid(t, self.cfg.freq_dim)                              # (B, freq_dim)
            e = self.time_embedding(sinusoid.to(self.time_embedding[0].weight.dtype)).float()  # (B, D)
            e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()    # (B, 6D)
        e0 = rearrange(e0, "b (six d) -> b six d", six=6)                         # (B, 6, D)

        # Text: Wan has no cross-attention mask, so the zero rows up to text_len change the
        # output; pad here to exactly text_len, as the original does.
        context = pad(context, (0, 0, 0, self.cfg.text_len - S))  # (B, S=text_len, text_dim)
        context = self.text_embedding(context.to(self.compute_dtype))  # (B, S, D), in the compute dtype

        x, grid = self.patchify(x.to(self.compute_dtype))  # (B, L, D)
        x = x.float()                             # the residual stream is fp32 throughout
        cos, sin = self.rope(grid, x.device)      # each (L, d/2), cached per grid
        # One complex table per call, shared by every block (so backward saves it once): cos + i*sin.
        rotation = torch.complex(cos, sin)        # (L, d/2) complex64

        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block inputs; recompute the activations during backward.
                saved = CheckpointedInput(x, self.activation_dtype, self.activation_offload)
                with saved_tensors_hooks(saved.pack, saved.unpack):
                    x = checkpoint(block, x, e0, context, rotation, use_reentrant=False)
            else:
                x = block(x, e0, context, rotation)  # (B, L, D)

        x = self.head(x, e)                 # (B, L, pt*ph*pw*C) fp32
        return self.unpatchify(x, grid)     # (B, C, F, H, W) fp32


# ---- model FLOPs (bench.py's throughput columns) ----
def dit_flops(cfg: DiTConfig, batch: int, tokens: int, lora_rank: int = 0, backward: bool = False) -> float:
    """2 x multiply-adds of one DiT step on `batch` samples of L = `tokens` video tokens."""
    D, S, ffn, L = cfg.dim, cfg.text_len, cfg.ffn_dim, tokens
    patch = math.prod(cfg.patch_size)
    # Per block: self q k v o and cross q o on L tokens, cross k v on the S text rows, the FFN on L.
    video_linear = L * (6 * D * D + 2 * D * ffn)
    text_linear = S * 2 * D * D
    attention = 2 * L * L * D + 2 * L * S * D          # QK^T and PV of self- and cross-attention
    lora = lora_rank * (L * (6 * 2 * D + 2 * (D + ffn)) + S * 2 * 2 * D)  # x -> r -> out, every block linear
    # Outside the blocks: text embedding MLP, patch embedding, head (the time MLPs are per sample: tiny).
    outer = S * (cfg.text_dim * D + D * D) + L * D * patch * (cfg.in_dim + cfg.out_dim)
    if backward:
        # Frozen base: video-token linears also give input grads (x2); the text side needs no backward
        # (context and base weights need no grad); attention gives dQ, dK, dV (x3); LoRA factors also
        # get weight grads (x3). The outer layers' backward is left out: input and weights are frozen.
        video_linear, attention, lora = 2 * video_linear, 3 * attention, 3 * lora
    return 2.0 * batch * (cfg.num_layers * (video_linear + text_linear + attention + lora) + outer)
