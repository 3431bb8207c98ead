"""The VAE part of the toy pretraining (toy/pretrain.py --part vae), and the run helpers all parts share.

The causal Wan-VAE at the toy config learns from renders of the whole sprite world (held-out
attributes included, so it can encode the concept videos): MSE plus a small KL, mostly on single
frames and short clips, some full 17-frame clips so the temporal path learns too. It starts as an
image VAE run frame by frame (`inflate_init`, the usual way to grow a video VAE from an image one),
so the 4-frame chunks inherit what frame 0 learns instead of starting from random temporal weights.
Shapes: B batch, T video frames, H W height/width, z latent channels.
"""
import math
import os
import time

import torch
from tqdm import tqdm

from model.config import WanConfig
from model.files import atomic_path
from model.vae import CausalCache, CausalConv3d, Resample, WanVAE
from toy import world


def save_atomic(obj: dict, path: str) -> None:
    """torch.save atomically: a killed run never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Deadline:
    """The wall-clock budget of one invocation (--minutes), shared by all parts it runs."""

    def __init__(self, minutes: float):
        self.end = time.time() + 60 * minutes

    def passed(self) -> bool:
        return time.time() > self.end


class Every:
    """True once per `minutes` of wall time: when a training loop checkpoints (--save-minutes)."""

    def __init__(self, minutes: float):
        self.period, self.last = 60 * minutes, time.time()

    def due(self) -> bool:
        if time.time() - self.last <= self.period:
            return False
        self.last = time.time()
        return True


def restore(state: dict | None, vae: WanVAE, opt: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Load a part's saved state into the VAE, optimizer and generator; the step to resume at (0 if fresh)."""
    if state is None:
        return 0
    vae.load_state_dict(state["vae"])
    opt.load_state_dict(state["opt"])
    generator.set_state(state["generator"])
    return state["step"]


def save_part(path: str, vae: WanVAE, opt: torch.optim.Optimizer, generator: torch.Generator, step: int) -> None:
    save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "generator": generator.get_state(),
                 "step": step}, path)


def render_pool(count: int, split: str, seed: int) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 clips of random scenes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([world.render(world.random_scene(generator, split, anchors="random"))
                        for _ in tqdm(range(count), desc=f"render {split} pool")])


def vae_batch(pool: torch.Tensor, step: int, total: int, args, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1]: 2 of 4 steps single frames, 1 a 5-frame clip, 1 the full 17 frames."""
    # The causal VAE encodes frame 0 alone, so single frames train the image path (and most of
    # every clip's cost); short clips train the 4-frame temporal chunks; full clips the whole cache.
    kind = step % 4
    frames, batch = {0: (1, args.vae_batch), 1: (1, args.vae_batch), 2: (5, args.vae_batch // 4)}.get(kind, (17, 2))
    # Random crops: the VAE is convolutional, and 32x32 crops cost a quarter of a full frame.
    # The last 5% of steps use whole 64x64 frames, the size the model will always see.
    crop = world.FRAME_SIZE if step >= 0.95 * total else args.vae_crop
    clips = torch.randint(len(pool), (batch,), generator=generator)
    start = torch.randint(world.NUM_FRAMES - frames + 1, (batch,), generator=generator)
    corners = torch.randint(world.FRAME_SIZE - crop + 1, (batch, 4, 2), generator=generator)
    videos = []
    for c, s, options in zip(clips.tolist(), start.tolist(), corners.tolist()):
        # Of 4 random crops keep the busiest: a random crop is mostly flat background, and a VAE
        # fed those learns the background colours first and the sprites (few pixels) very late.
        crops = [pool[c, s:s + frames, y:y + crop, x:x + crop] for y, x in options]
        videos.append(world.to_pixels(max(crops, key=lambda v: float(v.float().std()))))  # (T, 3, h, w)
    return torch.stack(videos).permute(0, 2, 1, 3, 4)                            # (B, 3, T, h, w)


def reconstruct(vae: WanVAE, video: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior sample -> decoded video WITHOUT decode's final clamp (a clamp has no gradient), the KL,
    and the posterior mean (B, z, F, h, w)."""
    mean, logvar = vae.moments(video)                     # (B, z, F, h/8, w/8) each
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    x, cache, frames = vae.conv2(z), CausalCache(), []
    for i in range(x.shape[2]):                           # as WanVAE.decode_raw: one latent frame at a time
        frames.append(vae.decoder(x[:, :, i:i + 1], cache))
        cache.next_chunk()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return torch.cat(frames, dim=2), kl, mean


@torch.no_grad()
def inflate_init(vae: WanVAE) -> None:
    """Start the VAE as an image VAE run frame by frame: the look of frame 0 carries over to every chunk.

    Every causal 3x3x3 conv keeps only its current-frame tap (the past taps start at zero, the
    current one scaled by sqrt(3) to the variance of a 3x3 conv's init); the encoder's temporal
    downsamplers start as a 2-frame average and the decoder's temporal upsamplers as frame
    repetition. Single frames (half the VAE's steps) only ever train the current-frame taps, so
    without this the later latent frames start from random temporal weights and learn colour late
    (PyTorch's default init is --vae-init pytorch).
    """
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module.kernel_size[0] == 3 and module.context == 2:
            module.weight[:, :, :2] = 0
            module.weight[:, :, 2] *= 3 ** 0.5
    for module in vae.modules():                                # the temporal resamplers, over the above
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv                              # weight (C_out, C, 3, 1, 1)
            conv.weight.zero_()
            conv.bias.zero_()
            eye = torch.eye(conv.weight.shape[1])
            if module.mode == "downsample3d":                   # each window [past, f, f']: the mean of f, f'
                conv.weight[:, :, 1, 0, 0] = 0.5 * eye
                conv.weight[:, :, 2, 0, 0] = 0.5 * eye
            else:                                               # both halves (two output frames) copy the input
                conv.weight[:, :, 2, 0, 0] = torch.cat([eye, eye])


def train_vae(args, cfg: WanConfig, deadline: Deadline) -> None:
    path = os.path.join(args.run_dir, "vae.pt")
    state = torch.load(path) if os.path.exists(path) else None
    if state is not None and state["step"] >= args.vae_steps:
        return
    pool_path = os.path.join(args.run_dir, "vae_pool.pt")
    if not os.path.exists(pool_path):
        # The VAE is a general compressor, like Wan's (trained on everything): it sees the WHOLE
        # vocabulary, held-out looks and motions included, or the concept videos could not even be
        # encoded. Only the DiT, the generative prior, never sees the held-out words.
        save_atomic({"clips": render_pool(args.vae_clips, "all", args.seed + 1)}, pool_path)
    pool = torch.load(pool_path)["clips"]

    torch.manual_seed(args.seed)
    vae = WanVAE(cfg.vae)
    # Start almost deterministic: with log-variance ~0 the posterior noise (std 1) drowns the tiny
    # initial means and the decoder cannot learn to use the latent (loss stalls at the frame variance).
    with torch.no_grad():
        vae.conv1.bias[cfg.vae.z_dim:] = -6.0
    if args.vae_init == "inflate":
        inflate_init(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 2)
    step = restore(state, vae, opt, generator)

    def save():
        save_part(path, vae, opt, generator, step)

    autosave, log = Every(args.save_minutes), tqdm(total=args.vae_steps, initial=step, desc="vae", mininterval=10)
    while step < args.vae_steps:
        if deadline.passed():
            save()
            return
        # linear warmup, then cosine decay to 10%
        progress = step / args.vae_steps
        lr = args.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        video = vae_batch(pool, step, args.vae_steps, args, generator)
        rec, kl, _ = reconstruct(vae, video, generator)
        mse = (rec - video).pow(2).mean()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        log.update(1)
        log.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.1f}", T=video.shape[2], refresh=False)
        if step % 50 == 0:
            print(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.2f} T {video.shape[2]}", flush=True)
        if autosave.due():
            save()
    save()


def load_vae(args, cfg: WanConfig) -> WanVAE:
    """The trained VAE of part "vae", frozen."""
    vae = WanVAE(cfg.vae)
    vae.load_state_dict(torch.load(os.path.join(args.run_dir, "vae.pt"))["vae"])
    return vae.eval().requires_grad_(False)
