"""What train.py keeps around its loop: the steps and training defaults per stage and model, the
learning-rate schedule, the resume state, the loss plot.

A resumed run must continue bit-exactly: its state holds the adapter tensors (only what trains),
AdamW's moments and every random stream a step draws from (noise, sigmas and text masks from one
CPU generator shared by all ranks; each rank's DropConnect masks from its global RNG). The loss
log itself is train.py's JSONL file; plot_losses draws it as SVG, with no plotting library.
"""
import json
import math
import sys

import torch

from lora.lora import adapter_state_dict
from model.files import atomic_path
from model.parallel import Ranks, gather

# Steps per stage (docs/method.md: the paper's 600 and 900; stage single gets their sum, same total work).
DEFAULT_STEPS = {"set": 600, "sequence": 900, "single": 1500}

# Training defaults per base model id (a flag given wins: hyperparameters). Wan: the paper's values
# (docs/method.md), its batch of 8 as 1 sample at a time x 8 accumulated. The toy's were measured on the toy world
# (docs/toy-model.md, "The quick start on the new base"): Adam moves a 128-wide layer far less than a
# 1536-wide one, hence the larger rate; the paper's prior weight, but lighter DropConnect and no text
# masking: with the paper's, the concept's own prompt drew its motion in 5 of 8 samples instead of 8 of 8.
TRAINING_DEFAULTS = {
    "paper": {"rank": 8, "lr": 1e-4, "batch": 1, "grad_accum": 8, "text_mask": 0.1, "drop_set": 0.8,
              "drop_sequence": 0.5, "prior_weight": 1.0},
    "toy": {"rank": 32, "lr": 3e-3, "batch": 8, "grad_accum": 1, "text_mask": 0.0, "drop_set": 0.3,
            "drop_sequence": 0.2, "prior_weight": 1.0},
}


def hyperparameters(model_id: str, flags: dict) -> tuple[dict, str]:
    """The model's TRAINING_DEFAULTS overridden by the flags given (not None), and a line saying whose
    defaults they are: a model without its own, e.g. a retrained toy whose config is not PRESETS["toy"]
    (latent statistics included), gets the paper's."""
    own = model_id in TRAINING_DEFAULTS
    defaults = TRAINING_DEFAULTS[model_id if own else "paper"]
    values = ", ".join(f"{k} {v}" for k, v in defaults.items())
    whose = "its own" if own else "the paper's"
    note = f"training defaults for {model_id}: {whose} ({values}); a flag given wins"
    return {**defaults, **{k: v for k, v in flags.items() if k in defaults and v is not None}}, note


def learning_rate(step: int, steps: int, peak: float, schedule: str, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then constant or a cosine decay to 0 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
    return peak


def plot_losses(log_path: str, svg_path: str, width: int = 640, height: int = 240) -> None:
    """The loss log as an SVG line plot (each step, and its mean over 20 steps), no plotting library."""
    with open(log_path) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    if len(losses) < 2:
        return
    smooth = [sum(losses[max(0, i - 19):i + 1]) / len(losses[max(0, i - 19):i + 1]) for i in range(len(losses))]
    low, high = min(losses), max(losses)
    x = lambda i: 40 + i * (width - 50) / (len(losses) - 1)                   # noqa: E731
    y = lambda v: height - 25 - (v - low) * (height - 40) / max(high - low, 1e-12)  # noqa: E731
    line = lambda values, style: (f'<polyline fill="none" {style} points="'   # noqa: E731
                                  + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values)) + '"/>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + line(losses, 'stroke="#bbb"') + line(smooth, 'stroke="#c33" stroke-width="2"')
           + f'<text x="40" y="12">loss per step (grey) and its mean over 20 steps (red), steps 1-{len(losses)}</text>'
           + f'<text x="2" y="{y(high) + 4:.0f}">{high:.3g}</text><text x="2" y="{y(low):.0f}">{low:.3g}</text></svg>')
    with atomic_path(svg_path) as tmp, open(tmp, "w") as f:
        f.write(svg)


def rng_states(noise_gen: torch.Generator, ranks: Ranks) -> dict:
    """The random streams a step draws from: noise/sigmas/text masks (the same on every rank), and
    each rank's own DropConnect masks (every rank calls this: it gathers them)."""
    states = {"noise_gen": noise_gen.get_state(), "rng": gather(torch.get_rng_state(), ranks)}
    if torch.cuda.is_available():
        states["cuda_rng"] = gather(torch.cuda.get_rng_state(), ranks)   # DropConnect masks on the GPU
    return states


def save_state(path: str, step: int, model, optimizer, rng: dict, losses: list[float]) -> None:
    """Everything a resumed run needs to continue bit-exactly, written atomically."""
    state = {"step": step, "adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
             "losses": losses, **rng}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_hint(state_path: str, step: int, run_dir: str) -> str:
    """What an interrupted run says: where its state is and the command that continues it."""
    again = [a for a in sys.argv[1:] if a != "--resume"]
    again += [] if "--run-dir" in again else ["--run-dir", run_dir]
    return (f"\ninterrupted at step {step}; saved {state_path}. Continue with:\n"
            f"  python train.py {' '.join(again)} --resume")


def load_state(path: str, model, optimizer, noise_gen: torch.Generator, ranks: Ranks) -> tuple[int, list[float]]:
    """Restore what save_state wrote (adapter, AdamW, random streams); the step to go on from and the losses."""
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for key, tensor in state["adapter"].items():
            model.get_parameter(key).copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) != ranks.world:
        raise ValueError(f"{path} was written by a run of {len(state['rng'])} processes, this one has "
                         f"{ranks.world}: resume with --nproc-per-node {len(state['rng'])} (the samples of a "
                         "step are split by the number of processes)")
    noise_gen.set_state(state["noise_gen"])
    torch.set_rng_state(state["rng"][ranks.rank])          # this rank's DropConnect masks
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"][ranks.rank])
    return state["step"], state["losses"]
