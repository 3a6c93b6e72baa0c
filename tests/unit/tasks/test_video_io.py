"""Video I/O: MP4 round trips keep frame count, size and exact frame rate; bad files are clear errors."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from pixelmill.tasks.video.io import VideoError, decode_video, encode_video, pick_codec, probe_video
from pixelmill.tasks.video.metrics import psnr
from pixelmill.tasks.video.synthetic import synthetic_moving_shape, synthetic_pan


@pytest.mark.parametrize("size", [(32, 32), (33, 27)], ids=["even-32x32", "odd-33x27"])
@pytest.mark.parametrize("fps", [Fraction(24), Fraction(30000, 1001)], ids=["24", "29.97"])
def test_round_trip_keeps_count_size_and_rate(tmp_path, size, fps):
    clip = synthetic_pan(frames=10, size=size, shift=(1.0, 0.5))
    dst = tmp_path / "clip.mp4"
    codec = encode_video(clip.frames, fps, dst)
    assert codec == ("libx264" if size == (32, 32) else "mpeg4")

    info = probe_video(dst)
    assert (info.width, info.height, info.frames) == (size[0], size[1], 10)
    assert info.fps_fraction == fps
    assert info.duration == pytest.approx(10 / float(fps), rel=1e-3)

    video = decode_video(dst)
    assert len(video.frames) == 10
    assert all(f.shape == (size[1], size[0], 3) and f.dtype == np.uint8 for f in video.frames)
    assert (video.width, video.height, video.fps) == (size[0], size[1], fps)
    np.testing.assert_allclose(np.diff(video.timestamps), 1 / float(fps), rtol=1e-3)
    # Lossy but faithful: measured 27.8 dB (libx264, 32x32) and 27.3 dB (mpeg4, 33x27);
    # 4:2:0 chroma subsampling alone caps this saturated texture at ~28-30 dB.
    assert psnr(video.frames, clip.frames) > 24.0


def test_decode_from_bytes_equals_decode_from_path(tmp_path):
    clip = synthetic_moving_shape(frames=4)
    dst = tmp_path / "clip.mp4"
    encode_video(clip.frames, 24, dst)
    a, b = decode_video(dst), decode_video(dst.read_bytes())
    assert len(a.frames) == len(b.frames) == 4
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert probe_video(dst.read_bytes()).frames == 4


def test_max_frames_stops_early(tmp_path):
    dst = tmp_path / "clip.mp4"
    encode_video(synthetic_pan(frames=8, size=(32, 32)).frames, 24, dst)
    assert len(decode_video(dst, max_frames=3).frames) == 3


def test_odd_size_refused_for_libx264(tmp_path):
    frames = synthetic_pan(frames=2, size=(33, 27)).frames
    with pytest.raises(ValueError, match="odd size 33x27"):
        encode_video(frames, 24, tmp_path / "x.mp4", codec="libx264")
    assert pick_codec(33, 27) == "mpeg4"


def test_broken_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"broken\.mp4: unreadable or broken video file"):
        decode_video(bad)
    with pytest.raises(VideoError, match=r"<4096 bytes>: unreadable or broken video file"):
        probe_video(bad.read_bytes())


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(VideoError, match=r"nope\.mp4: no such file"):
        decode_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="empty input"):
        decode_video(b"")


def _zero_frame_avi(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()


def test_zero_frame_container_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.avi"
    _zero_frame_avi(empty)
    assert av.open(str(empty)).streams.video  # the container does have a video stream
    with pytest.raises(VideoError, match=r"empty\.avi has 0 frames"):
        decode_video(empty)
    with pytest.raises(VideoError, match=r"empty\.avi has 0 frames"):
        probe_video(empty)


def test_audio_only_file_has_no_video_stream(tmp_path):
    wav = tmp_path / "sound.wav"
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    with pytest.raises(VideoError, match=r"sound\.wav: no video stream"):
        decode_video(wav)


def test_single_frame_video_needs_two_frames(tmp_path):
    one = tmp_path / "one.mp4"
    encode_video(synthetic_pan(frames=1, size=(32, 32)).frames, 24, one)
    with pytest.raises(VideoError, match=r"one\.mp4 has 1 frame; atlas editing needs at least 2$"):
        decode_video(one)
    assert len(decode_video(one, min_frames=1).frames) == 1


def test_synthetic_pan_has_the_stated_motion():
    clip = synthetic_pan(frames=3, size=(40, 30), shift=(2.0, 1.0))
    a, b = clip.frames[0].astype(int), clip.frames[1].astype(int)
    # Frame 1 shows texture point (x + 2, y + 1) at pixel (x, y): frame 0 moved up-left.
    assert np.abs(b[:-1, :-2] - a[1:, 2:]).max() <= 1
    assert np.abs(b - a).mean() > 10  # and it is not a static picture
    np.testing.assert_array_equal(clip.shifts, [[0, 0], [2, 1], [4, 2]])


def test_synthetic_moving_shape_masks_follow_the_path():
    clip = synthetic_moving_shape(frames=4, size=(32, 32), radius=4.0, velocity=(3.0, 1.0))
    for t, mask in enumerate(clip.masks):
        ys, xs = np.nonzero(mask)
        assert mask.sum() == pytest.approx(np.pi * 16, rel=0.15)
        assert (xs.mean(), ys.mean()) == pytest.approx(tuple(clip.centers[t]), abs=0.3)
    np.testing.assert_allclose(np.diff(clip.centers, axis=0), [[3.0, 1.0]] * 3)
