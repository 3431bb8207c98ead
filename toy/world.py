"""The sprite world: the toy videos the miniature Wan is pretrained on, and the concepts it learns.

No real Wan weights can be downloaded here, so the project pretrains a tiny Wan-architecture model
on this world instead. A scene is one or two flat-coloured sprites moving over a solid or
gradient background; `render` draws it, `caption` describes it in the plain words the model is
trained on. The world is deliberately small and high-contrast, so that a tiny text-conditioned
DiT can learn it in about an hour of CPU training.

Set-and-Sequence needs things the base model has never seen (docs/method.md#the-idea): some
appearance words and motions are HELD OUT of pretraining (the `HELD_OUT` table), and the three
`CONCEPTS` (toy/concepts.py) combine a held-out appearance with a held-out motion. Their prompts replace the
held-out words with a rare identity token [v] and motion token [u], exactly as "a [v] man" does
in the paper.

Geometry is in frame units (0..1 across the frame, y pointing down), so a scene renders at any
size; time is normalized clip time t in [0, 1]. At the world's FPS = 8, the default 17 frames
are 2 seconds and frame i is at t = i / 16.
Shapes: T frames, H W pixel height/width (H = W = size), 3 RGB channels.
"""
import functools
import math
from dataclasses import dataclass, replace

import torch

FPS = 8                    # the world's frame rate: 17 frames = 2 s
NUM_FRAMES = 17            # 4k+1, what Wan's causal VAE wants; 5 latent frames
FRAME_SIZE = 64            # 8x8 latents after the VAE's 8x spatial stride
SUPERSAMPLE = 4            # 4x4 samples per pixel: antialiased edges, still crisp
GRID = 2.0 ** -18          # render snaps sprite geometry to this grid (frame units; 1/4096 px at 64 px)

# ----------------------------------------------------------------------------- the vocabulary

# Fill colours, far apart in RGB (every pair at least 0.4 apart on the [0, 1] scale), so that a
# blurry sample still lands nearest the right name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40), "orange": (250, 130, 0), "yellow": (250, 235, 50), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (250, 120, 200), "teal": (0, 180, 170),
    "gray": (128, 128, 128),   # backgrounds only: a neutral backdrop
}
SPRITE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black", "pink", "teal")


# Shapes in sprite units (the sprite's radius is 1, y down); None is the unit circle. Each is sized
# so that its area is close to the circle's: a "large square" looks as large as a "large circle".
SHAPES: dict[str, tuple[tuple[float, float], ...] | None] = {
    "circle": None,
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -1.25), (1.0825, 0.625), (-1.0825, 0.625)),   # equilateral, centroid at 0
    "diamond": ((0.0, -1.1), (1.1, 0.0), (0.0, 1.1), (-1.1, 0.0)),
    # five points, the first up: outer (1.25) and inner (0.55) vertices alternate every 36 degrees;
    # rounded so that another libm's last bit cannot move a vertex
    "star": tuple((round(r * math.sin(math.pi * k / 5), 12), round(-r * math.cos(math.pi * k / 5), 12))
                  for k, r in enumerate((1.25, 0.55) * 5)),
}
# How far each shape reaches from its centre, for keeping sprites inside the frame and apart.
SHAPE_REACH = {name: 1.0 if poly is None else max(math.hypot(x, y) for x, y in poly)
               for name, poly in SHAPES.items()}

PATTERNS = ("plain", "striped", "checkered")   # striped: horizontal bands; checkered: square cells
PATTERN_CELL = 2 / 3                           # band / cell width in sprite units: about 3 across a sprite
SIZES = {"small": 7 / 64, "large": 11 / 64}    # sprite radius in frame units: 14 and 22 px across at 64


@dataclass(frozen=True)
class Background:
    """A solid colour (start == end) or a linear gradient from `start` to `end` along `axis`."""
    start: str
    end: str
    axis: str = "vertical"                     # vertical: top to bottom; horizontal: left to right


BACKGROUNDS: dict[str, Background] = {
    "black": Background("black", "black"),
    "white": Background("white", "white"),
    "gray": Background("gray", "gray"),
    "blue": Background("blue", "blue"),
    "green": Background("green", "green"),
    "blue to white gradient": Background("blue", "white", "vertical"),     # a sky
    "red to yellow gradient": Background("red", "yellow", "horizontal"),   # a sunset
}

# Motion words and the phrase a caption uses for each; the paths themselves are in `motion_path`.
MOTIONS: dict[str, str] = {
    "still": "standing still", "left": "moving left", "right": "moving right", "up": "moving up",
    "down": "moving down", "diagonal": "moving diagonally", "orbit": "orbiting", "bounce": "bouncing",
    "pulse": "pulsing", "zigzag": "zigzagging", "figure_eight": "moving in a figure eight", "spiral": "spiraling",
}
AMPLITUDE = 10 / 64        # how far motions travel from the anchor, frame units (10 px at 64)
PULSE_DEPTH = 0.5          # pulsing scales the sprite between 0.5x and 1.5x

# THE split: these never appear in a pretraining scene or caption. Everything else is held in.
HELD_OUT: dict[str, tuple[str, ...]] = {
    "colour": ("pink", "teal"),
    "shape": ("star",),
    "pattern": ("checkered",),
    "motion": ("zigzag", "figure_eight", "spiral"),
    "background": (),
}
MIN_CONTRAST = 0.45        # every sprite colour stays this far (RGB in [0, 1]) from its whole background


def vocabulary(kind: str, split: str = "train") -> tuple[str, ...]:
    """Names of one attribute kind ('colour', 'shape', 'pattern', 'motion', 'background'); 'all' or 'train'."""
    names = {"colour": SPRITE_COLOURS, "shape": tuple(SHAPES), "pattern": PATTERNS,
             "motion": tuple(MOTIONS), "background": tuple(BACKGROUNDS)}[kind]
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    return names if split == "all" else tuple(n for n in names if n not in HELD_OUT[kind])


def motion_path(motion: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, scale) of a sprite at clip times t (any shape): offset from its anchor, and size factor."""
    a, zero, one = AMPLITUDE, torch.zeros_like(t), torch.ones_like(t)
    turn = 2 * math.pi * t
    match motion:
        case "still":
            return zero, zero, one
        case "left":
            return a - 2 * a * t, zero, one
        case "right":
            return -a + 2 * a * t, zero, one
        case "up":
            return zero, a - 2 * a * t, one
        case "down":
            return zero, -a + 2 * a * t, one
        case "diagonal":                       # top-left to bottom-right
            return 0.8 * (-a + 2 * a * t), 0.8 * (-a + 2 * a * t), one
        case "orbit":                          # one clockwise turn, starting at the top
            return a * torch.sin(turn), -a * torch.cos(turn), one
        case "bounce":                         # two bounces off a floor at +a
            return zero, a - 2 * a * torch.sin(turn).abs(), one
        case "pulse":                          # two beats in place
            return zero, zero, 1 + PULSE_DEPTH * torch.sin(2 * turn)
        case "zigzag":                         # rightwards, with two up-down teeth (a triangle wave)
            tooth = 1 - 4 * (2 * t + 0.25 - torch.floor(2 * t + 0.75)).abs()
            return -a + 2 * a * t, 0.8 * a * tooth, one
        case "figure_eight":                   # a sideways 8 (Lissajous 1:2)
            return a * torch.sin(turn), 0.8 * a * torch.sin(2 * turn), one
        case "spiral":                         # 1.25 clockwise turns, growing outwards
            radius = a * (0.15 + 0.85 * t)
            return radius * torch.sin(1.25 * turn), -radius * torch.cos(1.25 * turn), one
    raise ValueError(f"unknown motion {motion!r}; known: {', '.join(MOTIONS)}")


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Sprite:
    """One sprite: its look, its motion, and the anchor (frame units) its motion moves around."""
    shape: str
    colour: str
    size: str = "large"
    motion: str = "still"
    pattern: str = "plain"
    colour2: str | None = None                 # the second colour of a striped/checkered sprite
    x: float = 0.5
    y: float = 0.5

    def __post_init__(self):
        for kind, name, table in (("shape", self.shape, SHAPES), ("colour", self.colour, SPRITE_COLOURS),
                                  ("size", self.size, SIZES), ("motion", self.motion, MOTIONS),
                                  ("pattern", self.pattern, PATTERNS)):
            if name not in table:
                raise ValueError(f"Sprite: unknown {kind} {name!r}; known: {', '.join(table)}")
        if (self.pattern == "plain") != (self.colour2 is None):
            raise ValueError(f"Sprite: pattern {self.pattern!r} needs colour2 exactly when it is not plain")
        if self.colour2 is not None and (self.colour2 not in SPRITE_COLOURS or self.colour2 == self.colour):
            raise ValueError(f"Sprite: colour2 {self.colour2!r} must be a sprite colour other than "
                             f"{self.colour!r}")

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour,) if self.colour2 is None else (self.colour, self.colour2)


@dataclass(frozen=True)
class Scene:
    """One or two sprites over a background; construction checks the layout is clean (see layout_problem)."""
    sprites: tuple[Sprite, ...]
    background: str = "black"

    def __post_init__(self):
        problem = layout_problem(self.sprites, self.background)
        if problem:
            raise ValueError(f"Scene: {problem}")


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 255


@functools.lru_cache(maxsize=None)
def contrast(colour: str, background: str) -> float:
    """RGB distance from a colour to the nearest colour anywhere on a background (a segment in RGB)."""
    c, p, q = _rgb(colour), _rgb(BACKGROUNDS[background].start), _rgb(BACKGROUNDS[background].end)
    span = q - p
    s = 0.0 if span.norm() == 0 else float(((c - p) @ span / (span @ span)).clamp(0, 1))
    return float((c - (p + s * span)).norm())


def _extent(sprite: Sprite) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre (x, y) and reach of a sprite at 65 times across the clip, frame units (float64)."""
    # float64 and exact times: whether a scene is accepted must not hang on a CPU's float32 sin
    dx, dy, scale = motion_path(sprite.motion, torch.arange(65, dtype=torch.float64) / 64)
    return sprite.x + dx, sprite.y + dy, SIZES[sprite.size] * SHAPE_REACH[sprite.shape] * scale


def layout_problem(sprites: tuple[Sprite, ...], background: str) -> str | None:
    """Why a scene would not be clean to render and score, or None: the oracle relies on all of these."""
    if background not in BACKGROUNDS:
        return f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}"
    if not 1 <= len(sprites) <= 2:
        return f"a scene has 1 or 2 sprites, got {len(sprites)}"
    margin = 1 / 64
    for sprite in sprites:
        for colour in sprite.colours:
            if contrast(colour, background) < MIN_CONTRAST:
                return f"{colour} does not stand out on the {background} background"
        x, y, reach = _extent(sprite)
        if ((x - reach).min() < margin or (y - reach).min() < margin
                or (x + reach).max() > 1 - margin or (y + reach).max() > 1 - margin):
            return f"the {sprite.colour} {sprite.shape} leaves the frame while {MOTIONS[sprite.motion]}"
    if len(sprites) == 2:
        first, second = sprites
        if set(first.colours) & set(second.colours):
            return "the two sprites share a colour (the oracle tells them apart by colour)"
        x1, y1, r1 = _extent(first)
        x2, y2, r2 = _extent(second)
        if (torch.hypot(x1 - x2, y1 - y2) - r1 - r2).min() < 2 * margin:
            return "the two sprites touch or overlap"
    return None


# ----------------------------------------------------------------------------- rendering

def shape_inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of points (u, v), in sprite units, that lie inside `shape` (even-odd polygon rule)."""
    polygon = SHAPES[shape]
    if polygon is None:
        return u * u + v * v <= 1
    inside = torch.zeros_like(u, dtype=torch.bool)
    for (xi, yi), (xj, yj) in zip(polygon, polygon[1:] + polygon[:1]):
        # a ray from (u, v) towards +u crosses this edge: flip the parity
        straddles = (yi > v) != (yj > v)
        crossing_u = (xj - xi) * (v - yi) / (yj - yi + 1e-12) + xi
        inside ^= straddles & (u < crossing_u)
    return inside


def _background_levels(name: str, size: int) -> torch.Tensor:
    """(H, W, 3) float64 in 0..255: the background at each pixel centre, exact for power-of-two sizes."""
    bg = BACKGROUNDS[name]
    s = (2 * torch.arange(size, dtype=torch.float64) + 1) / (2 * size)   # pixel centres, frame units
    if bg.axis == "vertical":
        s = s[:, None].expand(size, size)                     # varies with y (rows)
    else:
        s = s[None, :].expand(size, size)                     # varies with x (columns)
    start = torch.tensor(COLOURS[bg.start], dtype=torch.float64)
    end = torch.tensor(COLOURS[bg.end], dtype=torch.float64)
    return start + s[..., None] * (end - start)               # (H, W, 3)


def render_background(name: str, size: int = FRAME_SIZE) -> torch.Tensor:
    """(H, W, 3) float in [0, 1]: the background alone, each pixel's colour at its centre."""
    return (_background_levels(name, size) / 255).float()


def _snap(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the GRID: a last-bit difference (another CPU's sin, cos or sum order) vanishes."""
    return torch.round(x / GRID) * GRID


def _sprite_pixels(sprite: Sprite, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At points (u, v) in sprite units: (inside mask, mask of where the pattern shows colour2)."""
    inside = shape_inside(sprite.shape, u, v)
    # the pattern is fixed to the sprite: its bands move and scale with it
    if sprite.pattern == "striped":                           # bands from the top: colour, colour2, colour
        second = torch.floor((v + 1) / PATTERN_CELL) % 2 == 1
    elif sprite.pattern == "checkered":                       # cell edges on the axes: a 50/50 split
        second = (torch.floor(u / PATTERN_CELL) + torch.floor(v / PATTERN_CELL)) % 2 == 1
    else:
        second = torch.zeros_like(inside)
    return inside, second


def render(scene: Scene, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> torch.Tensor:
    """Draw a scene: (T, H, W, 3) uint8, the same bytes for the same scene on any machine.

    Each pixel is the average of SUPERSAMPLE x SUPERSAMPLE samples (antialiasing). Only a window
    around each sprite is sampled finely; a linear background's pixel average is its centre value.
    Same bytes: geometry is float64 snapped to the GRID, samples are counted in integers and the
    blend is exact in float64 (0..255 levels), so no CPU's rounding can tip a sample or a pixel;
    a pixel exactly between two levels rounds half to even.
    """
    t = torch.arange(num_frames, dtype=torch.float64) / max(1, num_frames - 1)   # exact i / (T - 1)
    frames = _background_levels(scene.background, size).expand(num_frames, size, size, 3).clone()  # (T, H, W, 3)
    samples = SUPERSAMPLE ** 2
    for sprite in scene.sprites:
        dx, dy, scale = motion_path(sprite.motion, t)         # (T,) each
        cx, cy = _snap(sprite.x + dx), _snap(sprite.y + dy)
        radius = _snap(SIZES[sprite.size] * scale)
        # a square window of pixels around the sprite, the same size in every frame
        reach = SHAPE_REACH[sprite.shape] * float(radius.max())
        side = min(size, int(2 * reach * size) + 3)
        x0 = ((cx - reach) * size).long().sub(1).clamp(0, size - side)                 # (T,) window corners
        y0 = ((cy - reach) * size).long().sub(1).clamp(0, size - side)
        offsets = (torch.arange(side * SUPERSAMPLE, dtype=torch.float64) + 0.5) / SUPERSAMPLE   # samples, in pixels
        # sample positions in sprite units: the shape and its pattern move and scale with the sprite
        u = (((x0[:, None] + offsets) / size - cx[:, None]) / radius[:, None])[:, None, :]   # (T, 1, S)
        v = (((y0[:, None] + offsets) / size - cy[:, None]) / radius[:, None])[:, :, None]   # (T, S, 1)
        n = side * SUPERSAMPLE
        inside, second = _sprite_pixels(sprite, u.expand(-1, n, n), v.expand(-1, n, n))   # (T, S, S) each
        # per pixel, in integers: how many samples the sprite covers, and how many of them in colour2
        blocks = (num_frames, side, SUPERSAMPLE, side, SUPERSAMPLE)
        cover = inside.reshape(blocks).sum((2, 4))[..., None]                          # (T, side, side, 1)
        cover2 = (inside & second).reshape(blocks).sum((2, 4))[..., None]
        paint = (cover - cover2) * torch.tensor(COLOURS[sprite.colour])   # (T, side, side, 3) levels summed
        if sprite.colour2 is not None:
            paint = paint + cover2 * torch.tensor(COLOURS[sprite.colour2])
        for i in range(num_frames):
            ys, xs = slice(int(y0[i]), int(y0[i]) + side), slice(int(x0[i]), int(x0[i]) + side)
            # sprites never overlap; exact, as a level has few bits (k / 128 on a gradient at 64 px)
            frames[i, ys, xs] = (frames[i, ys, xs] * (samples - cover[i]) + paint[i]) / samples
    return frames.round().to(torch.uint8)                                      # (T, H, W, 3)


def to_pixels(video: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1], the project's pixel convention (data.py)."""
    return video.permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- captions

def subject(sprite: Sprite, identity_token: str | None = None) -> str:
    """'a large red and white striped circle'; with a token, the held-out words become the token."""
    look = sprite.colour if sprite.pattern == "plain" else f"{sprite.colour} and {sprite.colour2} {sprite.pattern}"
    shape = sprite.shape
    if identity_token is not None:
        look_held_out = (any(c in HELD_OUT["colour"] for c in sprite.colours)
                         or sprite.pattern in HELD_OUT["pattern"])
        shape_held_out = sprite.shape in HELD_OUT["shape"]
        if not (look_held_out or shape_held_out):
            raise ValueError("subject: an identity token replaces held-out words, and this sprite has none")
        # the token stands where the unseen words stood: "a large dax square", "a large purple dax"
        if look_held_out and shape_held_out:
            return f"a {sprite.size} {identity_token}"
        look, shape = (identity_token, shape) if look_held_out else (look, identity_token)
    return f"a {sprite.size} {look} {shape}"


def caption(scene: Scene, identity_token: str | None = None, motion_token: str | None = None) -> str:
    """The video caption, e.g. 'a small red circle bouncing and a large blue square orbiting on a black background'.

    Tokens (for a concept's prompts) apply to the first sprite only: [v] replaces its held-out
    appearance words, and the motion phrase becomes 'moving in [u] motion'.
    """
    parts = []
    for i, sprite in enumerate(scene.sprites):
        motion = MOTIONS[sprite.motion] if (i or motion_token is None) else f"moving in {motion_token} motion"
        parts.append(f"{subject(sprite, identity_token if i == 0 else None)} {motion}")
    return f"{' and '.join(parts)} on a {scene.background} background"


def image_caption(scene: Scene, identity_token: str | None = None) -> str:
    """The caption of a single frame: no motion words, e.g. 'a small red circle on a blue background'."""
    subjects = [subject(s, identity_token if i == 0 else None) for i, s in enumerate(scene.sprites)]
    return f"{' and '.join(subjects)} on a {scene.background} background"


# ----------------------------------------------------------------------------- random scenes

def _pick(names: tuple[str, ...], generator: torch.Generator) -> str:
    return names[int(torch.randint(len(names), (1,), generator=generator))]


def anchor_range(sprite: Sprite) -> tuple[float, float, float, float]:
    """(low_x, high_x, low_y, high_y): where the sprite's anchor may lie so its whole path stays inside
    the frame (1 px margin); low > high where it cannot fit at all. Every motion path is symmetric
    about its anchor, so the range is centred on the frame's centre whenever it is not empty."""
    x, y, reach = _extent(replace(sprite, x=0.5, y=0.5))
    margin = 1 / 64
    return (float(margin - (x - 0.5 - reach).min()), float(1 - margin - (x - 0.5 + reach).max()),
            float(margin - (y - 0.5 - reach).min()), float(1 - margin - (y - 0.5 + reach).max()))


def _random_sprite(generator: torch.Generator, split: str, background: str, taken: tuple[str, ...]) -> Sprite:
    """A sprite whose colours stand out on the background and differ from `taken`, anchored inside the frame."""
    colours = [c for c in vocabulary("colour", split)
               if c not in taken and contrast(c, background) >= MIN_CONTRAST]
    colour = _pick(tuple(colours), generator)
    # most sprites are plain: patterns are a harder thing to learn, keep them a minority
    patterned = [p for p in vocabulary("pattern", split) if p != "plain"]
    pattern = "plain" if torch.rand(1, generator=generator) < 0.75 else _pick(tuple(patterned), generator)
    colour2 = None if pattern == "plain" else _pick(tuple(c for c in colours if c != colour), generator)
    sprite = Sprite(shape=_pick(vocabulary("shape", split), generator), colour=colour,
                    size=_pick(tuple(SIZES), generator), motion=_pick(vocabulary("motion", split), generator),
                    pattern=pattern, colour2=colour2)
    low_x, high_x, low_y, high_y = anchor_range(sprite)
    if low_x > high_x or low_y > high_y:
        return sprite                                          # cannot fit: the caller draws again
    u, w = torch.rand(2, generator=generator).tolist()
    return replace(sprite, x=low_x + u * (high_x - low_x), y=low_y + w * (high_y - low_y))


def caption_anchor(sprite: Sprite, index: int, count: int) -> Sprite:
    """The sprite at the place its caption implies: alone, at the frame's centre; of two, the first
    named at the top-left corner of its anchor range and the second at the bottom-right corner of its own.

    A caption names no position, so with random anchors a model must guess where a path starts,
    and a sprite off-centre does not say whether it is moving or was placed there. With the place
    fixed by the words, where the sprite is in each frame is the motion word's doing alone: part of
    the motion design of docs/toy-model.md ("Motion experiments").
    """
    if count == 1:
        return replace(sprite, x=0.5, y=0.5)
    low_x, high_x, low_y, high_y = anchor_range(sprite)
    # a quarter pixel inside the corner, so that float rounding cannot put the path a hair outside
    inset_x, inset_y = min(1 / 256, (high_x - low_x) / 2), min(1 / 256, (high_y - low_y) / 2)
    if index == 0:
        return replace(sprite, x=low_x + inset_x, y=low_y + inset_y)
    return replace(sprite, x=high_x - inset_x, y=high_y - inset_y)


def random_scene(generator: torch.Generator, split: str = "train", anchors: str = "random") -> Scene:
    """A random clean scene: one sprite (65%) or two, from the held-in ('train') or whole ('all') vocabulary.

    anchors: 'random' puts the sprites anywhere their paths fit (the VAE must encode a sprite anywhere;
    the previous DiT was trained on these too); 'caption' where their caption implies (caption_anchor):
    the motion design's training scenes (toy.pretrain --anchors caption, the shipped DiT's).
    """
    if anchors not in ("caption", "random"):
        raise ValueError(f"anchors must be 'caption' or 'random', got {anchors!r}")
    while True:
        background = _pick(vocabulary("background", split), generator)
        count = 1 if torch.rand(1, generator=generator) < 0.65 else 2
        sprites: tuple[Sprite, ...] = ()
        for _ in range(20):                                    # rejection sampling: most draws fit
            taken = tuple(c for s in sprites for c in s.colours)
            candidate = _random_sprite(generator, split, background, taken)
            if anchors == "caption":
                candidate = caption_anchor(candidate, len(sprites), count)
            if layout_problem(sprites + (candidate,), background) is None:
                sprites += (candidate,)
            if len(sprites) == count:
                return Scene(sprites, background)
