"""Video I/O with PyAV: probe, decode to RGB frames, encode MP4.

Every failure a user's file can cause (unreadable or broken, no video stream, too few
frames) raises :class:`VideoError` with a short message naming the source; a job turns it
into a reject row.

Odd frame sizes: H.264 in 4:2:0 cannot code an odd width or height (its cropping works
in 2-pixel units), so :func:`encode_video` uses ``libx264`` when both sides are even and
MPEG-4 Part 2 (``mpeg4``, still yuv420p) otherwise: that codec stores the exact size, so
every decoder returns frames of the input size with no padding or cropping step.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VideoSource = str | os.PathLike | bytes | bytearray | memoryview


class VideoError(ValueError):
    """A video that cannot be used: unreadable, no video stream, or too few frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What a container says about its first video stream.

    Attributes:
        fps: frames per second as a float.
        fps_fraction: the exact rate (e.g. ``Fraction(30000, 1001)``).
        width, height: frame size in pixels.
        frames: number of frames (counted from packets when the container has no count).
        duration: seconds.
        codec: decoder name.
    """

    fps: float
    fps_fraction: Fraction
    width: int
    height: int
    frames: int
    duration: float
    codec: str


@dataclass
class DecodedVideo:
    """Decoded frames of a video.

    Attributes:
        frames: HxWx3 uint8 RGB arrays.
        timestamps: presentation time of each frame in seconds.
        fps: the stream's frame rate.
        width, height: frame size.
    """

    frames: list[np.ndarray]
    timestamps: list[float]
    fps: Fraction
    width: int
    height: int


def _describe(src: VideoSource) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(src)


def _open(src: VideoSource) -> tuple[av.container.InputContainer, str]:
    name = _describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoError(f"{name}: empty input, not a video")
        target: object = io.BytesIO(bytes(src))
    else:
        if not Path(src).is_file():
            raise VideoError(f"{name}: no such file")
        target = str(src)
    try:
        return av.open(target, mode="r"), name
    except av.error.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(f"{name}: unreadable or broken video file ({reason})") from exc


def _video_stream(container: av.container.InputContainer, name: str) -> av.VideoStream:
    if not container.streams.video:
        if not container.streams:
            raise VideoError(f"{name}: no video stream (the container is empty: 0 frames)")
        raise VideoError(f"{name}: no video stream")
    return container.streams.video[0]


def _rate(stream: av.VideoStream, name: str) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError(f"{name}: video stream has no frame rate")
    return Fraction(rate)


def probe_video(src: VideoSource) -> VideoInfo:
    """Frame rate, size, frame count and duration of the first video stream.

    Args:
        src: a local path or the file's bytes.

    Raises:
        VideoError: unreadable file, no video stream, or zero frames.
    """
    container, name = _open(src)
    with container:
        stream = _video_stream(container, name)
        rate = _rate(stream, name)
        frames = stream.frames
        if not frames:
            try:
                frames = sum(1 for p in container.demux(stream) if p.size > 0)
            except av.error.FFmpegError as exc:
                raise VideoError(f"{name}: broken video stream ({exc})") from exc
        if frames == 0:
            raise VideoError(f"{name} has 0 frames")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / float(rate)
        return VideoInfo(
            fps=float(rate),
            fps_fraction=rate,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frames=int(frames),
            duration=duration,
            codec=stream.codec_context.name,
        )


def _plural(n: int) -> str:
    return f"{n} frame" if n == 1 else f"{n} frames"


MAX_FRAME_PIXELS = 4096 * 4096
"""Largest frame (width x height) decoded: a bigger one is refused from the header, before any frame is decoded."""


def decode_video(
    src: VideoSource, max_frames: int | None = None, min_frames: int = 2, max_pixels: int = MAX_FRAME_PIXELS
) -> DecodedVideo:
    """Decode the first video stream to RGB frames.

    Args:
        src: a local path or the file's bytes.
        max_frames: stop after this many frames (None: all).
        min_frames: fewer decoded frames than this is an error; atlas editing needs motion,
            so the default is 2.
        max_pixels: largest accepted frame size (from the stream header, checked before decoding).

    Raises:
        VideoError: unreadable or broken file, no video stream, frames over ``max_pixels``,
            or fewer than ``min_frames``.
    """
    if max_frames is not None and max_frames < max(min_frames, 1):
        raise ValueError(f"max_frames={max_frames} is below min_frames={min_frames}")
    container, name = _open(src)
    with container:
        stream = _video_stream(container, name)
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise VideoError(f"{name}: frames of {w}x{h} exceed the {max_pixels}-pixel limit "
                             f"({int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)}); downscale the video first")
        rate = _rate(stream, name)
        stream.thread_type = "AUTO"
        frames: list[np.ndarray] = []
        stamps: list[float] = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                stamps.append(float(frame.time) if frame.time is not None else len(stamps) / float(rate))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            raise VideoError(f"{name}: broken video stream after {_plural(len(frames))} ({exc})") from exc
    if not frames:
        raise VideoError(f"{name} has 0 frames")
    if len(frames) < min_frames:
        raise VideoError(
            f"{name} has {_plural(len(frames))}; atlas editing needs at least {min_frames}"
        )
    h, w = frames[0].shape[:2]
    return DecodedVideo(frames=frames, timestamps=stamps, fps=rate, width=w, height=h)


def pick_codec(width: int, height: int) -> str:
    """``libx264`` for even sizes when PyAV's FFmpeg has it, else ``mpeg4`` (any size, 4:2:0)."""
    if width % 2 == 0 and height % 2 == 0 and "libx264" in av.codecs_available:
        return "libx264"
    return "mpeg4"


def encode_video(
    frames: Sequence[np.ndarray],
    fps: Fraction | int | float,
    dst_path: str | os.PathLike,
    codec: str | None = None,
    crf: int = 18,
    mpeg4_qscale: int = 2,
) -> str:
    """Write RGB frames to an MP4 file (yuv420p, ``moov`` first for streaming) at exactly ``fps``.

    The decoded size always equals the input size: odd sizes use ``mpeg4``, which codes
    them exactly (see the module docstring). Returns the codec used.

    Args:
        frames: HxWx3 uint8 RGB arrays, all the same size.
        fps: frame rate; pass a Fraction (``Fraction(30000, 1001)``) for NTSC rates. A float
            is turned into the nearest fraction with a denominator up to 100000.
        dst_path: output ``.mp4`` path (parent folders are created).
        codec: force a codec; ``libx264`` with an odd size is refused.
        crf: libx264 constant rate factor (lower is better quality).
        mpeg4_qscale: mpeg4 fixed quantiser, 1 (best) to 31.
    """
    if len(frames) == 0:
        raise ValueError("encode_video needs at least one frame")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"frames must be HxWx3 RGB arrays, got shape {first.shape}")
    h, w = first.shape[:2]
    rate = Fraction(fps).limit_denominator(100000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    codec = codec or pick_codec(w, h)
    if codec in ("libx264", "h264") and (w % 2 or h % 2):
        raise ValueError(f"{codec} in yuv420p cannot code the odd size {w}x{h}; use mpeg4")
    Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(dst_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": str(crf), "preset": "medium"}
        elif codec == "mpeg4":
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = int(mpeg4_qscale) * 118  # FF_QP2LAMBDA
        for i, arr in enumerate(frames):
            arr = np.asarray(arr)
            if arr.shape != first.shape:
                raise ValueError(f"frame {i} has shape {arr.shape}, frame 0 has {first.shape}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return codec
