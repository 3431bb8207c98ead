"""Toy-model motion experiments (issue 17), DiT-only on the colours-and-backgrounds world.

World (README item 7 / docs): one plain large circle, any of the 8 held-in colours, any of the 5
solid held-in backgrounds (contrast rule), any of the 9 held-in motions, random anchor. 1000 clips
+ 1000 frames encoded by the shipped toy VAE. DiT + umT5 from scratch, lr 3e-3 cosine, batch 16+16,
raw weights, scored on 50 captions of that world with the oracle (as toy.evaluate).

Variants:
  --clip-shift S      clips' training sigmas shifted by S (images stay at 1)
  --sil-weight W      a training-only linear head on block --sil-block's tokens predicts the sprite's
                      coverage per latent pixel and latent frame (colour-blind); loss W * MSE
  --anchor-p P        frame-anchored clips: in a share P of clips latent frame 0 is given clean
                      (its loss masked), as Diffusion Forcing anchors a frame
  --world W           default | colours-on-black | white-on-backgrounds (the cut-down worlds) | full
                      (the whole held-in world of toy/world.py: shapes, patterns, two sprites, placed
                      where the caption puts them) | one-sprite (its one-sprite scenes only)
  --clips N           distinct clips in the cache (default 1000)
  --colours A,B,..    only these sprite colours (with --world colours-on-black: fewer colours)
  --backgrounds A,..  only these solid backgrounds
  --patch 1           the DiT's patch 1x1x1 instead of 1x2x2: a token is one latent pixel (8 px)
  --amplitude PX      how far motions travel from the anchor, in pixels at 64 (the world's is 10)
  --jitter PX         anchors at most PX pixels from the frame's centre, so the motion word sets the path
  --vae PATH          another toy VAE (a checkpoint folder) to encode and decode with
  --images N          single frames a step (default: as many as --batch clips; 0: clips only)
  --frozen-text       the umT5 stays at its random init instead of training with the DiT
  --frame-head W      a training-only head on block --sil-block's tokens predicts each token's latent
                      frame index (cross-entropy, weight W): the DiT must infer it from RoPE's ends
  --frame-embedding   diagnostic, NOT Wan: a learned vector per latent frame added to the tokens, the
                      absolute frame index that Wan's relative RoPE does not give
Tools: `--breakdown` scores a finished run's weights per colour and per motion; `--drift` shows where
its DiT puts the sprite at high noise (first and last frame), per motion word; `--words` how much its
umT5 and DiT react to a motion, colour or background word. Other VAEs to try with
--vae, and the latent-shift probe that measures how colour-blind a VAE's motion signature is, come
from toy/latent_tie.py.
Run from the project folder: python -m toy.motion_experiments --name NAME [...]; each run appends a
line to <--root>/results.jsonl. The issue 17 table of docs/toy-model.md came from these runs (one
thread each, two side by side on the 2-core machine, 32-70 minutes a run).
"""
import argparse
import json
import math
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import flow  # noqa: E402
from model.config import WanConfig  # noqa: E402
from model.dit import WanDiT  # noqa: E402
from model.loader import WanModels, load_wan  # noqa: E402
from model.pipeline import generate_videos  # noqa: E402
from model.text_encoder import UMT5Encoder, encode_prompts  # noqa: E402
from model.vae import WanVAE  # noqa: E402
from toy import oracle, world  # noqa: E402

SOLID = ("black", "white", "gray", "blue", "green")


WORLD = {"backgrounds": SOLID, "colours": None, "jitter": None, "full": False, "one": False}


def small_scene(generator: torch.Generator) -> world.Scene:
    if WORLD["full"]:                        # the whole held-in world (shapes, patterns, two sprites)
        return world.random_scene(generator, "train", anchors="caption")
    if WORLD["one"]:                         # its one-sprite scenes only (the sprite at the centre)
        while len((scene := world.random_scene(generator, "train", anchors="caption")).sprites) != 1:
            pass
        return scene
    while True:
        background = world._pick(WORLD["backgrounds"], generator)
        colours = [c for c in (WORLD["colours"] or world.vocabulary("colour"))
                   if world.contrast(c, background) >= world.MIN_CONTRAST]
        if not colours:
            continue
        sprite = world.Sprite("circle", world._pick(tuple(colours), generator), "large",
                              world._pick(world.vocabulary("motion"), generator))
        x, y, reach = world._extent(sprite)
        m = 1 / 64
        lx, hx = m - (x - 0.5 - reach).min(), 1 - m - (x - 0.5 + reach).max()
        ly, hy = m - (y - 0.5 - reach).min(), 1 - m - (y - 0.5 + reach).max()
        if WORLD["jitter"] is not None:      # anchors near the centre: the motion word sets the path
            j = WORLD["jitter"] / 64
            lx, hx, ly, hy = max(lx, 0.5 - j), min(hx, 0.5 + j), max(ly, 0.5 - j), min(hy, 0.5 + j)
        u, w = torch.rand(2, generator=generator).tolist()
        sprite = replace(sprite, x=float(lx + u * (hx - lx)), y=float(ly + w * (hy - ly)))
        try:
            return world.Scene((sprite,), background)
        except ValueError:
            continue


def coverage(scene: world.Scene) -> torch.Tensor:
    """(T, 64, 64) in [0, 1]: the sprite's coverage, by rendering it white on black."""
    ghost = world.Scene(tuple(replace(s, colour="white", pattern="plain", colour2=None) for s in scene.sprites),
                        "black")
    v = world.render(ghost).float().mean(-1)                       # (T, H, W) 20..245
    return ((v - 20) / 225).clamp(0, 1)


def latent_coverage(cov: torch.Tensor) -> torch.Tensor:
    """(T=4k+1, 64, 64) -> (1+k, 8, 8): latent frame 0 = frame 0, frame j = frames 4j-3..4j."""
    first, rest = cov[:1], cov[1:]
    rest = rest.view(-1, 4, 64, 64).mean(1) if len(rest) else rest[:0]
    return F.avg_pool2d(torch.cat([first, rest])[:, None], 8)[:, 0]


@torch.no_grad()
def build_cache(vae, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"video": [], "image": [], "captions": [], "image_captions": [], "cov_v": [], "cov_i": []}
    for _ in range(0, n, 8):
        scenes = [small_scene(g) for _ in range(8)]
        clips = torch.stack([world.to_pixels(world.render(s)) for s in scenes]).permute(0, 2, 1, 3, 4)
        pick = torch.randint(world.NUM_FRAMES, (8,), generator=g)
        frames = clips[torch.arange(8), :, pick][:, :, None]
        out["video"].append(torch.cat(vae.moments(clips), 1))
        out["image"].append(torch.cat(vae.moments(frames), 1))
        covs = [coverage(s) for s in scenes]
        out["cov_v"].append(torch.stack([latent_coverage(c) for c in covs]))
        out["cov_i"].append(torch.stack([latent_coverage(c[int(p)][None]) for c, p in zip(covs, pick)]))
        out["captions"] += [world.caption(s) for s in scenes]
        out["image_captions"] += [world.image_caption(s) for s in scenes]
    for k in ("video", "image", "cov_v", "cov_i"):
        out[k] = torch.cat(out[k])
    return out


def add_frame_embedding(dit: WanDiT, frames: torch.Tensor) -> None:
    """--frame-embedding (not Wan): frames (D, 5, 1, 1) added to the patch embedding's (B, D, f, h, w) output."""
    dit.patch_embedding.register_forward_hook(lambda m, i, o: o + frames[:, :o.shape[2]])


def setup(a):
    """The base parts (the shipped umT5 config and tokenizer; --vae's VAE), the DiT config, the world."""
    base = load_wan("toy/checkpoint", parts=("vae", "text"))
    if a.vae:               # its own latent statistics come with it
        other = load_wan(a.vae, parts=("vae",))
        base = replace(base, cfg=replace(base.cfg, vae=other.cfg.vae), vae=other.vae)
    cfg = base.cfg
    if a.patch == 1:
        cfg = replace(cfg, dit=replace(cfg.dit, patch_size=(1, 1, 1)))
    world.AMPLITUDE = a.amplitude / 64
    if a.world == "colours-on-black":
        WORLD["backgrounds"] = ("black",)
    elif a.world == "white-on-backgrounds":
        WORLD["colours"] = ("white",)
    if a.colours:
        WORLD["colours"] = tuple(a.colours.split(","))
    if a.backgrounds:
        WORLD["backgrounds"] = tuple(a.backgrounds.split(","))
    WORLD["jitter"] = a.jitter
    WORLD["full"] = a.world == "full"
    WORLD["one"] = a.world == "one-sprite"
    return base, cfg


def main(a):
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    base, cfg = setup(a)
    tokenizer = base.tokenizer
    tag = "" if a.amplitude == 10 and not a.vae else f"_a{a.amplitude:g}_{os.path.basename(a.vae or 'toy')}"
    tag += f"_{a.colours.replace(',', '-')}" if a.colours else ""
    tag += f"_on-{a.backgrounds.replace(',', '-')}" if a.backgrounds else ""
    tag += f"_{a.clips}clips" if a.clips != 1000 else ""
    tag += f"_jitter{a.jitter:g}" if a.jitter is not None else ""
    cache_path = os.path.join(a.root, f"cache_{a.world}{tag}.pt")
    if os.path.exists(cache_path):
        cache = torch.load(cache_path)
    else:
        cache = build_cache(base.vae.eval(), a.clips, 7)
        torch.save(cache, cache_path + ".tmp")
        os.replace(cache_path + ".tmp", cache_path)
    vid_ids, vid_mask = tokenizer(cache["captions"])
    img_ids, img_mask = tokenizer(cache["image_captions"])
    empty_ids, empty_mask = tokenizer([""])

    torch.manual_seed(a.seed)
    with torch.device("meta"):
        stats = WanVAE(cfg.vae)
    dit, enc = WanDiT(cfg.dit), UMT5Encoder(cfg.t5)
    enc.init_weights()
    head = torch.nn.Linear(cfg.dit.dim, 4)          # 2x2 latent pixels per token (patch 1x2x2)
    feats = {}
    dit.blocks[a.sil_block].register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    frames = torch.nn.Parameter(torch.zeros(cfg.dit.dim, 5, 1, 1))    # (D, latent frame, 1, 1)
    if a.frame_embedding:
        add_frame_embedding(dit, frames)
    frame_head = torch.nn.Linear(cfg.dit.dim, 5)     # training-only: which latent frame a token is in
    # --frozen-text: the umT5 stays at its random init (Wan keeps its pretrained umT5 frozen too)
    enc.requires_grad_(not a.frozen_text)
    params = list(dit.parameters()) + ([] if a.frozen_text else list(enc.parameters()))
    params += list(head.parameters()) if a.sil_weight else []
    params += ([frames] if a.frame_embedding else []) + (list(frame_head.parameters()) if a.frame_head else [])
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed + 4)
    B = a.batch

    a.images = B if a.images is None else a.images

    def batch(moments, ids, mask, cov, n=B):
        rows = torch.randint(len(moments), (n,), generator=g)
        drop = torch.rand(n, generator=g) < 0.1
        x0 = stats.normalized_latent(*moments[rows].chunk(2, dim=1), None if a.mean_latents else g)
        return (x0, torch.where(drop[:, None], empty_ids, ids[rows]),
                torch.where(drop[:, None], empty_mask, mask[rows]), cov[rows])

    def step_loss(x0, ctx, cov, shift):
        sig = flow.sample_train_sigmas(x0.shape[0], g, shift=shift, mode="logit_normal")
        noise = torch.randn(x0.shape, generator=g)
        x_t = flow.add_noise(x0, noise, sig)
        weight = torch.ones(x0.shape[0], 1, x0.shape[2], 1, 1)
        if a.anchor_p and x0.shape[2] > 1:
            # frame-anchored clips: latent frame 0 given clean, its loss masked; the rest as usual
            anchored = torch.rand(x0.shape[0], generator=g) < a.anchor_p
            x_t[anchored, :, 0] = x0[anchored, :, 0]
            weight[anchored, :, 0] = 0
        pred = dit(x_t, sig * 1000, ctx)
        err = (pred - flow.velocity_target(x0, noise)).pow(2) * weight
        loss = err.sum() / (weight.sum() * x0.shape[1] * x0.shape[3] * x0.shape[4])
        aux = torch.zeros(())                       # the training-only heads' weighted losses
        if a.sil_weight:
            Fr = x0.shape[2]
            p = head(feats["x"])                                             # (B, L, 4)
            p = p.view(x0.shape[0], Fr, 4, 4, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(x0.shape[0], Fr, 8, 8)
            aux = a.sil_weight * (p - cov).pow(2).mean()
        if a.frame_head and x0.shape[2] > 1:
            # the frame index a token is in, read from block --sil-block (RoPE is relative: the DiT must
            # infer it from where the sequence ends); the head is dropped after training
            logits = frame_head(feats["x"])                                  # (B, L, 5)
            index = torch.arange(x0.shape[2]).repeat_interleave(logits.shape[1] // x0.shape[2])
            ce = F.cross_entropy(logits.flatten(0, 1), index.repeat(x0.shape[0]))
            aux = aux + a.frame_head * ce
        return loss, aux

    log = open(os.path.join(a.out, "log.txt"), "a")
    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        xv, iv, mv, cv = batch(cache["video"], vid_ids, vid_mask, cache["cov_v"])
        xi, ii, mi, ci = batch(cache["image"], img_ids, img_mask, cache["cov_i"], a.images)
        ctx = enc(torch.cat([iv, ii]), torch.cat([mv, mi]))
        lv, sv = step_loss(xv, ctx[:B], cv, a.clip_shift)
        li, si = step_loss(xi, ctx[B:], ci, 1.0) if a.images else (torch.zeros(()), torch.zeros(()))
        loss = lv + li + sv + si
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 250 == 0:
            print(f"step {step+1} {time.time()-t0:.0f}s video {lv.item():.3f} image {li.item():.3f} "
                  f"aux {sv.item():.4f}/{si.item():.4f}", file=log, flush=True)
    train_min = (time.time() - t0) / 60

    # ---- score on 50 captions of the small world, as toy.evaluate does
    dit.eval(), enc.eval()
    models = WanModels(cfg, "toy", dit, base.vae.eval(), enc, tokenizer)
    ge = torch.Generator().manual_seed(0)
    scenes = [small_scene(ge) for _ in range(50)]
    noise = torch.randn(50, cfg.vae.z_dim, 5, 8, 8, generator=ge)
    rows = []
    for i in range(0, 50, 25):
        vids = generate_videos(models, [world.caption(s) for s in scenes[i:i + 25]], noise[i:i + 25])
        rows += [oracle.score(v.transpose(0, 1), s) for s, v in zip(scenes[i:i + 25], vids)]
    res = {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("background_ok", "colour_ok", "motion_ok")}
    res.update(name=a.name, steps=a.steps, train_min=round(train_min, 1), clip_shift=a.clip_shift,
               sil_weight=a.sil_weight, lr=a.lr, anchor_p=a.anchor_p, world=a.world,
               patch=a.patch, amplitude=a.amplitude, batch=a.batch, vae=a.vae, colours=a.colours, backgrounds=a.backgrounds, clips=a.clips, jitter=a.jitter,
               mean_latents=a.mean_latents, images=a.images, frame_embedding=a.frame_embedding,
               frame_head=a.frame_head, frozen_text=a.frozen_text)
    print(json.dumps(res), file=log, flush=True)
    with open(os.path.join(a.root, "results.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    torch.save({"dit": dit.state_dict(), "t5": enc.state_dict(), "frames": frames if a.frame_embedding else None},
               os.path.join(a.out, "weights.pt"))


def load_run(a) -> tuple[WanModels, WanConfig, WanDiT, UMT5Encoder]:
    """The base parts, the config and a finished run's DiT and umT5 (weights.pt), in eval mode."""
    base, cfg = setup(a)
    state = torch.load(os.path.join(a.out, "weights.pt"))
    dit, enc = WanDiT(cfg.dit), UMT5Encoder(cfg.t5)
    dit.load_state_dict(state["dit"])
    enc.load_state_dict(state["t5"])
    if state.get("frames") is not None:         # a --frame-embedding run
        add_frame_embedding(dit, state["frames"])
    return base, cfg, dit.eval(), enc.eval()


@torch.no_grad()
def breakdown(a) -> None:
    """A run's weights.pt on a balanced grid (every colour x motion, centred, first background): motion
    right per colour and per motion, and the motion labels the oracle reads."""
    base, cfg, dit, enc = load_run(a)
    models = WanModels(cfg, "toy", dit, base.vae.eval(), enc, base.tokenizer)
    background = WORLD["backgrounds"][0]
    colours = [c for c in (WORLD["colours"] or world.vocabulary("colour"))
               if world.contrast(c, background) >= world.MIN_CONTRAST]
    scenes = [world.Scene((world.Sprite("circle", c, "large", m),), background)
              for c in colours for m in world.vocabulary("motion")]
    noise = torch.randn(len(scenes), cfg.vae.z_dim, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = []
    for i in range(0, len(scenes), 21):
        vids = generate_videos(models, [world.caption(s) for s in scenes[i:i + 21]], noise[i:i + 21])
        rows += [oracle.score(v.transpose(0, 1), s) for s, v in zip(scenes[i:i + 21], vids)]
    for key in ("colour", "motion"):
        right: dict[str, list[float]] = {}
        for scene, row in zip(scenes, rows):
            right.setdefault(getattr(scene.sprites[0], key), []).append(float(row["motion_ok"]))
        print(f"motion right per {key}:", {k: f"{sum(v) / len(v):.0%}" for k, v in right.items()})
    labels: dict[str, int] = {}
    for row in rows:
        labels[row["sprites"][0]["motion"]] = labels.get(row["sprites"][0]["motion"], 0) + 1
    print(f"{len(rows)} clips; motion right {sum(r['motion_ok'] for r in rows) / len(rows):.0%}; labels read:",
          dict(sorted(labels.items(), key=lambda kv: -kv[1])))


@torch.no_grad()
def drift(a) -> None:
    """Does a run's DiT lay out the motion at high noise? Its clean-clip estimate from pure noise at sigma
    0.98, 0.9 and 0.8 (16 noises, a large white circle on black), decoded: the sprite's mean position (the
    centroid of the change from the background) in the first and last frame, per motion word."""
    base, cfg, dit, enc = load_run(a)
    g = torch.Generator().manual_seed(3)
    background = world.render_background("black").permute(2, 0, 1) * 2 - 1                  # (3, H, W)
    pixels = torch.arange(64.0)
    for motion in ("right", "left", "down", "still"):
        text = world.caption(world.Scene((world.Sprite("circle", "white", "large", motion),), "black"))
        context = encode_prompts(base.tokenizer, enc, [text], "cpu").expand(16, -1, -1)
        noise = torch.randn(16, cfg.vae.z_dim, 5, 8, 8, generator=g)
        found = []
        for sigma in (0.98, 0.9, 0.8):
            x0 = noise - sigma * dit(noise, torch.full((16,), sigma * 1000), context)
            change = (base.vae.decode(x0).float() - background[None, :, None]).abs().sum(1)    # (16, T, H, W)
            w = change / change.sum((-1, -2), keepdim=True)
            x, y = (w * pixels).sum((-1, -2)).mean(0), (w * pixels[:, None]).sum((-1, -2)).mean(0)  # (T,)
            found.append(f"sigma {sigma}: x {x[0]:.1f} -> {x[-1]:.1f}, y {y[0]:.1f} -> {y[-1]:.1f}")
        print(f"{motion:>5}: " + " | ".join(found), flush=True)


@torch.no_grad()
def words(a) -> None:
    """How much a run's umT5 and DiT react to one word of a caption: the relative change of the text states,
    and of the DiT's clean-clip estimate from pure noise (sigma 0.98, 0.7), when a white circle moving right
    on black is told another motion, colour or background."""
    base, cfg, dit, enc = load_run(a)
    sprite = world.Sprite("circle", "white", "large", "right")
    scenes = {"as is": world.Scene((sprite,), "black"),
              "left": world.Scene((replace(sprite, motion="left"),), "black"),
              "down": world.Scene((replace(sprite, motion="down"),), "black"),
              "red": world.Scene((replace(sprite, colour="red"),), "black"),
              "blue bg": world.Scene((sprite,), "blue")}
    context = encode_prompts(base.tokenizer, enc, [world.caption(s) for s in scenes.values()], "cpu")  # (5, S, D)
    noise = torch.randn(8, cfg.vae.z_dim, 5, 8, 8, generator=torch.Generator().manual_seed(3))

    def change(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    for sigma in (0.98, 0.7):
        x0 = [noise - sigma * dit(noise, torch.full((8,), sigma * 1000), c[None].expand(8, -1, -1)) for c in context]
        print(f"sigma {sigma}: " + ", ".join(f"{name} text {change(c, context[0]):.2f} clip {change(x, x0[0]):.3f}"
                                             for name, c, x in zip(list(scenes)[1:], context[1:], x0[1:])))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", help="the run's folder under --root")
    p.add_argument("--root", default="runs/motion-experiments", help="runs, caches and results.jsonl")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-shift", type=float, default=1.0)
    p.add_argument("--sil-weight", type=float, default=0.0)
    p.add_argument("--sil-block", type=int, default=1)
    p.add_argument("--anchor-p", type=float, default=0.0)
    p.add_argument("--world", default="default", choices=("default", "colours-on-black", "white-on-backgrounds", "full", "one-sprite"))
    p.add_argument("--patch", type=int, default=2, choices=(1, 2))
    p.add_argument("--amplitude", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=16, help="clips (and as many single frames) a step")
    p.add_argument("--vae", default=None)
    p.add_argument("--clips", type=int, default=1000, help="distinct clips (and as many frames) to train on")
    p.add_argument("--jitter", type=float, default=None,
                   help="anchors at most this many pixels (at 64) from the centre (default: anywhere the path fits)")
    p.add_argument("--colours", help="comma-separated sprite colours (default: the world's)")
    p.add_argument("--backgrounds", help="comma-separated solid backgrounds (default: the world's)")
    p.add_argument("--mean-latents", action="store_true",
                   help="train on the posterior means, not samples (for a VAE whose channels are near-constant)")
    p.add_argument("--images", type=int, default=None, help="single frames a step (default: --batch; 0: none)")
    p.add_argument("--frozen-text", action="store_true", help="keep the umT5 at its random init (not trained)")
    p.add_argument("--frame-head", type=float, default=0.0,
                   help="weight of a training-only head on block --sil-block that predicts each token's frame index")
    p.add_argument("--frame-embedding", action="store_true",
                   help="diagnostic, not Wan: a learned absolute embedding per latent frame")
    p.add_argument("--breakdown", action="store_true", help="instead: score --name's weights on a balanced grid")
    p.add_argument("--words", action="store_true",
                   help="instead: how much --name's umT5 and DiT react to a motion, colour or background word")
    p.add_argument("--drift", action="store_true",
                   help="instead: where --name's DiT puts the sprite at high noise, first and last frame")
    a = p.parse_args()
    a.out = os.path.join(a.root, a.name or "")
    if a.breakdown:
        breakdown(a)
    elif a.drift:
        drift(a)
    elif a.words:
        words(a)
    else:
        main(a)
