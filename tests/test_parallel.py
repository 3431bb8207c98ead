"""Several processes (torchrun, gloo on the CPU): the same adapter as one process, a sharded base, failures."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import ROOT

# Exact-comparison settings: no DropConnect (its masks are drawn per forward, so they differ with
# the number of forwards), SGD-like small steps, enough prior samples to split over 2 ranks.
COMMON = ["--stage", "set", "--drop", "0", "--text-mask", "0.3", "--prior-weight", "0.5", "--prior-batch", "2",
          "--lr", "1e-3", "--clip", "1.0", "--batch", "1", "--threads", "1"]


def torchrun(tiny, run_dir, *extra: str, nproc: int = 2, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(ROOT, "train.py"), *tiny["flags"], "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, env=env, cwd=ROOT, **popen)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def single(tiny, run_dir, *extra: str) -> None:
    flags = [*tiny["flags"], "--run-dir", str(run_dir), *extra]
    train.main(train.parse_args(flags))


def assert_same_adapter(a, b) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    assert any(v.abs().sum() > 0 for v in first.values()), "nothing trained"
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6)


def test_two_ranks_equal_one_process_with_accumulation(tiny, tmp_path):
    """2 ranks x micro-batch 1 train the adapter that 1 process x micro-batch 1 x accumulation 2 trains."""
    result = torchrun(tiny, tmp_path / "ranks", *COMMON, "--grad-accum", "1", "--steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 2 concept samples" in result.stderr + result.stdout
    single(tiny, tmp_path / "one", *COMMON, "--grad-accum", "2", "--steps", "3")
    assert_same_adapter(tmp_path / "one" / "set.safetensors", tmp_path / "ranks" / "set.safetensors")


def test_sharded_base_trains_the_same_adapter(tiny, tmp_path):
    """--shard-base (FSDP2 over the frozen linears) gives the unsharded run's adapter, in the same file format."""
    for name, extra in (("plain", ()), ("sharded", ("--shard-base", "--grad-ckpt"))):
        result = torchrun(tiny, tmp_path / name, *COMMON, "--grad-accum", "1", "--steps", "3", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(tmp_path / "plain" / "set.safetensors", tmp_path / "sharded" / "set.safetensors")


def test_resume_needs_the_same_number_of_processes(tiny, tmp_path):
    """A state written by 2 ranks is refused by 1 process with the --nproc-per-node to use."""
    result = torchrun(tiny, tmp_path, *COMMON, "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(ValueError, match="--nproc-per-node 2"):
        single(tiny, tmp_path, *COMMON, "--steps", "4", "--resume")


def test_a_killed_rank_ends_the_run_cleanly(tiny, tmp_path):
    """Killing one rank mid-run ends the whole run with an error, in bounded time, leaving no partial file."""
    log = tmp_path / "set-log.jsonl"
    process = torchrun(tiny, tmp_path, *COMMON, "--steps", "100000", "--save-every", "2", "--dist-timeout", "30",
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
            time.sleep(0.5)
        assert log.exists(), "the run never started"
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and worker_of(int(p), process.pid)]
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)                    # one rank dies without a word
        output, _ = process.communicate(timeout=90)              # the others must not hang
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert not (tmp_path / "set.safetensors").exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert torch.load(tmp_path / "set-state.pt", weights_only=True)["step"] % 2 == 0   # a whole checkpoint


def worker_of(pid: int, parent: int) -> bool:
    """Whether process `pid` is a child of `parent` (torchrun's workers are its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except (OSError, IndexError, ValueError):
        return False
