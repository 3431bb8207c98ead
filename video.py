"""Video in and out: any clip to exactly the frames Wan wants, and frames to mp4 / mov / mkv / gif.

Reading turns any clip (mp4, mov, webm, mkv, gif, or a folder of frames) into exactly what Wan
wants: `num_frames` = 4k+1 frames at a fixed fps, resized and center-cropped to a multiple of 16.
Writing goes through model/files.py's atomic_path: a video appears whole or not at all.

Shapes: T video frames, H W pixel height/width. Pixels are float in [-1, 1], channels first:
(T, 3, H, W), the range the VAE encodes and decodes.
"""
import os
import re
from fractions import Fraction
from typing import Iterator

import av
import torch
import torch.nn.functional as F

from model.files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_MUXERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".gif": "gif"}  # write_video


class VideoError(ValueError):
    """A video (or frame folder, or output path) that cannot be used; the message says how to fix it."""


def check_video_size(num_frames: int, height: int, width: int) -> None:
    """Raise unless (num_frames, height, width) is a size Wan can encode; scripts call it before loading models."""
    if num_frames < 1 or (num_frames - 1) % 4:
        # the causal VAE keeps frame 0 alone and folds every following 4 frames into one latent frame
        low = max(1, 4 * ((num_frames - 1) // 4) + 1)
        raise VideoError(f"num_frames={num_frames} is not 4k+1 (Wan's VAE compresses time 1 + 4:1): "
                         f"use {low} or {low + 4}")
    for name, size in (("height", height), ("width", width)):
        if size < 16 or size % 16:
            # /8 in the VAE, then /2 by the DiT's patchify
            low = max(16, size // 16 * 16)
            raise VideoError(f"{name}={size} is not a positive multiple of 16 (VAE /8, DiT patch /2): "
                             f"use {low} or {low + 16}")


# ----------------------------------------------------------------------------- reading

def resize_and_crop(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (3, H0, W0) so it covers (height, width) with its aspect ratio kept, then cut out the center."""
    _, h0, w0 = frame.shape
    scale = max(height / h0, width / w0)                      # the side that is short *for the target* fits
    new_h, new_w = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    # antialias: without it, bilinear downscaling of a 1080p clip aliases fine textures
    frame = F.interpolate(frame[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                          align_corners=False)[0]             # (3, new_h, new_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frame[:, top:top + height, left:left + width]      # (3, height, width)


def _frame_to_tensor(frame: av.VideoFrame, height: int, width: int) -> torch.Tensor:
    """One decoded frame (any pixel format) as (3, height, width) float in [-1, 1]."""
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))  # (H0, W0, 3) uint8, numpy only as the bridge
    rgb = rgb.permute(2, 0, 1).float() / 127.5 - 1.0          # (3, H0, W0) in [-1, 1]
    return resize_and_crop(rgb, height, width)


def _natural_key(name: str) -> list:
    """'frame2.png' sorts before 'frame10.png': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _folder_frames(folder: str, fps: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time, frame) for each image of a folder in natural name order; image i is shown at time i / fps."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not names:
        raise VideoError(f"folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)}): "
                         "put the frames there, or pass a video file")
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        try:
            with av.open(path) as container:
                frame = next(container.decode(video=0))
        except (av.FFmpegError, StopIteration, IndexError) as err:
            raise VideoError(f"frame {path} could not be decoded ({err}): replace or delete it") from err
        yield i / fps, frame


def require_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"video {path} does not exist: check the path")


def _open_video(path: str) -> av.container.InputContainer:
    """Open a video file, turning every way it can be unusable into a VideoError with a fix."""
    require_exists(path)
    if path.lower().endswith(IMAGE_EXTENSIONS):
        raise VideoError(f"{path} is a single image; pass a video or a folder of frames")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video {path} is empty (0 bytes): copy or export it again")
    try:
        container = av.open(path)
    except av.FFmpegError as err:
        raise VideoError(f"{path} could not be read as a video ({err}): the file is corrupt or not a "
                         "video; re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4") from err
    # ffmpeg opens a still image (even a misnamed one) through an image demuxer: png_pipe, image2, ...
    is_image = container.format.name == "image2" or container.format.name.endswith("_pipe")
    if is_image or not container.streams.video:
        container.close()
        if is_image:
            raise VideoError(f"{path} is a single image; pass a video or a folder of frames")
        raise VideoError(f"{path} has no video stream (audio only?): pass a file with a video track")
    return container


def _file_frames(container: av.container.InputContainer, fps: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time in seconds from the first frame, frame) for the decoded frames of the first video stream."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"                               # frame-parallel decoding, same frames
    rate = stream.average_rate or stream.guessed_rate         # only used when a frame has no timestamp
    start, last = None, None
    for i, frame in enumerate(container.decode(stream)):
        # frame.time = pts * time_base is the true presentation time, also in variable-frame-rate clips
        time = frame.time if frame.time is not None else i / float(rate or fps)
        start = time if start is None else start              # clips may start at pts > 0 (edit lists)
        if last is not None and time <= last:
            continue                                          # repeated or out-of-order pts: keep the first
        last = time
        yield time - start, frame


def _resample_nearest(timed_frames: Iterator[tuple[float, av.VideoFrame]], fps: float, num_frames: int,
                      height: int, width: int) -> list[torch.Tensor]:
    """The source frame nearest to each target time t_k = k / fps, for k < num_frames (fewer if the clip ends)."""
    picked: list[torch.Tensor] = []
    chosen_before = None                                      # last av frame converted, to reuse its tensor
    prev_time, prev_frame, period = 0.0, None, 1.0 / fps
    for time, frame in timed_frames:
        # every target time up to this frame's time now has both neighbours: prev_frame and frame
        while len(picked) < num_frames and len(picked) / fps <= time:
            target = len(picked) / fps
            # a tie (equal within float rounding, 1 us) goes to the earlier frame, the same on any machine
            earlier_wins = prev_frame is not None and target - prev_time <= time - target + 1e-6
            chosen = prev_frame if earlier_wins else frame
            picked.append(picked[-1] if chosen is chosen_before else _frame_to_tensor(chosen, height, width))
            chosen_before = chosen
        if len(picked) == num_frames:
            return picked                                     # stop decoding: the rest is not needed
        if prev_frame is not None:
            period = time - prev_time                         # source frame period, as the clip ends
        prev_time, prev_frame = time, frame
    # the last frame stays nearest for target times up to half a source period after it
    while prev_frame is not None and len(picked) < num_frames and len(picked) / fps <= prev_time + period / 2:
        picked.append(picked[-1] if prev_frame is chosen_before else _frame_to_tensor(prev_frame, height, width))
        chosen_before = prev_frame
    return picked


def read_video(path: str, fps: float, height: int, width: int, num_frames: int) -> torch.Tensor:
    """The first `num_frames` frames at `fps`, resized and center-cropped: (T, 3, H, W) float in [-1, 1].

    `path` is a video file or a folder of images (one image per frame at `fps`).
    """
    path = os.fspath(path)
    check_video_size(num_frames, height, width)
    if fps <= 0:
        raise VideoError(f"fps={fps} must be positive: Wan2.1 was trained at 16 fps")
    try:
        if os.path.isdir(path):
            frames = _resample_nearest(_folder_frames(path, fps), fps, num_frames, height, width)
        else:
            with _open_video(path) as container:
                frames = _resample_nearest(_file_frames(container, fps), fps, num_frames, height, width)
    except av.FFmpegError as err:                             # broken packets halfway through the clip
        raise VideoError(f"{path} failed to decode ({err}): the file is corrupt or truncated; "
                         "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4") from err
    if not frames:
        raise VideoError(f"{path} contains no decodable frames: re-encode or replace it")
    if len(frames) < num_frames:
        usable = 4 * ((len(frames) - 1) // 4) + 1            # the largest 4k+1 the clip can give
        raise VideoError(f"{path} has {len(frames)} frames at {fps:g} fps, need {num_frames}: "
                         f"pass --frames {usable} or a longer video")
    return torch.stack(frames)                                # (T, 3, H, W)


# ----------------------------------------------------------------------------- writing

def _uint8_frames(frames: torch.Tensor) -> Iterator:
    """(T, 3, H, W) float in [-1, 1] -> one (H, W, 3) uint8 numpy array per frame, for av."""
    for frame in frames:
        rgb = ((frame.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
        yield rgb.permute(1, 2, 0).contiguous().cpu().numpy()                             # (H, W, 3)


def _gif_palette_graph(width: int, height: int, time_base: Fraction) -> av.filter.Graph:
    """rgb24 -> pal8 with one 256-colour palette fitted to the whole clip (ffmpeg palettegen + paletteuse)."""
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=time_base)
    split, palettegen = graph.add("split"), graph.add("palettegen", "stats_mode=full")
    paletteuse, sink = graph.add("paletteuse"), graph.add("buffersink")
    source.link_to(split)
    split.link_to(palettegen, 0, 0)                           # copy 1: count the colours of every frame
    split.link_to(paletteuse, 1, 0)                           # copy 2: map each frame onto the palette
    palettegen.link_to(paletteuse, 0, 1)
    paletteuse.link_to(sink)
    graph.configure()
    return graph


def write_video(path: str, frames: torch.Tensor, fps: float, lossless: bool = False, crf: int = 18) -> None:
    """Write (T, 3, H, W) float frames in [-1, 1] (what read_video returns) to .mp4/.mov/.mkv or .gif.

    Video files are h264: yuv420p at `crf` (18: visually lossless, plays everywhere) or, with
    `lossless`, yuv444p at qp 0 (exact up to the RGB<->YUV rounding, ~1 level; fewer players).
    GIF stores 256 colours fitted to the clip and delays in 1/100 s, so 16 fps plays as ~16.7.
    The file appears complete or not at all.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_MUXERS:
        raise VideoError(f"cannot write {path}: unknown extension, use one of {', '.join(VIDEO_MUXERS)}")
    if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point() or len(frames) == 0:
        raise VideoError(f"write_video wants frames (T, 3, H, W) float in [-1, 1], got "
                         f"{tuple(frames.shape)} {frames.dtype}: convert them first")
    _, _, height, width = frames.shape
    if ext != ".gif" and not lossless and (height % 2 or width % 2):
        raise VideoError(f"yuv420p needs an even size, got {height}x{width}: crop the frames or pass lossless=True")
    rate = Fraction(fps).limit_denominator(1001)              # 29.97 -> 30000/1001, exact in the container
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format=VIDEO_MUXERS[ext]) as container:
        if ext == ".gif":
            stream = container.add_stream("gif", rate=rate)
            stream.pix_fmt = "pal8"
            # palettegen must see all frames before paletteuse emits any: frames come out at the end
            graph = _gif_palette_graph(width, height, 1 / rate)
        else:
            # mbtree off: libx264's macroblock-tree rate control read memory that differs between
            # processes, and the same frames came out up to 23 levels apart from run to run
            options = {"qp": "0"} if lossless else {"crf": str(crf), "x264-params": "mbtree=0"}
            stream = container.add_stream("libx264", rate=rate, options=options)
            stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
            graph = None
        stream.width, stream.height = width, height
        for i, rgb in enumerate(_uint8_frames(frames)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            if graph is None:
                container.mux(stream.encode(frame))
            else:
                graph.push(frame)
        if graph is not None:
            graph.push(None)                                  # end of stream: the palette is now known
            for _ in range(len(frames)):
                container.mux(stream.encode(graph.pull()))
        container.mux(stream.encode(None))                    # flush the encoder's delayed frames


@torch.no_grad()
def write_panels(path: str, vae, latents: torch.Tensor, fps: float, gif: bool = False) -> None:
    """Decode latent clips (B, C, F, H, W) one at a time (the VAE's peak memory is one clip's), lay them
    left to right and write them to `path`, and with `gif` also to a .gif beside it."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    clips = [vae.decode(z[None].to(device, dtype))[0].float().cpu().transpose(0, 1) for z in latents]  # [(T, 3, H, W)]
    strip = side_by_side(clips)                                                       # (T, 3, H, B*W + gaps)
    write_video(path, strip, fps=fps)
    if gif:
        write_video(os.path.splitext(path)[0] + ".gif", strip, fps=fps)


def side_by_side(clips: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Clips (T, 3, H, W_i) laid left to right with white `gap`-pixel separators: (T, 3, H, sum W_i + gaps)."""
    T, _, H, _ = clips[0].shape
    white = torch.ones(T, 3, H, gap)
    return torch.cat([piece for clip in clips for piece in (clip.float().cpu(), white)][:-1], dim=3)
