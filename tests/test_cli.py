"""A newcomer's first hour: the command lines' defaults, bad input, and what they leave behind."""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sample
import train
from video import read_video, write_video
from model.config import PRESETS
from conftest import moving_square
from test_train import ROOT, run_train


def sample_args(tiny, tmp_path, *extra: str) -> list[str]:
    return ["--model", tiny["flags"][1], "--steps", "2", "--out", str(tmp_path / "out.mp4"), *extra]


def meta_of(path) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


# ---- stage sequence continues the stage-set run it finds in the run folder ----
def test_sequence_takes_video_and_prompts_from_the_set_run(tiny, tmp_path):
    """`--stage sequence --run-dir R` trains R's own video and prompts, not the toy's default concept."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "2")
    flags = [*tiny["model"], "--stage", "sequence", "--steps", "2", "--run-dir", str(tmp_path)]
    train.main(train.parse_args(flags))                       # no --video, no prompts
    meta = meta_of(tmp_path / "sequence.safetensors")
    assert tiny["video"] in meta["videos"] and "zwx motion" in meta["prompts"]


def test_sequence_refuses_another_video_than_the_set_run(tiny, tmp_path):
    """A --video other than the stage-set run's is refused, naming both."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "2")
    other = str(tmp_path / "other.mp4")
    write_video(other, moving_square(12).flip(-1), fps=PRESETS["tiny"].fps)
    with pytest.raises(ValueError, match="was trained on"):
        run_train(tiny, tmp_path, "--stage", "sequence", "--steps", "2", "--video", other)
    assert not os.path.exists(tmp_path / "sequence.safetensors")


# ---- sample.py: bad flags fail before any model is loaded ----
@pytest.mark.parametrize("extra, match", [
    (("--prompt", ""), "empty"),
    (("--prompt", "   "), "empty"),
    (("--prompt", "a", "--steps", "0"), "--steps must be >= 1"),
    (("--prompt", "a", "--out", "x.webm"), "extension"),
    (("--prompt", "a", "--out", "/proc/nope/x.mp4"), "not a writable folder"),
    (("--prompt", "a", "--threads", "0"), "--threads"),
])
def test_sample_bad_flags_fail_before_loading(tiny, tmp_path, monkeypatch, extra, match):
    """Empty prompts, --steps 0, a bad --out: an error naming the problem, no model loaded."""
    monkeypatch.setattr(sample, "load_wan", lambda *a, **k: pytest.fail("the model was loaded"))
    args = sample.parse_args([*sample_args(tiny, tmp_path), *extra])
    if "--out" in extra:
        args.out = extra[extra.index("--out") + 1]
    with pytest.raises(ValueError, match=match):
        sample.main(args)


def test_sample_refuses_a_file_that_is_not_an_adapter(tiny, tmp_path):
    """The resume state (a torch pickle) passed as --adapter gets one clear line, not a safetensors traceback."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "1")
    with pytest.raises(ValueError, match="not a safetensors file"):
        sample.main(sample.parse_args(sample_args(tiny, tmp_path, "--prompt", "a",
                                                  "--adapter", str(tmp_path / "set-state.pt"))))


def test_sample_defaults_to_the_adapters_training_size(tiny, tmp_path):
    """An adapter trained on 5 frames samples 5 frames unless --frames says otherwise (the model's default is 9)."""
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "1", "--frames", "5")
    sample.main(sample.parse_args(sample_args(tiny, tmp_path, "--prompt", "a sks square",
                                              "--adapter", str(tmp_path / "set.safetensors"))))
    with pytest.raises(Exception, match="frames"):            # there are not 9 frames in the file
        read_video(str(tmp_path / "out.mp4"), fps=PRESETS["tiny"].fps, height=32, width=32, num_frames=9)
    assert read_video(str(tmp_path / "out.mp4"), fps=PRESETS["tiny"].fps, height=32, width=32,
                      num_frames=5).shape == (5, 3, 32, 32)


def test_sample_two_prompts_side_by_side(tiny, tmp_path):
    """Two --prompt panels from one noise: one video twice as wide (plus a separator), the panels differ."""
    sample.main(sample.parse_args(sample_args(tiny, tmp_path, "--no-adapter", "--prompt", "a red square",
                                              "--prompt", "a blue circle")))
    import av
    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).float() for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 66, 3)
    left, right = torch.stack(frames)[:, :, :32], torch.stack(frames)[:, :, 34:]
    assert (left - right).abs().mean() > 2                    # out of 255: the text changed the panel


def test_too_many_frames_names_the_limit(tiny, tmp_path):
    """--frames past the RoPE tables gives the largest frame count, not an internal error."""
    limit = (PRESETS["tiny"].dit.rope_max_len - 1) * 4 + 1
    with pytest.raises(ValueError, match=f"at most {limit} frames"):
        sample.main(sample.parse_args(sample_args(tiny, tmp_path, "--prompt", "a", "--frames", str(limit + 4))))


# ---- train.py ----
def test_failed_run_leaves_no_empty_folders(tiny, tmp_path):
    """A run that fails before writing anything removes the run and cache folders it created."""
    with pytest.raises(ValueError):
        run_train(tiny, tmp_path / "run", "--stage", "set", "--steps", "1", "--video", str(tmp_path / "nope.mp4"))
    assert not os.path.exists(tmp_path / "run")


def test_files_follow_the_umask(tiny, tmp_path):
    """Adapters, caches and states get the user's umask like any other file (safetensors alone writes 0600)."""
    old = os.umask(0o022)
    try:
        run_train(tiny, tmp_path, "--stage", "set", "--steps", "1")
    finally:
        os.umask(old)
    for path in (tmp_path / "set.safetensors", tmp_path / "set-state.pt", tmp_path / "cache" / "video0.safetensors"):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_split_token_and_truncated_prompt_warn(tiny, tmp_path, capsys):
    """A token the tokenizer splits and a prompt longer than text_len are both reported."""
    long_prompt = "a sks square " + "on blue " * 20
    run_train(tiny, tmp_path, "--stage", "set", "--steps", "1", "--id-token", "qqxq", "--prompt", long_prompt)
    err = capsys.readouterr().err
    assert "'qqxq' is" in err and "pieces" in err
    assert "the rest is cut" in err


def test_help_shows_defaults_and_cites_only_the_repository():
    """--help names numeric defaults and cites no file outside the repository."""
    for script in ("train.py", "sample.py"):
        text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert "shared/" not in text and "Chinese" not in text
        for doc in re.findall(r"docs/[\w.-]+", text):
            assert os.path.exists(os.path.join(ROOT, doc)), doc
    text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert re.search(r"--clip CLIP\s+gradient-norm clipping \(default: 0.05\)", text)


def test_threads_flag_sets_torch_threads(tiny, tmp_path):
    """--threads N is what torch runs with (default 1: fast on a shared machine)."""
    before = torch.get_num_threads()
    try:
        run_train(tiny, tmp_path, "--stage", "set", "--steps", "1", "--threads", "2")
        assert torch.get_num_threads() == 2
        assert train.parse_args(["--stage", "set"]).threads == 1 and sample.parse_args([]).threads == 1
    finally:
        torch.set_num_threads(before)


def test_toy_defaults_work_outside_the_project_folder(tmp_path):
    """From another working directory, the toy model and its concept are found (no 'toy/checkpoint' error)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--no-adapter", "--steps", "1",
                             "--out", "clip.mp4"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(tmp_path / "clip.mp4")


def readme_section(title: str) -> list[str]:
    """The shell commands of one README section's code block, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def test_readme_your_own_video_runs_as_written(tmp_path):
    """The README's 'Your own video' commands run as written (steps cut to 2 by a trailing flag)."""
    os.symlink(os.path.join(ROOT, "assets"), tmp_path / "assets")     # the commands' relative paths
    commands = readme_section("Your own video")
    assert any("--stage set" in c for c in commands) and any("--stage sequence" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        if argv[1] in ("train.py", "sample.py"):
            argv += ["--steps", "2"]
        result = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-2000:])


def test_sample_loads_one_part_at_a_time_text_first(tiny, tmp_path, monkeypatch):
    """sample.py encodes the prompts before the DiT is loaded, and decodes after: one part at a time."""
    loaded, real = [], sample.load_wan
    monkeypatch.setattr(sample, "load_wan", lambda model, parts, **kw: loaded.append(parts) or real(model, parts, **kw))
    sample.main(sample.parse_args(sample_args(tiny, tmp_path, "--no-adapter", "--prompt", "a red square")))
    assert loaded == [(), ("text",), ("dit",), ("vae",)]
