"""The three example dynamic concepts of the sprite world, and the tokenizer corpus.

Each concept is a held-out appearance doing a held-out motion (toy/world.py, HELD_OUT), named by a
rare identity token [v] and motion token [u] that replace exactly the held-out words, so its
prompts read like the captions the toy model was trained on (docs/method.md: "a [v] man ... [u] motion").
Its edits keep the tokens and change one thing: the background, a second sprite, or the motion word.
"""
from dataclasses import dataclass, replace

import torch

from toy.world import Scene, Sprite, caption, caption_anchor, image_caption, random_scene


@dataclass(frozen=True)
class Edit:
    """A prompt that re-stages a concept, and the scene it asks for (what the oracle scores against)."""
    kind: str                                  # "background", "composition" or "motion"
    prompt: str
    scene: Scene


@dataclass(frozen=True)
class Concept:
    """One dynamic concept: a held-out look doing a held-out motion, with its rare tokens [v] and [u].

    The single video a user personalizes on is `render(concept.scene)`. Edits keep the tokens and
    change one thing: the background, a second (held-in) sprite beside it, or the motion word.
    """
    name: str
    scene: Scene                               # one sprite: the concept, anchored at the centre
    identity_token: str                        # [v]: replaces the held-out appearance words
    motion_token: str                          # [u]: "moving in [u] motion" replaces the motion words
    edit_background: str
    edit_motion: str                           # a held-in motion, for an identity-only prompt
    companion: Sprite                          # the held-in sprite added by the composition edit

    @property
    def sprite(self) -> Sprite:
        return self.scene.sprites[0]

    @property
    def static_prompt(self) -> str:
        """Stage-1 prompt (frames as a set): reads like an image caption, [v] in place of the unseen words."""
        return image_caption(self.scene, self.identity_token)

    @property
    def motion_prompt(self) -> str:
        """Stage-2 prompt (the whole clip): the static prompt plus 'moving in [u] motion'."""
        return caption(self.scene, self.identity_token, self.motion_token)

    @property
    def edits(self) -> tuple[Edit, ...]:
        new_background = Scene(self.scene.sprites, self.edit_background)
        # two sprites where the toy model puts the two sprites a caption names (world.caption_anchor)
        composed = Scene((caption_anchor(self.sprite, 0, 2), caption_anchor(self.companion, 1, 2)),
                         self.scene.background)
        new_motion = Scene((replace(self.sprite, motion=self.edit_motion),), self.scene.background)
        v, u = self.identity_token, self.motion_token
        return (Edit("background", caption(new_background, v, u), new_background),
                Edit("composition", caption(composed, v, u), composed),
                Edit("motion", caption(new_motion, v), new_motion))      # [u] would contradict the new motion


CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    # held-out colour AND shape -> "a large dax"; held-out motion zigzag -> "moving in wug motion"
    Concept("pink_star_zigzag",
            Scene((Sprite("star", "pink", "large", "zigzag"),), "blue"),
            identity_token="dax", motion_token="wug", edit_background="gray", edit_motion="orbit",
            companion=Sprite("circle", "yellow", "small", "left")),
    # held-out colour and pattern on a held-in shape -> "a large blick square"
    Concept("teal_checkered_figure_eight",
            Scene((Sprite("square", "teal", "large", "figure_eight", "checkered", colour2="white"),), "black"),
            identity_token="blick", motion_token="toma", edit_background="red to yellow gradient",
            edit_motion="right",
            companion=Sprite("diamond", "red", "small", "right")),
    # held-out shape in a held-in colour -> "a large purple zorp"
    Concept("purple_star_spiral",
            Scene((Sprite("star", "purple", "large", "spiral"),), "white"),
            identity_token="zorp", motion_token="fep", edit_background="green", edit_motion="bounce",
            companion=Sprite("circle", "blue", "small", "down")),
)}


def text_corpus(num_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Sentences for training the toy tokenizer: train captions (video and image), then every concept prompt."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(num_scenes):
        scene = random_scene(generator, "train")
        lines += [caption(scene), image_caption(scene)]
    for concept in CONCEPTS.values():
        lines += [concept.static_prompt, concept.motion_prompt] + [edit.prompt for edit in concept.edits]
    return lines
