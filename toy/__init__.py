"""The toy sprite world the miniature Wan is pretrained on (world.py), the oracle that scores clips
of it (oracle.py), and the script that renders the example concepts' videos (make_assets.py).

The scripts fall back to the toy when no --model is given; these paths are resolved from the
project folder, so the defaults work from any working directory.
"""
import json
import os

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(PROJECT, "toy", "checkpoint")            # the pretrained toy Wan (toy/pretrain.py)
CONCEPTS_FILE = os.path.join(PROJECT, "assets", "concepts.json")  # the example concepts (toy/make_assets.py)


def example_concepts() -> list[dict]:
    """The toy world's example dynamic concepts: video file (absolute), prompts, tokens, edits."""
    with open(CONCEPTS_FILE) as f:
        concepts = json.load(f)
    for concept in concepts:
        concept["file"] = os.path.join(os.path.dirname(CONCEPTS_FILE), concept["file"])
    return concepts
