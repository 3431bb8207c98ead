"""Tests for video.py and data.py: reading any clip to Wan's size, writing videos atomically, caches, stage batches.

Test clips are drawn here with av: frame i has a flat grey background of level 20 + 5 i (so the
source index of any output frame can be read back despite compression) and a red square moving right.
"""
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import video as video_io
from model.files import WriteError

H0, W0, N0, FPS0 = 80, 96, 40, 24            # the standard test clip: 80x96, 40 frames at 24 fps


def _picture(i: int, height: int = H0, width: int = W0) -> np.ndarray:
    """Frame i of a test clip, (H, W, 3) uint8."""
    rgb = np.full((height, width, 3), 20 + 5 * i, np.uint8)
    rgb[50:66, 2 * i:2 * i + 16] = (220, 30, 30)
    return rgb


def _source_index(video: torch.Tensor) -> list[int]:
    """Which test-clip frame each (T, 3, H, W) output frame came from: read the grey level of the top rows."""
    level = ((video[:, :, :12].mean(dim=(1, 2, 3)) + 1) * 127.5)
    return ((level - 20) / 5).round().long().tolist()


def _write_clip(path, codec: str, count: int = N0, fps: int = FPS0, times_ms: list[int] | None = None):
    """Encode a test clip with av (not with video_io.write_video, so reading is tested on its own)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W0, H0, "yuv420p"
        if codec.startswith("libvpx"):
            stream.bit_rate = 4_000_000
        if times_ms is not None:                   # variable frame rate: explicit timestamps in ms
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(count if times_ms is None else len(times_ms)):
            frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
            frame.pts, frame.time_base = (i, Fraction(1, fps)) if times_ms is None else (times_ms[i], Fraction(1, 1000))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_png(path, rgb: np.ndarray):
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def _write_frame_folder(folder, count: int):
    folder.mkdir()
    for i in range(count):                       # unpadded names: plain sorting would put 10 before 2
        _write_png(folder / f"frame{i}.png", _picture(i))
    (folder / "notes.txt").write_text("not a frame")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The standard clip in every input kind read_video accepts."""
    root = tmp_path_factory.mktemp("clips")
    paths = {}
    for name, codec in [("mp4", "libx264"), ("mov", "libx264"), ("mkv", "libx264"),
                        ("vp8.webm", "libvpx"), ("vp9.webm", "libvpx-vp9")]:
        paths[name] = root / f"clip.{name}"
        _write_clip(paths[name], codec)
    paths["gif"] = root / "clip.gif"
    frames = torch.stack([torch.from_numpy(_picture(i)).permute(2, 0, 1) for i in range(N0)]) / 127.5 - 1
    video_io.write_video(paths["gif"], frames, FPS0)
    paths["folder"] = root / "frames"
    _write_frame_folder(paths["folder"], N0)
    return paths


# ----------------------------------------------------------------------------- reading

@pytest.mark.parametrize("kind", ["mp4", "mov", "mkv", "vp8.webm", "vp9.webm", "gif", "folder"])
def test_read_every_format(clips, kind):
    """Every input kind reads to (T, 3, H, W) float in [-1, 1] with source frames 0..T-1 at the source fps."""
    video = video_io.read_video(clips[kind], FPS0, 64, 64, 17)
    assert video.shape == (17, 3, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert _source_index(video) == list(range(17))


@pytest.mark.parametrize("fps, num_frames", [(10, 17), (30, 29), (16, 25)])
def test_fps_resampling_picks_nearest_frame(clips, fps, num_frames):
    """Output frame k is the source frame nearest to time k / fps (24 fps source, down and up)."""
    video = video_io.read_video(clips["mp4"], fps, 64, 64, num_frames)
    expected = [round(k * FPS0 / fps + 1e-9) if fps != 16 else int(k * 1.5) for k in range(num_frames)]
    assert _source_index(video) == expected      # at 16 fps, odd k ties halfway: the earlier frame wins


def test_variable_frame_rate_uses_timestamps(tmp_path):
    """With irregular timestamps (and a clip starting at 0.5 s) frames are picked by time, not by index."""
    times_ms = [500, 520, 560, 700, 710, 900, 1000, 1010, 1300]
    _write_clip(tmp_path / "vfr.mkv", "libx264", times_ms=times_ms)
    video = video_io.read_video(tmp_path / "vfr.mkv", 10, 64, 64, 9)
    seconds = (torch.tensor(times_ms) - 500) / 1000
    expected = [int((seconds - k / 10).abs().argmin()) for k in range(9)]
    assert _source_index(video) == expected == [0, 2, 3, 4, 5, 6, 7, 8, 8]


def test_folder_natural_order_at_target_fps(clips):
    """A folder is read in natural name order, one image per frame whatever the fps asked for."""
    video = video_io.read_video(clips["folder"], 8, 64, 64, 13)
    assert _source_index(video) == list(range(13))


@pytest.mark.parametrize("height, width", [(64, 64), (48, 96), (112, 128), (80, 32)])
def test_read_resizes_to_any_multiple_of_16(clips, height, width):
    """Any size that is a multiple of 16, smaller or larger than the source, comes out exactly."""
    assert video_io.read_video(clips["mp4"], FPS0, height, width, 5).shape == (5, 3, height, width)


def test_resize_keeps_aspect_and_crops_center():
    """A 2:1 image cropped to a square keeps the middle half, unstretched; portrait crops rows."""
    wide = torch.zeros(3, 64, 128)
    wide[:, :, :32], wide[:, :, 96:] = -1.0, 1.0   # outer quarters marked, middle half zero
    square = video_io.resize_and_crop(wide, 32, 32)
    assert square.shape == (3, 32, 32)
    torch.testing.assert_close(square[:, :, 1:-1], torch.zeros(3, 32, 30), atol=1e-6, rtol=0)
    tall = wide.transpose(1, 2)                    # (3, 128, 64)
    torch.testing.assert_close(video_io.resize_and_crop(tall, 32, 32), square.transpose(1, 2))
    exact = torch.rand(3, 40, 80)                  # same aspect as the target: a plain resize, no crop
    torch.testing.assert_close(video_io.resize_and_crop(exact, 16, 32),
                               F.interpolate(exact[None], size=(16, 32), mode="bilinear", antialias=True)[0])


# ----------------------------------------------------------------------------- read errors

def _error(path, fps=16, height=64, width=64, num_frames=17) -> str:
    with pytest.raises(video_io.VideoError) as info:
        video_io.read_video(path, fps, height, width, num_frames)
    return str(info.value)


def test_missing_file(tmp_path):
    """A path that does not exist says so."""
    assert "does not exist" in _error(tmp_path / "nope.mp4")


def test_corrupt_file(tmp_path):
    """Random bytes are reported as corrupt, with a re-encode command as the fix."""
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    assert "corrupt" in _error(tmp_path / "noise.mp4") and "ffmpeg" in _error(tmp_path / "noise.mp4")


def test_empty_file(tmp_path):
    """A 0-byte file is reported as empty."""
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.mp4")


def test_audio_only_file(tmp_path):
    """A file with only an audio track is reported as having no video stream."""
    path, rate = tmp_path / "tone.m4a", 16000
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
        for start in range(0, rate, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert "no video stream" in _error(path)


def test_image_passed_as_video(tmp_path):
    """A still image, by extension or misnamed as .mp4, is refused with the hint to pass a folder."""
    _write_png(tmp_path / "still.png", _picture(0))
    assert "is a single image; pass a video or a folder of frames" in _error(tmp_path / "still.png")
    os.rename(tmp_path / "still.png", tmp_path / "still.mp4")
    assert "is a single image" in _error(tmp_path / "still.mp4")


def test_too_few_frames_suggests_largest_4k_plus_1(tmp_path):
    """A short clip names its frame count at the asked fps and the largest valid --frames."""
    _write_clip(tmp_path / "short.mp4", "libx264", count=9, fps=16)
    assert "has 9 frames at 16 fps, need 17: pass --frames 9 or a longer video" in _error(tmp_path / "short.mp4")
    _write_frame_folder(tmp_path / "ten", 10)
    assert "has 10 frames at 16 fps, need 17: pass --frames 9" in _error(tmp_path / "ten")


def test_bad_sizes_suggest_valid_ones(clips):
    """num_frames not 4k+1 and sizes not divisible by 16 are refused with the nearest valid values."""
    assert "use 13 or 17" in _error(clips["mp4"], num_frames=16)
    assert "height=70" in _error(clips["mp4"], height=70) and "use 64 or 80" in _error(clips["mp4"], height=70)
    assert "width=8" in _error(clips["mp4"], width=8)


def test_empty_folder(tmp_path):
    """A folder without images says it has no image files."""
    (tmp_path / "frames").mkdir()
    assert "no image files" in _error(tmp_path / "frames")


# ----------------------------------------------------------------------------- writing

def _grey_frames(count: int = 9) -> torch.Tensor:
    """(T, 3, 32, 48) frames of distinct flat grey levels, in [-1, 1]."""
    levels = torch.tensor([20.0 + 20 * i for i in range(count)]) / 127.5 - 1
    return levels.view(-1, 1, 1, 1).expand(count, 3, 32, 48).clone()


@pytest.mark.parametrize("name, lossless, atol", [("out.mp4", False, 3), ("out.mp4", True, 1), ("out.gif", False, 1)])
def test_write_read_round_trip(tmp_path, name, lossless, atol):
    """What write_video writes, read_video reads back: same frames, within a few grey levels."""
    frames = _grey_frames()
    video_io.write_video(tmp_path / name, frames, 16, lossless=lossless)
    back = video_io.read_video(tmp_path / name, 16, 32, 48, 9)
    torch.testing.assert_close(back, frames, atol=atol / 127.5 + 1e-6, rtol=0)
    assert os.listdir(tmp_path) == [name]          # no temp file left behind


_WRITE_AFTER_LOADING = """
import sys, torch
from model.loader import load_wan
from video import write_video
models = load_wan("toy/checkpoint")                 # what sample.py does first: the heap fills up
with torch.no_grad():
    models.vae.decode(torch.randn(1, 16, 5, 8, 16))
del models
# two panels as sample.py lays them out: a blurry blob moving over a flat background in each
t = torch.arange(17.0)[:, None, None]
y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
def panel(background, colour, speed):
    blob = torch.exp(-((x - 20 - speed * t) ** 2 + (y - 32 - 8 * torch.sin(t / 3)) ** 2) / 60)[:, None]
    return torch.tensor(background).view(1, 3, 1, 1) * (1 - blob) + torch.tensor(colour).view(1, 3, 1, 1) * blob
frames = torch.cat([panel([-0.7, -0.4, 0.7], [0.9, 0.0, 0.6], 1.5), torch.ones(17, 3, 64, 2),
                    panel([0.0, 0.0, 0.0], [0.9, 0.3, 0.5], 1.0)], dim=3)                 # (17, 3, 64, 130)
frames = frames + 0.02 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
write_video(sys.argv[1], frames.clamp(-1, 1), 8)
"""


def test_write_is_the_same_in_every_process(tmp_path):
    """The same frames make the same file in every fresh process. libx264's macroblock-tree rate control
    read memory that differed between processes: sample.py's videos changed by up to 23 levels from run
    to run with the same latents (write_video turns it off)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.mp4"
        subprocess.run([sys.executable, "-c", _WRITE_AFTER_LOADING, str(path)], cwd=root, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        files.append(path.read_bytes())
    assert files[1] == files[0] and files[2] == files[0]


def test_write_invalid_frames_leaves_nothing(tmp_path):
    """A frame array of the wrong layout is refused before any file is created."""
    with pytest.raises(video_io.VideoError, match=r"\(T, 3, H, W\)"):
        video_io.write_video(tmp_path / "out.mp4", torch.zeros(9, 32, 48, 3, dtype=torch.uint8), 16)
    assert os.listdir(tmp_path) == []


def test_write_failing_midway_keeps_old_file(tmp_path, monkeypatch):
    """When encoding fails after some frames, the old target is untouched and no temp file remains."""
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous video")
    real = video_io._uint8_frames

    def fail_after_three(frames):
        for i, rgb in enumerate(real(frames)):
            if i == 3:
                raise RuntimeError("encoder died")
            yield rgb
    monkeypatch.setattr(video_io, "_uint8_frames", fail_after_three)
    for name in ("out.mp4", "out.gif"):
        with pytest.raises(RuntimeError, match="encoder died"):
            video_io.write_video(tmp_path / name, _grey_frames(), 16)
    assert target.read_bytes() == b"previous video" and os.listdir(tmp_path) == ["out.mp4"]


def test_write_to_unwritable_folder(tmp_path):
    """An output path under a regular file (unwritable even for root) raises a WriteError naming the fix."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(WriteError, match="not a writable folder"):
        video_io.write_video(tmp_path / "file.txt" / "out.mp4", _grey_frames(), 16)


# ----------------------------------------------------------------------------- caches

class CountingVAE(torch.nn.Module):
    """Stand-in with Wan-VAE shapes: frame 0 alone, then 4:1 in time, 8:1 in space; counts encode calls
    and how often it was loaded (called as the loader)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))      # its dtype is the pixels' dtype
        self.calls = self.loads = 0

    def __call__(self):                                      # the loader cache_latents calls on a miss
        self.loads += 1
        return self

    def encode(self, video: torch.Tensor) -> torch.Tensor:   # (B, 3, T, H, W) -> (B, 3, F, H/8, W/8)
        self.calls += 1
        first, rest = video[:, :, :1], video[:, :, 1:]
        rest = rest.unflatten(2, (-1, 4)).mean(dim=3)         # (B, 3, (T-1)/4, H, W)
        return F.avg_pool3d(torch.cat([first, rest], dim=2), (1, 8, 8))


def test_cache_latents_encodes_once(clips, tmp_path):
    """The first call encodes every frame alone plus the clip; an unchanged second call encodes nothing."""
    vae, cache = CountingVAE(), tmp_path / "latents.safetensors"
    first = data.cache_latents(clips["mp4"], vae, cache, FPS0, 64, 64, 17, "toy")
    assert vae.calls == 17 + 1
    assert first.frames.shape == (17, 3, 1, 8, 8) and first.clip.shape == (3, 5, 8, 8)
    torch.testing.assert_close(first.frames[0, :, 0], first.clip[:, 0])  # causal: frame 0 is encoded alone
    again = data.cache_latents(clips["mp4"], vae, cache, FPS0, 64, 64, 17, "toy")
    assert vae.calls == 18 and vae.loads == 1                  # a hit does not even load the VAE
    torch.testing.assert_close(again.frames, first.frames)
    torch.testing.assert_close(again.clip, first.clip)
    assert os.listdir(tmp_path) == ["latents.safetensors"]


def test_cache_latents_reencodes_on_new_fingerprint(clips, tmp_path):
    """A new model id, frame count, touched source file or broken cache file each trigger a fresh encode."""
    vae, cache, video = CountingVAE(), tmp_path / "latents.safetensors", clips["mkv"]
    data.cache_latents(video, vae, cache, FPS0, 64, 64, 5, "toy")
    data.cache_latents(video, vae, cache, FPS0, 64, 64, 5, "other-model")
    data.cache_latents(video, vae, cache, FPS0, 64, 64, 9, "other-model")
    assert vae.calls == 6 + 6 + 10
    stat = os.stat(video)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data.cache_latents(video, vae, cache, FPS0, 64, 64, 9, "other-model")
    assert vae.calls == 32
    cache.write_bytes(b"garbage")
    data.cache_latents(video, vae, cache, FPS0, 64, 64, 9, "other-model")
    assert vae.calls == 42


def test_cache_text(tmp_path):
    """Prompt states are encoded once per (prompts, model); changing a prompt re-encodes."""
    calls = []

    def encode_fn(prompts):
        calls.append(list(prompts))
        return torch.randn(len(prompts), 7, 4)    # (P, S, D)
    cache = tmp_path / "text.safetensors"
    states = data.cache_text(["a [v] man", "a [v] man dancing"], encode_fn, cache, "umt5")
    torch.testing.assert_close(data.cache_text(["a [v] man", "a [v] man dancing"], encode_fn, cache, "umt5"), states)
    assert len(calls) == 1 and states.shape == (2, 7, 4)
    data.cache_text(["a [v] woman", "a [v] man dancing"], encode_fn, cache, "umt5")
    assert len(calls) == 2


# ----------------------------------------------------------------------------- stage batches

def _tagged_video(index: int, count: int) -> data.VideoLatents:
    """Latents whose values say which video and frame they are: 100 * video + frame."""
    frames = (100.0 * index + torch.arange(count, dtype=torch.float32)).view(-1, 1, 1, 1, 1).expand(count, 2, 1, 2, 2)
    return data.VideoLatents(frames=frames.clone(), clip=frames[:, :, 0].transpose(0, 1).clone())


def test_set_batches_cover_each_frame_once_per_epoch():
    """Stage set draws single frames of all videos, each exactly once per epoch, tagged with their video."""
    videos = [_tagged_video(0, 5), _tagged_video(1, 3)]
    batches = data.set_batches(videos, 4, torch.Generator().manual_seed(0))
    for _ in range(3):                               # 3 epochs of 8 frames = 2 batches each
        seen = []
        for _ in range(2):
            latents, owner = next(batches)
            assert latents.shape == (4, 2, 1, 2, 2)
            tags = latents[:, 0, 0, 0, 0]
            assert torch.equal(owner, (tags // 100).long())
            seen += tags.tolist()
        assert sorted(seen) == [0, 1, 2, 3, 4, 100, 101, 102]


def test_sequence_batches_repeat_the_ordered_clip():
    """Stage sequence yields the whole clip in frame order; one video means every row is that clip."""
    video = _tagged_video(0, 5)
    latents, owner = next(data.sequence_batches([video], 3, torch.Generator().manual_seed(0)))
    assert latents.shape == (3, 2, 5, 2, 2) and owner.tolist() == [0, 0, 0]
    assert latents[:, 0, :, 0, 0].tolist() == [[0, 1, 2, 3, 4]] * 3
    with pytest.raises(ValueError, match="differ in shape"):
        next(data.sequence_batches([video, _tagged_video(1, 3)], 2, torch.Generator()))
