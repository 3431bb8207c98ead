"""Set-and-Sequence training: ONE loop, two stages (docs/method.md).

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
import functools
import glob
import json
import os
import sys
from dataclasses import asdict

import torch
from tqdm import tqdm

from data import Concept, VideoLatents, cache_latents, cache_text, preview_prompts
from data import prior_latents, prior_prompts, resolve_run, sequence_batches, set_batches, warn_split_tokens
from lora.export import export_files
from lora.lora import inject, load_adapter_file, save_adapter, set_stage, trainable_parameters
from lora.training import DEFAULT_STEPS, hyperparameters, learning_rate, load_state, plot_losses, resume_hint
from lora.training import rng_states, save_state
from model.checkpoint import weights_fingerprint
from model.flow import flow_matching_loss, sample_train_sigmas
from model.loader import DTYPES, add_model_arguments, add_runtime_arguments, load_wan, single_files
from model.offload import offload_blocks
from model.parallel import Ranks, barrier, init_ranks, reshard_all, shard_frozen_linears, share
from model.parallel import sum_gradients, sum_values
from model.pipeline import check_size, generate_latents
from model.text_encoder import encode_prompts
from video import VideoError, check_video_size, write_panels

def main(args: argparse.Namespace) -> str:
    """Check the flags, train in the run folder, and leave no empty folder behind if it fails."""
    check_flags(args)
    torch.set_num_threads(args.threads)
    ranks = init_ranks(args.device, args.dist_timeout)   # one process, or one of torchrun's
    concepts, run_dir = resolve_run(args)
    made = [d for d in (run_dir, os.path.join(run_dir, "cache")) if not os.path.isdir(d)]
    try:
        os.makedirs(os.path.join(run_dir, "cache"), exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the run folder {run_dir!r} ({error.strerror}): choose another --run-dir")
    try:
        return train(args, concepts, run_dir, ranks)
    except RuntimeError as error:
        if ranks.world == 1:
            raise
        # A collective failed or timed out: another rank died or was stopped. Nothing is half-written
        # (every write is atomic), and the last resume state is whole.
        raise SystemExit(f"train.py: error: rank {ranks.rank}: another process of this run failed or stopped "
                         f"({str(error).splitlines()[0][:200]}); resume from the last state with --resume") from None
    finally:
        for folder in reversed(made):          # only what this run created, and only if still empty
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def train(args: argparse.Namespace, concepts: list[Concept], run_dir: str, ranks: Ranks) -> str:
    set_path, adapter_path = (os.path.join(run_dir, f"{s}.safetensors") for s in ("set", args.stage))
    torch.manual_seed(args.seed)  # the adapter's initialization: the same on every rank
    device = torch.device(f"cuda:{ranks.local_rank}" if args.device == "cuda" and ranks.world > 1 else args.device)
    dtype = DTYPES[args.dtype]
    configs = load_wan(args.model, parts=(), **single_files(args))           # configs only, no tensor read
    model_id, cfg = configs.model_id, configs.cfg
    frames, height, width = args.frames or cfg.num_frames, args.height or cfg.height, args.width or cfg.width
    check_video_size(frames, height, width)
    check_size(cfg, frames, height, width)
    # Caches are keyed by the weights themselves and the dtype: another checkpoint never reuses them.
    fingerprint = weights_fingerprint(args.model, dit=args.dit, vae=args.vae, text=args.text_encoder,
                                      tokenizer=args.tokenizer)
    cache_id = f"{model_id}-{fingerprint}-{args.dtype}"
    cache = lambda name: os.path.join(run_dir, "cache", name)  # noqa: E731
    # Defaults the flags did not set: the paper's for Wan, measured ones for the toy (TRAINING_DEFAULTS).
    hp, defaults_note = hyperparameters(model_id, vars(args))
    drop = {"set": hp["drop_set"], "sequence": hp["drop_sequence"], "single": 0.0}[args.stage]
    drop = drop if args.drop is None else args.drop

    # ---- 1. Cache what the loop reads: latents and text states, then prior samples. The VAE and the
    # umT5 (11 GB for Wan) are loaded only if a cache misses, and freed before the DiT is loaded.
    # With several ranks, rank 0 computes and writes the caches while the others wait, then they read.
    if not ranks.main:
        barrier(ranks)
    def load_part(part: str):
        # --offload-blocks: the DiT is built in CPU memory; offload_blocks puts what stays on the device
        where = "cpu" if part == "dit" and args.offload_blocks else device
        loaded = load_wan(args.model, parts=(part,), device=where, dtype=dtype, fp8=args.fp8, **single_files(args))
        if part == "text":
            warn_split_tokens(loaded.tokenizer, concepts)
        return loaded
    load = functools.cache(load_part)                    # each encoder once, and only if a cache misses

    def encode(prompts: list[str]) -> torch.Tensor:
        text_part = load("text")
        return encode_prompts(text_part.tokenizer, text_part.text_encoder, prompts, device)

    videos: list[VideoLatents] = [
        cache_latents(c.video, lambda: load("vae").vae, cache(f"video{i}.safetensors"), cfg.fps, height, width,
                      frames, cache_id, device) for i, c in enumerate(concepts)]
    stage_prompts = [c.static_prompt if args.stage == "set" else c.motion_prompt for c in concepts]
    # (stage single learns identity and motion at once, from the clip and the motion prompt)
    text = cache_text(stage_prompts, encode, cache(f"text-{args.stage}.safetensors"), cache_id)   # (V, S, D)
    if hp["prior_weight"] > 0 or args.sample_every:
        negative = cache_text([cfg.negative_prompt], encode, cache("negative.safetensors"), cache_id).to(device)
    if args.sample_every:   # previews: the prompts of --sample-prompts, else each concept's own and its edits
        preview_text = cache_text(preview_prompts(args, concepts), encode, cache("preview-text.safetensors"), cache_id)
        preview_vae = functools.cache(lambda: load_part("vae").vae)       # kept from the first preview on
    if hp["prior_weight"] > 0:
        prior_text = cache_text(prior_prompts(args), encode, cache(f"prior-{args.stage}-text.safetensors"),
                                cache_id)                                                          # (P, S, D)
    # Composition (docs/method.md#the-two-stages-and-inference): with several videos, stage sequence also
    # trains on two clips side by side under both prompts joined, against identity leakage between them.
    pairs = [(i, j) for i in range(len(concepts)) for j in range(len(concepts)) if i != j]
    composing = args.stage == "sequence" and bool(pairs) and args.composition_weight > 0
    if composing:
        pair_text = cache_text([f"{concepts[i].motion_prompt} and {concepts[j].motion_prompt}" for i, j in pairs],
                               encode, cache("composition-text.safetensors"), cache_id)            # (pairs, S, D)
    load.cache_clear()                                   # the encoders go before the DiT comes
    dit = load_part("dit").dit
    dit.requires_grad_(False)
    offload = offload_blocks(dit, args.offload_blocks, device) if args.offload_blocks else None
    prior = None
    if hp["prior_weight"] > 0:
        # Stage set sees the prior as images (1-frame videos), stage sequence as clips, like the concept.
        shape = videos[0].frames.shape[1:] if args.stage == "set" else videos[0].clip.shape  # (C, F, H, W)
        prior = prior_latents(args, dit, cfg, prior_text, negative, tuple(shape),
                              cache(f"prior-{args.stage}.safetensors"), {"model": cache_id, "fp8": str(args.fp8)})
    if ranks.main:
        barrier(ranks)                                   # the caches are written: the other ranks read them

    # ---- 2. The adapter: fresh for stage set; stage sequence continues from the stage-set file.
    if args.stage == "sequence":
        load_adapter_file(dit, set_path, model_id)  # rank/targets come from the file, strictly
        set_stage(dit, "sequence", p=drop)
    else:
        inject(dit, rank=hp["rank"], alpha=args.alpha, basis_side=args.basis_side)
        # stage single trains the same tensors as stage set: a plain LoRA, no DropConnect by default
        set_stage(dit, "set", p=drop)
    if offload:   # again, now with the adapters: they are created in CPU memory and must live on the device
        offload.remove()
        offload_blocks(dit, args.offload_blocks, device)
    torch.manual_seed(args.seed + ranks.rank)  # the global RNG draws the DropConnect masks: each rank its own
    dit.train()
    dit.gradient_checkpointing = args.grad_ckpt
    # What checkpointing keeps of each block input: fp32 on the device, or bf16, and/or in CPU memory.
    dit.activation_dtype = torch.bfloat16 if "bf16" in args.activations else None
    dit.activation_offload = args.activations.endswith("cpu")
    params = trainable_parameters(dit)
    # --shard-base: each rank keeps 1/N of the frozen block linears (FSDP2); the adapter stays whole.
    sharded = shard_frozen_linears(dit, ranks) if args.shard_base and ranks.world > 1 else []
    optimizer = torch.optim.AdamW(params.values(), lr=hp["lr"], betas=(0.9, 0.99), weight_decay=args.weight_decay)
    micro, accum = hp["batch"], hp["grad_accum"]
    if ranks.main:
        tqdm.write(defaults_note)
        tqdm.write(f"effective batch {micro * accum * ranks.world} concept samples (micro-batch {micro} x {accum} "
                   f"accumulated x {ranks.world} processes)" + (f" + {args.prior_batch} prior samples"
                                                                 if prior is not None else "") + " per optimizer step")

    # ---- 3. Resume: restore adapter, optimizer and RNGs; the batch iterators are replayed.
    data_gen, noise_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    state_path, start, losses = os.path.join(run_dir, f"{args.stage}-state.pt"), 0, []
    if args.resume and os.path.exists(state_path):
        start, losses = load_state(state_path, dit, optimizer, noise_gen, ranks)
    # Stage set: random single frames of the video(s) (no order can leak); sequence: the ordered clip.
    # One draw is an optimizer step's worth of samples, so --batch only decides how many run at once.
    # Every rank draws the same samples (same seeds) and trains on its share of them (model/parallel.py).
    batches = (set_batches if args.stage == "set" else sequence_batches)(videos, micro * accum * ranks.world,
                                                                         data_gen)

    def next_batch() -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """One optimizer step's data: [(kind, latents (N, C, F, H, W), text (N, S, D), loss weight per sample)],
        weighted as DreamBooth's loss: mean over the concept samples + prior_weight x mean over the prior
        samples (+ composition_weight x mean over the stitched pairs, when composing)."""
        x0, owner = next(batches)                          # owner: the video each sample comes from
        groups = [("concept", x0, text[owner], 1 / len(x0))]
        if prior is not None:
            pick = torch.randint(len(prior), (args.prior_batch,), generator=data_gen)
            groups.append(("prior", prior[pick], prior_text[pick], hp["prior_weight"] / args.prior_batch))
        if composing:   # two clips side by side: their latents joined along the width (a latent-space stitch)
            pick = torch.randint(len(pairs), (args.composition_batch,), generator=data_gen)
            stitched = torch.stack([torch.cat([videos[pairs[k][0]].clip, videos[pairs[k][1]].clip], dim=-1)
                                    for k in pick.tolist()])                                  # (N, C, F, h, 2w)
            groups.append(("composition", stitched, pair_text[pick], args.composition_weight / args.composition_batch))
        return groups

    for _ in range(start):  # replay the data order up to the resumed step (cheap: indexing only)
        next_batch()

    # What every adapter file of this run records: stage sequence continues it, sample.py reads its size.
    meta = {"base_model_id": model_id, "stage": args.stage, "seed": args.seed,
            "videos": [c.video for c in concepts], "prompts": stage_prompts,
            "tokens": [[c.id_token, c.motion_token] for c in concepts],
            "concepts": [asdict(c) for c in concepts], "size": {"frames": frames, "height": height, "width": width}}
    # The log: one JSON line per step; a resumed run first drops the lines past its state's step.
    log_path = os.path.join(run_dir, f"{args.stage}-log.jsonl")
    kept = open(log_path).readlines()[:start] if start and os.path.exists(log_path) else []
    log = open(log_path if ranks.main else os.devnull, "w")     # only rank 0 writes files
    log.writelines(kept)

    def preview(at_step: int) -> None:
        """Sample the preview prompts from a fixed seed into <run-dir>/previews/ (mp4 and GIF): every rank
        samples (a sharded DiT needs them all for each forward); rank 0 decodes and writes."""
        # Sampling draws from its own generator and runs without DropConnect; the global RNG (the
        # training's DropConnect masks) is put back anyway, so a run with previews trains the same adapter.
        rng = torch.get_rng_state()
        dit.eval()
        noise = torch.randn((1, *videos[0].clip.shape), generator=torch.Generator().manual_seed(args.seed))
        latents = [generate_latents(dit, preview_text[i:i + 1].to(device), negative, noise, "unipc",
                                    cfg.sample_steps, cfg.sample_shift, cfg.guidance_scale, progress=False)
                   for i in range(len(preview_text))]
        reshard_all(sharded)
        if ranks.main:
            out = os.path.join(run_dir, "previews", f"{args.stage}-step{at_step:06d}.mp4")
            write_panels(out, preview_vae(), torch.cat(latents), cfg.fps, gif=True)
        dit.train()
        torch.set_rng_state(rng)

    # ---- 4. The loop: per optimizer step, the concept samples and then the prior samples, each run in
    # micro-batches whose gradients add up (what fits in memory decides --batch, not the result).
    steps = args.steps or DEFAULT_STEPS[args.stage]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"stage {args.stage}", disable=not ranks.main)
    step, at_start = start, None
    try:
        for step in bar:
            if ranks.world == 1:
                at_start = rng_states(noise_gen, ranks)      # what an interrupted step resumes from
            optimizer.zero_grad(set_to_none=True)
            lr = learning_rate(step, steps, hp["lr"], args.lr_schedule, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            group_loss = {"concept": 0.0, "prior": 0.0, "composition": 0.0}   # this step's parts of the loss
            for kind, x0, context, weight in next_batch():   # concept samples, then prior samples (, pairs)
                # Every random draw is made for the whole group at once, so micro-batching cannot change it.
                # Per-token text masking (docs/method.md#regularization): zeroed rows look like Wan's padding rows.
                keep = torch.rand(context.shape[:2], generator=noise_gen) >= hp["text_mask"]   # (N, S)
                # Timesteps: uniform, then the model's sampling shift (model/flow.py): coarse layout and motion
                # are decided at high noise, which the shift favours. --timesteps logit_normal is SD3's choice.
                sigmas = sample_train_sigmas(len(x0), noise_gen, shift=args.train_shift or cfg.sample_shift,
                                             mode=args.timesteps)                               # (N,)
                noise = torch.randn(x0.shape, generator=noise_gen)                              # CPU noise
                mine = share(len(x0), ranks)                     # this rank's share of the group's samples
                for i in range(mine.start, mine.stop, micro):
                    part = slice(i, min(i + micro, mine.stop))
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        per_sample = flow_matching_loss(dit, x0[part].to(device), noise[part].to(device),
                                                        sigmas[part].to(device),
                                                        (context[part] * keep[part, :, None]).to(device, dtype))
                    loss = weight * per_sample.sum()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower --lr or use --dtype "
                                                 f"fp32; the last good state is {state_path}")
                    loss.backward()                                  # gradients add up over micro-batches
                    reshard_all(sharded)
                    group_loss[kind] += loss.item()
            sum_gradients(list(params.values()), ranks)          # the whole step's gradient on every rank
            group_loss = dict(zip(group_loss, sum_values(list(group_loss.values()), ranks)))
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), args.clip)
            optimizer.step()
            losses.append(sum(group_loss.values()))
            # the parts as plain means: the concept's, the prior's and the pairs' (before their weights)
            parts = {"concept": group_loss["concept"],
                     "prior": group_loss["prior"] / hp["prior_weight"] if prior is not None else None,
                     "composition": group_loss["composition"] / args.composition_weight if composing else None}
            log.write(json.dumps({"step": step + 1, "loss": losses[-1], **parts, "lr": lr,
                                  "grad_norm": float(grad_norm)}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if args.sample_every and (step + 1) % args.sample_every == 0:
                preview(step + 1)
            if (step + 1) % args.save_every == 0 and step + 1 < steps:
                rng = rng_states(noise_gen, ranks)               # every rank: the DropConnect streams are gathered
                if ranks.main:
                    save_state(state_path, step + 1, dit, optimizer, rng, losses)
                if args.keep and ranks.main:   # an adapter along the way, for sample.py; the last --keep stay
                    save_adapter(os.path.join(run_dir, f"{args.stage}-step{step + 1:06d}.safetensors"), dit,
                                 {**meta, "steps": step + 1})
                    for old in sorted(glob.glob(os.path.join(run_dir, f"{args.stage}-step*.safetensors")))[:-args.keep]:
                        os.remove(old)
                    plot_losses(log_path, os.path.join(run_dir, f"{args.stage}-loss.svg"))
    except KeyboardInterrupt:  # Ctrl-C: keep what was trained and say how to go on
        bar.close()
        if ranks.world > 1:   # the ranks stop at different points: the last --save-every state is the one to use
            saved = len(losses) // args.save_every * args.save_every
            raise SystemExit(f"\ninterrupted; resume from {state_path} (step {saved}): the same command with --resume")
        # mid-step: the streams as the step found them; between steps: as they are now
        save_state(state_path, len(losses), dit, optimizer,
                   at_start if len(losses) == step else rng_states(noise_gen, ranks), losses)
        raise SystemExit(resume_hint(state_path, len(losses), run_dir))
    finally:
        log.close()

    # ---- 5. Save the adapter tensors (only what was trained), the loss plot, optionally a plain LoRA.
    dit.eval()
    rng = rng_states(noise_gen, ranks)
    if not ranks.main:
        return adapter_path
    save_adapter(adapter_path, dit, {**meta, "steps": steps, "final_loss": losses[-1] if losses else None})
    plot_losses(log_path, os.path.join(run_dir, f"{args.stage}-loss.svg"))
    save_state(state_path, steps, dit, optimizer, rng, losses)
    if args.export:
        for written in export_files(dit, os.path.join(run_dir, f"lora-{args.export}.safetensors"), args.export,
                                    args.split, args.s_id, args.s_mot):
            tqdm.write(f"exported {written}")
    head, tail = losses[:20], losses[-20:]   # means over 20 steps: single-step losses are noisy
    tqdm.write(f"wrote {adapter_path} (mean loss of the first / last 20 steps: "
               f"{sum(head) / max(len(head), 1):.4f} -> {sum(tail) / max(len(tail), 1):.4f})")
    return adapter_path


def check_flags(args: argparse.Namespace) -> None:
    """Out-of-range flags fail before any model is loaded."""
    checks = [(args.rank is None or args.rank >= 1, "--rank must be >= 1"),
              (args.batch is None or args.batch >= 1, "--batch must be >= 1"),
              (args.grad_accum is None or args.grad_accum >= 1, "--grad-accum must be >= 1"),
              (args.lr is None or args.lr > 0, "--lr must be > 0"), (args.clip > 0, "--clip must be > 0"),
              (args.steps is None or args.steps >= 1, "--steps must be >= 1"),
              (args.drop is None or 0 <= args.drop < 1, "--drop must be in [0, 1)"),
              (args.text_mask is None or 0 <= args.text_mask < 1, "--text-mask must be in [0, 1)"),
              (args.prior_weight is None or args.prior_weight >= 0, "--prior-weight must be >= 0"),
              (args.prior_count >= 1 and args.prior_batch >= 1, "--prior-count and --prior-batch must be >= 1"),
              (args.composition_weight >= 0 and args.composition_batch >= 1,
               "--composition-weight must be >= 0 and --composition-batch >= 1"),
              (args.save_every >= 1, "--save-every must be >= 1"),
              (args.activations == "fp32" or args.grad_ckpt, "--activations needs --grad-ckpt"),
              (not args.shard_base or not (args.fp8 or args.offload_blocks),
               "--shard-base shards plain linears: it does not combine with --fp8 or --offload-blocks"),
              (args.offload_blocks >= 0, "--offload-blocks must be >= 0"),
              (args.keep >= 0 and args.warmup >= 0 and args.sample_every >= 0,
               "--keep, --warmup and --sample-every must be >= 0"), (args.threads >= 1, "--threads must be >= 1")]
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
    add_model_arguments(p)
    p.add_argument("--run-dir", help="folder for caches, adapters and resume state (default: runs/<video name>)")
    p.add_argument("--frames", type=int, help="frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, help="height, multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, help="width, multiple of 16 (default: the model's)")
    # optimization (docs/method.md: the paper's values)
    p.add_argument("--steps", type=int, help="training steps (default 600 set, 900 sequence, 1500 single)")
    p.add_argument("--batch", type=int, help="micro-batch: samples per forward pass, what memory allows "
                   "(default: the model's, 1 for Wan, 8 for the toy)")
    p.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimizer step: the effective "
                   "batch is --batch x --grad-accum (default: the model's, 8 for Wan as the paper's batch 8, 1 for "
                   "the toy)")
    p.add_argument("--lr", type=float, help="AdamW learning rate, betas (0.9, 0.99) (default: the model's, "
                   "1e-4 for Wan as in the paper)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--clip", type=float, default=0.05, help="gradient-norm clipping (default: %(default)s)")
    p.add_argument("--rank", type=int, help="LoRA rank r (default: the model's, 8 for Wan, 32 for the toy; "
                   "stage set; sequence reads it from the file)")
    p.add_argument("--basis-side", choices=("output", "input"), default="output",
                   help="where the shared basis sits: output (basis @ coeff, docs/method.md#decisions) or input")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default r: scale 1)")
    p.add_argument("--timesteps", choices=("uniform", "logit_normal"), default="uniform",
                   help="training noise-level distribution before the shift")
    p.add_argument("--train-shift", type=float, help="timestep shift in training (default: the model's)")
    # regularization (docs/method.md#regularization)
    p.add_argument("--drop", type=float, help="DropConnect p on the coefficients (default: the model's, 0.8 set / "
                   "0.5 sequence for Wan as in the paper; 0 in stage single)")
    p.add_argument("--text-mask", type=float, help="per-token text masking probability (default: the model's, "
                   "0.1 for Wan as in the paper)")
    p.add_argument("--prior-weight", type=float, help="loss weight of prior samples, 0 = off (default: the "
                   "model's, 1.0 for Wan)")
    p.add_argument("--composition-weight", type=float, default=1.0, help="with several --video in stage sequence: "
                   "loss weight of two clips side by side under both prompts joined, 0 = off (default: %(default)s)")
    p.add_argument("--composition-batch", type=int, default=1, help="stitched pairs per step (default: %(default)s)")
    p.add_argument("--prior-count", type=int, default=4,
                   help="number of base-model prior samples (default: %(default)s)")
    p.add_argument("--prior-batch", type=int, default=2,
                   help="prior samples mixed into each batch (default: %(default)s)")
    # run
    p.add_argument("--seed", type=int, default=0,
                   help="seed of data order, noise, DropConnect (default: %(default)s)")
    p.add_argument("--keep", type=int, default=3, help="adapters kept along the way, <stage>-stepN.safetensors, "
                   "written every --save-every steps; 0: none (default: %(default)s)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after the warmup: constant (the paper's) or cosine decay to 0")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup (default: %(default)s)")
    p.add_argument("--sample-every", type=int, default=0, help="preview videos every N steps into <run-dir>/previews "
                   "(default: %(default)s, none)")
    p.add_argument("--sample-prompts", help="text file, one preview prompt a line (default: each concept's motion "
                   "prompt and, for the toy examples, its edits)")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between resume checkpoints (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/<stage>-state.pt")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per DiT block")
    # where and how the base model runs, memory (docs/performance.md#memory)
    add_runtime_arguments(p)
    p.add_argument("--activations", choices=("fp32", "bf16", "cpu", "bf16-cpu"), default="fp32",
                   help="with --grad-ckpt: how the saved block inputs are stored (bf16 halves them, cpu moves them)")
    # several processes (torchrun --nproc-per-node N train.py ...; docs/performance.md#many-gpus)
    p.add_argument("--shard-base", action="store_true", help="with torchrun: shard the frozen DiT linears over "
                   "the processes (FSDP2), for a base model that does not fit one device")
    p.add_argument("--dist-timeout", type=float, default=600, help="seconds a process waits for the others before "
                   "the run fails with an error, e.g. when one died (default: %(default)s)")
    # export
    p.add_argument("--export", choices=("comfyui", "diffusers"), help="also write a plain LoRA file")
    p.add_argument("--split", action="store_true", help="with --export: an identity LoRA and a motion LoRA "
                   "(<name>-identity / -motion.safetensors), loaded together at weights s_id, s_mot")
    p.add_argument("--s-id", type=float, default=1.0,
                   help="identity strength baked into the export (default: %(default)s)")
    p.add_argument("--s-mot", type=float, default=1.0,
                   help="motion strength baked into the export (default: %(default)s)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (VideoError, ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt:   # before the loop: caches are written atomically, nothing to resume yet
        sys.exit("train.py: interrupted before training started; run the same command again")
