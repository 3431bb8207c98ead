"""The oracle: what a sprite-world clip shows, and how well it matches the scene it was asked for.

The paper scores identity with ArcFace and text alignment with CLIP (docs/method.md#evaluation-in-the-paper);
neither means anything on toy sprites, so the project measures the same things directly. The
pipeline, each step a function below:
  1. fit the background as a plane per RGB channel (solid colours and linear gradients are
     planes), robustly, and name it by the nearest vocabulary background;
  2. sprite pixels are those far from that plane; tiny specks are dropped;
  3. with two sprites, each sprite pixel goes to the target sprite whose colours explain it best;
  4. per sprite: centroid and size per frame (a track), colour names, pattern, shape, motion.
`score(clip, scene)` compares all of it with the scene; every metric is defined in its docstring.

Input convention: a clip is either what `world.render` returns, (T, H, W, 3) uint8, or what the
VAE decodes and data.py reads, (T, 3, H, W) float in [-1, 1]; `to_video` turns both into
(T, H, W, 3) float in [0, 1], the range every colour distance here uses.
Shapes: T frames, H W pixels, K colours, N sprites. Positions and sizes are in frame units.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toy import world

MASK_THRESHOLD = 0.18      # RGB distance from the background beyond which a pixel is sprite (half MIN_CONTRAST)
MIN_AREA = 8 / 4096        # blobs under this share of the frame (8 px at 64x64) are noise
MAX_AREA = 0.3             # a "sprite" over 30% of the frame is not one (the largest, pulsing, is ~21%)
COLOUR_TOLERANCE = 0.4     # RGB distance at which a pixel no longer counts as the sprite's colour
# A clear colour vote is within half of that, 0.2 = 51 levels of 1/255: a render's pixel can lie exactly
# there (levels 45, 24, 0 off), so the cut sits between squared level distances 2600 and 2601, not on one.
CLEAR_VOTE = ((255 * COLOUR_TOLERANCE / 2) ** 2 - 0.5) ** 0.5 / 255
MIN_SHARE = 0.25           # a colour names a sprite when it covers this share of it
BALANCE_SHARE = 0.25       # each colour of a pattern covers >= 25% of a true render; below that it fades
MOTION_TOLERANCE = 0.1     # mean trajectory error (frame units, ~6 px) at which the motion score reaches 0
CROP = 32                  # shapes are compared on a CROP x CROP grid over their bounding box
HALF_COVERED = 0.5 - 0.5 / world.SUPERSAMPLE ** 2   # 15/32: half coverage, between a render's coverage steps
NAMED_COLOURS = world.SPRITE_COLOURS


def to_video(clip: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 or (T, 3, H, W) float in [-1, 1] -> (T, H, W, 3) float in [0, 1] (overshoot clipped)."""
    if clip.ndim != 4:
        raise ValueError(f"a clip is 4-D (T, H, W, 3) uint8 or (T, 3, H, W) float, got shape {tuple(clip.shape)}")
    if clip.dtype == torch.uint8 and clip.shape[-1] == 3:
        return clip.float() / 255
    if clip.is_floating_point() and clip.shape[1] == 3:
        return ((clip.detach().float().cpu().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)
    raise ValueError(f"expected (T, H, W, 3) uint8 or (T, 3, H, W) float in [-1, 1], got "
                     f"{tuple(clip.shape)} {clip.dtype}")


def _palette(names: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([world.COLOURS[n] for n in names], dtype=torch.float32) / 255   # (len, 3)


def _distances(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(P, 3), (K, 3) -> (P, K) RGB distances, from differences: cdist's default matrix-product route
    errs by up to ~2e-5 near zero (this one by ~1e-7), by amounts that depend on the CPU's BLAS."""
    return torch.cdist(pixels, palette, compute_mode="donot_use_mm_for_euclid_dist")


# ----------------------------------------------------------------------------- background and sprite pixels

def fit_background(video: torch.Tensor, keep: float = 0.6, rounds: int = 4) -> torch.Tensor:
    """(T, H, W, 3) -> (H, W, 3): the plane per channel that the most pixels of all frames agree with.

    Trimmed least squares: fit, keep the `keep` share of pixels that fit best, refit. Sprites
    cover well under 40% of a frame, so the kept pixels end up all background. Every second
    pixel of each row and column is plenty for three numbers per channel. The fit runs in float64:
    a float32 fit is off by ~1e-5 in a way that differs between LAPACK builds and CPUs, while the
    float64 one lands on the same float32 plane everywhere (on a solid colour, exactly that colour).
    """
    T, H, W, _ = video.shape
    y, x = torch.meshgrid((torch.arange(H, dtype=torch.float64) + 0.5) / H,
                          (torch.arange(W, dtype=torch.float64) + 0.5) / W, indexing="ij")
    design = torch.stack([torch.ones_like(x), x, y], -1)                          # (H, W, 3): 1, x, y
    rows = design[::2, ::2].reshape(1, -1, 3).expand(T, -1, -1).reshape(-1, 3)    # (T*H*W/4, 3)
    colours = video[:, ::2, ::2].reshape(-1, 3).double()                          # (T*H*W/4, 3)
    kept = torch.ones(len(rows), dtype=torch.bool)
    for _ in range(rounds):
        coef = torch.linalg.lstsq(rows[kept], colours[kept]).solution            # (3 terms, 3 channels)
        residual = (rows @ coef - colours).norm(dim=-1)
        kept = residual <= residual.kthvalue(max(1, int(keep * len(residual)))).values
    return (design @ coef).clamp(0, 1).float()                                    # (H, W, 3)


def background_name(background: torch.Tensor) -> tuple[str, float]:
    """The vocabulary background nearest a fitted one (H, W, 3), and their mean RGB distance."""
    size = background.shape[0]
    distances = {name: float((world.render_background(name, size) - background).norm(dim=-1).mean())
                 for name in world.BACKGROUNDS}
    name = min(distances, key=distances.get)
    return name, distances[name]


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool -> (T, H, W) long labels, 0 off the mask, one id per 8-connected blob (ids unique over T)."""
    T, H, W = mask.shape
    on = mask.flatten()
    labels = torch.arange(1, T * H * W + 1) * on                                  # id = flat index + 1
    while True:
        # every pixel takes the largest id among its neighbours: blobs converge to their max id
        grown = F.max_pool2d(labels.view(T, 1, H, W).float(), 3, stride=1, padding=1).long().flatten() * on
        # pointer jumping: the pixel an id names is in the same blob, so its (newer) label is fair game;
        # this spreads ids along long blobs in far fewer rounds than neighbour steps alone
        grown = torch.maximum(grown, grown[(grown - 1).clamp(min=0)] * on)
        if torch.equal(grown, labels):
            return labels.view(T, H, W)
        labels = grown


def find_blobs(distance: torch.Tensor) -> torch.Tensor:
    """(T, H, W) RGB distance from the background -> (T, H, W) blob labels, 0 off the sprites.

    Sprite pixels are those far from the background; blobs under MIN_AREA (noise specks) are dropped.
    """
    T, H, W = distance.shape
    # a 3x3 average first: pixel noise cancels, a sprite's solid interior does not
    smooth = F.avg_pool2d(distance[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    labels = connected_components(smooth > MASK_THRESHOLD)
    area = torch.bincount(labels.flatten())                                       # pixels per label
    return torch.where(area[labels] >= MIN_AREA * H * W, labels, 0)


def unmixed_distance(video: torch.Tensor, background: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """(T, H, W, K): how far each of K colours is from explaining each pixel as a blend with the background.

    A blurred or antialiased pixel is p = a * c + (1 - a) * bg; its true colour c lies on the ray
    from bg through p, beyond p. The distance from a candidate colour to that ray (not to p itself)
    keeps a tiny, mostly-edge sprite from looking like a different colour.
    """
    d = (video - background)[..., None, :]                                        # (T, H, W, 1, 3)
    towards = colours - background[..., None, :]                                  # (H, W, K, 3)
    along = ((towards * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-6)).clamp(min=1)  # (T, H, W, K)
    return (along[..., None] * d - towards).norm(dim=-1)


def split_sprites(video: torch.Tensor, background: torch.Tensor, blobs: torch.Tensor,
                  sprites: tuple[world.Sprite, ...]) -> torch.Tensor:
    """(N, T, H, W) bool: each sprite pixel goes to the sprite whose colours explain its neighbourhood best.

    Per pixel rather than per blob, so two sprites that blur into one blob still come apart; the
    5x5 neighbourhood (weighted by how far each pixel is from the background) keeps the pixels on a
    stripe border or a sprite's rim with the sprite they belong to.
    """
    mask = blobs > 0
    if len(sprites) == 1:
        return mask[None]
    # per pixel, how well the nearest colour of each sprite explains it: (N, T, H, W)
    cost = torch.stack([unmixed_distance(video, background, _palette(s.colours)).min(-1).values for s in sprites])
    weight = (video - background).norm(dim=-1) * mask                             # (T, H, W) strong pixels count more
    pooled = F.avg_pool2d((cost * weight).flatten(0, 1)[:, None], 5, stride=1, padding=2)[:, 0]
    owner = pooled.view(cost.shape).argmin(0)                                      # (T, H, W) sprite index
    return torch.stack([mask & (owner == i) for i in range(len(sprites))])


# ----------------------------------------------------------------------------- one sprite's measurements

def measure_track(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sprite's (T, H, W) mask -> centroid (T, 2) as (x, y), equal-area diameter (T,), present (T,) bool."""
    T, H, W = mask.shape
    area = mask.flatten(1).sum(1).float()                                         # (T,) pixels
    present = (area >= MIN_AREA * H * W) & (area <= MAX_AREA * H * W)
    y, x = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
    weight = mask.float() / area.clamp(min=1)[:, None, None]
    centre = torch.stack([(weight * x).flatten(1).sum(1), (weight * y).flatten(1).sum(1)], -1)   # (T, 2)
    diameter = 2 * (area / (H * W) / torch.pi).sqrt()                             # the circle of the same area
    return centre, diameter, present


def trajectory_error(centre: torch.Tensor, diameter: torch.Tensor, present: torch.Tensor, motion: str) -> float:
    """Mean distance (frame units) between the measured path and `motion`'s path, both centred.

    The path is (x, y, diameter) per frame; centring removes where the sprite is anchored, and the
    template's size is fitted to the measured mean size, so only the *shape* of the motion counts.
    """
    t = torch.linspace(0, 1, len(centre))[present]
    dx, dy, scale = world.motion_path(motion, t)
    measured = torch.cat([centre[present], diameter[present, None]], -1)          # (T', 3)
    template = torch.stack([dx, dy, scale * diameter[present].mean() / scale.mean()], -1)
    measured, template = measured - measured.mean(0), template - template.mean(0)
    return float((measured - template).norm(dim=-1).mean())


def motion_name(centre: torch.Tensor, diameter: torch.Tensor, present: torch.Tensor) -> str:
    """The vocabulary motion (held-out ones included) whose path is nearest the measured one; 'none' if unseen."""
    if present.sum() < 2:
        return "none"
    errors = {m: trajectory_error(centre, diameter, present, m) for m in world.MOTIONS}
    return min(errors, key=errors.get)


def inner_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask eroded by one pixel, so blurred edges (background mixed in) do not vote on colours.

    Falls back to the whole mask when erosion would leave under a fifth of it (thin or tiny sprites).
    """
    inner = mask & ~F.max_pool2d((~mask).float()[:, None], 3, stride=1, padding=1)[:, 0].bool()
    return inner if inner.sum() >= 0.2 * mask.sum() else mask


def colour_labels(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H, W) index of the nearest named colour per pixel, and whether it is a clear vote.

    A pixel votes clearly when it lies within half COLOUR_TOLERANCE of that colour: pixels on a blurred
    border between two colours (blue and orange blend to purple-ish) are near no colour and abstain.
    """
    distance = _distances(video.reshape(-1, 3), _palette(NAMED_COLOURS))         # (T*H*W, colours)
    nearest = distance.min(1)
    shape = video.shape[:-1]
    return nearest.indices.reshape(shape), (nearest.values < CLEAR_VOTE).reshape(shape)


def colour_shares(labels: torch.Tensor, clear: torch.Tensor, inner: torch.Tensor) -> dict[str, float]:
    """Share of a sprite's clearly voting inner pixels nearest each named colour, largest first."""
    votes = labels[inner & clear] if (inner & clear).any() else labels[inner]
    if len(votes) == 0:
        return {}
    counts = torch.bincount(votes, minlength=len(NAMED_COLOURS)).float() / len(votes)
    order = counts.argsort(descending=True)
    return {NAMED_COLOURS[i]: float(counts[i]) for i in order if counts[i] > 0}


def pattern_name(labels: torch.Tensor, clear: torch.Tensor, inner: torch.Tensor, colours: tuple[str, ...]) -> str:
    """'plain' for one colour; 'striped' when each pixel row is one colour, 'checkered' when rows mix both.

    Measured as the share of the colour variance that lies within rows: ~0 for horizontal bands,
    ~1 for checks. Variances, unlike counts of neighbour changes, ignore blurred borders (they abstain).
    """
    if len(colours) < 2:
        return "plain"
    first, second = (NAMED_COLOURS.index(c) for c in colours[:2])
    weight = (inner & clear & ((labels == first) | (labels == second))).float()  # (T, H, W) voting pixels
    is_second = (labels == second).float()
    total = weight.sum().clamp(min=1)
    overall = (weight * (is_second - (weight * is_second).sum() / total) ** 2).sum()
    row_mean = (weight * is_second).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1)
    within_rows = (weight * (is_second - row_mean) ** 2).sum()
    return "striped" if within_rows < 0.5 * overall else "checkered"


def _shape_template(shape: str) -> torch.Tensor:
    """(CROP, CROP) bool: the shape drawn over its own bounding box."""
    polygon = world.SHAPES[shape] or ((-1.0, -1.0), (1.0, 1.0))                  # a circle's box
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    s = (torch.arange(CROP) + 0.5) / CROP
    u = (min(xs) + s * (max(xs) - min(xs)))[None, :].expand(CROP, CROP)
    v = (min(ys) + s * (max(ys) - min(ys)))[:, None].expand(CROP, CROP)
    return world.shape_inside(shape, u, v)


TEMPLATES = {shape: _shape_template(shape) for shape in world.SHAPES}


def outline(mask: torch.Tensor, distance: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The sprite's pixels at least half covered: distance from the background at least half its inner level.

    The detection mask is deliberately generous (low threshold, smoothed), which rounds corners;
    half coverage is where the true edge of an antialiased or blurred sprite lies. A render's
    coverage comes in steps of 1 / SUPERSAMPLE^2, and a pixel covered exactly half (common: any
    edge along the sample grid) sits on the threshold, where the last bit of the fitted
    background would decide it; the threshold sits half a step lower, so such pixels count.
    """
    if not inner.any():
        return mask
    near = F.max_pool2d(mask.float()[:, None], 3, stride=1, padding=1)[:, 0].bool()
    return near & (distance > HALF_COVERED * distance[inner].quantile(0.2))


def shape_overlaps(mask: torch.Tensor) -> dict[str, float]:
    """Mean IoU, over frames where the sprite shows, of its box-normalized mask with each shape template."""
    crops = []
    for frame in mask:
        rows, cols = frame.any(1).nonzero(), frame.any(0).nonzero()
        if len(rows) < 3 or len(cols) < 3:
            continue
        crop = frame[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()
        crops.append(F.interpolate(crop[None, None], size=(CROP, CROP), mode="bilinear")[0, 0] > 0.5)
    if not crops:
        return {shape: 0.0 for shape in TEMPLATES}
    crops = torch.stack(crops)                                                    # (T', CROP, CROP)
    return {shape: float(((crops & t).flatten(1).sum(1) / (crops | t).flatten(1).sum(1)).mean())
            for shape, t in TEMPLATES.items()}


# ----------------------------------------------------------------------------- scoring against a scene

@dataclass(frozen=True)
class Analysis:
    """A clip taken apart for one scene: pixels, their distance to the background, colour votes, sprite masks."""
    video: torch.Tensor            # (T, H, W, 3) in [0, 1]
    distance: torch.Tensor         # (T, H, W) RGB distance to the background
    labels: torch.Tensor           # (T, H, W) nearest named colour
    clear: torch.Tensor            # (T, H, W) whether that vote is clear
    masks: torch.Tensor            # (N, T, H, W) one mask per scene sprite


def analyze(video: torch.Tensor, background: torch.Tensor, sprites: tuple[world.Sprite, ...]) -> Analysis:
    """Steps 2 and 3 of the pipeline, plus every pixel's colour vote."""
    distance = (video - background).norm(dim=-1)                                  # (T, H, W)
    masks = split_sprites(video, background, find_blobs(distance), sprites)       # (N, T, H, W)
    labels, clear = colour_labels(video)
    return Analysis(video, distance, labels, clear, masks)


def _appearance(analysis: Analysis, index: int,
                sprite: world.Sprite) -> tuple[float, dict[str, float], dict[str, float]]:
    """Raw identity (colour fidelity x colour balance x shape IoU), colour shares and shape IoUs of one sprite."""
    mask = analysis.masks[index]
    mask = mask & measure_track(mask)[2][:, None, None]                           # frames where it shows
    inner = inner_mask(mask)
    shares = colour_shares(analysis.labels, analysis.clear, inner)
    overlaps = shape_overlaps(outline(mask, analysis.distance, inner))
    pixels = analysis.video[inner]                                                # (P, 3)
    if len(pixels) == 0:
        return 0.0, shares, overlaps
    to_true = _distances(pixels, _palette(sprite.colours))                        # (P, 1 or 2)
    fidelity = float((1 - to_true.min(1).values / COLOUR_TOLERANCE).clamp(min=0).mean())
    share = torch.bincount(to_true.argmin(1), minlength=len(sprite.colours)).float() / len(pixels)
    balance = min(1.0, float(share.min()) / BALANCE_SHARE) if len(sprite.colours) == 2 else 1.0
    return fidelity * balance * overlaps[sprite.shape], shares, overlaps


@functools.lru_cache(maxsize=512)
def perfect_appearance(scene: world.Scene, num_frames: int, size: int) -> tuple[float, ...]:
    """Raw identity of each sprite in a perfect render of the scene: what 'identity 1' means for it."""
    truth = analyze(to_video(world.render(scene, num_frames, size)),
                    world.render_background(scene.background, size), scene.sprites)
    return tuple(_appearance(truth, i, sprite)[0] for i, sprite in enumerate(scene.sprites))


def _score_sprite(clip: Analysis, index: int, sprite: world.Sprite, perfect: float) -> dict:
    """Everything about one sprite; identity and motion scores are defined in `score`."""
    raw, shares, overlaps = _appearance(clip, index, sprite)
    colours = tuple(name for name, share in shares.items() if share >= MIN_SHARE)[:2]
    mask = clip.masks[index]
    centre, diameter, present = measure_track(mask)
    pattern = pattern_name(clip.labels, clip.clear, inner_mask(mask & present[:, None, None]), colours)
    presence = float(present.float().mean())
    motion_score = 0.0
    if present.sum() >= 2:
        error = trajectory_error(centre, diameter, present, sprite.motion)
        motion_score = presence * max(0.0, 1 - error / MOTION_TOLERANCE)
    shape = max(overlaps, key=overlaps.get)
    motion = motion_name(centre, diameter, present)
    return {"colours": colours, "colour_ok": set(colours) == set(sprite.colours),
            "pattern": pattern, "pattern_ok": pattern == sprite.pattern,
            "shape": shape, "shape_ok": shape == sprite.shape,
            "motion": motion, "motion_ok": motion == sprite.motion,
            "identity_score": min(1.0, raw / max(perfect, 1e-6)), "motion_score": motion_score,
            "presence": presence}


def score(clip: torch.Tensor, scene: world.Scene, reference: torch.Tensor | None = None) -> dict:
    """Score a clip against the scene it should show. Keys (per-sprite details under 'sprites'):

    background, background_ok: nearest vocabulary background to the fitted one, and whether it is the scene's.
    colour_ok, pattern_ok, shape_ok, motion_ok: every sprite's colour set (colours covering >= 25% of it),
        pattern, shape (best template IoU) and motion (nearest path) equal the scene's.
    identity_score in [0, 1], mean over sprites of: colour fidelity (mean of 1 - d / 0.4 over its
        pixels, d the RGB distance to the nearest true colour) x colour balance (each true colour
        covers >= 25% of it) x shape IoU (box-normalized mask vs the true shape, mean over frames),
        divided by the same product for a perfect render of the scene (so a perfect render is 1;
        edges, blends and rasterization cost nothing that the truth also pays).
    motion_score in [0, 1], mean over sprites of: presence x (1 - trajectory error / 0.1), the error
        being the mean (x, y, diameter) distance to the true path, both centred (frame units).
    presence: the smallest share of frames in which a sprite is found (at a plausible size).
    temporal_consistency in [0, 1]: 1 - mean absolute frame-to-frame change of background pixels
        (away from sprites), RGB in [0, 1]; 1 for a static background, lower for flicker.
    mse: mean squared error against `reference` (any clip format, same size), RGB in [0, 1]; None without one.
    """
    video = to_video(clip)                                                        # (T, H, W, 3)
    T, H, W, _ = video.shape
    if H != W:
        raise ValueError(f"the sprite world is square; got a {H}x{W} clip")
    background = fit_background(video)
    name, _ = background_name(background)
    analysis = analyze(video, background, scene.sprites)
    perfect = perfect_appearance(scene, T, H)
    sprites = [_score_sprite(analysis, i, s, p) for i, (s, p) in enumerate(zip(scene.sprites, perfect))]
    # background pixels: off every sprite, with a one-pixel ring, in both frames of a pair
    mask = analysis.masks.any(0)                                                  # (T, H, W)
    near = F.max_pool2d(mask.float()[:, None], 3, stride=1, padding=1)[:, 0].bool()
    calm = ~(near[1:] | near[:-1])                                                # (T-1, H, W)
    change = (video[1:] - video[:-1]).abs().mean(-1)                              # (T-1, H, W)
    if T < 2:
        flicker = 0.0                                                             # a single image cannot flicker
    else:
        flicker = float((change[calm] if calm.any() else change).mean())         # all sprite: judge every pixel
    result = {"background": name, "background_ok": name == scene.background}
    for key in ("colour_ok", "pattern_ok", "shape_ok", "motion_ok"):
        result[key] = all(s[key] for s in sprites)
    result["identity_score"] = sum(s["identity_score"] for s in sprites) / len(sprites)
    result["motion_score"] = sum(s["motion_score"] for s in sprites) / len(sprites)
    result["presence"] = min(s["presence"] for s in sprites)
    result["temporal_consistency"] = 1 - flicker
    result["mse"] = None if reference is None else float(((video - to_video(reference)) ** 2).mean())
    result["sprites"] = sprites
    return result
