"""Pretrain the toy Wan (PRESETS["toy"]) on the sprite world, from nothing, in 75 minutes on a 2-core CPU.

No Wan weights can be downloaded here, so the project makes its own base model: the SAME modules
as Wan2.1 (model/), a tiny config, trained in the order the real one was built:
  tokenizer  a word-level sentencepiece model over the world's captions (+ the concept tokens)
  vae        the causal Wan-VAE, MSE + a small KL, mostly on single frames and short clips,
             started as an image VAE run frame by frame (pretrain_vae.inflate_init)
  latents    cache the DiT's training set once: clips with video captions AND single frames with
             image captions (Wan trains on images as 1-frame videos; stage "set" relies on that);
             held-out colours/shapes/patterns/motions never appear; measures latents_mean/std
  dit        the DiT with flow matching (model/flow.py) on the cached latents, the small umT5
             trained jointly (then frozen forever, like the real one); 10% empty captions for CFG
  export     a diffusers-format folder (toy/checkpoint/) via model/save.save_diffusers
Each invocation runs the named parts (or all) for at most --minutes, checkpointing atomically
in --run-dir; run it again and it resumes exactly where it stopped (RNG states are saved too).
The defaults are the recipe of the shipped toy/checkpoint:

  OMP_WAIT_POLICY=ACTIVE python -m toy.pretrain --threads 2 --minutes 120

on the idle 2-core machine: tokenizer and clip pool 0.1 min, VAE 5000 steps 25.9, latents of 3000
clips + 3000 frames 2.6, DiT 15000 steps 45 (about 75 minutes; the VAE and latents times were
measured with the previous recipe, whose VAE part is the same). The shipped checkpoint was made in
two runs: its VAE is the previous checkpoint's, taken over with --vae-from, and its latent cache was
drawn before world.caption_anchor kept a quarter pixel inside the corners, so the current code's
cache differs in its two-sprite clips (the shipped one has no large moving square beside another
sprite).
The same command with `--minutes 55`, repeated until it prints "done", runs it in chunks of under
an hour.
Two threads pay only if OpenMP's threads spin while they wait (OMP_WAIT_POLICY=ACTIVE; the default
here is PASSIVE, which keeps a shared machine usable but then runs no faster than one thread); with
one thread the recipe takes longer than the 2-hour budget (measured earlier: the VAE part 40 min,
the DiT 3.6 instead of 5.3 steps/s). docs/toy-model.md lists what else was tried.

The motion design of docs/toy-model.md ("How far the motion design goes") is three defaults:
--anchors caption (each caption fixes where its sprites sit), --clip-shift 3 (clips trained at
noisier sigmas than images) and --frame-head 1 (a training-only head on block 1 that names each
token's latent frame, never exported). --anchors random --clip-shift 1 --frame-head 0 is the
previous checkpoint's recipe (motion 12% instead of 68%). --vae-from CHECKPOINT reuses an exported
VAE. Use a fresh --run-dir when changing --anchors: the cached latents depend on it.

Shapes: B batch, T video frames, F latent frames, H W height/width, z latent channels, S text tokens.
"""
import argparse
import io
import math
import os
import shutil
from dataclasses import replace

# OpenMP threads that spin while waiting for each other crawl when the cores are shared with other
# jobs (measured: 3-24 s instead of 0.6 s per VAE step on the 2-core machine); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import flow
from model.config import PRESETS, WanConfig
from model.dit import WanDiT
from model.files import atomic_path
from model.loader import load_wan
from model.text_encoder import Tokenizer, UMT5Encoder
from model.vae import WanVAE
from toy import concepts, world
from toy.pretrain_vae import Deadline, Every, load_vae, save_atomic, train_vae

PARTS = ("tokenizer", "vae", "latents", "dit", "export")


# ---------------------------------------------------------------------------- tokenizer

def train_tokenizer(args) -> None:
    """spiece.model whose pieces include every corpus word whole: one token per word."""
    path = os.path.join(args.run_dir, "tokenizer", "spiece.model")
    if os.path.exists(path):
        return
    lines = concepts.text_corpus()
    # Sentencepiece's unigram trainer cannot reach a vocabulary this small and still keep whole
    # words (it stops at ~70 sub-word pieces for this corpus). So train it for the characters and
    # a few sub-words, then append every word as a "▁word" piece with score 0, above every
    # trained piece: the Viterbi segmentation then takes whole words, and an unseen word
    # ("pink") still splits into known pieces. T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    have = {piece.piece for piece in proto.pieces}
    for word in sorted({w for line in lines for w in line.split()}):
        if "▁" + word not in have:
            piece = proto.pieces.add()
            piece.piece, piece.score = "▁" + word, 0.0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=path)
    longest = max(len(sp.encode(line)) + 1 for line in lines)      # + </s>
    print(f"tokenizer: {len(sp)} pieces, longest caption {longest} tokens incl. </s>")


def load_tokenizer(args, cfg: WanConfig) -> Tokenizer:
    tokenizer = Tokenizer(os.path.join(args.run_dir, "tokenizer"), cfg.t5.text_len)
    if tokenizer.vocab_size != cfg.t5.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the toy preset says {cfg.t5.vocab_size}")
    return tokenizer


# ---------------------------------------------------------------------------- latent cache

@torch.no_grad()
def cache_latents(args, cfg: WanConfig, deadline: Deadline) -> None:
    """Render held-in scenes, encode each clip and one single frame of it; store posterior moments."""
    path = os.path.join(args.run_dir, "latents.pt")
    cache = torch.load(path) if os.path.exists(path) else None
    if cache is not None and "latents_mean" in cache:
        return
    if cache is None:
        cache = {"video": [], "image": [], "captions": [], "image_captions": [],
                 "generator": torch.Generator().manual_seed(args.seed + 3).get_state()}
    generator = torch.Generator()
    generator.set_state(cache["generator"])
    vae = load_vae(args, cfg)
    log = tqdm(total=args.num_clips, initial=len(cache["captions"]), desc="latents", mininterval=10)
    while len(cache["captions"]) < args.num_clips:
        if deadline.passed():
            save_atomic(cache, path)
            return
        scenes = [world.random_scene(generator, "train", args.anchors) for _ in range(8)]   # held-in words only
        clips = torch.stack([world.to_pixels(world.render(s)) for s in scenes])  # (8, T, 3, H, W)
        clips = clips.permute(0, 2, 1, 3, 4)                                     # (8, 3, T, H, W)
        # The image: one random frame of each clip, encoded alone as a 1-frame video.
        pick = torch.randint(world.NUM_FRAMES, (8,), generator=generator)
        frames = clips[torch.arange(8), :, pick][:, :, None]                     # (8, 3, 1, H, W)
        # Keep mean and log-variance: the DiT trains on fresh posterior samples of them.
        cache["video"].append(torch.cat(vae.moments(clips), dim=1))             # (8, 2z, 5, 8, 8)
        cache["image"].append(torch.cat(vae.moments(frames), dim=1))            # (8, 2z, 1, 8, 8)
        cache["captions"] += [world.caption(s) for s in scenes]
        cache["image_captions"] += [world.image_caption(s) for s in scenes]
        cache["generator"] = generator.get_state()
        log.update(8)
        if len(cache["captions"]) % 200 == 0:
            save_atomic(cache, path)
    # Per-channel statistics of the raw posterior means over every cached latent frame, as Wan
    # ships its own (config latents_mean/std): they make the DiT's targets ~N(0, 1) per channel.
    z = cfg.vae.z_dim
    means = torch.cat([torch.cat(cache["video"])[:, :z].transpose(0, 1).flatten(1),
                       torch.cat(cache["image"])[:, :z].transpose(0, 1).flatten(1)], dim=1)  # (z, n)
    cache["video"], cache["image"] = torch.cat(cache["video"]), torch.cat(cache["image"])
    cache["latents_mean"] = [round(v, 4) for v in means.mean(1).tolist()]
    cache["latents_std"] = [round(v, 4) for v in means.std(1).tolist()]
    save_atomic(cache, path)
    print("latents_mean=", tuple(cache["latents_mean"]), "\nlatents_std=", tuple(cache["latents_std"]), flush=True)


def measured_config(args) -> WanConfig:
    """The toy preset with the latent statistics measured by the latents part."""
    cfg = PRESETS["toy"]
    cache = torch.load(os.path.join(args.run_dir, "latents.pt"))
    measured = (tuple(cache["latents_mean"]), tuple(cache["latents_std"]))
    if measured != (cfg.vae.latents_mean, cfg.vae.latents_std):
        print("NOTE: model/config.py PRESETS['toy'] latent stats differ from the measured ones; paste:\n"
              f"latents_mean={measured[0]},\nlatents_std={measured[1]}")
    return replace(cfg, vae=replace(cfg.vae, latents_mean=measured[0], latents_std=measured[1]))


# ---------------------------------------------------------------------------- DiT

def flow_step(dit: WanDiT, x0: torch.Tensor, context: torch.Tensor, shift: float, args,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching loss (B,) and the sigmas it was drawn at (shifted by `shift`)."""
    sigmas = flow.sample_train_sigmas(x0.shape[0], generator, shift=shift, mode=args.timesteps)
    noise = torch.randn(x0.shape, generator=generator)
    return flow.flow_matching_loss(dit, x0, noise, sigmas, context), sigmas


def frame_index_loss(head: torch.nn.Linear, tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """Cross-entropy of `head` telling each clip token's latent frame from an early block's output.

    tokens (B, L, D) in the DiT's order (frame-major, L = frames x tokens per frame). Training only:
    the head is never exported. Wan's RoPE is relative, so a token learns where it is in time only
    from where the sequence ends. With the two other changes of the motion design, asking an early
    block to say it outright made the DiT draw the motion words on a cut-down world (docs/toy-model.md,
    "Motion experiments": 32% without the head, 88% and 64% with it).
    """
    logits = head(tokens)                                                 # (B, L, frames)
    index = torch.arange(frames).repeat_interleave(tokens.shape[1] // frames)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), index.repeat(tokens.shape[0]))


def train_dit(args, deadline: Deadline) -> None:
    path = os.path.join(args.run_dir, "dit.pt")
    state = torch.load(path) if os.path.exists(path) else None
    if state is not None and state["step"] >= args.dit_steps:
        return
    cfg = measured_config(args)
    cache = torch.load(os.path.join(args.run_dir, "latents.pt"))
    tokenizer = load_tokenizer(args, cfg)
    # Token ids once; caption dropout swaps in the empty prompt (just </s>), which is what CFG's
    # unconditional branch will be fed at sampling time.
    video_ids, video_mask = tokenizer(cache["captions"])
    image_ids, image_mask = tokenizer(cache["image_captions"])
    empty_ids, empty_mask = tokenizer([""])

    torch.manual_seed(args.seed)
    with torch.device("meta"):
        stats = WanVAE(cfg.vae)      # only its latent statistics are used: no weights needed
    dit, encoder = WanDiT(cfg.dit), UMT5Encoder(cfg.t5)
    encoder.init_weights()                                 # T5's own init: this umT5 starts from nothing
    frames = cache["video"].shape[2]                       # latent frames of a clip
    frame_head, early = None, {}
    if args.frame_head:                                    # training only (frame_index_loss)
        frame_head = torch.nn.Linear(cfg.dit.dim, frames)
        dit.blocks[args.frame_head_block].register_forward_hook(lambda module, inputs, out: early.update(x=out))
    # The umT5 trains jointly with the DiT here and is frozen afterwards: a random frozen encoder
    # would hand the DiT token embeddings with no notion of which colour belongs to which shape
    # (the DiT's cross-attention has no text positions); the real umT5 learned that from text.
    params = list(dit.parameters()) + list(encoder.parameters())
    opt_params = params + (list(frame_head.parameters()) if frame_head else [])
    opt = torch.optim.AdamW(opt_params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    # An exponential moving average of the weights is what gets exported (smoother samples).
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(args.seed + 4)
    step = 0
    if state is not None:
        dit.load_state_dict(state["dit"])
        encoder.load_state_dict(state["t5"])
        if frame_head:
            frame_head.load_state_dict(state["frame_head"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        generator.set_state(state["generator"])
        step = state["step"]

    def save():
        save_atomic({"dit": dit.state_dict(), "t5": encoder.state_dict(), "opt": opt.state_dict(), "ema": ema,
                     "frame_head": frame_head and frame_head.state_dict(),
                     "generator": generator.get_state(), "step": step}, path)

    def batch(moments, ids, mask):
        """Random rows -> (latent sample, ids, mask), 10% of captions replaced by the empty prompt."""
        rows = torch.randint(len(moments), (args.dit_batch,), generator=generator)
        drop = torch.rand(args.dit_batch, generator=generator) < args.caption_dropout
        b_ids = torch.where(drop[:, None], empty_ids, ids[rows])
        b_mask = torch.where(drop[:, None], empty_mask, mask[rows])
        # The cached (B, 2z, F, H, W) mean/logvar -> a fresh normalized latent sample (B, z, F, H, W).
        return stats.normalized_latent(*moments[rows].chunk(2, dim=1), generator), b_ids, b_mask

    bins = torch.zeros(2, 5)     # (sum, count) of the video loss per sigma fifth, as minRF logs it
    autosave, log = Every(args.save_minutes), tqdm(total=args.dit_steps, initial=step, desc="dit", mininterval=10)
    while step < args.dit_steps:
        if deadline.passed():
            save()
            return
        lr = args.dit_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.dit_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        # One batch of clips (F = 5 latent frames) and one of single frames (F = 1) per step.
        x_video, ids_v, mask_v = batch(cache["video"], video_ids, video_mask)
        x_image, ids_i, mask_i = batch(cache["image"], image_ids, image_mask)
        context = encoder(torch.cat([ids_v, ids_i]), torch.cat([mask_v, mask_i]))   # (2B, S, D)
        # --clip-shift > 1 trains clips at noisier sigmas than images, where a path is decided (docs/toy-model.md)
        loss_v, sigmas = flow_step(dit, x_video, context[:args.dit_batch], args.clip_shift, args, generator)
        # the frame head reads the clips' pass, before the images' pass overwrites `early`
        loss_f = frame_index_loss(frame_head, early["x"], frames) if frame_head else torch.zeros(())
        loss_i, _ = flow_step(dit, x_image, context[args.dit_batch:], args.image_shift, args, generator)
        loss = loss_v.mean() + loss_i.mean() + args.frame_head * loss_f
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(opt_params, 1.0)
        opt.step()
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.lerp_(p.detach(), 1 - args.ema_decay)
        step += 1
        which = (sigmas * 5).long().clamp(max=4)
        bins[0].index_add_(0, which, loss_v.detach())
        bins[1].index_add_(0, which, torch.ones_like(loss_v))
        log.update(1)
        log.set_postfix(video=f"{loss_v.mean().item():.3f}", image=f"{loss_i.mean().item():.3f}",
                        frame=f"{loss_f.item():.3f}", refresh=False)
        if step % 100 == 0:
            per_bin = " ".join(f"{v:.3f}" for v in (bins[0] / bins[1].clamp(min=1)).tolist())
            print(f"dit step {step} lr {lr:.2e} grad norm {grad_norm:.2f} video loss per sigma fifth [{per_bin}]",
                  flush=True)
            bins.zero_()
        if autosave.due():
            save()
    save()


# ---------------------------------------------------------------------------- export

# Generic held-in captions: what the base model generates for stage 1/2 prior preservation.
PRIOR_PROMPTS = (
    "a large red circle moving right on a black background",
    "a small blue square bouncing on a white background",
    "a large yellow triangle orbiting on a blue background",
    "a large white diamond moving down on a green background",
    "a small orange circle pulsing on a gray background",
    "a large green square moving left on a blue to white gradient background",
    "a large purple triangle moving up on a white background",
    "a small black diamond moving diagonally on a red to yellow gradient background",
)


def export(args) -> None:
    from model.loader import WanModels, wan_model_id
    from model.save import save_diffusers
    cfg = measured_config(args)
    state = torch.load(os.path.join(args.run_dir, "dit.pt"))
    dit, encoder = WanDiT(cfg.dit), UMT5Encoder(cfg.t5)
    dit.load_state_dict(state["dit"])
    encoder.load_state_dict(state["t5"])
    if args.weights == "ema":   # the EMA weights, same order as `params` in train_dit
        with torch.no_grad():
            for p, average in zip(list(dit.parameters()) + list(encoder.parameters()), state["ema"]):
                p.copy_(average)
    models = WanModels(cfg, wan_model_id(cfg), dit.eval(), load_vae(args, cfg), encoder.eval(),
                       load_tokenizer(args, cfg))
    # save_diffusers refuses to overwrite: write next to the old folder, then swap them.
    fresh = args.out.rstrip("/") + ".new"
    shutil.rmtree(fresh, ignore_errors=True)
    save_diffusers(fresh, models, dtype=getattr(torch, args.dtype))
    with open(os.path.join(fresh, "prior_prompts.txt"), "w") as f:
        f.write("\n".join(PRIOR_PROMPTS) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(fresh, args.out)
    print(f"exported the step-{state['step']} {args.weights} weights to {args.out} ({args.dtype})")


def adopt_vae(args) -> None:
    """--vae-from: take an exported checkpoint's VAE as part "vae"'s result instead of training one.

    For retraining the DiT alone when the VAE's recipe has not changed (its clips keep random
    anchors, toy/pretrain_vae.py); the weights are the exported ones (bf16-rounded by the default
    export), so the DiT trains on exactly the latents that users' runs will encode.
    """
    path = os.path.join(args.run_dir, "vae.pt")
    if os.path.exists(path):
        return
    vae = load_wan(args.vae_from, parts=("vae",)).vae
    save_atomic({"vae": vae.float().state_dict(), "step": args.vae_steps, "from": args.vae_from}, path)
    print(f"vae: taken from {args.vae_from}, not trained")


def main(args) -> None:
    torch.set_num_threads(args.threads)
    os.makedirs(args.run_dir, exist_ok=True)
    deadline = Deadline(args.minutes)
    parts = PARTS if args.part == "all" else (args.part,)
    for part in parts:
        if deadline.passed():
            print(f"time is up before part {part}: run again to resume")
            return
        if part == "tokenizer":
            train_tokenizer(args)
        elif part == "vae":
            if args.vae_from:
                adopt_vae(args)
            train_vae(args, PRESETS["toy"], deadline)
        elif part == "latents":
            cache_latents(args, PRESETS["toy"], deadline)
        elif part == "dit":
            train_dit(args, deadline)
        elif part == "export":
            export(args)
    print("done" if not deadline.passed() else "time is up: run again to resume", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to run
    parser.add_argument("--part", default="all", choices=PARTS + ("all",), help="one part, or all in order")
    parser.add_argument("--minutes", type=float, default=55, help="stop (with a checkpoint) after this long")
    parser.add_argument("--run-dir", default="runs/toy-pretrain", help="state, checkpoints and caches")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random draw of every part")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine, 2 threads spin-wait and run 5x slower)")
    parser.add_argument("--save-minutes", type=float, default=5, help="checkpoint at least this often")
    # ---- VAE
    parser.add_argument("--vae-steps", type=int, default=5000, help="VAE optimizer steps")
    parser.add_argument("--vae-batch", type=int, default=16, help="single frames per step (clips: a quarter)")
    parser.add_argument("--vae-crop", type=int, default=32, help="random crop size for the first 95%% of steps")
    parser.add_argument("--vae-lr", type=float, default=3e-4,
                        help="AdamW peak learning rate (1e-3 stalls at the frame variance; 1e-4 learns too slowly)")
    parser.add_argument("--vae-init", default="inflate", choices=("inflate", "pytorch"),
                        help="inflate: start as an image VAE run frame by frame (pretrain_vae.inflate_init); "
                             "pytorch: PyTorch's default init")
    parser.add_argument("--vae-from", metavar="CHECKPOINT",
                        help="take this exported checkpoint's VAE instead of training one (adopt_vae)")
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the mean KL next to the mean MSE")
    parser.add_argument("--vae-clips", type=int, default=400, help="rendered clips (whole vocabulary) to crop from")
    # ---- latent cache
    parser.add_argument("--num-clips", type=int, default=3000,
                        help="held-in training clips (each also gives one image)")
    parser.add_argument("--anchors", default="caption", choices=("random", "caption"),
                        help="where the training clips' sprites sit (world.random_scene): anywhere their paths "
                             "fit, or where their caption puts them (world.caption_anchor)")
    # ---- DiT
    parser.add_argument("--dit-steps", type=int, default=15000, help="DiT optimizer steps")
    parser.add_argument("--dit-batch", type=int, default=16, help="clips per step, plus as many single frames")
    parser.add_argument("--dit-lr", type=float, default=5e-4, help="AdamW peak learning rate (DiT and umT5)")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions, for CFG")
    parser.add_argument("--timesteps", default="logit_normal", choices=("logit_normal", "uniform"),
                        help="training sigma distribution (model/flow.py)")
    parser.add_argument("--clip-shift", type=float, default=3.0,
                        help="shift of the clips' training sigmas (noisier: where a path is decided)")
    parser.add_argument("--image-shift", type=float, default=1.0, help="shift of the single frames' training sigmas")
    parser.add_argument("--frame-head", type=float, default=1.0,
                        help="weight of the training-only frame-index loss (frame_index_loss); 0: off")
    parser.add_argument("--frame-head-block", type=int, default=1, help="the block whose output it reads")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights that get exported")
    # ---- export
    parser.add_argument("--out", default="toy/checkpoint", help="diffusers-format output folder")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"),
                        help="export the moving average of the DiT/umT5 weights or the last ones")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="storage dtype of the exported weights")
    main(parser.parse_args())
