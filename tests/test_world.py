"""The sprite world (toy/world.py) and its oracle (toy/oracle.py): split, determinism, and that the
oracle tells true renders from wrong ones, also through noise and blur."""
import json
import os
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from video import read_video
from toy import concepts, oracle, world

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")

CHECKS = ("background_ok", "colour_ok", "motion_ok")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The oracle runs thousands of ops on small tensors: on a shared 2-core machine, handing each one to
    a second thread costs more than it saves (5-10x slower under load), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scenes(count: int, seed: int, split: str = "train") -> list[world.Scene]:
    generator = torch.Generator().manual_seed(seed)
    return [world.random_scene(generator, split) for _ in range(count)]


def _held_out_phrases() -> list[str]:
    """Every held-out name, and the caption phrase of every held-out motion."""
    phrases = []
    for kind, names in world.HELD_OUT.items():
        phrases += [world.MOTIONS[n] if kind == "motion" else n for n in names]
    return phrases


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def _corrupt(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A [1 2 1]/4 blur in x and y, then gaussian noise of std 0.05; returned as (T, 3, H, W) in [-1, 1]."""
    x = video.permute(0, 3, 1, 2).float() / 255                                  # (T, 3, H, W)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + 0.05 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1) * 2 - 1


def _single(sprite: world.Sprite, background: str) -> world.Scene:
    """The sprite alone, anchored at the centre, where every motion fits."""
    return world.Scene((replace(sprite, x=0.5, y=0.5),), background)


# ----------------------------------------------------------------------------- the world

def test_render_is_deterministic():
    """The same seed gives the same scenes, and the same scene renders to the same bytes."""
    first, second = _scenes(5, seed=3), _scenes(5, seed=3)
    assert first == second
    for scene in first:
        video = world.render(scene)
        assert video.shape == (world.NUM_FRAMES, world.FRAME_SIZE, world.FRAME_SIZE, 3)
        assert video.dtype == torch.uint8
        assert torch.equal(video, world.render(scene))


def test_render_ignores_last_bit_differences(monkeypatch):
    """Motion paths a few ulps off (another CPU's sin, cos or summation order) render to the same bytes."""
    # 60 scenes: with float32 geometry, 4 ulps changed the bytes of two of them
    scenes = _scenes(60, seed=11) + [c.scene for c in concepts.CONCEPTS.values()]
    expected = [world.render(scene) for scene in scenes]
    path = world.motion_path
    for ulps in (4, -4):
        def nudged(motion, t, ulps=ulps):
            values = []
            for value in path(motion, t):
                for _ in range(abs(ulps)):
                    value = torch.nextafter(value, value + ulps)
                values.append(value)
            return tuple(values)
        monkeypatch.setattr(world, "motion_path", nudged)
        for scene, video in zip(scenes, expected):
            assert torch.equal(world.render(scene), video), (ulps, world.caption(scene))


def test_train_scenes_and_captions_hold_nothing_out():
    """500 train scenes use no held-out attribute, and their captions mention no held-out word."""
    phrases = _held_out_phrases()
    for scene in _scenes(500, seed=0):
        for sprite in scene.sprites:
            assert sprite.colour not in world.HELD_OUT["colour"] and sprite.colour2 not in world.HELD_OUT["colour"]
            assert sprite.shape not in world.HELD_OUT["shape"]
            assert sprite.pattern not in world.HELD_OUT["pattern"]
            assert sprite.motion not in world.HELD_OUT["motion"]
        for text in (world.caption(scene), world.image_caption(scene)):
            assert not [p for p in phrases if _mentions(text, p)], text


def test_image_captions_have_no_motion_words():
    """A frame's caption names no motion; the video caption names every sprite's motion."""
    for scene in _scenes(50, seed=1):
        assert not [m for m in world.MOTIONS.values() if m in world.image_caption(scene)]
        assert all(world.MOTIONS[s.motion] in world.caption(scene) for s in scene.sprites)


def test_concepts_are_held_out_and_their_prompts_use_tokens():
    """Each concept has a held-out look and motion; every prompt hides them behind its own rare tokens."""
    phrases = _held_out_phrases()
    train_words = {w for s in _scenes(200, seed=2) for w in (world.caption(s) + " " + world.image_caption(s)).split()}
    tokens = [t for c in concepts.CONCEPTS.values() for t in (c.identity_token, c.motion_token)]
    assert len(set(tokens)) == len(tokens) and not set(tokens) & train_words
    for concept in concepts.CONCEPTS.values():
        sprite = concept.sprite
        assert sprite.motion in world.HELD_OUT["motion"]
        assert (sprite.shape in world.HELD_OUT["shape"] or sprite.pattern in world.HELD_OUT["pattern"]
                or set(sprite.colours) & set(world.HELD_OUT["colour"]))
        assert concept.motion_prompt.startswith(concept.static_prompt.split(" on a ")[0])
        prompts = [concept.static_prompt, concept.motion_prompt] + [e.prompt for e in concept.edits]
        for prompt in prompts:
            assert concept.identity_token in prompt.split()
            assert not [p for p in phrases if _mentions(prompt, p)], prompt
        assert concept.motion_token in concept.motion_prompt.split()
        assert {e.kind for e in concept.edits} == {"background", "composition", "motion"}


def test_text_corpus_covers_captions_and_tokens():
    """The tokenizer corpus holds train captions and every concept's tokens and prompts."""
    corpus = concepts.text_corpus(50)
    words = {w for line in corpus for w in line.split()}
    for concept in concepts.CONCEPTS.values():
        assert {concept.identity_token, concept.motion_token} <= words
        assert concept.motion_prompt in corpus and all(e.prompt in corpus for e in concept.edits)


def test_the_caption_fixes_the_layout():
    """The motion design's scenes (anchors 'caption') put a lone sprite at the centre and two at opposite
    corners of their anchor ranges, so a caption fixes where every sprite starts; 'random' (the default)
    goes anywhere. Every kind of sprite gets placed: none is lost to a corner that rounding puts outside."""
    generator = torch.Generator().manual_seed(5)
    scenes = [world.random_scene(generator, anchors="caption") for _ in range(200)]
    assert {len(s.sprites) for s in scenes} == {1, 2}
    for scene in scenes:
        if len(scene.sprites) == 1:
            assert (scene.sprites[0].x, scene.sprites[0].y) == (0.5, 0.5)
        else:
            first, second = scene.sprites          # a quarter pixel inside the corners
            low_x, _, low_y, _ = world.anchor_range(first)
            _, high_x, _, high_y = world.anchor_range(second)
            assert 0 <= first.x - low_x <= 1 / 256 and 0 <= first.y - low_y <= 1 / 256
            assert 0 <= high_x - second.x <= 1 / 256 and 0 <= high_y - second.y <= 1 / 256
        # the anchors follow from the words: the same sprites drawn anywhere else get them back
        moved = tuple(replace(s, x=0.3, y=0.6) for s in scene.sprites)
        assert tuple(world.caption_anchor(s, i, len(moved)) for i, s in enumerate(moved)) == scene.sprites
    two = [s for scene in scenes if len(scene.sprites) == 2 for s in scene.sprites]
    assert any(s.shape == "square" and s.size == "large" and s.motion not in ("still", "pulse") for s in two)
    lone = [s for s in (world.random_scene(generator) for _ in range(50)) if len(s.sprites) == 1]
    assert len({(s.sprites[0].x, s.sprites[0].y) for s in lone}) > len(lone) // 2
    with pytest.raises(ValueError, match="anchors"):
        world.random_scene(generator, anchors="centre")


def test_bad_scenes_are_refused():
    """Scenes the oracle could not read raise: invisible colour, leaving the frame, overlapping, shared colour."""
    with pytest.raises(ValueError, match="stand out"):
        world.Scene((world.Sprite("circle", "blue"),), "blue")
    with pytest.raises(ValueError, match="leaves the frame"):
        world.Scene((world.Sprite("circle", "red", motion="left", x=0.1),), "black")
    with pytest.raises(ValueError, match="overlap"):
        world.Scene((world.Sprite("circle", "red"), world.Sprite("square", "green", x=0.55)), "black")
    with pytest.raises(ValueError, match="share a colour"):
        world.Scene((world.Sprite("circle", "red", x=0.25), world.Sprite("square", "red", x=0.75)), "black")


# ----------------------------------------------------------------------------- the oracle on true clips

def test_oracle_reads_true_renders_correctly():
    """On 100 clean train renders the oracle gets background, colours, pattern, shape and motion all right."""
    wrong = []
    for scene in _scenes(100, seed=11):
        result = oracle.score(world.render(scene), scene)
        wrong += [(world.caption(scene), k) for k in CHECKS + ("pattern_ok", "shape_ok") if not result[k]]
        assert result["identity_score"] > 0.99 and result["motion_score"] > 0.85
        assert result["presence"] == 1 and result["temporal_consistency"] > 0.999
    assert not wrong


def test_oracle_ignores_last_bit_differences(monkeypatch):
    """A fitted background a few float32 ulps off per pixel (another CPU's LAPACK) still reads true renders
    at identity > 0.99: no pixel of a clean render sits on a threshold that the last bit decides."""
    scenes = _scenes(25, seed=11)        # among them, edges exactly half covered (even colour steps)
    fit, eps = oracle.fit_background, torch.finfo(torch.float32).eps
    for ulps in (4, -4):
        generator = torch.Generator().manual_seed(0)
        def nudged(*args, ulps=ulps, generator=generator):
            background = fit(*args)
            return background * (1 + ulps * eps * torch.rand(background.shape, generator=generator))
        monkeypatch.setattr(oracle, "fit_background", nudged)
        for scene in scenes:
            assert oracle.score(world.render(scene), scene)["identity_score"] > 0.99, (ulps, world.caption(scene))


def test_oracle_reads_concepts_and_edits_correctly():
    """Every concept video and every edit's target scene reads back as exactly its scene."""
    for concept in concepts.CONCEPTS.values():
        for scene in [concept.scene] + [e.scene for e in concept.edits]:
            result = oracle.score(world.render(scene), scene)
            assert all(result[k] for k in CHECKS + ("pattern_ok", "shape_ok")), world.caption(scene)


def test_oracle_tolerates_noise_and_blur():
    """Blurred renders with noise (std 0.05) still read as the right background, colours and motion."""
    generator = torch.Generator().manual_seed(0)
    scenes = _scenes(20, seed=5) + [c.scene for c in concepts.CONCEPTS.values()]
    for scene in scenes:
        result = oracle.score(_corrupt(world.render(scene), generator), scene)
        assert all(result[k] for k in CHECKS), (world.caption(scene), result)
        assert result["identity_score"] > 0.35 and result["motion_score"] > 0.8


def test_input_conventions_agree():
    """A uint8 (T, H, W, 3) clip and its (T, 3, H, W) [-1, 1] float twin score the same; MSE to itself is 0."""
    scene = concepts.CONCEPTS["teal_checkered_figure_eight"].scene
    video = world.render(scene)
    a, b = oracle.score(video, scene, reference=video), oracle.score(world.to_pixels(video), scene, reference=video)
    assert a["identity_score"] == pytest.approx(b["identity_score"], abs=1e-4)
    assert a["motion_score"] == pytest.approx(b["motion_score"], abs=1e-4)
    assert a["mse"] == 0 and b["mse"] == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------- the oracle on wrong clips

def test_wrong_colour_scores_wrong():
    """The same scene with the first sprite in other colours fails colour_ok, its identity falls below 0.3."""
    for scene in _scenes(12, seed=21):
        sprite = scene.sprites[0]
        taken = {c for s in scene.sprites for c in s.colours}
        others = [c for c in world.vocabulary("colour") if c not in taken
                  and world.layout_problem((replace(sprite, colour=c, pattern="plain", colour2=None),),
                                           scene.background) is None]
        recoloured = replace(sprite, colour=others[0], pattern="plain", colour2=None)
        clip = world.render(world.Scene((recoloured,) + scene.sprites[1:], scene.background))
        result = oracle.score(clip, scene)
        assert not result["colour_ok"] and result["sprites"][0]["identity_score"] < 0.3


def test_wrong_background_scores_wrong():
    """The same sprites on another background fail background_ok."""
    for scene in _scenes(12, seed=22):
        for background in world.vocabulary("background"):
            if background != scene.background and world.layout_problem(scene.sprites, background) is None:
                result = oracle.score(world.render(world.Scene(scene.sprites, background)), scene)
                assert not result["background_ok"]
                break


def test_wrong_motion_scores_wrong():
    """The same sprite doing any other motion fails motion_ok, and its motion score drops clearly."""
    for scene in _scenes(4, seed=23):
        target = _single(scene.sprites[0], scene.background)
        true_score = oracle.score(world.render(target), target)["motion_score"]
        for motion in world.vocabulary("motion", "all"):
            if motion == target.sprites[0].motion:
                continue
            moved = replace(target, sprites=(replace(target.sprites[0], motion=motion),))
            result = oracle.score(world.render(moved), target)
            assert not result["motion_ok"], (world.caption(target), motion)
            assert result["motion_score"] < true_score - 0.3, (world.caption(target), motion)


def test_frozen_clip_is_not_motion():
    """The first frame repeated does not match a moving sprite: motion_ok fails, motion score < 0.5."""
    scenes = [s for s in _scenes(20, seed=24) if s.sprites[0].motion != "still"][:10]
    for scene in scenes + [c.scene for c in concepts.CONCEPTS.values()]:
        video = world.render(scene)
        moving = oracle.score(video[:1].expand_as(video).clone(), scene)["sprites"][0]
        assert not moving["motion_ok"] and moving["motion_score"] < 0.5, world.caption(scene)


def test_noise_scores_as_nothing():
    """Uniform noise scores near zero on identity and motion for any scene."""
    generator = torch.Generator().manual_seed(0)
    for scene in _scenes(6, seed=25) + [c.scene for c in concepts.CONCEPTS.values()]:
        noise = torch.randint(0, 256, (17, 64, 64, 3), dtype=torch.uint8, generator=generator)
        result = oracle.score(noise, scene)
        assert result["identity_score"] < 0.1 and result["motion_score"] < 0.1
        assert not (result["colour_ok"] and result["motion_ok"])


def test_two_sprites_are_checked_separately():
    """In a composition edit, a missing companion or a companion doing another motion fails that sprite only."""
    for concept in concepts.CONCEPTS.values():
        composed = next(e.scene for e in concept.edits if e.kind == "composition")
        alone = world.render(world.Scene(composed.sprites[:1], composed.background))
        result = oracle.score(alone, composed)
        assert [s["presence"] for s in result["sprites"]] == [1.0, 0.0] and not result["colour_ok"]
        concept, companion = composed.sprites
        others = [replace(companion, motion=m) for m in world.vocabulary("motion") if m != companion.motion]
        moved = next(world.Scene((concept, c), composed.background) for c in others
                     if world.layout_problem((concept, c), composed.background) is None)
        result = oracle.score(world.render(moved), composed)
        assert [s["motion_ok"] for s in result["sprites"]] == [True, False]
        assert all(s["colour_ok"] for s in result["sprites"])


def test_assets_match_the_concepts():
    """assets/ (python -m toy.make_assets) holds each concept's prompts and a video that reads back as its render."""
    with open(os.path.join(ASSETS, "concepts.json")) as f:
        entries = {e["name"]: e for e in json.load(f)}
    assert set(entries) == set(concepts.CONCEPTS)
    for name, concept in concepts.CONCEPTS.items():
        entry = entries[name]
        assert (entry["static_prompt"], entry["motion_prompt"]) == (concept.static_prompt, concept.motion_prompt)
        assert [e["prompt"] for e in entry["edits"]] == [e.prompt for e in concept.edits]
        clip = read_video(os.path.join(ASSETS, entry["file"]), world.FPS, 64, 64, world.NUM_FRAMES)
        assert oracle.score(clip, concept.scene, reference=world.render(concept.scene))["mse"] < 1e-4
