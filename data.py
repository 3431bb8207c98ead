"""The training data of the two Set-and-Sequence stages: cached latents and text states, and batches.

Training never touches pixels: each video (read by video.py) is VAE-encoded once and cached as
safetensors, twice over (docs/method.md#the-two-stages-and-inference):
  - stage SET sees the frames as an unordered set of images: every frame encoded alone as a
    1-frame video, drawn in random order, so no temporal order can leak into the identity basis;
  - stage SEQUENCE sees the whole clip, encoded in one piece, in temporal order.
A cache is reused only when its fingerprint (source file, size, model weights, dtype) matches.

Shapes: T video frames, B batch, C latent channels, F latent frames (F = 1 + (T - 1) / 4),
h w latent height/width (H / 8, W / 8), P prompts, S text tokens, D text width.
"""
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.files import atomic_path
from video import IMAGE_EXTENSIONS, read_video, require_exists

# ----------------------------------------------------------------------------- latent and text caches

@dataclass
class VideoLatents:
    """One video, encoded twice: as a set of single frames (stage set) and as one clip (stage sequence)."""
    frames: torch.Tensor                                      # (T, C, 1, h, w), each frame encoded alone
    clip: torch.Tensor                                        # (C, F, h, w), the clip encoded whole


def source_fingerprint(path: str, fps: float, height: int, width: int, num_frames: int,
                       model_id: str) -> dict[str, str]:
    """Everything that decides a video's latents; a cache is reused only if this matches exactly."""
    require_exists(path)
    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
    stats = [os.stat(f) for f in files]                       # a folder: all its frames count
    return {"source": os.path.abspath(path), "bytes": str(sum(s.st_size for s in stats)),
            "mtime_ns": str(max((s.st_mtime_ns for s in stats), default=0)), "fps": f"{fps:g}",
            "height": str(height), "width": str(width), "num_frames": str(num_frames), "model": model_id}


def _load_if_fresh(path: str, fingerprint: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file whose metadata equals `fingerprint`; None if absent, stale or broken."""
    try:
        with safe_open(path, framework="pt") as f:
            if f.metadata() != fingerprint:
                return None
            return {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError):
        return None


def _save(tensors: dict[str, torch.Tensor], fingerprint: dict[str, str], path: str) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=fingerprint)


def cache_latents(video: str, load_vae: Callable[[], Any], cache_path: str, fps: float, height: int, width: int,
                  num_frames: int, model_id: str, device: str | torch.device = "cpu") -> VideoLatents:
    """Latents of `video` from `cache_path` if its fingerprint matches, else read, encode and save them.

    `load_vae()`, called only on a cache miss, returns anything with `encode(video (B, 3, T, H, W) in
    [-1, 1]) -> (B, C, F, h, w)`, e.g. model.vae.WanVAE: a hit never loads the VAE.
    """
    fingerprint = source_fingerprint(video, fps, height, width, num_frames, model_id)
    cached = _load_if_fresh(cache_path, fingerprint)
    if cached is not None:
        return VideoLatents(frames=cached["frames"], clip=cached["clip"])
    pixels = read_video(video, fps, height, width, num_frames)          # (T, 3, H, W)
    vae = load_vae()
    dtype = next(vae.parameters()).dtype
    # no_grad, not inference_mode: the latents become inputs of a graph that trains LoRA weights,
    # and inference-mode tensors may not be saved for backward
    with torch.no_grad():
        pixels = pixels.to(device, dtype).transpose(0, 1)[None]        # (1, 3, T, H, W)
        # stage set: a frame alone is a 1-frame video, exactly how the causal VAE encodes frame 0
        frames = torch.cat([vae.encode(pixels[:, :, t:t + 1]).float().cpu()
                            for t in range(num_frames)])               # (T, C, 1, h, w)
        clip = vae.encode(pixels)[0].float().cpu()                     # (C, F, h, w)
    _save({"frames": frames, "clip": clip}, fingerprint, cache_path)
    return VideoLatents(frames=frames, clip=clip)


def cache_text(prompts: list[str], encode_fn: Callable[[list[str]], torch.Tensor], cache_path: str,
               model_id: str) -> torch.Tensor:
    """Text states (P, S, D) of `prompts` from `cache_path` if prompts and model match, else encoded and saved.

    `encode_fn(list of P prompts) -> (P, S, D)`, e.g. the frozen umT5 encoder with its tokenizer.
    """
    fingerprint = {"prompts": json.dumps(prompts), "model": model_id}
    return cache_tensor(cache_path, fingerprint, lambda: encode_fn(prompts))


def cache_tensor(cache_path: str, fingerprint: dict[str, str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()` once: later calls with the same fingerprint read the tensor back from `cache_path`."""
    cached = _load_if_fresh(cache_path, fingerprint)
    if cached is not None:
        return cached["tensor"]
    with torch.no_grad():
        tensor = compute().cpu()
    _save({"tensor": tensor}, fingerprint, cache_path)
    return tensor


# ----------------------------------------------------------------------------- what each stage trains on

def _epochs(count: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless (B,) index batches: each epoch a fresh permutation of range(count), batches run across epochs."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch]
        pending = pending[batch:]


def set_batches(videos: list[VideoLatents], batch: int,
                generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stage SET: endless (latents (B, C, 1, h, w), video index (B,)), single frames in random order.

    Frames of all videos form one pool, shuffled anew each epoch (not drawn with replacement):
    every frame is seen equally often, and a batch repeats a frame only if it is bigger than the pool.
    """
    if len({v.frames.shape[1:] for v in videos}) != 1:
        raise ValueError("set_batches: videos have different latent sizes: read them all at one --height/--width")
    pool = torch.cat([v.frames for v in videos])                        # (sum of T, C, 1, h, w)
    owner = torch.cat([torch.full((len(v.frames),), i) for i, v in enumerate(videos)])
    for index in _epochs(len(pool), batch, generator):
        yield pool[index], owner[index]


def sequence_batches(videos: list[VideoLatents], batch: int,
                     generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stage SEQUENCE: endless (latents (B, C, F, h, w), video index (B,)), whole clips in frame order.

    With one video every row is the same clip; the rows still differ in the noise and timestep
    that the training loop draws for them.
    """
    if len({v.clip.shape for v in videos}) != 1:
        raise ValueError("sequence_batches: clips differ in shape: read all videos at one --frames/--height/--width")
    clips = torch.stack([v.clip for v in videos])                       # (number of videos, C, F, h, w)
    for index in _epochs(len(clips), batch, generator):
        yield clips[index], index
