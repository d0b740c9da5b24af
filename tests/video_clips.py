"""Helpers for the video tests: clips written with OpenCV, a model whose scores the test controls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from api.detector.preprocess import CLIP_MEAN, CLIP_STD
from tests.helpers import post_form

# fourcc -> (container suffix, description). OpenCV's own writers; H.264 needs an encoder the
# OpenCV wheel may lack, so it is checked at run time.
CODECS = {"mp4v": ".mp4", "avc1": ".mp4", "MJPG": ".avi", "VP80": ".webm", "VP90": ".webm"}


def gray_levels(count: int, level: Callable[[int], int]) -> list[int]:
    return [int(level(i)) % 256 for i in range(count)]


def write_clip(path: Path, fourcc: str, fps: float, levels: Sequence[int], size: tuple[int, int] = (64, 48)) -> Path:
    """A clip whose frame i is flat gray at levels[i] (0-255): its brightness identifies the frame."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        writer.release()
        pytest.skip(f"this OpenCV build cannot write {fourcc} video (no encoder for it)")
    try:
        for level in levels:
            writer.write(np.full((height, width, 3), level, np.uint8))
    finally:
        writer.release()
    if not path.exists() or path.stat().st_size == 0:
        pytest.skip(f"this OpenCV build wrote no {fourcc} data")
    return path


def clip_bytes(tmp_path: Path, fourcc: str = "MJPG", fps: float = 10.0, levels: Sequence[int] | None = None,
               size: tuple[int, int] = (64, 48), name: str = "clip") -> bytes:
    levels = list(range(0, 250, 5)) if levels is None else levels
    path = write_clip(tmp_path / f"{name}-{fourcc}{CODECS.get(fourcc, '.avi')}", fourcc, fps, levels, size)
    return path.read_bytes()


def noise_clip_bytes(tmp_path: Path, count: int, size: tuple[int, int], fps: float = 10.0) -> bytes:
    """An MJPEG clip of random pixels: big for its length (flat frames compress to almost nothing)."""
    rng = np.random.default_rng(count)
    path = tmp_path / f"noise-{count}.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for _ in range(count):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path.read_bytes()


def decoded_levels(data: bytes, tmp_path: Path, suffix: str = ".bin", sizes: list | None = None) -> list[float]:
    """Reference: mean brightness (0-1) of every frame, decoding sequentially in this process.

    `sizes`, if given, receives each frame's (width, height).
    """
    path = tmp_path / f"reference{suffix}"
    path.write_bytes(data)
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    levels = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        levels.append(float(frame.mean()) / 255.0)
        if sizes is not None:
            sizes.append((frame.shape[1], frame.shape[0]))
    capture.release()
    return levels


class BrightnessModel(torch.nn.Module):
    """Fake probability = mean pixel value (0-1) of the original view: a score the test controls."""

    model_version = "test/brightness"
    trained = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).mean(dim=(1, 2, 3)).clamp(0.0, 1.0)


def make_brightness_engine():
    from api.detector import DetectorConfig, InferenceEngine

    engine = InferenceEngine(DetectorConfig(device="cpu", precision="fp32", max_wait_ms=1.0), model=BrightnessModel())
    engine.start()
    assert engine.wait_ready(60), engine.load_error
    return engine


def post_video(client, data: bytes, filename: str = "clip.avi", **form):
    return post_form(client, "/predict/video", [("file", (filename, data)), *form.items()])


# Video endpoints are rate limited per client (10/minute by default); tests post more than that.
VIDEO_APP_SETTINGS = {"RATE_LIMIT_VIDEO": "10000/minute", "RATE_LIMIT_DEFAULT": "100000/minute"}
