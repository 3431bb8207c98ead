"""The README's GIF strip: input video | stage set output | stage sequence output | two edits.

    python train.py --stage set && python train.py --stage sequence   # the quick start's adapters
    python -m toy.make_strip                                          # -> assets/strip_pink_star_zigzag.gif

Samples the concept's motion prompt with the stage-set adapter and with the stage-sequence
adapter, and the background and composition edits with the stage-sequence adapter, all from the
same seed, and lays the five clips side by side (64x64 each, 8 fps) into one GIF, scored by the
oracle on the way (printed) so the picture and the numbers come from the same clips.
"""
import argparse
import os

import torch

from video import read_video, side_by_side, write_video
from lora.lora import apply_adapters
from model.loader import load_wan
from model.pipeline import generate_videos, initial_noise
from toy import TOY_MODEL, oracle, world
from toy.concepts import CONCEPTS


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    concept = CONCEPTS[args.concept]
    run = args.run_dir or os.path.join("runs", concept.name)
    adapters = {stage: os.path.join(run, f"{stage}.safetensors") for stage in ("set", "sequence")}
    for path in adapters.values():
        if not os.path.exists(path):
            raise SystemExit(f"make_strip: {path} is missing: run `python train.py --stage set` and "
                             f"`--stage sequence` for {concept.name} first (or pass --run-dir)")
    edits = {edit.kind: edit for edit in concept.edits}
    panels = [("input", None, None, concept.scene), ("set", "set", concept.motion_prompt, concept.scene),
              ("sequence", "sequence", concept.motion_prompt, concept.scene)]
    panels += [(f"edit: {kind}", "sequence", edits[kind].prompt, edits[kind].scene)
               for kind in ("background", "composition")]
    clips = []
    for title, stage, prompt, scene in panels:
        if stage is None:
            clip = read_video(os.path.join("assets", f"{concept.name}.mp4"), world.FPS, world.FRAME_SIZE,
                              world.FRAME_SIZE, world.NUM_FRAMES)                          # (T, 3, H, W)
        else:
            models = load_wan(args.model)
            apply_adapters(models.dit, [adapters[stage]], models.model_id, s_id=1.0, s_mot=1.0)
            noise = initial_noise(models.cfg, 1, models.cfg.num_frames, torch.Generator().manual_seed(args.seed))
            clip = generate_videos(models, [prompt], noise)[0].transpose(0, 1)                 # (T, 3, H, W)
        result = oracle.score(clip, scene)
        print(f"{title:22s} identity {result['identity_score']:.3f}  motion {result['motion_score']:.3f}  "
              f"background {result['background']}  {prompt or ''}")
        clips.append(clip)
    strip = side_by_side(clips)                                                          # (T, 3, H, 5W + 8)
    out = args.out or os.path.join("assets", f"strip_{concept.name}.gif")
    write_video(out, strip, fps=world.FPS)
    print(f"wrote {out}: " + " | ".join(title for title, *_ in panels))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default=next(iter(CONCEPTS)), choices=list(CONCEPTS))
    parser.add_argument("--run-dir", help="folder with set.safetensors and sequence.safetensors (default runs/<concept>)")
    parser.add_argument("--model", default=TOY_MODEL, help="the base model (default: the toy model)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of every sampled panel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="output .gif (default assets/strip_<concept>.gif)")
    main(parser.parse_args())
