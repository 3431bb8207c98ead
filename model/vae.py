"""Wan-VAE: the causal 3D video autoencoder of Wan2.1 (`WanVAE_` in Wan-Video/Wan2.1 wan/modules/vae.py).

A video of T = 4k+1 frames in [-1, 1] becomes a latent with 4x fewer frames, 8x smaller H and W and
z_dim = 16 channels. Frame 0 is encoded alone (so an image is a 1-frame video), then every group of 4
frames becomes one latent frame. All temporal convolutions are causal, so the model runs chunk by chunk
and carries only the last input frames of each causal layer in an explicit `CausalCache`: memory is
bounded by one chunk whatever the video length (docs/wan.md#chunked-encode-and-decode).

Parameter names equal the original checkpoint (Wan2.1_VAE.pth): `encoder.downsamples.3.residual.2.weight`,
`decoder.upsamples.7.time_conv.bias`, ... The diffusers `AutoencoderKLWan` names are mapped in
model/keymaps.py.

Shapes: B batch, C channels, T video frames, F latent frames (F = 1 + (T-1)/4), H W the spatial size
of the tensor at hand (pixels at the video end, pixels/8 at the latent end), t frames of one chunk.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model.config import VAEConfig


class CausalCache:
    """Temporal state carried from one chunk to the next in a chunked encode or decode.

    One fresh cache per video. Each causal layer stores its own state under itself as the key.
    """

    def __init__(self) -> None:
        self.first_chunk = True      # chunk 0 holds frame 0 alone; temporal resampling skips it
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        return self._frames.get(layer)

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        # clone: a view would keep the whole chunk's activation alive until the next chunk
        self._frames[layer] = frames.clone()

    def next_chunk(self) -> None:
        self.first_chunk = False


class CausalConv3d(nn.Conv3d):
    """A Conv3d that only looks back: 2*p_t zero frames in front of the clip, none behind.

    With a cache, the previous chunk's last input frames take the place of that many zero frames,
    so running chunk by chunk gives exactly the whole-clip result.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel_size, stride=stride)  # padding is done by hand in forward
        p_t, p_h, p_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.context = 2 * p_t                       # past frames one output needs (k_t - 1 for "same" convs)
        self.spatial_pad = (p_w, p_w, p_h, p_h)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # x: (B, C, t, H, W)
        front = self.context
        if cache is not None and self.context > 0:
            past = cache.get(self)                   # previous chunk's last input frames; None on chunk 0
            if past is not None:
                x = torch.cat([past, x], dim=2)      # (B, C, n_past + t, H, W)
                front -= past.shape[2]
            cache.keep(self, x[:, :, -self.context:])
        x = F.pad(x, (*self.spatial_pad, front, 0))  # zero frames in front only: causal in time
        return super().forward(x)                    # (B, C_out, t, H, W) for stride 1


class RMSNorm(nn.Module):
    """RMS norm over channels, `normalize(x) * sqrt(C) * gamma`, no bias (the original's RMS_norm)."""

    def __init__(self, dim: int, per_frame: bool) -> None:
        super().__init__()
        # gamma broadcasts over (H, W) for per-frame 4-D input, over (t, H, W) for 5-D video
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if per_frame else torch.ones(dim, 1, 1, 1))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize divides by max(||x||_2, 1e-12). Done in fp32, as diffusers does for half inputs,
        # because the sum of squares over hundreds of channels is coarse in bf16.
        x_hat = F.normalize(x.float(), dim=1).to(x.dtype)
        return x_hat * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """Two [RMSNorm, SiLU, causal 3x3x3 conv] steps plus a shortcut (a 1x1x1 conv when widths differ)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # A Sequential only so the checkpoint names residual.{0,2,3,6} line up; forward unpacks it.
        # Slots 1 and 4 are the original's SiLUs and slot 5 its Dropout(0.0): all parameter-free.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, per_frame=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, per_frame=False), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: (B, C_in, t, H, W)
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)          # (B, C_out, t, H, W)
        # Rebind h before conv2 runs, so conv1's output is freed first: one activation less at the peak.
        h = F.silu(norm2(h))
        h = conv2(h, cache)                         # (B, C_out, t, H, W)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the H*W positions of each frame; nothing mixes across time."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, per_frame=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, t, H, W = x.shape
        h = rearrange(x, "b c t h w -> (b t) c h w")                        # frames fold into the batch
        qkv = self.to_qkv(self.norm(h))                                     # (B*t, 3C, H, W)
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # each (B*t, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)                         # scale 1/sqrt(C)
        h = self.proj(rearrange(h, "n 1 (h w) c -> n c h w", h=H))          # (B*t, C, H, W)
        return x + rearrange(h, "(b t) c h w -> b c t h w", b=B)


class Resample(nn.Module):
    """Halve or double H and W frame by frame; the "3d" modes also halve or double time."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("downsample"):
            # pad right and bottom by one, then a stride-2 3x3 conv: (H, W) -> (H/2, W/2)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            # nearest-exact x2, then a 3x3 conv that also halves the channels (the next stage expects C/2)
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "downsample3d":
            # no padding, stride 2: frames [0,1,2] -> 1, [2,3,4] -> 2, ...
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        if mode == "upsample3d":
            # makes 2C channels per frame; the two halves become two consecutive output frames
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: (B, C, t, H, W)
        B = x.shape[0]
        if self.mode == "upsample3d" and not cache.first_chunk:
            # Latent frame 0 stays one frame and is never used as temporal context: on chunk 1 the
            # time_conv starts from zero padding (the original's 'Rep' marker).
            x = self.time_conv(x, cache)                                    # (B, 2C, t, H, W)
            x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)   # (B, C, 2t, H, W)

        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample(x)                                                # (B*t, C', 2H or H/2, ...)
        x = rearrange(x, "(b t) c h w -> b c t h w", b=B)

        if self.mode == "downsample3d":
            past = cache.get(self)                   # previous chunk's last frame, after the spatial step
            cache.keep(self, x[:, :, -1:])
            if not cache.first_chunk:
                # Frame 0 passed through alone on chunk 0; now the stride-2 conv runs over
                # [last previous frame, this chunk]: 1 + 4 frames -> 2, 1 + 2 frames -> 1.
                x = self.time_conv(torch.cat([past, x], dim=2))            # (B, C, t/2, H, W)
        return x


class Encoder(nn.Module):
    """conv1 -> flat list of residual blocks and downsamplers -> middle [res, attn, res] -> head."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]   # Wan: 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:           # every stage but the last halves H and W
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*layers)   # flat, so indices match the checkpoint
        dim = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))
        # outputs 2*z_dim channels: mean and log-variance
        self.head = nn.Sequential(RMSNorm(dim, per_frame=False), nn.SiLU(),
                                  CausalConv3d(dim, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: (B, 3, t, H, W), t = 1 on chunk 0 and 4 afterwards
        x = self.conv1(x, cache)                    # (B, C0, t, H, W)
        for layer in self.downsamples:
            x = layer(x, cache)                     # ends at (B, C, 1, H/8, W/8)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)         # (B, 2z, 1, H/8, W/8)


class Decoder(nn.Module):
    """conv1 -> middle [res, attn, res] -> flat list of residual blocks and upsamplers -> head."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        # Wan: 384, 384, 384, 192, 96
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = cfg.temporal_downsample[::-1]      # mirror of the encoder: Wan (T, T, F)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2                         # the previous stage's upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):  # one more block per stage than the encoder
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)     # flat, so indices match the checkpoint
        self.head = nn.Sequential(RMSNorm(dims[-1], per_frame=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # z: (B, z, 1, H, W), one latent frame
        x = self.conv1(z, cache)                    # (B, C, 1, H, W)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        for layer in self.upsamples:
            x = layer(x, cache)                     # ends at (B, C0, 1 or 4, 8H, 8W)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)         # (B, 3, 1 or 4, 8H, 8W)


class WanVAE(nn.Module):
    """The Wan-VAE: chunked causal encode to a normalized latent, frame-by-frame decode back to video."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)   # "quant conv" on (mean, logvar)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)           # "post-quant conv" before decoding
        self.decoder = Decoder(cfg)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE: expected video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        k, s = self.cfg.temporal_factor, self.cfg.spatial_factor
        if (T - 1) % k:
            # the original silently drops the trailing frames; we refuse instead
            raise ValueError(f"WanVAE: T={T} frames is not of the form {k}k+1 (1, {k + 1}, {2 * k + 1}, ...):"
                             f" frame 0 is encoded alone, then groups of {k}; trim or pad the video")
        if H % s or W % s:
            raise ValueError(f"WanVAE: H={H} and W={W} must both be divisible by the spatial factor {s}")

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and std from the config, shaped (1, z, 1, 1, 1) like `like`."""
        mean = torch.tensor(self.cfg.latents_mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(self.cfg.latents_std, device=like.device, dtype=like.dtype)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unnormalized) posterior mean and log-variance, each (B, z, F, H/8, W/8)."""
        self._check_video(video)
        x = video.to(self.conv1.weight.dtype)       # (B, 3, T, H, W)
        T, k = x.shape[2], self.cfg.temporal_factor
        # chunks [0], [1:5], [5:9], ...: each gives exactly one latent frame
        chunks = [x[:, :, :1]] + [x[:, :, i:i + k] for i in range(1, T, k)]
        cache = CausalCache()
        latents = []
        for chunk in chunks:
            latents.append(self.encoder(chunk, cache))   # (B, 2z, 1, H/8, W/8)
            cache.next_chunk()
        h = self.conv1(torch.cat(latents, dim=2))   # (B, 2z, F, H/8, W/8)
        mean, logvar = h.chunk(2, dim=1)            # channels [0:z] and [z:2z]
        return mean, logvar

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalized latent (z - latents_mean) / latents_std, (B, z, F, H/8, W/8).

        Uses the posterior mean, like the original; with a generator, a posterior sample instead.
        """
        return self.normalized_latent(*self.moments(video), generator)

    def normalized_latent(self, mean: torch.Tensor, logvar: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """The posterior mean (or, with a generator, a posterior sample), normalized by the config's stats."""
        z = mean
        if generator is not None:
            # drawn exactly as diffusers' DiagonalGaussianDistribution.sample does, on the
            # generator's device, so one CPU seed gives the same latent on any device
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + std * eps.to(mean.device)
        shift, scale = self._latent_stats(z)
        return (z - shift) / scale

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1], (B, 3, 1 + 4(F-1), 8H, 8W), from an unnormalized latent (B, z, F, H, W)."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"WanVAE: expected a latent of shape (B, {self.cfg.z_dim}, F, H, W), "
                             f"got {tuple(z.shape)}")
        x = self.conv2(z.to(self.conv2.weight.dtype))   # whole latent at once: a 1x1x1 conv has no context
        cache = CausalCache()
        frames = []
        for i in range(x.shape[2]):
            # one latent frame at a time bounds memory: frame 0 -> 1 video frame, later ones -> 4
            frames.append(self.decoder(x[:, :, i:i + 1], cache))
            cache.next_chunk()
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1] from a normalized latent, the inverse of `encode`."""
        shift, scale = self._latent_stats(z)
        return self.decode_raw(z * scale + shift)
