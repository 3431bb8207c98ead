"""Text -> video with Wan2.1: the one sampling pipeline that sample.py, train.py (previews and data.py's
prior samples), bench.py and the evaluation scripts (eval.py, toy/) share.

Prompts are encoded once, the DiT integrates the flow from noise to latents with classifier-free
guidance (model/flow.py's samplers), and the VAE decodes them. The initial noise comes from a CPU
generator, as in flux's sampling code: the same seed gives the same video on any device.
Shapes: B batch, C latent channels, F H W latent frames/height/width, T video frames, S text rows.
"""
import torch

from model.flow import cfg_velocity, euler_sigmas, sample_euler, sample_unipc, unipc_sigmas
from model.loader import WanModels
from model.text_encoder import encode_prompts


def latent_shape(cfg, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """(B, C, F, H, W) of the latents of `frames` (4k+1) x height x width video: the VAE's strides, F = k + 1."""
    return (batch, cfg.vae.z_dim, (frames - 1) // cfg.vae.temporal_factor + 1,
            height // cfg.vae.spatial_factor, width // cfg.vae.spatial_factor)


def initial_noise(cfg, batch: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """Initial noise (B, C, F, H, W) for `frames` frames at the model's height and width: standard normal,
    drawn on the CPU so that a seed means the same video on any device."""
    return torch.randn(latent_shape(cfg, batch, frames, cfg.height, cfg.width), generator=generator)


@torch.no_grad()
def generate_latents(dit, context: torch.Tensor, negative: torch.Tensor | None, noise: torch.Tensor,
                     sampler: str, steps: int, shift: float, guidance: float, progress: bool = True) -> torch.Tensor:
    """Integrate the flow from the initial noise (B, C, F, H, W) to latents (B, C, F, H, W) with CFG.

    context / negative: (B, S, D) text states of the prompt and the negative prompt
    (negative may be None when guidance == 1, which needs one model pass per step instead of two).
    noise: drawn by the caller from a CPU generator (initial_noise); it is moved to context's device here.
    """
    device = context.device
    noise = noise.to(device)                                               # (B, C, F, H, W)
    sigmas = unipc_sigmas(steps, shift) if sampler == "unipc" else euler_sigmas(steps, shift)
    weight_dtype = dit.compute_dtype   # the blocks' linears' (model/loader.py keeps some small modules fp32)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The original runs the DiT under bf16 autocast and keeps the guidance arithmetic in fp32.
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            if negative is None:
                return dit(x, t.to(device), context)
            # One batched pass for the conditional and unconditional predictions.
            v_cond, v_uncond = dit(torch.cat([x, x]), torch.cat([t, t]).to(device),
                                   torch.cat([context, negative])).chunk(2)
        return cfg_velocity(v_cond, v_uncond, guidance)

    run = sample_unipc if sampler == "unipc" else sample_euler
    return run(velocity, noise, sigmas, progress=progress)


@torch.no_grad()
def generate_videos(models: WanModels, prompts: list[str], noise: torch.Tensor, steps: int | None = None,
                    shift: float | None = None, guidance: float | None = None) -> torch.Tensor:
    """Videos (B, 3, T, H, W) in [-1, 1] for B prompts in one batch from the initial noise (B, C, F, H, W).

    For scripts that compare many samples (eval.py, toy/): the model's negative prompt, UniPC with CFG,
    as sample.py samples; steps, shift and guidance default to the model's config.
    """
    cfg, device = models.cfg, next(models.dit.parameters()).device
    states = encode_prompts(models.tokenizer, models.text_encoder, prompts + [cfg.negative_prompt], device)
    context, negative = states[:-1], states[-1:].expand(len(prompts), -1, -1)        # (B, S, D) each
    latents = generate_latents(models.dit, context, negative, noise, "unipc", steps or cfg.sample_steps,
                               cfg.sample_shift if shift is None else shift,
                               cfg.guidance_scale if guidance is None else guidance, progress=False)
    return models.vae.decode(latents)


def check_size(cfg, frames: int, height: int, width: int) -> None:
    """Refuse a video size the DiT's RoPE tables cannot index; warn when it is far above the model's own."""
    f, h, w = latent_shape(cfg, 1, frames, height, width)[2:]
    grid = (f // cfg.dit.patch_size[0], h // cfg.dit.patch_size[1], w // cfg.dit.patch_size[2])
    limit = cfg.dit.rope_max_len
    if max(grid) > limit:
        max_frames = (limit * cfg.dit.patch_size[0] - 1) * cfg.vae.temporal_factor + 1
        max_side = limit * cfg.dit.patch_size[1] * cfg.vae.spatial_factor
        raise ValueError(f"{frames} frames of {height}x{width} is too large for this model: at most {max_frames} "
                         f"frames and {max_side} pixels a side (its position tables have {limit} rows per axis)")
    usual_shape = latent_shape(cfg, 1, cfg.num_frames, cfg.height, cfg.width)[2:]
    tokens = grid[0] * grid[1] * grid[2]
    usual = (usual_shape[0] // cfg.dit.patch_size[0]) * (usual_shape[1] // cfg.dit.patch_size[1]) \
        * (usual_shape[2] // cfg.dit.patch_size[2])
    if tokens > 8 * usual:
        print(f"note: {frames} frames of {height}x{width} are {tokens} tokens, {tokens / usual:.0f}x the model's "
              f"default size ({cfg.num_frames} frames of {cfg.height}x{cfg.width}); attention grows with the "
              "square of that: expect a long run", flush=True)
