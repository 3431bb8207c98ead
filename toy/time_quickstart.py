"""Time the README's quick start on this machine, as a fresh clone would run it.

    python -m toy.time_quickstart                                   # in a temporary folder, removed after
    python -m toy.time_quickstart --run-dir runs/pink_star_zigzag   # keep the adapters (for toy.make_strip)

Runs the three commands with their defaults (the toy model, the first example concept, its
first edit prompt) as separate processes, the way a user types them, in a fresh run folder
(no cached latents, text states or prior samples), and prints each wall-clock time next to
the budget of the toy-world issue: set <= 5 min, sequence <= 5 min, sample <= 1 min.

    python -m toy.time_quickstart --seeds 4                         # then sample seeds 0-3 and score them

--seeds N runs `python sample.py --seed k` for k < N on the same adapter and lets the oracle read
each video file the way a user would see it: the concept's own prompt (left panel) and the same
prompt on the gray background (right panel): motion label, colour and background per seed.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import av
import numpy as np
import torch

from toy import concepts, oracle

BUDGET_S = {"set": 300, "sequence": 300, "sample": 60}


def timed(name: str, command: list[str]) -> float:
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return seconds


def main(args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="quickstart-")
    try:
        run = args.run_dir or os.path.join(root, "run")
        if os.path.exists(run):
            shutil.rmtree(run)          # a fresh run: no cached latents, text states or prior samples
        out = os.path.join(root, "sample.mp4")
        python = sys.executable
        commands = {"set": [python, "train.py", "--stage", "set", "--run-dir", run],
                    "sequence": [python, "train.py", "--stage", "sequence", "--run-dir", run],
                    "sample": [python, "sample.py", "--adapter", os.path.join(run, "sequence.safetensors"),
                               "--out", out]}
        times = {name: timed(name, command) for name, command in commands.items()}
        concept = next(iter(concepts.CONCEPTS.values()))          # what sample.py draws without --prompt
        scores = [score_seed(seed, commands["sample"], out, concept) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    print(f"quick start on {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| command | seconds | budget |")
    print("|---|---|---|")
    shown = {"set": "python train.py --stage set", "sequence": "python train.py --stage sequence",
             "sample": "python sample.py"}
    for name, seconds in times.items():
        verdict = "ok" if seconds <= BUDGET_S[name] else "OVER"
        print(f"| `{shown[name]}` | {seconds:.0f} | <= {BUDGET_S[name]} ({verdict}) |")
    if scores:
        print(f"\nthe oracle on `python sample.py --seed k` (asked: {concept.sprite.motion}, {concept.sprite.colour})")
        print("| seed | own prompt: motion, colour right | gray background: motion, colour right, background right |")
        print("|---|---|---|")
        for seed, (own, edit) in enumerate(scores):
            print(f"| {seed} | {own['sprites'][0]['motion']}, {_yes(own['colour_ok'])} | "
                  f"{edit['sprites'][0]['motion']}, {_yes(edit['colour_ok'])}, {_yes(edit['background_ok'])} |")
        for name, which in (("own prompt", 0), ("gray background", 1)):
            right = sum(bool(pair[which]["motion_ok"]) for pair in scores)
            print(f"{name}: the concept's motion in {right} of {len(scores)} seeds")


def _yes(flag) -> str:
    return "yes" if flag else "no"


def score_seed(seed: int, sample: list[str], out: str, concept: concepts.Concept) -> tuple[dict, dict]:
    """Sample with noise seed `seed` and score the file's two panels against the concept's scene and its
    first edit's (the gray background). av decodes the file as written: read_video would resize the
    two-panel strip (130 px wide) to a multiple of 16."""
    timed(f"sample --seed {seed}", sample + ["--seed", str(seed)])
    with av.open(out) as container:
        video = torch.from_numpy(np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]))
    size = video.shape[1]                               # (T, H, 2 H + 2, 3): two square panels, a 2 px gap
    return (oracle.score(video[:, :, :size].contiguous(), concept.scene),
            oracle.score(video[:, :, -size:].contiguous(), concept.edits[0].scene))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="run folder to (re)create and keep (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=0, help="then sample and score this many noise seeds")
    main(parser.parse_args())
