"""End to end on CPU with a tiny random Wan: train.py --stage set, --stage sequence, sample.py, resume, bad input."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sample
import train
from conftest import moving_square
from video import read_video, write_video
from lora.lora import load_adapter_file
from lora.training import TRAINING_DEFAULTS
from model.config import PRESETS
from model.flow import add_noise, flow_loss, velocity_target
from model.loader import load_wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def merged(flags: list[str], extra: tuple[str, ...]) -> list[str]:
    """flags with every (--name value) pair of `extra` replacing the same flag, or added."""
    pairs = dict(zip(flags[::2], flags[1::2]))
    loose = []
    i = 0
    while i < len(extra):
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            pairs[extra[i]] = extra[i + 1]
            i += 2
        else:
            loose.append(extra[i])
            i += 1
    return [item for pair in pairs.items() for item in pair] + loose


def run_train(tiny, run_dir, *extra: str) -> str:
    return train.main(train.parse_args(merged([*tiny["flags"], "--run-dir", str(run_dir)], extra)))


def test_set_then_sequence_then_sample(tiny, tmp_path):
    """The three commands write a stage-set adapter, a stage-sequence adapter and a readable video."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "4")
    run_train(tiny, tmp_path, "--stage", "sequence", "--steps", "4", "--export", "comfyui")
    seq = load_file(tmp_path / "sequence.safetensors")
    assert any(k.endswith(".residual") and v.abs().sum() > 0 for k, v in seq.items()), "residual never trained"
    with safe_open(tmp_path / "sequence.safetensors", "pt") as f:
        assert '"sequence"' == f.metadata()["stage"]
    set_tensors = load_file(tmp_path / "set.safetensors")
    for key in [k for k in seq if not k.endswith(".residual")]:  # basis/coeff frozen in stage sequence
        assert torch.equal(seq[key], set_tensors[key]), key
    assert os.path.exists(tmp_path / "lora-comfyui.safetensors")
    out = str(tmp_path / "out.mp4")
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--adapter", str(tmp_path / "sequence.safetensors"),
                                   "--prompt", "a sks square on green", "--steps", "3", "--out", out, "--gif"]))
    video = read_video(out, fps=PRESETS["tiny"].fps, height=32, width=32, num_frames=9)
    assert video.shape == (9, 3, 32, 32)
    assert os.path.exists(str(tmp_path / "out.gif"))
    base = str(tmp_path / "base.mp4")                         # the same seed without the adapter: another video
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--no-adapter", "--prompt", "a sks square on green",
                                   "--steps", "3", "--out", base]))
    assert (read_video(base, fps=PRESETS["tiny"].fps, height=32, width=32, num_frames=9) - video).abs().mean() > 1e-3


def test_same_seed_same_video(tiny, tmp_path):
    """sample.py with the same seed writes the same frames twice."""
    outs = []
    for name in ("a.mp4", "b.mp4"):
        sample.main(sample.parse_args(["--model", tiny["flags"][1], "--no-adapter", "--prompt", "a red square",
                                       "--steps", "3", "--seed", "7", "--out", str(tmp_path / name)]))
        outs.append(read_video(str(tmp_path / name), fps=16, height=32, width=32, num_frames=9))
    assert torch.equal(outs[0], outs[1])


def fixed_loss(dit, x0: torch.Tensor, context: torch.Tensor) -> float:
    """Flow-matching loss of one clip on 32 fixed (noise, sigma) draws: a low-variance yardstick."""
    g = torch.Generator().manual_seed(123)
    x0, context = x0.expand(32, *x0.shape[1:]), context.expand(32, *context.shape[1:])
    noise, sigmas = torch.randn(x0.shape, generator=g), torch.linspace(0.05, 0.95, 32)
    with torch.no_grad():
        pred = dit(add_noise(x0, noise, sigmas), sigmas * 1000, context)
    return flow_loss(pred, velocity_target(x0, noise)).mean().item()


def test_loss_decreases_when_overfitting(tiny, tmp_path):
    """Overfitting one clip without regularization lowers its loss well below the base model's."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "60", "--lr", "2e-2", "--clip", "1.0", "--drop", "0",
              "--text-mask", "0", "--prior-weight", "0")
    assert len(torch.load(tmp_path / "set-state.pt", weights_only=True)["losses"]) == 60
    models = load_wan(tiny["flags"][1], parts=("dit",))
    x0 = load_file(tmp_path / "cache" / "video0.safetensors")["frames"][:1]   # (1, C, 1, h, w): frame 0
    context = load_file(tmp_path / "cache" / "text-set.safetensors")["tensor"]  # (1, S, D)
    base = fixed_loss(models.dit, x0, context)
    load_adapter_file(models.dit, str(tmp_path / "set.safetensors"), models.model_id)
    models.dit.eval()
    adapted = fixed_loss(models.dit, x0, context)
    # A 24-wide random DiT with a rank-8 adapter cannot fit the clip closely: measured 1.163 -> 1.021.
    assert adapted < 0.92 * base, (base, adapted)


def test_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    """A run interrupted mid-step (Ctrl-C) and resumed ends with the same adapter as an uninterrupted one."""
    args = ("--stage", "set", "--steps", "8", "--save-every", "3")
    run_train(tiny, tmp_path / "full", *args)
    calls = {"n": 0}
    real_loss = train.flow_matching_loss

    def dying_loss(*args):  # Ctrl-C during step 5 (two calls a step: the concept and the prior samples)
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_loss(*args)
    monkeypatch.setattr(train, "flow_matching_loss", dying_loss)
    with pytest.raises(SystemExit, match="--resume"):      # Ctrl-C: the state is saved, the command named
        run_train(tiny, tmp_path / "killed", *args)
    assert not os.path.exists(tmp_path / "killed" / "set.safetensors")
    assert torch.load(tmp_path / "killed" / "set-state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "flow_matching_loss", real_loss)
    run_train(tiny, tmp_path / "killed", *args, "--resume")
    full, resumed = load_file(tmp_path / "full" / "set.safetensors"), load_file(tmp_path / "killed" / "set.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


# ---- bad input: a clear message, a non-zero exit, nothing half-written ----
def expect_error(tiny, tmp_path, match: str, *flags: str, stage: str = "set") -> None:
    with pytest.raises(ValueError, match=match):
        run_train(tiny, tmp_path / "run", "--stage", stage, "--steps", "2", *flags)
    assert not os.path.exists(tmp_path / "run" / f"{stage}.safetensors")


def test_missing_video(tiny, tmp_path):
    """A video path that does not exist is named in the error."""
    expect_error(tiny, tmp_path, "does not exist|not found|No such", "--video", str(tmp_path / "nope.mp4"))


def test_corrupt_and_empty_video(tiny, tmp_path):
    """Random bytes and an empty file are reported as unreadable videos."""
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    expect_error(tiny, tmp_path, "corrupt|unreadable|cannot|not a video", "--video", str(tmp_path / "corrupt.mp4"))
    expect_error(tiny, tmp_path, "empty", "--video", str(tmp_path / "empty.mp4"))


def test_too_few_frames(tiny, tmp_path):
    """A 5-frame video for a 9-frame model says how many frames it has and what to pass."""
    short = str(tmp_path / "short.mp4")
    write_video(short, moving_square(5), fps=16)
    expect_error(tiny, tmp_path, "--frames", "--video", short)


def test_audio_only_file(tiny, tmp_path):
    """An audio-only file is rejected as having no video stream."""
    import av
    import numpy as np
    path = str(tmp_path / "sound.m4a")
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode(None))
    expect_error(tiny, tmp_path, "video stream", "--video", path)


def test_image_passed_as_video(tiny, tmp_path):
    """A single .png is refused as an image, not a video."""
    import av
    import numpy as np
    path = str(tmp_path / "one.png")
    with av.open(path, "w") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        out.mux(stream.encode(None))
    expect_error(tiny, tmp_path, "image", "--video", path)


def test_size_not_divisible_by_16(tiny, tmp_path):
    """--height 40 is refused with the nearest valid sizes."""
    expect_error(tiny, tmp_path, "16", "--height", "40")


def test_prompt_without_token_warns(tiny, tmp_path, capsys):
    """A static prompt without its identity token trains, with a warning naming the token."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "1", "--prompt", "a red square on blue")
    assert "does not contain the token 'sks'" in capsys.readouterr().err


def test_unwritable_run_dir(tiny, tmp_path):
    """A run folder under a regular file fails with a message naming the folder."""
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="run folder"):
        run_train(tiny, tmp_path / "file.txt" / "run", "--stage", "set", "--steps", "1")


def test_sequence_without_set_adapter(tiny, tmp_path):
    """Stage sequence in a fresh run folder asks for stage set first."""
    expect_error(tiny, tmp_path, "stage set", stage="sequence")


def test_cli_exit_code(tiny, tmp_path):
    """The command line turns an error into one readable line and a non-zero exit."""
    result = subprocess.run([sys.executable, "train.py", "--stage", "sequence", *tiny["flags"],
                             "--run-dir", str(tmp_path / "fresh")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "train.py: error:" in result.stderr and "Traceback" not in result.stderr


def test_two_videos_train_jointly(tiny, tmp_path):
    """Two --video entries, each with its own prompts and tokens, train one shared adapter."""
    second = str(tmp_path / "second.mp4")
    write_video(second, moving_square(12).flip(-1), fps=PRESETS["tiny"].fps)
    flags = ["--stage", "set", "--steps", "2", "--video", tiny["video"], "--video", second,
             "--prompt", "a sks square on blue", "--prompt", "a dog square on blue",
             "--motion-prompt", "a sks square in zwx motion", "--motion-prompt", "a dog square in park motion",
             "--id-token", "sks", "--id-token", "dog", "--motion-token", "zwx", "--motion-token", "park"]
    train.main(train.parse_args([*tiny["model"], "--run-dir", str(tmp_path / "run"), *flags]))
    with safe_open(tmp_path / "run" / "set.safetensors", "pt") as f:
        meta = f.metadata()
    assert '"a dog square on blue"' in meta["prompts"] and '"a sks square on blue"' in meta["prompts"]
    assert os.path.exists(tmp_path / "run" / "cache" / "video1.safetensors")


def test_single_stage_baseline_trains_basis_and_coeff_on_the_clip(tiny, tmp_path):
    """--stage single (the DB-LoRA baseline) trains basis + coeff with the motion prompt, no residual, and samples."""
    run_train(tiny, tmp_path, "--stage", "single", "--steps", "3")
    tensors = load_file(tmp_path / "single.safetensors")
    with safe_open(tmp_path / "single.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["stage"] == '"single"' and "zwx" in meta["prompts"]       # the motion prompt
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith(".basis"))
    assert all(v.abs().sum() == 0 for k, v in tensors.items() if k.endswith(".residual"))
    out = str(tmp_path / "single.mp4")
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--adapter", str(tmp_path / "single.safetensors"),
                                   "--prompt", "a sks square moving in zwx motion", "--steps", "2", "--out", out]))
    assert os.path.exists(out)


def test_input_side_basis_runs_both_stages(tiny, tmp_path):
    """--basis-side input: the file records it, stage sequence keeps basis/coeff, sample.py loads it."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "3", "--basis-side", "input", "--rank", "2")
    run_train(tiny, tmp_path, "--stage", "sequence", "--steps", "3")
    seq, first = load_file(tmp_path / "sequence.safetensors"), load_file(tmp_path / "set.safetensors")
    with safe_open(tmp_path / "sequence.safetensors", "pt") as f:
        assert f.metadata()["basis_side"] == '"input"'
    key = next(k for k in seq if k.endswith(".basis"))
    assert seq[key].shape[0] == 2                                        # (r, in): the input-side factor
    assert all(torch.equal(seq[k], first[k]) for k in seq if not k.endswith(".residual"))
    assert any(v.abs().sum() > 0 for k, v in seq.items() if k.endswith(".residual"))
    out = str(tmp_path / "input.mp4")
    sample.main(sample.parse_args(["--model", tiny["flags"][1], "--adapter", str(tmp_path / "sequence.safetensors"),
                                   "--prompt", "a sks square", "--steps", "2", "--out", out]))
    assert os.path.exists(out)


def test_rank_defaults_to_the_models_and_the_flag_overrides_it(tiny, tmp_path):
    """--rank unset: the model's training default (the paper's 8 for any model but the toy); --rank wins."""
    assert TRAINING_DEFAULTS["paper"]["rank"] == 8 and TRAINING_DEFAULTS["toy"]["rank"] == 32
    for extra, rank in (((), 8), (("--rank", "2"), 2)):
        run_dir = tmp_path / f"rank{rank}"
        run_train(tiny, run_dir, "--stage", "set", "--steps", "1", *extra)
        tensors = load_file(run_dir / "set.safetensors")
        key = next(k for k in tensors if k.endswith(".basis"))
        assert tensors[key].shape[1] == rank                            # (out, r): the output-side factor


# ---- micro-batches: memory decides --batch, not the result ----
@pytest.mark.parametrize("stage", ["set", "sequence"])
def test_accumulated_micro_batches_equal_one_batch(tiny, tmp_path, stage, monkeypatch):
    """--batch 1 --grad-accum 4 and --batch 2 --grad-accum 2 train the adapter --batch 4 does (fp32, 1e-6)."""
    # Plain SGD in place of AdamW: the update is then the accumulated gradient itself. (Adam's first steps
    # are nearly sign(gradient), which turns a 1e-9 rounding difference of a near-zero entry into lr.)
    monkeypatch.setattr(train.torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    common = ("--steps", "3", "--drop", "0", "--text-mask", "0.3", "--prior-weight", "0.5", "--prior-batch", "3",
              "--lr", "1e-2", "--clip", "1.0")
    adapters = []
    for batch, accum in ((4, 1), (1, 4), (2, 2)):
        run_dir = tmp_path / f"b{batch}"
        if stage == "sequence":
            run_train(tiny, run_dir, "--stage", "set", *common, "--batch", "4", "--grad-accum", "1")
        run_train(tiny, run_dir, "--stage", stage, *common, "--batch", str(batch), "--grad-accum", str(accum))
        adapters.append(load_file(run_dir / f"{stage}.safetensors"))
    trained = [k for k in adapters[0] if adapters[0][k].abs().sum() > 0]
    assert trained, "nothing trained"
    for other in adapters[1:]:
        for key in adapters[0]:
            torch.testing.assert_close(other[key], adapters[0][key], rtol=0, atol=1e-6)


def test_prior_weight_is_dreambooths_whatever_the_batch_sizes(tiny, tmp_path, monkeypatch):
    """A step's loss is mean concept loss + w x mean prior loss: with every sample's loss 1, it is 1 + w."""
    real = train.flow_matching_loss
    monkeypatch.setattr(train, "flow_matching_loss", lambda *a: real(*a) * 0 + 1)
    for batch, accum, prior_batch in ((2, 2, 3), (3, 1, 1)):
        run_dir = tmp_path / f"{batch}-{accum}-{prior_batch}"
        run_train(tiny, run_dir, "--stage", "set", "--steps", "2", "--prior-weight", "0.5", "--batch", str(batch),
                  "--grad-accum", str(accum), "--prior-batch", str(prior_batch))
        losses = torch.load(run_dir / "set-state.pt", weights_only=True)["losses"]
        assert losses == pytest.approx([1.5, 1.5])


def test_encoders_load_only_on_a_cache_miss_and_caches_follow_the_weights(tiny, tmp_path, monkeypatch):
    """A second run with every cache hit loads only the DiT; the same model copied elsewhere misses again."""
    run_train(tiny, tmp_path / "run", "--stage", "set", "--steps", "1")
    loaded = []
    real = train.load_wan
    monkeypatch.setattr(train, "load_wan", lambda model, parts, **kw: loaded.append(parts) or real(model, parts, **kw))
    run_train(tiny, tmp_path / "run", "--stage", "set", "--steps", "1")
    assert sorted(loaded) == [(), ("dit",)]
    copy = tmp_path / "copy"
    shutil.copytree(tiny["flags"][1], copy)
    loaded.clear()
    run_train(tiny, tmp_path / "run", "--stage", "set", "--steps", "1", "--model", str(copy))
    assert ("vae",) in loaded and ("text",) in loaded


def test_text_masking_zeroes_whole_token_rows_at_its_rate(tiny, tmp_path, monkeypatch):
    """--text-mask p zeroes about p of the prompt's token rows (whole rows, like Wan's padding); 0 zeroes none."""
    seen, real = [], train.flow_matching_loss
    monkeypatch.setattr(train, "flow_matching_loss", lambda dit, x0, noise, sigmas, context:
                        seen.append(context.clone()) or real(dit, x0, noise, sigmas, context))
    for rate in (0.0, 0.5):
        seen.clear()
        run_train(tiny, tmp_path / str(rate), "--stage", "set", "--steps", "4", "--text-mask", str(rate),
                  "--prior-weight", "0")
        cached = load_file(tmp_path / str(rate) / "cache" / "text-set.safetensors")["tensor"][0]   # (S, D)
        real_rows = cached.abs().sum(-1) > 0                                                      # the prompt's rows
        rows = torch.cat([c[:, real_rows] for c in seen])                                         # (N, R, D)
        zeroed = (rows.abs().sum(-1) == 0).float()
        kept = rows[zeroed == 0]
        assert torch.equal(kept, cached[real_rows].expand(len(rows), -1, -1)[zeroed == 0])        # the rest untouched
        if rate == 0:
            assert zeroed.sum() == 0
        else:
            assert 0.3 < zeroed.mean() < 0.7, zeroed.mean()


def test_resume_in_stage_sequence_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    """Stage sequence interrupted mid-step and resumed ends with the uninterrupted run's adapter."""
    for name in ("full", "killed"):
        run_train(tiny, tmp_path / name, "--stage", "set", "--steps", "3")
    args = ("--stage", "sequence", "--steps", "6", "--save-every", "2")
    run_train(tiny, tmp_path / "full", *args)
    calls, real = {"n": 0}, train.flow_matching_loss

    def dying_loss(*a):
        calls["n"] += 1
        if calls["n"] == 7:                                   # during step 4 (2 calls a step)
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train, "flow_matching_loss", dying_loss)
    with pytest.raises(SystemExit, match="--resume"):
        run_train(tiny, tmp_path / "killed", *args)
    monkeypatch.setattr(train, "flow_matching_loss", real)
    run_train(tiny, tmp_path / "killed", *args, "--resume")
    full, resumed = (load_file(tmp_path / n / "sequence.safetensors") for n in ("full", "killed"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
