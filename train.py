"""Set-and-Sequence training: ONE loop, two stages (shared/reference/method.md).

    python train.py --stage set        # identity basis + coefficients, from the video's frames as a set
    python train.py --stage sequence   # motion residual on the coefficients, from the ordered clip
    python train.py --stage single     # baseline: one plain LoRA stage on the clip (the paper's DB-LoRA)

Stage set trains `basis` and `coeff` of a LoRA on every DiT block linear, on random single frames
(1-frame videos) with the static prompt "a [v] ...". Stage sequence freezes them and trains only
`residual` on the whole clip with the motion prompt "... [u] motion", so the motion lives in the
span of the identity basis: delta W = basis @ (coeff + residual). Everything is cached once per
run folder: the video's latents, the prompts' text states (then the text encoder is released) and
the prior-preservation samples that the base model generates from generic prompts.
Stage single is the comparison eval.py needs: basis and coeff trained together on the whole clip
with the motion prompt, no DropConnect (a DreamBooth LoRA), 1500 steps = set + sequence.
Shapes: B batch, C latent channels, F H W latent frames/height/width, S text rows, D text width.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import VideoError, VideoLatents, cache_latents, cache_tensor, cache_text, check_video_size
from data import sequence_batches, set_batches
from lora.export import export_lora
from lora.lora import adapter_state_dict, inject, save_adapter, set_stage, trainable_parameters
from model.flow import add_noise, flow_loss, sample_train_sigmas, velocity_target
from model.loader import load_wan
from model.text_encoder import encode_prompts
from sample import CONCEPTS_FILE, DEFAULT_MODEL, DTYPES, generate_latents, load_adapter_file

# Generic prompts for prior preservation with a real Wan model (method.md, Regularization 3);
# a model folder may ship its own in prior_prompts.txt (the toy model does).
GENERIC_PROMPTS = ["A man in a blue t-shirt. He is walking in a park.",
                   "A woman in a red dress dancing in a living room.",
                   "A dog running on a beach at sunset.",
                   "A child riding a bicycle on a quiet street."]

# Steps per stage (method.md: the paper's 600 and 900; stage single gets their sum, same total work).
DEFAULT_STEPS = {"set": 600, "sequence": 900, "single": 1500}


@dataclass
class Concept:
    """One video to personalize on, with its two prompts and the rare tokens that name it."""
    video: str
    static_prompt: str   # stage set: "a [v] ..."
    motion_prompt: str   # stage sequence: "a [v] ... [u] motion"
    id_token: str | None
    motion_token: str | None


def resolve_concepts(args: argparse.Namespace) -> list[Concept]:
    """--video entries with their prompts; the toy world's concepts.json fills in what is omitted."""
    known = {}
    if os.path.exists(CONCEPTS_FILE):
        with open(CONCEPTS_FILE) as f:
            known = {os.path.normpath(os.path.join(os.path.dirname(CONCEPTS_FILE), c["file"])): c
                     for c in json.load(f)}
    videos = args.video or ([next(iter(known))] if known and args.model == DEFAULT_MODEL else [])
    if not videos:
        raise ValueError("--video is required with a model other than the toy default")
    for flag in ("prompt", "motion_prompt", "id_token", "motion_token"):
        given = getattr(args, flag) or []
        if given and len(given) != len(videos):
            raise ValueError(f"--{flag.replace('_', '-')} given {len(given)} times for {len(videos)} --video "
                             "entries: give it once per video, in the same order")
    concepts = []
    for i, video in enumerate(videos):
        default = known.get(os.path.normpath(video), {})
        pick = lambda flag, key: (getattr(args, flag) or [None] * len(videos))[i] or default.get(key)  # noqa: E731
        concept = Concept(video, pick("prompt", "static_prompt"), pick("motion_prompt", "motion_prompt"),
                          pick("id_token", "identity_token"), pick("motion_token", "motion_token"))
        if not concept.static_prompt or not concept.motion_prompt:
            raise ValueError(f"{video}: give --prompt (static, with the identity token) and --motion-prompt")
        # A prompt without its rare token cannot bind the concept to a word: warn, do not stop.
        for prompt, token in ((concept.static_prompt, concept.id_token), (concept.motion_prompt, concept.id_token),
                              (concept.motion_prompt, concept.motion_token)):
            if token and token not in prompt.split():
                print(f"warning: prompt {prompt!r} does not contain the token {token!r}", file=sys.stderr)
        concepts.append(concept)
    return concepts


def prior_latents(args, models, shape, negative: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of the BASE model from generic prompts, generated once and cached (latents, text states)."""
    prompts_file = os.path.join(args.model, "prior_prompts.txt") if args.model else ""
    prompts = GENERIC_PROMPTS
    if os.path.exists(prompts_file):
        with open(prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
    prompts = prompts[:args.prior_count]
    device = negative.device
    states = cache_text(prompts, lambda p: encode_prompts(models.tokenizer, models.text_encoder, p, device),
                        f"{path}-text.safetensors", models.model_id)           # (P, S, D)
    fingerprint = {"prompts": json.dumps(prompts), "model": models.model_id, "shape": str(shape),
                   "steps": str(models.cfg.sample_steps), "seed": str(args.seed)}

    def generate() -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.cat([generate_latents(models.dit, states[i:i + 1].to(device), negative, (1, *shape), "unipc",
                                           models.cfg.sample_steps, models.cfg.sample_shift,
                                           models.cfg.guidance_scale, generator, progress=False)
                          for i in tqdm(range(len(prompts)), desc="prior samples (once)")])
    return cache_tensor(f"{path}.safetensors", fingerprint, generate), states  # (P, C, F, H, W)


def save_state(path: str, step: int, model, optimizer, noise_gen, losses: list[float]) -> None:
    """Everything a resumed run needs to continue bit-exactly, written atomically."""
    state = {"step": step, "adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
             "noise_gen": noise_gen.get_state(), "rng": torch.get_rng_state(), "losses": losses}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()   # DropConnect masks on the GPU
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(args: argparse.Namespace) -> str:
    check_flags(args)
    concepts = resolve_concepts(args)
    run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(concepts[0].video))[0])
    try:
        os.makedirs(os.path.join(run_dir, "cache"), exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the run folder {run_dir!r} ({error.strerror}): choose another --run-dir")
    set_path, adapter_path = (os.path.join(run_dir, f"{s}.safetensors") for s in ("set", args.stage))
    if args.stage == "sequence" and not os.path.exists(set_path):
        raise ValueError(f"stage sequence needs the stage-set adapter {set_path}: run "
                         f"`python train.py --stage set` first with the same --run-dir")
    torch.manual_seed(args.seed)  # the global RNG draws the DropConnect masks

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    models = load_wan(args.model, parts=("dit", "vae", "text"), device=device, dtype=dtype)
    cfg = models.cfg
    frames, height, width = args.frames or cfg.num_frames, args.height or cfg.height, args.width or cfg.width
    check_video_size(frames, height, width)
    models.dit.requires_grad_(False)

    # ---- 1. Cache what the loop reads: latents, text states, prior samples; then free the encoders.
    videos: list[VideoLatents] = [
        cache_latents(c.video, models.vae, os.path.join(run_dir, "cache", f"video{i}.safetensors"), cfg.fps,
                      height, width, frames, models.model_id, device, dtype) for i, c in enumerate(concepts)]
    stage_prompts = [c.static_prompt if args.stage == "set" else c.motion_prompt for c in concepts]
    # (stage single learns identity and motion at once, from the clip and the motion prompt)
    encode = lambda p: encode_prompts(models.tokenizer, models.text_encoder, p, device)  # noqa: E731
    text = cache_text(stage_prompts, encode, os.path.join(run_dir, "cache", f"text-{args.stage}.safetensors"),
                      models.model_id)                                                   # (V, S, D)
    prior, prior_text = None, None
    # Regularization defaults come from the model's config (the paper's for Wan, measured for the toy).
    prior_weight = cfg.lora_prior_weight if args.prior_weight is None else args.prior_weight
    drop = {"set": cfg.lora_drop_set, "sequence": cfg.lora_drop_sequence, "single": 0.0}[args.stage]
    drop = drop if args.drop is None else args.drop
    if prior_weight > 0:
        negative = cache_text([cfg.negative_prompt], encode, os.path.join(run_dir, "cache", "negative.safetensors"),
                              models.model_id).to(device)
        # Stage set sees the prior as images (1-frame videos), stage sequence as clips, like the concept.
        shape = videos[0].frames.shape[1:] if args.stage == "set" else videos[0].clip.shape  # (C, F, H, W)
        prior, prior_text = prior_latents(args, models, tuple(shape), negative,
                                          os.path.join(run_dir, "cache", f"prior-{args.stage}"))
    models.text_encoder = models.vae = None  # umT5-XXL alone is 11 GB; the loop needs only the DiT

    # ---- 2. The adapter: fresh for stage set; stage sequence continues from the stage-set file.
    dit = models.dit
    if args.stage == "sequence":
        load_adapter_file(dit, set_path, models.model_id)  # rank/targets come from the file, strictly
        set_stage(dit, "sequence", p=drop)
    else:
        rank = cfg.lora_rank if args.rank is None else args.rank
        inject(dit, rank=rank, alpha=args.alpha, basis_side=args.basis_side)
        # stage single trains the same tensors as stage set: a plain LoRA, no DropConnect by default
        set_stage(dit, "set", p=drop)
    dit.train()
    dit.gradient_checkpointing = args.grad_ckpt
    params = trainable_parameters(dit)
    lr = cfg.lora_lr if args.lr is None else args.lr
    text_mask = cfg.lora_text_mask if args.text_mask is None else args.text_mask
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)

    # ---- 3. Resume: restore adapter, optimizer and RNGs; the batch iterators are replayed.
    data_gen, noise_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    state_path, start, losses = os.path.join(run_dir, f"{args.stage}-state.pt"), 0, []
    if args.resume and os.path.exists(state_path):
        state = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for key, tensor in state["adapter"].items():
                dit.get_parameter(key).copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        noise_gen.set_state(state["noise_gen"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, losses = state["step"], state["losses"]
    # Stage set: random single frames of the video(s) (no order can leak); sequence: the ordered clip.
    batches = (set_batches if args.stage == "set" else sequence_batches)(videos, args.batch, data_gen)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concept samples, then prior samples: latents (B', C, F, H, W), text (B', S, D), loss weights (B',)."""
        x0, owner = next(batches)                          # owner: the video each sample comes from
        context, weights = text[owner], torch.ones(len(x0))
        if prior is not None:
            pick = torch.randint(len(prior), (args.prior_batch,), generator=data_gen)
            x0, context = torch.cat([x0, prior[pick]]), torch.cat([context, prior_text[pick]])
            weights = torch.cat([weights, torch.full((args.prior_batch,), prior_weight)])
        return x0, context, weights

    for _ in range(start):  # replay the data order up to the resumed step (cheap: indexing only)
        next_batch()

    # ---- 4. The loop.
    steps = args.steps or DEFAULT_STEPS[args.stage]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"stage {args.stage}")
    for step in bar:
        x0, context, weights = next_batch()            # (B', C, F, H, W), (B', S, D), (B',)
        # Per-token text masking (method.md Reg. 2): zeroed rows look like Wan's padding rows.
        keep = torch.rand(context.shape[:2], generator=noise_gen) >= text_mask        # (B', S)
        context = context * keep[..., None]
        # Timesteps: uniform then shifted by the model's sampling shift (default), so training
        # weights noise levels the way the sampler visits them; coarse layout and motion are
        # decided at high noise, which the shift favours. --timesteps logit_normal is SD3's choice.
        sigmas = sample_train_sigmas(len(x0), noise_gen, shift=args.train_shift or cfg.sample_shift,
                                     mode=args.timesteps)
        noise = torch.randn(x0.shape, generator=noise_gen)                              # CPU noise
        x0, noise, sigmas, context = (t.to(device) for t in (x0, noise, sigmas, context))
        x_t = add_noise(x0, noise, sigmas)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = dit(x_t.to(dtype), sigmas * cfg.num_train_timesteps, context.to(dtype))  # (B', C, F, H, W)
        per_sample = flow_loss(pred, velocity_target(x0, noise))                           # (B',)
        loss = (per_sample * weights.to(device)).sum() / len(per_sample)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower --lr or use --dtype fp32; "
                                     f"the last good state is {state_path}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_state(state_path, step + 1, dit, optimizer, noise_gen, losses)

    # ---- 5. Save the adapter tensors (only what was trained), then optionally a plain LoRA.
    dit.eval()
    meta = {"base_model_id": models.model_id, "stage": args.stage, "steps": steps, "seed": args.seed,
            "videos": [c.video for c in concepts], "prompts": stage_prompts,
            "tokens": [[c.id_token, c.motion_token] for c in concepts], "final_loss": losses[-1] if losses else None}
    save_adapter(adapter_path, dit, meta)
    save_state(state_path, steps, dit, optimizer, noise_gen, losses)
    if args.export:
        out = os.path.join(run_dir, f"lora-{args.export}.safetensors")
        export_lora(dit, out, args.export, s_id=args.s_id, s_mot=args.s_mot)
        tqdm.write(f"exported {out}")
    head, tail = losses[:20], losses[-20:]   # means over 20 steps: single-step losses are noisy
    tqdm.write(f"wrote {adapter_path} (mean loss of the first / last 20 steps: "
               f"{sum(head) / max(len(head), 1):.4f} -> {sum(tail) / max(len(tail), 1):.4f})")
    return adapter_path


def check_flags(args: argparse.Namespace) -> None:
    """Out-of-range flags fail before any model is loaded."""
    checks = [(args.rank is None or args.rank >= 1, "--rank must be >= 1"), (args.batch >= 1, "--batch must be >= 1"),
              (args.lr is None or args.lr > 0, "--lr must be > 0"), (args.clip > 0, "--clip must be > 0"),
              (args.steps is None or args.steps >= 1, "--steps must be >= 1"),
              (args.drop is None or 0 <= args.drop < 1, "--drop must be in [0, 1)"),
              (args.text_mask is None or 0 <= args.text_mask < 1, "--text-mask must be in [0, 1)"),
              (args.prior_weight is None or args.prior_weight >= 0, "--prior-weight must be >= 0"),
              (args.prior_count >= 1 and args.prior_batch >= 1, "--prior-count and --prior-batch must be >= 1"),
              (args.save_every >= 1, "--save-every must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to learn
    p.add_argument("--stage", choices=("set", "sequence", "single"), required=True,
                   help="set: identity; sequence: motion; single: the one-stage LoRA baseline")
    p.add_argument("--video", action="append", help="video file or frame folder; repeat to train concepts "
                   "jointly with one shared basis (default: the toy world's first concept)")
    p.add_argument("--prompt", action="append", help="static prompt with the identity token, once per --video")
    p.add_argument("--motion-prompt", action="append", help="static + motion prompt with the motion token")
    p.add_argument("--id-token", action="append", help="identity token [v] of each video (checked in prompts)")
    p.add_argument("--motion-token", action="append", help="motion token [u] of each video")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Wan checkpoint folder (default: the toy model)")
    p.add_argument("--run-dir", help="folder for caches, adapters and resume state (default: runs/<video name>)")
    p.add_argument("--frames", type=int, help="frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, help="height, multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, help="width, multiple of 16 (default: the model's)")
    # optimization (method.md: the paper's values)
    p.add_argument("--steps", type=int, help="training steps (default 600 set, 900 sequence, 1500 single)")
    p.add_argument("--batch", type=int, default=8, help="concept samples per step")
    p.add_argument("--lr", type=float, help="AdamW learning rate, betas (0.9, 0.99) (default: the model's, "
                   "1e-4 for Wan as in the paper)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=0.05, help="gradient-norm clipping")
    p.add_argument("--rank", type=int, help="LoRA rank r (default: the model's, 8 for Wan, 32 for the toy; "
                   "stage set; sequence reads it from the file)")
    p.add_argument("--basis-side", choices=("output", "input"), default="output",
                   help="where the shared basis sits: output (basis @ coeff, method.md DECISION) or input")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default r: scale 1)")
    p.add_argument("--timesteps", choices=("uniform", "logit_normal"), default="uniform",
                   help="training noise-level distribution before the shift")
    p.add_argument("--train-shift", type=float, help="timestep shift in training (default: the model's)")
    # regularization (method.md section 3.4)
    p.add_argument("--drop", type=float, help="DropConnect p on the coefficients (default: the model's, 0.8 set / "
                   "0.5 sequence for Wan as in the paper; 0 in stage single)")
    p.add_argument("--text-mask", type=float, help="per-token text masking probability (default: the model's, "
                   "0.1 for Wan as in the paper)")
    p.add_argument("--prior-weight", type=float, help="loss weight of prior samples, 0 = off (default: the "
                   "model's, 1.0 for Wan)")
    p.add_argument("--prior-count", type=int, default=4, help="number of base-model prior samples")
    p.add_argument("--prior-batch", type=int, default=2, help="prior samples mixed into each batch")
    # run
    p.add_argument("--seed", type=int, default=0, help="seed of data order, noise, DropConnect")
    p.add_argument("--save-every", type=int, default=100, help="steps between resume checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/<stage>-state.pt")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="base weights / autocast dtype")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per DiT block")
    # export
    p.add_argument("--export", choices=("comfyui", "diffusers"), help="also write a plain LoRA file")
    p.add_argument("--s-id", type=float, default=1.0, help="identity strength baked into the export")
    p.add_argument("--s-mot", type=float, default=1.0, help="motion strength baked into the export")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (VideoError, ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"train.py: error: {error}")
