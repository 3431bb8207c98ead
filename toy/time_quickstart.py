"""Time the README's quick start on this machine, as a fresh clone would run it.

    python -m toy.time_quickstart                                   # in a temporary folder, removed after
    python -m toy.time_quickstart --run-dir runs/pink_star_zigzag   # keep the adapters (for toy.make_strip)

Runs the three commands with their defaults (the toy model, the first example concept, its
first edit prompt) as separate processes, the way a user types them, in a fresh run folder
(no cached latents, text states or prior samples), and prints each wall-clock time next to
the budget of the toy-world issue: set <= 5 min, sequence <= 5 min, sample <= 1 min.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="run folder to (re)create and keep (default: a temporary one)")
    main(parser.parse_args())
