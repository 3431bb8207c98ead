"""Sample a video from Wan2.1 (or the project's toy model), optionally with Set-and-Sequence adapters.

    python sample.py                                   # the toy concept, re-staged by its first edit prompt
    python sample.py --prompt "..." --adapter runs/x/sequence.safetensors --s-id 1.0 --s-mot 0.8

Text is encoded once (prompt and negative prompt), then the DiT integrates the flow from noise to
latents with classifier-free guidance (model/flow.py samplers), and the VAE decodes them.
The initial noise comes from a CPU generator seeded by --seed: same seed, same video, any device.
Shapes: B batch (1), C latent channels, F H W latent frames/height/width, T video frames.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data import VideoError, check_video_size, write_video
from lora.lora import inject, load_adapter, lora_modules, merge
from model.flow import cfg_velocity, euler_sigmas, sample_euler, sample_unipc, unipc_sigmas
from model.loader import load_wan
from model.text_encoder import encode_prompts

DEFAULT_MODEL = "toy/checkpoint"         # the project's pretrained miniature Wan (toy/pretrain.py)
CONCEPTS_FILE = "assets/concepts.json"   # the toy world's example concepts (toy/make_assets.py)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_concept() -> dict | None:
    """The first example concept of the toy world (its video, prompts and tokens), if the file exists."""
    if not os.path.exists(CONCEPTS_FILE):
        return None
    with open(CONCEPTS_FILE) as f:
        return json.load(f)[0]


@torch.no_grad()
def generate_latents(dit, context: torch.Tensor, negative: torch.Tensor | None, shape: tuple[int, ...],
                     sampler: str, steps: int, shift: float, guidance: float, generator: torch.Generator,
                     progress: bool = True) -> torch.Tensor:
    """Integrate the flow from CPU-generator noise to latents (B, C, F, H, W) with CFG.

    context / negative: (B, S, D) text states of the prompt and the negative prompt
    (negative may be None when guidance == 1, which needs one model pass per step instead of two).
    """
    device = context.device
    noise = torch.randn(shape, generator=generator).to(device)  # (B, C, F, H, W), drawn on the CPU
    sigmas = unipc_sigmas(steps, shift) if sampler == "unipc" else euler_sigmas(steps, shift)
    weight_dtype = next(dit.parameters()).dtype

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


def latent_shape(cfg, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """(B, C, F, H, W) of the latents of `frames` (4k+1) x height x width video: the VAE's strides, F = k + 1."""
    return (batch, cfg.vae.z_dim, (frames - 1) // cfg.vae.temporal_factor + 1,
            height // cfg.vae.spatial_factor, width // cfg.vae.spatial_factor)


@torch.no_grad()
def generate_videos(model: str, adapters: list[str], prompts: list[str], seed: int, steps: int | None = None,
                    s_id: float = 1.0, s_mot: float = 1.0) -> torch.Tensor:
    """Videos (B, 3, T, H, W) in [-1, 1] for B prompts in one batch, on the CPU, at the model's defaults.

    For scripts that compare many samples (eval.py, toy/make_strip.py): the same noise stream
    (seed) for every call, the model's negative prompt, UniPC with CFG, like `main` below.
    """
    models = load_wan(model)
    cfg = models.cfg
    apply_adapters(models.dit, adapters, models.model_id, s_id, s_mot)
    states = encode_prompts(models.tokenizer, models.text_encoder, prompts + [cfg.negative_prompt], "cpu")
    context, negative = states[:-1], states[-1:].expand(len(prompts), -1, -1)
    shape = latent_shape(cfg, len(prompts), cfg.num_frames, cfg.height, cfg.width)
    latents = generate_latents(models.dit, context, negative, shape, "unipc", steps or cfg.sample_steps,
                               cfg.sample_shift, cfg.guidance_scale, torch.Generator().manual_seed(seed),
                               progress=False)
    return models.vae.decode(latents)


def apply_adapters(dit, paths: list[str], model_id: str, s_id: float, s_mot: float) -> list[dict]:
    """Load each adapter strictly, set its strengths, and merge it into the DiT's weights."""
    metas = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"adapter {path} does not exist: train one with "
                                    "`python train.py --stage set` then `--stage sequence`, or omit --adapter")
        meta = load_adapter_file(dit, path, model_id)
        for m in lora_modules(dit).values():
            m.s_id, m.s_mot = s_id, s_mot   # W + s_id * basis@coeff + s_mot * basis@residual
        merge(dit)                          # several adapters stack: each merges before the next loads
        metas.append(meta)
    return metas


def load_adapter_file(dit, path: str, model_id: str) -> dict:
    """Inject adapters shaped like the file's (rank, alpha, targets), then load it strictly."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if "rank" not in meta or "targets" not in meta:
        raise ValueError(f"{path} is not a Set-and-Sequence adapter (no rank/targets metadata); "
                         "plain LoRA files are for ComfyUI/diffusers")
    missing = [t for t in meta["targets"] if t not in dict(dit.named_modules())]
    if missing:
        raise ValueError(f"adapter {path} targets layers this model does not have ({missing[:3]}...): "
                         f"it was trained for {meta.get('base_model_id')!r}, this model is {model_id!r}")
    inject(dit, meta["targets"], rank=meta["rank"], alpha=meta["alpha"], basis_side=meta.get("basis_side", "output"))
    load_adapter(path, dit, base_model_id=model_id)
    return meta


def main(args: argparse.Namespace) -> str:
    if not 0 <= args.s_id <= 4 or not 0 <= args.s_mot <= 4:
        raise ValueError("--s-id and --s-mot must be in [0, 4]")
    device = torch.device(args.device)
    models = load_wan(args.model, parts=("dit", "vae", "text"), device=device, dtype=DTYPES[args.dtype])
    cfg = models.cfg
    frames = args.frames or cfg.num_frames
    height, width = args.height or cfg.height, args.width or cfg.width
    check_video_size(frames, height, width)
    steps = args.steps or cfg.sample_steps
    guidance = cfg.guidance_scale if args.guidance is None else args.guidance
    shift = cfg.sample_shift if args.shift is None else args.shift
    if steps < 1 or guidance < 1 or shift <= 0:
        raise ValueError("--steps must be >= 1, --guidance >= 1 (1 turns guidance off), --shift > 0")

    concept = default_concept() if args.model == DEFAULT_MODEL else None
    prompt = args.prompt or (concept["edits"][0]["prompt"] if concept else None)
    if prompt is None:
        raise ValueError("--prompt is required with a model other than the toy default")
    adapters = args.adapter
    if adapters is None and concept and not args.no_adapter:
        adapters = [os.path.join("runs", concept["name"], "sequence.safetensors")]
    metas = apply_adapters(models.dit, adapters or [], models.model_id, args.s_id, args.s_mot)

    # Text: encode once, then release the text encoder (umT5-XXL alone is 11 GB).
    negative_prompt = cfg.negative_prompt if args.negative_prompt is None else args.negative_prompt
    with torch.no_grad():
        states = encode_prompts(models.tokenizer, models.text_encoder, [prompt, negative_prompt], device)
    context, negative = states[:1], (states[1:] if guidance > 1 else None)
    models.text_encoder = None

    shape = latent_shape(cfg, 1, frames, height, width)
    generator = torch.Generator().manual_seed(args.seed)
    latents = generate_latents(models.dit, context, negative, shape, args.sampler, steps, shift,
                               guidance, generator)
    with torch.no_grad():
        video = models.vae.decode(latents.to(device, DTYPES[args.dtype]))[0].float().cpu()  # (3, T, H, W)
    video = video.transpose(0, 1)                                                           # (T, 3, H, W)

    write_video(args.out, video, fps=cfg.fps)          # atomic: a temp file, then a rename
    if args.gif:
        write_video(os.path.splitext(args.out)[0] + ".gif", video, fps=cfg.fps)
    used = ", ".join(f"{m.get('stage')} adapter for {m.get('prompts')}" for m in metas) or "no adapter"
    tqdm.write(f"wrote {args.out} ({frames} frames {height}x{width}; {used}; prompt: {prompt!r})")
    return args.out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model and adapters
    p.add_argument("--model", default=DEFAULT_MODEL, help="Wan checkpoint folder (diffusers or original layout)")
    p.add_argument("--adapter", action="append", help="Set-and-Sequence adapter file; repeat to stack several "
                   "(default for the toy model: runs/<first concept>/sequence.safetensors)")
    p.add_argument("--no-adapter", action="store_true", help="sample the base model only")
    p.add_argument("--s-id", type=float, default=1.0, help="identity strength: scales basis @ coeff")
    p.add_argument("--s-mot", type=float, default=1.0, help="motion strength: scales basis @ residual")
    # what to generate
    p.add_argument("--prompt", help="text prompt (default for the toy model: the concept's first edit prompt)")
    p.add_argument("--negative-prompt", help="negative prompt (default: the model's, Wan's Chinese default)")
    p.add_argument("--frames", type=int, help="number of frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16 (default: the model's)")
    # sampler
    p.add_argument("--sampler", choices=("unipc", "euler"), default="unipc", help="Wan's UniPC or plain Euler")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's; 1 = off)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU noise generator")
    # output and runtime
    p.add_argument("--out", default="out/sample.mp4", help="output .mp4 (written atomically)")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to the .mp4")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weight dtype (bf16 on GPUs)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (VideoError, ValueError, FileNotFoundError) as error:
        sys.exit(f"sample.py: error: {error}")
