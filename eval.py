"""Measure Set-and-Sequence against its ablations on the toy world, with the world's oracle.

    python eval.py               # 3 concepts x 10 rows x 2 seeds + composition: 56 runs, 47 min on 2 cores
    python eval.py --seeds 1     # a quick look (about half the time)
    python eval.py --write-docs  # also write the tables and plot into docs/results.md
    python eval.py --only-composition   # composition with and without the stitched pairs: 4 runs

The paper's claim (docs/method.md): two stages, set then sequence, keep identity and motion while
following edit prompts better than a one-stage LoRA of the same rank trained on the video (the
paper's DB-LoRA row), and the regularizers improve that trade-off. Every variant below trains
on each example concept of assets/ (toy/concepts.py) with train.py, then samples the concept's
motion prompt and its three edits (another background, a second sprite, another motion word)
with sample.py's sampler (model/pipeline.py), and toy/oracle.py scores each clip against the
scene its prompt asks for:

  MSE     motion prompt only: mean squared error against the input clip (RGB in [0, 1])   lower is better
  ID      the concept sprite's identity score (colour fidelity x balance x shape IoU) in the FIRST frame,
          all 4 prompts (the toy VAE keeps appearance crispest there: its later 4-frame chunks blur
          more even for true clips, see the `vae` row, so an all-frames score would measure the VAE)
  Motion  the concept sprite's motion score (presence x trajectory match), the 3 prompts that keep [u]
  Edit    the edit is there: the new background / the second sprite in its colour and motion / the new
          motion (oracle's nearest-motion label), each 0 or 1, mean of the three (the parts are also shown)
  TC      temporal consistency: 1 - mean frame-to-frame change of the background pixels, all 4 prompts
Like the paper's MSE / ID / C-T / TC, computed by the renderer's ground truth instead of CLIP/DINO.

Composition: two concepts trained jointly (one shared adapter: train.py with two --video) and
prompted together; the oracle looks for both identities and both motions in one clip.

Each (concept, variant, seed) is one job: its run folder under --out-dir keeps the adapters and a
result.json, so an interrupted evaluation resumes where it stopped and a finished one only re-tabulates.
Jobs run in --workers processes of one thread each (deterministic: same seeds, same numbers).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from multiprocessing import get_context

import torch
from tqdm import tqdm

from lora.lora import apply_adapters
from lora.training import DEFAULT_STEPS
from model.files import atomic_path, write_section
from model.loader import load_wan
from model.pipeline import generate_videos, initial_noise
from toy import oracle, world
from toy.concepts import CONCEPTS

PROJECT = os.path.dirname(os.path.abspath(__file__))
RESULTS = "docs/results.md"   # --write-docs fills its section between the eval markers
BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"
NO_REG = ("--drop", "0", "--text-mask", "0", "--prior-weight", "0")
PAPER_REG = ("--text-mask", "0.1", "--prior-weight", "1")   # with --drop 0.8 (set) / 0.5 (sequence): docs/method.md

# variant -> (what it is, the train.py runs (stage, extra flags), the adapter file sampled; None = base model)
VARIANTS: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...], str | None]] = {
    "vae": ("the true clips through the VAE: the ceiling of every row", (), "<vae>"),
    "base": ("the base model, no adapter (the tokens mean nothing to it)", (), None),
    "single": ("one-stage LoRA on the clip, 1500 steps (the paper's DB-LoRA)", (("single", ()),),
               "single.safetensors"),
    "set": ("stage set only (identity, no motion residual)", (("set", ()),), "set.safetensors"),
    "no_reg": ("set + sequence, no DropConnect, text masking or prior",
               (("set", NO_REG), ("sequence", NO_REG)), "sequence.safetensors"),
    "ours": ("set + sequence, the model's default regularization", (("set", ()), ("sequence", ())),
             "sequence.safetensors"),
    "paper_reg": ("set + sequence, the paper's regularization strengths",
                  (("set", ("--drop", "0.8", *PAPER_REG)), ("sequence", ("--drop", "0.5", *PAPER_REG))),
                  "sequence.safetensors"),
    "rank1": ("as ours, rank 1", (("set", ("--rank", "1")), ("sequence", ())), "sequence.safetensors"),
    "rank8": ("as ours, rank 8 (the paper's; the toy's default is 32)", (("set", ("--rank", "8")), ("sequence", ())),
              "sequence.safetensors"),
    "input_basis": ("as ours, the basis on the input side", (("set", ("--basis-side", "input")), ("sequence", ())),
                    "sequence.safetensors"),
    "no_pairs": ("as ours, without the stitched two-concept clips (composition only)",
                 (("set", ()), ("sequence", ("--composition-weight", "0"))), "sequence.safetensors"),
}
COMPOSITION = ("ours", "no_pairs")   # the variants a composition job trains; no_pairs trains nothing else
SHARED_RUN = {"set": "ours"}   # "set" is the first half of "ours": sample its set.safetensors, train nothing


@dataclass(frozen=True)
class Job:
    """One training run (one or two concepts, one seed) and the variants sampled from it."""
    name: str                                  # run folder under --out-dir
    concepts: tuple[str, ...]                  # toy/concepts.py names; two = composition
    seed: int
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    samples: tuple[tuple[str, str | None], ...]  # (variant, adapter file in the run folder or None)


def make_jobs(concept_names: list[str], variants: list[str], seeds: int, composition: bool) -> list[Job]:
    jobs = []
    for seed in range(seeds):
        for concept in concept_names:
            runs: dict[str, list[str]] = {}
            for variant in (v for v in variants if v != "no_pairs"):
                runs.setdefault(SHARED_RUN.get(variant, variant), []).append(variant)
            for run, sampled in runs.items():
                samples = tuple((v, VARIANTS[v][2]) for v in sampled)
                jobs.append(Job(f"{concept}/{run}/seed{seed}", (concept,), seed, VARIANTS[run][1], samples))
        if composition:
            pair = composition_pair()
            for variant in [v for v in COMPOSITION if v in variants] or ["ours"]:
                jobs.append(Job(f"composition/{'+'.join(pair)}/{variant}/seed{seed}", pair, seed,
                                VARIANTS[variant][1], ((variant, "sequence.safetensors"),)))
    # the longest jobs first (by train.py's default steps per stage), so the workers finish together
    return sorted(jobs, key=lambda j: -sum(DEFAULT_STEPS[s] for s, _ in j.stages) * len(j.concepts))


# ---------------------------------------------------------------------------- the prompts and their scenes

def composition_pair() -> tuple[str, str]:
    names = list(CONCEPTS)
    return names[1], names[2]   # teal checkered square (blick, toma) and purple star (zorp, fep)


def composition_scene(pair: tuple[str, ...]):
    """The two concepts in one scene, both small (two large moving sprites cannot share a 64x64 frame
    without touching), on the first concept's own background, where the toy model puts the two
    sprites a caption names (world.caption_anchor; Scene checks that the layout is clean)."""
    first, second = (replace(CONCEPTS[name].sprite, size="small") for name in pair)
    return world.Scene((world.caption_anchor(first, 0, 2), world.caption_anchor(second, 1, 2)),
                       CONCEPTS[pair[0]].scene.background)


def composition_prompt(pair: tuple[str, ...], scene) -> str:
    """'a small blick square moving in toma motion and a small purple zorp moving in fep motion on a black background'."""
    parts = [f"{world.subject(sprite, CONCEPTS[name].identity_token)} moving in {CONCEPTS[name].motion_token} motion"
             for name, sprite in zip(pair, scene.sprites)]
    return f"{' and '.join(parts)} on a {scene.background} background"


def prompts_of(job: Job) -> list[tuple[str, str, object]]:
    """(kind, prompt, scene) to sample: the motion prompt and the three edits, or the composition prompt."""
    if len(job.concepts) == 2:
        scene = composition_scene(job.concepts)
        return [("composition", composition_prompt(job.concepts, scene), scene)]
    concept = CONCEPTS[job.concepts[0]]
    return [("motion_prompt", concept.motion_prompt, concept.scene)] + [
        (edit.kind, edit.prompt, edit.scene) for edit in concept.edits]


# ---------------------------------------------------------------------------- one job (in a worker process)

def concept_flags(name: str) -> list[str]:
    concept = CONCEPTS[name]
    return ["--video", os.path.join("assets", f"{name}.mp4"), "--prompt", concept.static_prompt,
            "--motion-prompt", concept.motion_prompt, "--id-token", concept.identity_token,
            "--motion-token", concept.motion_token]


@torch.no_grad()
def sample_and_score(model_dir: str, adapter: str | None, prompts: list[tuple[str, str, object]], seed: int,
                     steps: int | None) -> list[dict]:
    """Sample every prompt (one batch, noise from a CPU generator seeded by `seed`) and score it.

    adapter "<vae>": no sampling; each prompt's true clip (the renderer's) through the VAE instead.
    """
    if adapter == "<vae>":
        vae = load_wan(model_dir, parts=("vae",)).vae
        truth = torch.stack([world.to_pixels(world.render(scene)) for _, _, scene in prompts])  # (B, T, 3, H, W)
        videos = vae.decode(vae.encode(truth.transpose(1, 2)))                                  # (B, 3, T, H, W)
    else:
        models = load_wan(model_dir)
        apply_adapters(models.dit, [adapter] if adapter else [], models.model_id, s_id=1.0, s_mot=1.0)
        noise = initial_noise(models.cfg, len(prompts), models.cfg.num_frames, torch.Generator().manual_seed(seed))
        videos = generate_videos(models, [p for _, p, _ in prompts], noise, steps)               # (B, 3, T, H, W)
    rows = []
    for (kind, prompt, scene), video in zip(prompts, videos):
        clip = video.transpose(0, 1)                                      # (T, 3, H, W)
        reference = world.render(scene) if kind == "motion_prompt" else None
        result = oracle.score(clip, scene, reference)
        first = oracle.score(clip[:1], scene)                             # appearance where the VAE keeps it
        result["first_frame_identity"] = [s["identity_score"] for s in first["sprites"]]
        rows.append({"kind": kind, "prompt": prompt, **result})
    return rows


def run_job(job: Job, out_dir: str, model: str, sample_steps: int | None) -> dict:
    """Train the job's stages (skipped when its result exists), then sample and score each variant."""
    folder = os.path.join(out_dir, job.name)
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return {**json.load(f), "cached": True}
    torch.set_num_threads(1)
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    with open(os.path.join(folder, "log.txt"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        flags = [flag for name in job.concepts for flag in concept_flags(name)]
        for stage, extra in job.stages:   # train.py as a user runs it: a process of its own
            subprocess.run([sys.executable, os.path.join(PROJECT, "train.py"), "--stage", stage, "--model", model,
                            "--run-dir", folder, "--seed", str(job.seed), *flags, *extra],
                           stdout=log, stderr=log, check=True)
        prompts = prompts_of(job)
        rows = []
        for variant, adapter in job.samples:
            path = os.path.join(folder, adapter) if adapter and not adapter.startswith("<") else adapter
            for row in sample_and_score(model, path, prompts, job.seed, sample_steps):
                rows.append({"variant": variant, "concepts": list(job.concepts), "seed": job.seed, **row})
    result = {"job": job.name, "seconds": time.time() - start, "rows": rows}
    with atomic_path(result_path) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------- tables

def metrics_of(rows: list[dict]) -> dict[str, float]:
    """The five metrics (and the three edit parts) of one variant on one concept and seed."""
    by_kind = {r["kind"]: r for r in rows}
    concept = lambda r: r["sprites"][0]  # noqa: E731  (the concept is sprite 0 of every scene)
    keeps_motion = [by_kind[k] for k in ("motion_prompt", "background", "composition")]
    second = by_kind["composition"]["sprites"][1]
    parts = {"edit_background": float(by_kind["background"]["background_ok"]),
             "edit_second": float(second["colour_ok"] and second["motion_ok"]),
             "edit_motion": float(concept(by_kind["motion"])["motion_ok"])}
    return {"mse": by_kind["motion_prompt"]["mse"],
            "id": sum(r["first_frame_identity"][0] for r in rows) / len(rows),
            "motion": sum(concept(r)["motion_score"] for r in keeps_motion) / len(keeps_motion),
            "edit": sum(parts.values()) / 3, **parts,
            "tc": sum(r["temporal_consistency"] for r in rows) / len(rows)}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def tabulate(results: list[dict], variants: list[str]) -> tuple[str, dict[str, dict[str, tuple[float, float]]]]:
    """Markdown table: per variant, the mean over concepts per seed, then mean +- std over seeds."""
    rows = [row for result in results for row in result["rows"] if len(row["concepts"]) == 1]
    summary = {}
    for variant in variants:
        per_seed: dict[int, list[dict]] = {}
        for seed in sorted({r["seed"] for r in rows}):
            concept_metrics = []
            for concept in sorted({r["concepts"][0] for r in rows}):
                mine = [r for r in rows if r["variant"] == variant and r["seed"] == seed and r["concepts"][0] == concept]
                if mine:
                    concept_metrics.append(metrics_of(mine))
            if concept_metrics:
                per_seed[seed] = concept_metrics
        if not per_seed:
            continue
        keys = per_seed[next(iter(per_seed))][0].keys()
        summary[variant] = {k: mean_std([sum(m[k] for m in ms) / len(ms) for ms in per_seed.values()]) for k in keys}
    fmt = lambda ms, digits=3: f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"  # noqa: E731
    lines = ["| variant | MSE ↓ | ID ↑ | Motion ↑ | Edit ↑ (background / 2nd sprite / motion) | TC ↑ |",
             "|---|---|---|---|---|---|"]
    for variant, m in summary.items():
        parts = " / ".join(f"{m[k][0]:.0%}" for k in ("edit_background", "edit_second", "edit_motion"))
        lines.append(f"| `{variant}`: {VARIANTS[variant][0]} | {fmt(m['mse'], 4)} | {fmt(m['id'])} | "
                     f"{fmt(m['motion'])} | {fmt(m['edit'], 2)} ({parts}) | {fmt(m['tc'])} |")
    return "\n".join(lines), summary


def per_concept_table(results: list[dict], variant: str) -> str:
    """One variant's metrics per concept, mean over seeds: what a user of one concept sees."""
    rows = [row for result in results for row in result["rows"]
            if len(row["concepts"]) == 1 and row["variant"] == variant]
    lines = ["| concept | MSE | ID | Motion | motion label of the motion prompt (per seed) | background edit followed |",
             "|---|---|---|---|---|---|"]
    for concept in sorted({r["concepts"][0] for r in rows}):
        seeds = sorted({r["seed"] for r in rows if r["concepts"][0] == concept})
        per_seed = [[r for r in rows if r["concepts"][0] == concept and r["seed"] == seed] for seed in seeds]
        metrics = [metrics_of(group) for group in per_seed]
        mean = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        labels = ", ".join(next(r for r in group if r["kind"] == "motion_prompt")["sprites"][0]["motion"]
                           for group in per_seed)
        lines.append(f"| {concept} | {mean['mse']:.4f} | {mean['id']:.3f} | {mean['motion']:.3f} | {labels} | "
                     f"{mean['edit_background']:.0%} |")
    return "\n".join(lines)


def composition_table(results: list[dict]) -> str:
    rows = [row for result in results for row in result["rows"] if len(row["concepts"]) == 2]
    if not rows:
        return ""
    lines = ["| variant | seed | prompt | per concept: colour right, first-frame identity, motion label right, "
             "motion score |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["variant"], r["seed"])):
        cells = "; ".join(f"{name}: {'yes' if s['colour_ok'] else 'no'}, {first:.2f}, "
                          f"{'yes' if s['motion_ok'] else 'no'} ({s['motion']}), {s['motion_score']:.2f}"
                          for name, s, first in zip(row["concepts"], row["sprites"], row["first_frame_identity"]))
        lines.append(f"| `{row['variant']}` | {row['seed']} | {row['prompt']} | {cells} |")
    return "\n".join(lines)


def plot_svg(summary: dict[str, dict[str, tuple[float, float]]], path: str) -> None:
    """The trade-off plot, hand-written SVG (no plotting dependency): edit adherence vs ID x Motion."""
    width, height, pad = 520, 360, 60
    xs = {v: m["edit"][0] for v, m in summary.items()}
    ys = {v: m["id"][0] * m["motion"][0] for v, m in summary.items()}
    x_max = max(0.05, max(xs.values())) * 1.15
    y_max = max(0.05, max(ys.values())) * 1.15
    px = lambda x: pad + x / x_max * (width - 1.5 * pad)   # noqa: E731
    py = lambda y: height - pad - y / y_max * (height - 1.5 * pad)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad / 2}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{pad}" y2="{pad / 2}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">edit adherence (Edit, higher is better)</text>',
           f'<text x="18" y="{height / 2}" text-anchor="middle" transform="rotate(-90 18 {height / 2})">'
           f'fidelity: ID x Motion</text>']
    for i in range(5):
        x, y = x_max * i / 4, y_max * i / 4
        out.append(f'<text x="{px(x)}" y="{height - pad + 16}" text-anchor="middle">{x:.2f}</text>')
        out.append(f'<text x="{pad - 6}" y="{py(y) + 4}" text-anchor="end">{y:.2f}</text>')
    for variant in summary:
        colour = "#d62728" if variant == "ours" else "#1f77b4"
        out.append(f'<circle cx="{px(xs[variant]):.1f}" cy="{py(ys[variant]):.1f}" r="5" fill="{colour}"/>')
        out.append(f'<text x="{px(xs[variant]) + 8:.1f}" y="{py(ys[variant]) - 6:.1f}">{variant}</text>')
    out.append("</svg>")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(out) + "\n")


def write_results(section: str) -> None:
    """Replace the results section of docs/results.md (between the eval markers), atomically."""
    write_section(RESULTS, section, BEGIN, END)


# ---------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> None:
    concepts = args.concept or list(CONCEPTS)
    unknown = [c for c in concepts if c not in CONCEPTS] + [v for v in args.variant or [] if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown concept/variant {unknown}; concepts: {list(CONCEPTS)}, variants: {list(VARIANTS)}")
    if args.only_composition and args.write_docs:
        raise ValueError("--write-docs rewrites the whole results section: run it without --only-composition")
    if args.seeds < 1 or args.workers < 1:
        raise ValueError("--seeds and --workers must be >= 1")
    variants = args.variant or list(VARIANTS)
    if args.only_composition:
        concepts, variants = [], [v for v in variants if v in COMPOSITION] or list(COMPOSITION)
    jobs = make_jobs(concepts, variants, args.seeds, not args.no_composition)
    start, results = time.time(), []
    context = get_context("spawn")   # fresh interpreters: one thread each, no state shared with this one
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, job, args.out_dir, args.model, args.sample_steps) for job in jobs]
        for future in tqdm(as_completed(futures), total=len(jobs), desc=f"eval ({len(jobs)} runs, {args.workers} workers)"):
            results.append(future.result())
    minutes = (time.time() - start) / 60
    os.makedirs(args.out_dir, exist_ok=True)
    timing = os.path.join(args.out_dir, "timing.json")
    if all(r.get("cached") for r in results) and os.path.exists(timing):
        with open(timing) as f:     # nothing ran now: quote the run that made these results
            minutes = json.load(f)["minutes"]
    else:
        with atomic_path(timing) as tmp, open(tmp, "w") as f:
            json.dump({"minutes": minutes, "runs": len(jobs)}, f)
    table, summary = tabulate(results, variants)
    composition = composition_table(results)
    if summary:
        plot_svg(summary, os.path.join(args.out_dir, "tradeoff.svg"))
    command = "python eval.py" + "".join(f" {a}" for a in sys.argv[1:])
    train_minutes = sum(r["seconds"] for r in results) / 60
    report = (f"`{command}`: {len(jobs)} runs, {minutes:.1f} min wall on this machine "
              f"({train_minutes:.0f} min of single-thread jobs), {args.seeds} seed(s)")
    report += f"; mean ± std over seeds of the mean over {len(concepts)} concepts.\n\n{table}\n" if summary else ".\n"
    if "ours" in variants and concepts:
        report += f"\nPer concept, `ours` (mean over seeds):\n\n{per_concept_table(results, 'ours')}\n"
    if composition:
        report += f"\nComposition (two concepts, one jointly trained adapter, prompted together):\n\n{composition}\n"
    print("\n" + report)
    if args.write_docs and summary:
        plot_copy = os.path.join("assets", "eval_tradeoff.svg")
        plot_svg(summary, plot_copy)
        link = os.path.relpath(plot_copy, os.path.dirname(RESULTS))   # the image link is relative to the page
        write_results(report + f"\n![edit adherence vs fidelity per variant]({link})\n")
        print(f"wrote the results into {RESULTS} and {plot_copy}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="seeds per (concept, variant): training and sampling noise")
    p.add_argument("--concept", action="append", help="only this concept (repeatable; default all three)")
    p.add_argument("--variant", action="append", help=f"only this variant (repeatable): {', '.join(VARIANTS)}")
    p.add_argument("--no-composition", action="store_true", help="skip the two-concept composition runs")
    p.add_argument("--only-composition", action="store_true",
                   help="only the two-concept runs: trained with and without the stitched pairs")
    p.add_argument("--model", default="toy/checkpoint", help="base model folder (the toy model)")
    p.add_argument("--out-dir", default="runs/eval", help="run folders and results (resumable)")
    p.add_argument("--workers", type=int, default=2, help="parallel single-thread jobs (one per core)")
    p.add_argument("--sample-steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the tables and plot into docs/results.md (between its eval markers)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as error:
        sys.exit(f"eval.py: error: {error}")
