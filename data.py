"""The training data of the two Set-and-Sequence stages: what to train on (videos, prompts, tokens,
the run folder), cached latents and text states, and batches.

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
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lora.lora import read_adapter_meta
from model.files import atomic_path
from model.pipeline import generate_latents
from video import IMAGE_EXTENSIONS, read_video, require_exists

# ----------------------------------------------------------------------------- what to train on

# Generic prompts for prior preservation with a real Wan model (docs/method.md#regularization);
# a model folder may ship its own in prior_prompts.txt (the toy model does).
GENERIC_PROMPTS = ["A man in a blue t-shirt. He is walking in a park.",
                   "A woman in a red dress dancing in a living room.",
                   "A dog running on a beach at sunset.",
                   "A child riding a bicycle on a quiet street."]

@dataclass
class Concept:
    """One video to personalize on, with its two prompts and the rare tokens that name it."""
    video: str
    static_prompt: str   # stage set: "a [v] ..."
    motion_prompt: str   # stage sequence: "a [v] ... [u] motion"
    id_token: str | None
    motion_token: str | None
    edits: tuple[str, ...] = ()   # prompts that re-stage it (the toy's examples have some): previews show them


def concepts_from_flags(args) -> list[Concept]:
    """--video entries with their prompts; without --model, the toy world's example concept fills in."""
    known = {}
    if args.model is None and args.dit is None:
        from toy import TOY_MODEL, example_concepts
        args.model = TOY_MODEL
        known = {os.path.normpath(c["file"]): c for c in example_concepts()}
    videos = args.video or list(known)[:1]
    if not videos:
        raise ValueError("--video is required with --model (the toy model alone has a default video)")
    for flag in ("prompt", "motion_prompt", "id_token", "motion_token"):
        given = getattr(args, flag) or []
        if given and len(given) != len(videos):
            raise ValueError(f"--{flag.replace('_', '-')} given {len(given)} times for {len(videos)} --video "
                             "entries: give it once per video, in the same order")
    concepts = []
    for i, video in enumerate(videos):
        default = known.get(os.path.normpath(os.path.abspath(video)), {})
        # A caption file next to the video (clip.mp4 -> clip.txt): its first line is the static prompt,
        # its second the motion prompt, as trainers that read captions from .txt files expect.
        caption = os.path.splitext(video)[0] + ".txt"
        if os.path.isfile(caption):
            with open(caption) as f:
                lines = [line.strip() for line in f if line.strip()]
            default = {**default, **dict(zip(("static_prompt", "motion_prompt"), lines))}
        pick = lambda flag, key: (getattr(args, flag) or [None] * len(videos))[i] or default.get(key)  # noqa: E731
        concepts.append(Concept(video, pick("prompt", "static_prompt"), pick("motion_prompt", "motion_prompt"),
                                pick("id_token", "identity_token"), pick("motion_token", "motion_token"),
                                tuple(edit["prompt"] for edit in default.get("edits", []))))
    return concepts


def resolve_run(args) -> tuple[list[Concept], str]:
    """The concepts to train and the run folder. Stage sequence continues the stage-set run in that
    folder: its videos, prompts, tokens and size come from the stage-set adapter unless flags say otherwise."""
    if args.stage == "sequence" and not args.video and args.run_dir:
        if args.model is None and args.dit is None:
            from toy import TOY_MODEL
            args.model = TOY_MODEL
        concepts = []
    else:
        concepts = concepts_from_flags(args)
    run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(concepts[0].video))[0])
    set_path = os.path.join(run_dir, "set.safetensors")
    if args.stage == "sequence":
        if not os.path.exists(set_path):
            raise ValueError(f"stage sequence needs the stage-set adapter {set_path}: run "
                             f"`python train.py --stage set` first with the same --run-dir")
        set_meta = read_adapter_meta(set_path)
        trained = set_meta.get("concepts")
        if trained and concepts and [os.path.abspath(c.video) for c in concepts] != \
                [os.path.abspath(c["video"]) for c in trained]:
            raise ValueError(f"{set_path} was trained on {[c['video'] for c in trained]}, not "
                             f"{[c.video for c in concepts]}: stage sequence continues that run; omit --video "
                             "(the stage-set run's videos and prompts are used) or pass another --run-dir")
        if trained:   # flags given for this stage win; the rest comes from the stage-set run
            flagged = {f: getattr(args, f) or [None] * len(trained)
                       for f in ("prompt", "motion_prompt", "id_token", "motion_token")}
            concepts = [Concept(c["video"], flagged["prompt"][i] or c["static_prompt"],
                                flagged["motion_prompt"][i] or c["motion_prompt"],
                                flagged["id_token"][i] or c["id_token"],
                                flagged["motion_token"][i] or c["motion_token"], tuple(c.get("edits", ())))
                        for i, c in enumerate(trained)]
            for key in ("frames", "height", "width"):
                if getattr(args, key) is None:
                    setattr(args, key, set_meta.get("size", {}).get(key))
        elif not concepts:
            raise ValueError(f"{set_path} does not record its videos (an older file): pass --video and the prompts")
    for concept in concepts:
        if not concept.static_prompt or not concept.motion_prompt:
            raise ValueError(f"{concept.video}: give --prompt (static, with the identity token) and --motion-prompt")
        # A prompt without its rare token cannot bind the concept to a word: warn, do not stop.
        for prompt, token in ((concept.static_prompt, concept.id_token), (concept.motion_prompt, concept.id_token),
                              (concept.motion_prompt, concept.motion_token)):
            if token and token not in prompt.split():
                print(f"warning: prompt {prompt!r} does not contain the token {token!r}", file=sys.stderr)
    return concepts, run_dir


def preview_prompts(args, concepts: list[Concept]) -> list[str]:
    """--sample-prompts (one prompt a line), else each concept's motion prompt and its known edits."""
    if args.sample_prompts:
        with open(args.sample_prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--sample-prompts {args.sample_prompts} has no prompt: write one prompt a line")
        return prompts
    return [p for c in concepts for p in (c.motion_prompt, *c.edits)]


def prior_prompts(args) -> list[str]:
    """Generic prompts for prior preservation: the model folder's prior_prompts.txt, else GENERIC_PROMPTS."""
    prompts_file = os.path.join(args.model or "", "prior_prompts.txt")
    prompts = GENERIC_PROMPTS
    if os.path.exists(prompts_file):
        with open(prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
    return prompts[:args.prior_count]


def warn_split_tokens(tokenizer, concepts: list[Concept]) -> None:
    """A rare token should be one piece of the tokenizer's vocabulary; warn when it splits into several."""
    for concept in concepts:
        for token in (concept.id_token, concept.motion_token):
            pieces = tokenizer.sp.encode(token, out_type=str) if token else []
            if len(pieces) > 1:
                print(f"warning: the token {token!r} is {len(pieces)} pieces for this model's tokenizer "
                      f"({' '.join(pieces)}): a rare word that is one piece binds the concept better "
                      "(the toy model knows: dax wug blick toma zorp fep)", file=sys.stderr)



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


def prior_latents(args, dit, cfg, states: torch.Tensor, negative: torch.Tensor, shape, path: str,
                  fingerprint: dict[str, str]) -> torch.Tensor:
    """Samples of the BASE model (no adapter yet) from the prior prompts' text states, generated once and cached."""
    device = negative.device

    def generate() -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.cat([generate_latents(dit, states[i:i + 1].to(device), negative,
                                           torch.randn((1, *shape), generator=generator), "unipc",
                                           cfg.sample_steps, cfg.sample_shift, cfg.guidance_scale, progress=False)
                          for i in tqdm(range(len(states)), desc="prior samples (once)")])
    return cache_tensor(path, {**fingerprint, "shape": str(shape), "steps": str(cfg.sample_steps),
                               "seed": str(args.seed)}, generate)          # (P, C, F, H, W)


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
