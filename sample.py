"""Sample a video from Wan2.1 (or the project's toy model), optionally with Set-and-Sequence adapters.

    python sample.py                                   # the toy concept: its own prompt | its first edit
    python sample.py --prompt "..." --adapter runs/x/sequence.safetensors --s-id 1.0 --s-mot 0.8
    python sample.py --prompt "A" --prompt "B"         # both from the same noise, side by side

Text is encoded once (prompts and negative prompt) and the text encoder released, then the DiT
integrates the flow from noise to latents with classifier-free guidance (model/pipeline.py), and
the VAE decodes them. The initial noise comes from a CPU generator seeded by --seed: same seed,
same video, any device. Several prompts share one noise and are laid side by side in one video.
Shapes: B batch (prompts), C latent channels, F H W latent frames/height/width, T video frames.
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

from lora.lora import apply_adapters, read_adapter_meta
from model.files import check_writable
from model.loader import DTYPES, add_model_arguments, add_runtime_arguments, load_wan, single_files, wan_model_id
from model.offload import offload_blocks
from model.pipeline import check_size, generate_latents, latent_shape
from model.text_encoder import encode_prompts
from video import VIDEO_MUXERS, VideoError, check_video_size, write_panels


def toy_defaults(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Without --model: the toy model, the first example concept's adapter, its own prompt and first edit."""
    from toy import TOY_MODEL, example_concepts
    args.model = TOY_MODEL
    concept = example_concepts()[0]
    prompts = args.prompt or [concept["motion_prompt"], concept["edits"][0]["prompt"]]
    adapters = args.adapter
    if adapters is None and not args.no_adapter:
        adapters = [os.path.join("runs", concept["name"], "sequence.safetensors")]
    return prompts, adapters or []


def check_args(args: argparse.Namespace) -> None:
    """Bad flags fail before any model is loaded (with a real Wan model, loading alone takes minutes)."""
    for prompt in args.prompt or []:
        if not prompt.strip():
            raise ValueError("--prompt is empty: give the text to generate (or omit --prompt for the toy default)")
    if not 0 <= args.s_id <= 4 or not 0 <= args.s_mot <= 4:
        raise ValueError("--s-id and --s-mot must be in [0, 4]")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1 (omit it for the model's default)")
    if (args.guidance is not None and args.guidance < 1) or (args.shift is not None and args.shift <= 0):
        raise ValueError("--guidance must be >= 1 (1 turns guidance off), --shift > 0")
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in VIDEO_MUXERS or ext == ".gif":
        videos = ", ".join(e for e in VIDEO_MUXERS if e != ".gif")
        raise ValueError(f"--out {args.out}: use a video extension ({videos}); --gif adds a .gif next to it")
    check_writable(args.out)


def main(args: argparse.Namespace) -> str:
    check_args(args)
    torch.set_num_threads(args.threads)
    if args.model is None and args.dit is None:
        prompts, adapters = toy_defaults(args)
    else:
        prompts, adapters = args.prompt, [] if args.no_adapter else (args.adapter or [])
        if not prompts:
            raise ValueError("--prompt is required with --model or --dit (the toy model alone has default prompts)")
    metas = [read_adapter_meta(path) for path in adapters]    # a bad adapter fails before loading models

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # Part files given one by one (ComfyUI single files) replace --model's, as load_wan's overrides.
    files = single_files(args)
    cfg = load_wan(args.model, parts=(), **files).cfg                                  # configs only
    # The size: the flags, else the size the (first) adapter was trained at, else the model's.
    trained = next((m["size"] for m in metas if "size" in m), {})
    frames = args.frames or trained.get("frames", cfg.num_frames)
    height, width = args.height or trained.get("height", cfg.height), args.width or trained.get("width", cfg.width)
    check_video_size(frames, height, width)
    check_size(cfg, frames, height, width)
    steps = args.steps or cfg.sample_steps
    guidance = cfg.guidance_scale if args.guidance is None else args.guidance
    shift = cfg.sample_shift if args.shift is None else args.shift

    # One part on the device at a time (umT5-XXL alone is 11 GB): text first, then the DiT, then the VAE.
    negative_prompt = cfg.negative_prompt if args.negative_prompt is None else args.negative_prompt
    text = load_wan(args.model, parts=("text",), device=device, dtype=dtype, **files)
    with torch.no_grad():
        states = encode_prompts(text.tokenizer, text.text_encoder, prompts + [negative_prompt], device)
    del text
    context = states[:-1]                                                     # (B, S, D)
    negative = states[-1:].expand_as(context) if guidance > 1 else None

    where = "cpu" if args.offload_blocks else device   # offload_blocks moves what stays to the device
    dit = load_wan(args.model, parts=("dit",), device=where, dtype=dtype, fp8=args.fp8, **files).dit
    apply_adapters(dit, adapters, wan_model_id(cfg), args.s_id, args.s_mot)
    if args.offload_blocks:
        dit.requires_grad_(False)
        offload_blocks(dit, args.offload_blocks, device)
    # One noise for every prompt: the panels differ only by their text.
    noise = torch.randn(latent_shape(cfg, 1, frames, height, width),
                        generator=torch.Generator().manual_seed(args.seed))  # (1, C, F, H, W), on the CPU
    latents = torch.cat([generate_latents(dit, context[i:i + 1], None if negative is None else negative[i:i + 1],
                                          noise, args.sampler, steps, shift, guidance)
                         for i in range(len(prompts))])                      # (B, C, F, H, W)
    del dit

    vae = load_wan(args.model, parts=("vae",), device=device, dtype=dtype, **files).vae
    write_panels(args.out, vae, latents, cfg.fps, gif=args.gif)   # atomic: a temp file, then a rename
    used = ", ".join(f"{m.get('stage')} adapter for {m.get('prompts')}" for m in metas) or "no adapter"
    panels = " | ".join(repr(p) for p in prompts)
    tqdm.write(f"wrote {args.out} ({frames} frames {height}x{width}; {used}; prompts, left to right: {panels})")
    return args.out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model and adapters
    add_model_arguments(p)
    p.add_argument("--adapter", action="append", help="Set-and-Sequence adapter file; repeat to stack several "
                   "(default for the toy model: runs/<first concept>/sequence.safetensors)")
    p.add_argument("--no-adapter", action="store_true", help="sample the base model only")
    p.add_argument("--s-id", type=float, default=1.0,
                   help="identity strength: scales basis @ coeff (default: %(default)s)")
    p.add_argument("--s-mot", type=float, default=1.0,
                   help="motion strength: scales basis @ residual (default: %(default)s)")
    # what to generate
    p.add_argument("--prompt", action="append", help="text prompt; repeat for side-by-side panels from the same "
                   "noise (default for the toy model: the concept's own prompt and its first edit)")
    p.add_argument("--negative-prompt", help="negative prompt (default: the model's config: Wan's own for Wan "
                   "checkpoints, the empty caption for the toy)")
    p.add_argument("--frames", type=int, help="number of frames, 4k+1 (default: the adapter's training size, "
                   "else the model's)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16 (default: as --frames)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16 (default: as --frames)")
    # sampler
    p.add_argument("--sampler", choices=("unipc", "euler"), default="unipc", help="Wan's UniPC or plain Euler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 25 for the toy, 50 for Wan)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's; 1 = off)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU noise generator (default: %(default)s)")
    # output and runtime
    p.add_argument("--out", default="out/sample.mp4", help="output video (.mp4, .mov, .mkv), written atomically")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to it")
    add_runtime_arguments(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (VideoError, ValueError, FileNotFoundError) as error:
        sys.exit(f"sample.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit("sample.py: interrupted; nothing was written")
