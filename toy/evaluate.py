"""Score the pretrained toy Wan with the oracle: does it draw what held-in captions ask for?

The toy base model stands in for Wan2.1, so before personalizing it we check that it is a
text-to-video model at all: random held-in scenes (toy/world.py, seeded), their captions sampled
the way sample.py samples (model/pipeline.py generate_videos: UniPC on the config's shifted sigma
grid, classifier-free guidance against the toy's negative prompt, the empty one that the 10% caption
dropout of toy/pretrain.py trained), decoded by the VAE, and scored by toy/oracle.py against the
scene the caption came from:

  background  the fitted background is the named one            (target >= 90%)
  colour      every sprite shows exactly its named colour(s)      (target >= 80%)
  motion      every sprite's track is nearest its named motion    (target >= 70%;
              on the captions that name two sprites, >= 50%)
  shape       every sprite's outline is nearest its named shape   (target >= 60%)
plus the pattern rate, the oracle's identity/motion scores, and the same numbers for the
VAE's reconstruction of the true clip (the ceiling the DiT can reach through this VAE).
--word-probe asks whether the DiT reads a caption word at all: the true clips noised to a few
sigmas, the DiT's velocity with the true caption against the same caption naming another motion
(or another colour) for the first sprite; a word the DiT ignores changes nothing.

  python -m toy.evaluate --count 100 --reconstruction --breakdown --word-probe

Shapes: B batch, z latent channels, F H W latent frames/height/width, T video frames.
"""
import argparse
import time
from collections import Counter

import torch
from tqdm import tqdm

from model import flow
from model.loader import WanModels, load_wan
from model.pipeline import generate_videos, initial_noise
from model.text_encoder import encode_prompts
from toy import oracle, world

METRICS = ("background_ok", "colour_ok", "motion_ok", "shape_ok", "pattern_ok", "identity_score", "motion_score")
TARGETS = {"background_ok": 0.9, "colour_ok": 0.8, "motion_ok": 0.7, "shape_ok": 0.6}
TWO_SPRITE_TARGET = 0.5      # both sprites' motions right, on the captions that name two


def swap_word(scene: world.Scene, kind: str, generator: torch.Generator) -> str:
    """The scene's caption with its first sprite's motion ('motion') or fill colour ('colour') swapped
    for another held-in one; the first sprite's words come first in a caption."""
    sprite, text = scene.sprites[0], world.caption(scene)
    if kind == "motion":
        old = world.MOTIONS[sprite.motion]
        others = [world.MOTIONS[m] for m in world.vocabulary("motion") if m != sprite.motion]
    else:
        old = f" {sprite.colour} "
        taken = {c for s in scene.sprites for c in s.colours}           # scenes never repeat a colour
        others = [f" {c} " for c in world.vocabulary("colour")
                  if c not in taken and world.contrast(c, scene.background) >= world.MIN_CONTRAST]
    return text.replace(old, others[int(torch.randint(len(others), (1,), generator=generator))], 1)


@torch.no_grad()
def word_probe(models: WanModels, scenes: list[world.Scene], sigmas: tuple[float, ...],
               generator: torch.Generator, device: str = "cpu") -> dict[str, list[float]]:
    """Per kind ('motion', 'colour') and sigma: mean squared change of the DiT's velocity on the true
    clips noised to sigma when their captions name another word of that kind for the first sprite."""
    clips = torch.stack([world.to_pixels(world.render(s)) for s in scenes]).transpose(1, 2)    # (B, 3, T, H, W)
    x0 = models.vae.encode(clips.to(device))                                                     # (B, z, F, H, W)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    prompts = {"true": [world.caption(s) for s in scenes],
               **{kind: [swap_word(s, kind, generator) for s in scenes] for kind in ("motion", "colour")}}
    context = {k: encode_prompts(models.tokenizer, models.text_encoder, p, device) for k, p in prompts.items()}
    change: dict[str, list[float]] = {"motion": [], "colour": []}
    for sigma in sigmas:
        sigma_b = torch.full((len(scenes),), sigma, device=device)
        x_t = flow.add_noise(x0, noise, sigma_b)
        velocity = {k: models.dit(x_t, sigma_b * flow.NUM_TRAIN_TIMESTEPS, c) for k, c in context.items()}
        for kind in change:
            change[kind].append(float((velocity["true"] - velocity[kind]).pow(2).mean()))
    return change


def main(args) -> None:
    torch.set_num_threads(args.threads)
    models = load_wan(args.model, device=args.device)
    cfg = models.cfg
    steps = args.steps or cfg.sample_steps
    shift = args.shift or cfg.sample_shift
    guidance = args.guidance if args.guidance is not None else cfg.guidance_scale

    # Held-in scenes only: the base model is judged on what it was trained to draw.
    generator = torch.Generator().manual_seed(args.seed)
    scenes = [world.random_scene(generator, "train", args.anchors) for _ in range(args.count)]
    noise = initial_noise(cfg, args.count, cfg.num_frames, generator)                 # (count, z, F, H, W)

    rows, reference_rows = [], []
    start = time.time()
    for i in tqdm(range(0, args.count, args.batch), desc="evaluate"):
        batch = scenes[i:i + args.batch]
        videos = generate_videos(models, [world.caption(s) for s in batch], noise[i:i + args.batch],
                                 steps, shift, guidance)                             # (B, 3, T, H, W)
        for scene, video in zip(batch, videos):
            rows.append(oracle.score(video.transpose(0, 1).cpu(), scene))            # (T, 3, H, W) clip
        if args.reconstruction:
            # The same scenes through the VAE alone: what a perfect DiT would score.
            clips = torch.stack([world.to_pixels(world.render(s)) for s in batch]).transpose(1, 2)
            decoded = models.vae.decode(models.vae.encode(clips.to(args.device)))
            reference_rows += [oracle.score(v.transpose(0, 1).cpu(), s) for s, v in zip(batch, decoded)]
    seconds = time.time() - start

    print(f"\n{args.count} held-in captions (seed {args.seed}), UniPC {steps} steps, shift {shift}, "
          f"CFG {guidance}, {seconds:.0f} s on {args.device}")
    columns = [("model", rows)] + ([("VAE recon.", reference_rows)] if reference_rows else [])
    print(f"| metric | {' | '.join(name for name, _ in columns)} | target |")
    print(f"|---|{'---|' * len(columns)}---|")
    for key in METRICS:
        values = [sum(float(r[key]) for r in table) / len(table) for _, table in columns]
        target = f">= {TARGETS[key]:.0%}" if key in TARGETS else ""
        print(f"| {key} | {' | '.join(f'{v:.1%}' if key.endswith('_ok') else f'{v:.3f}' for v in values)} | {target} |")
    two = [i for i, scene in enumerate(scenes) if len(scene.sprites) == 2]
    if two:   # a row's motion_ok is every sprite's: on these captions, both motions right
        values = [sum(float(table[i]["motion_ok"]) for i in two) / len(two) for _, table in columns]
        print(f"| motion_ok, the {len(two)} two-sprite captions | {' | '.join(f'{v:.1%}' for v in values)} "
              f"| >= {TWO_SPRITE_TARGET:.0%} |")
    if args.breakdown:
        for name, table in columns:
            breakdown(name, scenes, table)
    if args.word_probe:
        sigmas = (1.0, 0.9, 0.7, 0.5, 0.3)
        change = word_probe(models, scenes, sigmas, generator, args.device)
        print("\nword probe: mean squared change of the DiT's velocity on the true clips noised to sigma, "
              "when the caption names another motion / colour (rows) for the first sprite")
        print(f"| sigma | {' | '.join(f'{s:.1f}' for s in sigmas)} |\n|---|{'---|' * len(sigmas)}")
        for kind, values in change.items():
            print(f"| {kind} | {' | '.join(f'{v:.4f}' for v in values)} |")


def breakdown(name: str, scenes: list[world.Scene], rows: list[dict]) -> None:
    """Per sprite: colour right by pattern, and the motion labels read instead of the asked ones."""
    pairs = [(sprite, found) for scene, row in zip(scenes, rows)
             for sprite, found in zip(scene.sprites, row["sprites"])]
    print(f"\n{name}: {len(pairs)} sprites")
    for pattern in sorted({sprite.pattern for sprite, _ in pairs}):
        of = [found["colour_ok"] for sprite, found in pairs if sprite.pattern == pattern]
        print(f"  colour right, {pattern}: {sum(of)} of {len(of)}")
    wrong = Counter((sprite.motion, found["motion"]) for sprite, found in pairs if not found["motion_ok"])
    read = Counter(found["motion"] for _, found in pairs if not found["motion_ok"])
    print(f"  motion wrong: {sum(wrong.values())}; read instead: "
          + ", ".join(f"{label} {count}" for label, count in read.most_common()))
    print("  asked -> read (most common): " + ", ".join(f"{a} -> {b} {n}" for (a, b), n in wrong.most_common(6)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model
    parser.add_argument("--model", default="toy/checkpoint", help="diffusers-format folder (load_wan)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # ---- sampling (defaults: the checkpoint's config)
    parser.add_argument("--steps", type=int, default=None, help="UniPC steps (default: config sample_steps)")
    parser.add_argument("--shift", type=float, default=None, help="sigma shift (default: config sample_shift)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: config guidance_scale)")
    # ---- evaluation set
    parser.add_argument("--count", type=int, default=100, help="random held-in captions to sample and score")
    parser.add_argument("--seed", type=int, default=0, help="seeds the scenes and the initial noise")
    parser.add_argument("--batch", type=int, default=25, help="videos sampled at once")
    parser.add_argument("--anchors", default="caption", choices=("random", "caption"),
                        help="where the scenes' sprites sit: as the model was trained (toy.pretrain --anchors)")
    parser.add_argument("--reconstruction", action="store_true",
                        help="also score the VAE reconstructions of the true clips (the DiT's ceiling)")
    parser.add_argument("--breakdown", action="store_true",
                        help="per sprite: colour right by pattern, and which motion labels were read instead")
    parser.add_argument("--word-probe", action="store_true",
                        help="how much the DiT's velocity changes when a caption names another motion or colour")
    main(parser.parse_args())
