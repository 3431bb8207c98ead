"""Colour-blind toy latents (issue 17): fine-tune the shipped toy VAE so that a sprite's motion changes
its latent the same way whatever its colour, and measure that with the latent-shift probe.

    python -m toy.latent_tie --out FOLDER [--kind coverage|factors|flat]   # a VAE checkpoint folder
    python -m toy.latent_tie --probe FOLDER                                 # how colour-blind its latent is
    python -m toy.latent_tie --paste FOLDER                                 # a concept's look on other backgrounds

Kinds (a third loss next to MSE and KL, on the posterior mean):
  coverage  channels 0-3 tied to the sprites' coverage in the 2x2 sub-cells of each latent pixel (the
            sprites rendered white on black: the same for every colour)
  factors   also channels 4-6 to the background's colour and 7-12 to the nearest sprite's colours
  flat      coverage, and channels 4-15 pushed toward their mean over the frame (colours, little position)
A folder it writes goes to `python -m toy.motion_experiments --vae FOLDER`. The numbers of each are in
docs/toy-model.md (1200 steps: 26-32 minutes on one core).
Shapes: T video frames, F latent frames, z latent channels.
"""
import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.loader import load_wan  # noqa: E402
from model.save import save_diffusers  # noqa: E402
from toy import world  # noqa: E402
from toy.concepts import CONCEPTS  # noqa: E402
from toy.pretrain_vae import reconstruct  # noqa: E402


def sub_cell_coverage(cov: torch.Tensor) -> torch.Tensor:
    """(T=4k+1, 64, 64) -> (4, 1+k, 8, 8): per latent pixel, the coverage of its 2x2 sub-cells (4x4 px)."""
    first, rest = cov[:1], cov[1:]
    rest = rest.view(-1, 4, 64, 64).mean(1) if len(rest) else rest[:0]
    cells = F.avg_pool2d(torch.cat([first, rest])[:, None], 4)[:, 0]            # (F, 16, 16)
    return torch.stack([cells[:, i::2, j::2] for i in (0, 1) for j in (0, 1)])  # (4, F, 8, 8)


def latent_frames(x: torch.Tensor) -> torch.Tensor:
    """(T=4k+1, ...) -> (1+k, ...): frame 0 alone, then the mean of each group of 4 (the VAE's causal strides)."""
    return torch.cat([x[:1], x[1:].unflatten(0, (-1, 4)).mean(1)])


def factor_targets(scene: world.Scene, cov: torch.Tensor, span: slice = slice(None)) -> torch.Tensor:
    """(13, F, 8, 8) in [-1, 1]: what the factorized tie pins channels 0-12 to. 0-3: the sprites' coverage in
    the 2x2 sub-cells of each latent pixel (colour-blind, `cov` (T, 64, 64)); 4-6: the background's colour
    there; 7-9 and 10-12: the colour and second colour of the nearest sprite (one sprite: the same
    everywhere). Where a sprite is and what colour it is then live in different channels. `span`: the
    clip's frames that were encoded (all, or one)."""
    cov = cov[span]
    cells = sub_cell_coverage(cov) * 2 - 1                                               # (4, F, 8, 8)
    F_ = cells.shape[1]
    bg = F.avg_pool2d(world.render_background(scene.background).permute(2, 0, 1)[None], 8)[0] * 2 - 1  # (3, 8, 8)
    t = (torch.arange(world.NUM_FRAMES, dtype=torch.float64) / (world.NUM_FRAMES - 1))[span]
    grid = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    dist, looks = [], []
    for sprite in scene.sprites:
        dx, dy, _ = world.motion_path(sprite.motion, t)
        cx, cy = latent_frames(sprite.x + dx), latent_frames(sprite.y + dy)              # (F,)
        dist.append((grid[None, None, :] - cx[:, None, None]) ** 2 + (grid[None, :, None] - cy[:, None, None]) ** 2)
        look = [world._rgb(sprite.colour), world._rgb(sprite.colour2 or sprite.colour)]
        looks.append(torch.cat(look) * 2 - 1)                                            # (6,)
    nearest = torch.stack(dist).argmin(0)                                                # (F, 8, 8)
    colour = torch.stack(looks)[nearest].permute(3, 0, 1, 2).float()                     # (6, F, 8, 8)
    return torch.cat([cells, bg[:, None].expand(3, F_, 8, 8), colour])


def make_tied_vae(a) -> None:
    """Fine-tune the shipped VAE: reconstruction + KL + the tie of --kind; save it as a checkpoint folder."""
    torch.set_num_threads(1)
    base = load_wan("toy/checkpoint")
    vae = base.vae.float().train().requires_grad_(True)
    g = torch.Generator().manual_seed(11)
    clips, covs, scenes = [], [], []
    for _ in range(a.pool):                   # the whole world (held-out looks too), as the VAE's pool
        scene = world.random_scene(g, "all", anchors="random")
        scenes.append(scene)
        ghosts = [world.Scene((replace(s, colour="white", pattern="plain", colour2=None),), "black")
                  for s in scene.sprites]                                         # one at a time: same colour
        clips.append(world.to_pixels(world.render(scene)))                           # (T, 3, H, W)
        covs.append(torch.stack([((world.render(ghost).float().mean(-1) - 20) / 225).clamp(0, 1)
                                 for ghost in ghosts]).amax(0))                      # (T, H, W)
    clips, covs = torch.stack(clips).transpose(1, 2), torch.stack(covs)            # (N, 3, T, H, W), (N, T, H, W)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    for step in range(a.steps):
        # odd steps: 8 single frames (the image path); even steps: 2 whole clips (the temporal path)
        rows = torch.randint(len(clips), (8 if step % 2 else 2,), generator=g)
        frame = int(torch.randint(world.NUM_FRAMES, (1,), generator=g))
        span = slice(frame, frame + 1) if step % 2 else slice(None)
        video = clips[rows][:, :, span]
        if a.kind == "factors":
            target = torch.stack([factor_targets(scenes[r], covs[r], span) for r in rows.tolist()])  # (B, 13, F, 8, 8)
        else:
            target = torch.stack([sub_cell_coverage(c) for c in covs[rows][:, span]]) * 2 - 1       # (B, 4, F, 8, 8)
        rec, kl, mean = reconstruct(vae, video, g)
        mse = (rec - video).pow(2).mean()
        tie = (mean[:, :target.shape[1]] - target).pow(2).mean()
        if a.kind == "flat":   # the other channels pushed toward their mean over the frame: no position in them
            rest = mean[:, target.shape[1]:]
            tie = tie + (rest - rest.mean((-1, -2), keepdim=True)).pow(2).mean()
        loss = mse + 1e-4 * kl + a.weight * tie
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"tie step {step + 1} {time.time() - t0:.0f}s mse {mse.item():.5f} tie {tie.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():                        # the new latent statistics, as toy/pretrain.py measures them
        means = torch.cat([vae.moments(clips[i:i + 8])[0] for i in range(0, min(len(clips), 256), 8)])
        means = means.transpose(0, 1).flatten(1)
    stats = dict(latents_mean=tuple(round(v, 4) for v in means.mean(1).tolist()),
                 latents_std=tuple(round(v, 4) for v in means.std(1).tolist()))
    cfg = replace(base.cfg, vae=replace(base.cfg.vae, **stats))
    vae.cfg = cfg.vae                            # the VAE normalizes with the statistics of its config
    save_diffusers(a.out, replace(base, cfg=cfg, vae=vae), dtype=torch.float32)
    print("wrote", a.out, stats, flush=True)

@torch.no_grad()
def probe(folder: str) -> None:
    """Is a motion's latent signature colour-blind? Cosine between latent(moving right) - latent(still) of
    every two sprite colours on black (1: the same change), over all channels and over channels 0-3."""
    vae = load_wan(folder, parts=("vae",)).vae.eval()
    colours = ("red", "orange", "yellow", "green", "blue", "purple", "white")

    def latent(colour: str, motion: str) -> torch.Tensor:
        scene = world.Scene((world.Sprite("circle", colour, "large", motion),), "black")
        return vae.encode(world.to_pixels(world.render(scene)).transpose(0, 1)[None])[0]   # (z, F, 8, 8)
    change = {c: latent(c, "right") - latent(c, "still") for c in colours}
    for name, part in (("all channels", slice(None)), ("channels 0-3", slice(0, 4)), ("channels 4-15", slice(4, None))):
        cos = [F.cosine_similarity(change[x][part].flatten(), change[y][part].flatten(), 0).item()
               for i, x in enumerate(colours) for y in colours[i + 1:]]
        energy = sum(float(change[c][part].pow(2).sum() / change[c].pow(2).sum()) for c in colours) / len(colours)
        print(f"{name}: cosine min {min(cos):.2f}, mean {sum(cos) / len(cos):.2f}; share of the change {energy:.0%}")


@torch.no_grad()
def paste(vae, name: str) -> list[tuple[str, float, str]]:
    """Does a concept's look survive a new background in the latent? Its sprite's latent change (frame 0
    minus the empty background) on its own background, added to another empty background and decoded.
    Per background where the sprite stands out: (background, cosine with that background's true
    change (1: the same change), the sprite colour the pasted pixels are nearest). An adapter trained
    on one video can only learn the first; a prompt naming another background needs it to hold there."""
    concept = CONCEPTS[name]

    def latent(frame: torch.Tensor) -> torch.Tensor:               # (1, H, W, 3) uint8 -> (z, 1, 8, 8)
        return vae.encode(world.to_pixels(frame).transpose(0, 1)[None])[0]

    def frames(background: str) -> tuple[torch.Tensor, torch.Tensor]:
        empty = (world.render_background(background) * 255).round().to(torch.uint8)[None]
        return world.render(world.Scene(concept.scene.sprites, background), num_frames=1), empty

    drawn, empty = frames(concept.scene.background)
    change = latent(drawn) - latent(empty)
    palette = {c: torch.tensor(world.COLOURS[c], dtype=torch.float32) for c in world.vocabulary("colour", "all")}
    rows = []
    for background in world.vocabulary("background", "all"):
        try:
            drawn, empty = frames(background)
        except ValueError:                                         # the sprite's colour does not stand out
            continue
        cos = F.cosine_similarity((latent(drawn) - latent(empty)).flatten(), change.flatten(), 0).item()
        pasted = (vae.decode((latent(empty) + change)[None])[0, :, 0].permute(1, 2, 0) + 1) * 127.5
        inside = (drawn[0].float() - empty[0].float()).abs().sum(-1) > 60                  # the sprite's pixels
        seen = pasted[inside].mean(0)
        rows.append((background, cos, min(palette, key=lambda c: float((palette[c] - seen).norm()))))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write a tied VAE checkpoint folder here")
    p.add_argument("--kind", default="coverage", choices=("coverage", "factors", "flat"), help="what is tied")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight", type=float, default=0.1, help="the tie's loss weight next to MSE and KL")
    p.add_argument("--pool", type=int, default=400, help="rendered scenes the tie trains on")
    p.add_argument("--probe", metavar="FOLDER", help="instead: the latent-shift cosines of this checkpoint's VAE")
    p.add_argument("--paste", metavar="FOLDER", help="instead: a concept's look pasted onto other backgrounds "
                   "in this checkpoint's latent (paste)")
    p.add_argument("--concept", default="pink_star_zigzag", help="the concept --paste moves")
    a = p.parse_args()
    if a.probe:
        probe(a.probe)
    elif a.paste:
        concept = CONCEPTS[a.concept]
        print(f"{a.concept}: its sprite's latent change on {concept.scene.background}, pasted onto another background")
        for background, cos, colour in paste(load_wan(a.paste, parts=("vae",)).vae.eval(), a.concept):
            print(f"  {background:>24}: cosine {cos:+.2f}, decodes as {colour} (true: {concept.sprite.colour})")
    elif a.out:
        make_tied_vae(a)
    else:
        p.error("give --out FOLDER (make a tied VAE), --probe FOLDER or --paste FOLDER")
