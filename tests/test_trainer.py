"""The trainer's conveniences end to end on the tiny random Wan: previews, logs, kept adapters, schedules,
captions, exports, memory options, composition."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sample
import train
from lora import training
from conftest import moving_square
from model.config import PRESETS
from test_train import run_train
from video import write_video


def test_previews_are_written_and_do_not_change_training(tiny, tmp_path):
    """--sample-every writes mp4 + GIF previews, and the adapter equals a run without previews."""
    run_train(tiny, tmp_path / "plain", "--stage", "set", "--steps", "4")
    run_train(tiny, tmp_path / "previews", "--stage", "set", "--steps", "4", "--sample-every", "2")
    for step in (2, 4):
        for ext in ("mp4", "gif"):
            assert os.path.exists(tmp_path / "previews" / "previews" / f"set-step{step:06d}.{ext}")
    plain, previewed = load_file(tmp_path / "plain" / "set.safetensors"), load_file(tmp_path / "previews" / "set.safetensors")
    assert all(torch.equal(plain[k], previewed[k]) for k in plain)


def test_log_plot_and_kept_adapters(tiny, tmp_path):
    """Each step is a JSON line (loss, its parts, lr, grad norm); an SVG plot; the last --keep step adapters."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "7", "--save-every", "2", "--keep", "2",
              "--lr-schedule", "cosine", "--warmup", "2")
    records = [json.loads(line) for line in open(tmp_path / "set-log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 8))
    for r in records:
        assert r["loss"] == pytest.approx(r["concept"] + r["prior"] * training.TRAINING_DEFAULTS["paper"]["prior_weight"])
        assert r["grad_norm"] >= 0
    assert records[0]["lr"] < records[1]["lr"] and records[-1]["lr"] < records[2]["lr"]   # warmup, then decay
    assert open(tmp_path / "set-loss.svg").read().startswith("<svg")
    kept = sorted(p.name for p in tmp_path.glob("set-step*.safetensors"))
    assert kept == ["set-step000004.safetensors", "set-step000006.safetensors"]
    out = str(tmp_path / "kept.mp4")
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--adapter", str(tmp_path / kept[0]),
                                   "--prompt", "a sks square", "--steps", "2", "--out", out]))
    assert os.path.exists(out)


def test_learning_rate_schedules():
    """Warmup rises linearly to the peak; cosine ends near 0; constant stays at the peak."""
    assert training.learning_rate(0, 10, 1.0, "constant", 4) == 0.25
    assert training.learning_rate(3, 10, 1.0, "cosine", 4) == 1.0
    assert training.learning_rate(9, 10, 1.0, "cosine", 4) < 0.1
    assert training.learning_rate(9, 10, 1.0, "constant", 0) == 1.0


def test_caption_file_is_the_prompt(tiny, tmp_path):
    """clip.txt next to clip.mp4 gives the static (line 1) and motion (line 2) prompts when --prompt is absent."""
    video = tmp_path / "clip.mp4"
    shutil.copy(tiny["video"], video)
    video.with_suffix(".txt").write_text("a sks square on green\na sks square in zwx motion on green\n")
    flags = [*tiny["model"], "--stage", "set", "--steps", "1", "--video", str(video), "--run-dir", str(tmp_path / "run")]
    train.main(train.parse_args(flags))
    with safe_open(tmp_path / "run" / "set.safetensors", "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == ["a sks square on green"]


def test_split_export_and_single_file_flags(tiny, tmp_path):
    """--export --split writes an identity and a motion LoRA; --dit/--vae/--text-encoder files are what loads."""
    model = tiny["flags"][1]
    files = ["--dit", os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors"),
             "--vae", os.path.join(model, "vae", "diffusion_pytorch_model.safetensors"),
             "--text-encoder", os.path.join(model, "text_encoder", "model.safetensors")]
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "2", *files)
    run_train(tiny, tmp_path, "--stage", "sequence", "--steps", "2", "--export", "comfyui", "--split", *files)
    for part in ("identity", "motion"):
        assert os.path.exists(tmp_path / f"lora-comfyui-{part}.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_train(tiny, tmp_path / "bad", "--stage", "set", "--steps", "1", "--dit", str(tmp_path / "nope.safetensors"))


def test_fp8_offload_and_bf16_activations_train(tiny, tmp_path):
    """--fp8, --offload-blocks and --activations bf16-cpu run both stages; sample.py takes --fp8 --offload-blocks."""
    memory = ("--fp8", "--offload-blocks", "1", "--grad-ckpt", "--activations", "bf16-cpu")
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "2", *memory)
    run_train(tiny, tmp_path, "--stage", "sequence", "--steps", "2", *memory)
    assert any(v.abs().sum() > 0 for k, v in load_file(tmp_path / "sequence.safetensors").items() if "residual" in k)
    out = str(tmp_path / "fp8.mp4")
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--adapter", str(tmp_path / "sequence.safetensors"),
                                   "--prompt", "a sks square", "--steps", "2", "--out", out, "--fp8",
                                   "--offload-blocks", "1"]))
    assert os.path.exists(out)
    with pytest.raises(ValueError, match="--activations needs --grad-ckpt"):
        run_train(tiny, tmp_path / "bad", "--stage", "set", "--steps", "1", "--activations", "bf16")


def test_two_videos_compose_side_by_side_in_stage_sequence(tiny, tmp_path):
    """With two videos, stage sequence also trains stitched pairs under both prompts joined (logged apart)."""
    second = str(tmp_path / "second.mp4")
    write_video(second, moving_square(12).flip(-1), fps=PRESETS["tiny"].fps)
    flags = [*tiny["model"], "--video", tiny["video"], "--video", second,
             "--prompt", "a sks square on blue", "--prompt", "a dog square on blue",
             "--motion-prompt", "a sks square in zwx motion", "--motion-prompt", "a dog square in park motion",
             "--id-token", "sks", "--id-token", "dog", "--motion-token", "zwx", "--motion-token", "park"]
    for extra, name in ((("--composition-weight", "0.5"), "on"), (("--composition-weight", "0"), "off")):
        run = ["--run-dir", str(tmp_path / name)]
        train.main(train.parse_args([*flags, *run, "--stage", "set", "--steps", "1"]))
        train.main(train.parse_args([*flags, *run, "--stage", "sequence", "--steps", "2", *extra]))
        records = [json.loads(line) for line in open(tmp_path / name / "sequence-log.jsonl")]
        if name == "on":
            assert all(r["composition"] > 0 for r in records)
            assert os.path.exists(tmp_path / "on" / "cache" / "composition-text.safetensors")
        else:
            assert all(r["composition"] is None for r in records)
