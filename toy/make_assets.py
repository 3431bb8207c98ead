"""Render the example dynamic concepts: the single videos that users personalize on.

    python -m toy.make_assets            # -> assets/<name>.mp4, assets/<name>.gif, assets/concepts.json

Each concept of `concepts.CONCEPTS` (a held-out look doing a held-out motion) becomes one 17-frame,
8 fps, 64x64 clip, the toy counterpart of the paper's single input video. The mp4 is lossless
h264 (yuv444p, qp 0) so the colours survive; the gif is a preview. Every mp4 is read back the
way training reads it (video.read_video) and must still score as its scene by the oracle, so a
codec setting that shifts colours fails here and not in a training run.
"""
import argparse
import json
import os

from video import read_video, write_video
from toy import concepts, oracle, world


def main(args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    entries = []
    for concept in concepts.CONCEPTS.values():
        video = world.render(concept.scene, args.frames, args.size)               # (T, H, W, 3) uint8
        pixels = world.to_pixels(video)                                            # (T, 3, H, W) in [-1, 1]
        mp4, gif = (os.path.join(args.out, f"{concept.name}.{ext}") for ext in ("mp4", "gif"))
        write_video(mp4, pixels, world.FPS, lossless=True)
        write_video(gif, pixels, world.FPS)
        # read back exactly as training will, then let the oracle judge what survived the codec
        back = read_video(mp4, world.FPS, args.size, args.size, args.frames)      # (T, 3, H, W)
        result = oracle.score(back, concept.scene, reference=video)
        checks = ("background_ok", "colour_ok", "pattern_ok", "shape_ok", "motion_ok")
        failed = [key for key in checks if not result[key]]
        print(f"{mp4}: identity {result['identity_score']:.3f}  motion {result['motion_score']:.3f}  "
              f"mse {result['mse']:.2e}  {'ok' if not failed else 'FAILED ' + ', '.join(failed)}")
        if failed:
            raise SystemExit(f"{mp4} no longer shows its scene after encoding ({', '.join(failed)})")
        entries.append({
            "name": concept.name,
            "file": os.path.basename(mp4),
            "preview": os.path.basename(gif),
            "caption": world.caption(concept.scene),              # the truth, held-out words and all
            "identity_token": concept.identity_token,
            "motion_token": concept.motion_token,
            "static_prompt": concept.static_prompt,               # stage 1 (Set)
            "motion_prompt": concept.motion_prompt,               # stage 2 (Sequence)
            "edits": [{"kind": e.kind, "prompt": e.prompt, "caption": world.caption(e.scene)}
                      for e in concept.edits],
            "frames": args.frames, "fps": world.FPS, "height": args.size, "width": args.size,
        })
    with open(os.path.join(args.out, "concepts.json"), "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    print(f"wrote {len(entries)} concepts to {os.path.join(args.out, 'concepts.json')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # output
    parser.add_argument("--out", default="assets", help="folder for the videos and concepts.json")
    # clip size (defaults: the world's, which the toy model is trained on)
    parser.add_argument("--frames", type=int, default=world.NUM_FRAMES, help="frames per clip (4k+1)")
    parser.add_argument("--size", type=int, default=world.FRAME_SIZE, help="height and width in pixels")
    main(parser.parse_args())
