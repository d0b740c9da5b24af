"""The video decoder: container sniffing, sampling plan, child-process decoding and its limits."""

from __future__ import annotations

import math
import os
import signal
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from api.detector import preprocess_image
from api.utils.video_probe import VideoDecodeError, VideoReader, sample_indices, sniff
from tests.helpers import image_bytes
from tests.video_clips import decoded_levels, write_clip

LIMITS = {"timeout_s": 60.0, "memory_mb": 4096}


def test_sample_indices_are_slice_centres():
    assert sample_indices(50, 7) == [3, 10, 17, 25, 32, 39, 46]
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(1, 32) == [0]  # never more frames than the video has
    assert sample_indices(5, 5) == [0, 1, 2, 3, 4]
    assert sample_indices(3, 1) == [1]
    for count, wanted in [(14400, 32), (14400, 256), (7, 3), (1000, 999)]:
        indices = sample_indices(count, wanted)
        assert len(indices) == min(count, wanted)
        assert indices == sorted(set(indices)) and indices[0] >= 0 and indices[-1] < count
        n = len(indices)
        assert indices == [math.floor(Fraction(2 * i + 1, 2 * n) * count) for i in range(n)]


@pytest.mark.parametrize(("content", "kind", "words"), [
    (b"", "empty", "empty"),
    (image_bytes("PNG"), "image", "PNG image"),
    (image_bytes("JPEG"), "image", "JPEG image"),
    (image_bytes("GIF"), "image", "GIF image"),
    (image_bytes("WEBP"), "image", "WebP image"),
    (b"just some text, saved as movie.mp4\n" * 20, "not_video", "not a recognised video container"),
    (b"#EXTM3U\n#EXTINF:10,\nhttp://169.254.169.254/latest\n", "not_video", "not a recognised"),
])
def test_sniff_decides_from_content_never_the_name(tmp_path, content, kind, words):
    path = tmp_path / "movie.mp4"  # the name says mp4; only the bytes count
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError) as caught:
        sniff(path)
    assert caught.value.kind == kind
    assert words in caught.value.message


def test_sniff_names_containers(tmp_path):
    levels = [10, 20, 30]
    # Written with the right extension (OpenCV picks the container from it), then misnamed.
    assert sniff(write_clip(tmp_path / "a.avi", "MJPG", 10, levels).rename(tmp_path / "a.mp4")) == "avi"
    assert sniff(write_clip(tmp_path / "b.mp4", "mp4v", 10, levels).rename(tmp_path / "b.webm")) == "mp4"
    assert sniff(write_clip(tmp_path / "c.webm", "VP80", 10, levels).rename(tmp_path / "c.png")) == "webm"


@pytest.mark.parametrize(("fourcc", "suffix"), [("MJPG", ".avi"), ("mp4v", ".mp4"), ("VP80", ".webm")])
def test_every_strategy_returns_the_frames_sequential_decoding_defines(tmp_path, fourcc, suffix):
    levels = [(i * 5) % 256 for i in range(50)]
    path = write_clip(tmp_path / f"clip{suffix}", fourcc, 24, levels, size=(96, 64))
    reference = decoded_levels(path.read_bytes(), tmp_path, suffix)
    wanted = [1, 3, 17, 18, 30, 47, 49]
    for strategy in ("seek", "sequential", "auto"):
        with VideoReader(path, **LIMITS) as reader:
            info = reader.probe()
            assert (info.frame_count, info.fps, info.width, info.height) == (50, 24.0, 96, 64)
            frames = list(reader.frames(wanted, size=None, strategy=strategy))
            stats = reader.stats
        assert [f.index for f in frames] == wanted
        got = [np.frombuffer(f.rgb, np.uint8).mean() / 255.0 for f in frames]
        assert got == pytest.approx([reference[i] for i in wanted], abs=0.01), strategy
        assert stats["strategy"] == strategy
    if fourcc == "MJPG":  # intra-only: decoded frame i is the written frame i (level 5*i, +-1 from JPEG)
        assert [round(v * 255 / 5) for v in got] == wanted


class _PricedCapture:
    """A real OpenCV capture whose operations cost scripted time on a fake clock.

    The cost model compares measured prices; on a loaded machine real prices are noise, so the
    test sets them (decoding itself stays real) and asserts the choices they imply.
    """

    def __init__(self, capture, grab_s: float, seek_s: float) -> None:
        self.capture, self.grab_s, self.seek_s = capture, grab_s, seek_s
        self.now = 0.0
        self.seeking = False

    def clock(self) -> float:
        return self.now

    def grab(self):
        self.now += self.grab_s
        return self.capture.grab()

    def set(self, prop, value):
        self.seeking = True
        return self.capture.set(prop, value)

    def read(self):
        self.now += self.seek_s if self.seeking else self.grab_s
        self.seeking = False
        return self.capture.read()


def _decode_auto(path, indices, grab_s: float, seek_s: float):
    import cv2

    from api.utils.video_probe import _Decoder

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        ok, first = capture.read()
        assert ok
        priced = _PricedCapture(capture, grab_s, seek_s)
        decoder = _Decoder(cv2, priced, first, clock=priced.clock)
        frames = [decoder.read(i, "auto") for i in indices]
    finally:
        capture.release()
    return frames, decoder


@pytest.mark.parametrize(("seek_in_grabs", "seeks", "grabs"), [(30, 4, 1), (500, 1, 301)])
def test_auto_strategy_seeks_when_the_gap_costs_more_than_a_seek(tmp_path, seek_in_grabs, seeks, grabs):
    levels = [(i * 3) % 256 for i in range(400)]
    path = write_clip(tmp_path / "long.mp4", "mp4v", 25, levels, size=(128, 96))
    wanted = sample_indices(400, 4)  # 50, 150, 250, 350: gaps of ~100 frames
    frames, decoder = _decode_auto(path, wanted, grab_s=0.001, seek_s=0.001 * seek_in_grabs)
    reference = decoded_levels(path.read_bytes(), tmp_path, ".mp4")
    got = [f.mean() / 255.0 for f in frames]
    assert got == pytest.approx([reference[i] for i in wanted], abs=0.01)
    # One grab is measured first and a seek is assumed to cost 20 of them, so frame 50 is a seek.
    # At 30 grabs a seek beats grabbing the ~100 frames of each next gap: four seeks, one grab.
    # At 500 grabs the measured seek is dearer than any gap: the rest is grabbed (3 x 100).
    assert (decoder.seeks, decoder.grabs) == (seeks, grabs)


def test_auto_strategy_reports_what_it_measured(tmp_path):
    levels = [(i * 3) % 256 for i in range(400)]
    path = write_clip(tmp_path / "long.mp4", "mp4v", 25, levels, size=(128, 96))
    with VideoReader(path, **LIMITS) as reader:
        info = reader.probe()
        frames = list(reader.frames(sample_indices(info.frame_count, 4), size=None, strategy="auto"))
        stats = reader.stats
    assert len(frames) == 4 and all(f.rgb for f in frames)
    assert stats["strategy"] == "auto" and stats["failed"] == 0
    assert stats["grab_ms"] > 0 and stats["seeks"] + stats["grabs"] >= 4
    assert (stats["seek_ms"] is None) == (stats["seeks"] == 0)


def test_child_squash_equals_preprocessing_the_full_frame(tmp_path):
    """The child resizes to 224 with Pillow bilinear (spec §1 step 2); the tensor is bit-identical."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.avi"
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 200))
    for _ in range(3):
        writer.write(rng.integers(0, 256, (200, 320, 3), dtype=np.uint8))
    writer.release()
    with VideoReader(path, **LIMITS) as reader:
        reader.probe()
        [full] = list(reader.frames([1], size=None))
    with VideoReader(path, **LIMITS) as reader:
        reader.probe()
        [small] = list(reader.frames([1], size=224))
    assert (small.width, small.height) == (224, 224)
    full_image = Image.frombytes("RGB", (full.width, full.height), full.rgb)
    small_image = Image.frombytes("RGB", (224, 224), small.rgb)
    assert torch.equal(preprocess_image(full_image), preprocess_image(small_image))
    # And the child converted OpenCV's BGR to RGB: compare with OpenCV's own decode in this process.
    capture = cv2.VideoCapture(str(path))
    capture.read()
    _, bgr = capture.read()
    assert np.array_equal(np.asarray(full_image), bgr[:, :, ::-1])


def test_truncated_file_is_undecodable(tmp_path):
    path = write_clip(tmp_path / "t.mp4", "mp4v", 10, list(range(0, 200, 10)), size=(64, 48))
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(VideoDecodeError) as caught, VideoReader(path, **LIMITS) as reader:
        reader.probe()
    assert caught.value.kind == "undecodable"
    assert "truncated, corrupt" in caught.value.message


def test_a_hanging_decode_is_killed_at_the_time_limit(tmp_path):
    """A FIFO never delivers data: FFmpeg blocks forever in the child; the parent kills it on time."""
    fifo = tmp_path / "never.mp4"
    os.mkfifo(fifo)
    started = time.monotonic()
    reader = VideoReader(fifo, timeout_s=1.0, memory_mb=4096)
    with pytest.raises(VideoDecodeError) as caught:
        reader.probe()
    elapsed = time.monotonic() - started
    reader.close()
    assert caught.value.kind == "timeout"
    assert "longer than the limit of 1 s" in caught.value.message
    assert elapsed < 10
    assert reader._child.poll() is not None  # the child is gone, reaped
    # This process is fine and decodes the next file.
    good = write_clip(tmp_path / "ok.avi", "MJPG", 10, [100, 110, 120])
    with VideoReader(good, **LIMITS) as next_reader:
        assert next_reader.probe().frame_count == 3


def test_a_crashing_decoder_is_reported_and_the_parent_survives(tmp_path):
    fifo = tmp_path / "crash.mp4"
    os.mkfifo(fifo)
    reader = VideoReader(fifo, timeout_s=30.0, memory_mb=4096)
    time.sleep(0.3)
    os.kill(reader._child.pid, signal.SIGSEGV)  # what a decoder bug on a hostile file looks like
    with pytest.raises(VideoDecodeError) as caught:
        reader.probe()
    reader.close()
    assert caught.value.kind == "crashed"
    assert "SIGSEGV" in caught.value.message


def test_the_memory_limit_applies_to_the_child(tmp_path):
    path = write_clip(tmp_path / "m.avi", "MJPG", 10, [50, 60, 70], size=(320, 240))
    with pytest.raises(VideoDecodeError) as caught, VideoReader(path, timeout_s=30, memory_mb=64) as reader:
        reader.probe()
    assert caught.value.kind == "memory"
    assert "memory limit of 64 MB" in caught.value.message
    with VideoReader(path, **LIMITS) as reader:  # the same file within a sane limit
        assert reader.probe().frame_count == 3
