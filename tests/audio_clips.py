"""Helpers for the audio tests: tones and noise encoded with PyAV (FFmpeg) into real containers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# name -> (file suffix, FFmpeg muxer, encoder, sample format the encoder takes)
FORMATS = {
    "wav": (".wav", "wav", "pcm_s16le", "s16"),
    "flac": (".flac", "flac", "flac", "s16"),
    "opus": (".ogg", "ogg", "libopus", "flt"),
    "mp3": (".mp3", "mp3", "libmp3lame", "fltp"),
    "m4a": (".m4a", "ipod", "aac", "fltp"),
    "aac": (".aac", "adts", "aac", "fltp"),
}


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    n = np.arange(int(round(seconds * rate)))
    return (amplitude * np.sin(2 * np.pi * freq * n / rate)).astype(np.float32)


def noise(seconds: float, rate: int = 16_000, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(round(seconds * rate)))).clip(-1, 1).astype(np.float32)


def encode(path: Path, samples: np.ndarray, rate: int, fmt: str, channels: int = 1) -> Path:
    """Write samples (mono, or (channels, n)) with the named format; integer formats quantise to int16."""
    suffix, muxer, codec, sample_fmt = FORMATS[fmt]
    data = np.atleast_2d(samples).astype(np.float32)
    if data.shape[0] == 1 and channels > 1:
        data = np.repeat(data, channels, axis=0)
    layout = "mono" if data.shape[0] == 1 else "stereo"
    out_rate = 48_000 if codec == "libopus" else rate
    with av.open(str(path), "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=out_rate, layout=layout)
        stream.time_base = Fraction(1, out_rate)
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=out_rate)
        if sample_fmt == "s16":
            pcm = np.round(np.clip(data, -1, 32767 / 32768) * 32768).astype(np.int16)
            frame_fmt, block = "s16p" if data.shape[0] > 1 else "s16", pcm
        else:
            frame_fmt, block = "fltp", data
        step = 4096
        for start in range(0, block.shape[1], step):
            piece = block[:, start:start + step]
            if frame_fmt == "s16":
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="s16", layout=layout)
            else:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format=frame_fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for converted in resampler.resample(frame):
                for packet in stream.encode(converted):
                    container.mux(packet)
        for converted in resampler.resample(None):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def audio_file(tmp_path: Path, fmt: str, samples: np.ndarray | None = None, rate: int = 16_000,
               channels: int = 1, name: str = "clip") -> Path:
    samples = tone(1.0, rate) if samples is None else samples
    return encode(tmp_path / f"{name}-{fmt}{FORMATS[fmt][0]}", samples, rate, fmt, channels)


def video_with_soundtrack(path: Path, samples: np.ndarray | None, rate: int = 16_000, fps: int = 10,
                          seconds: float = 2.0, size: tuple[int, int] = (64, 48)) -> Path:
    """An MP4 (MPEG-4 video, flat gray frames) with an AAC soundtrack, or none when samples is None."""
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = None
        if samples is not None:
            audio = container.add_stream("aac", rate=rate, layout="mono")
        for i in range(int(seconds * fps)):
            image = np.full((size[1], size[0], 3), (i * 10) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            data = np.atleast_2d(samples).astype(np.float32)
            for start in range(0, data.shape[1], 4096):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + 4096]),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                for converted in resampler.resample(frame):
                    for packet in audio.encode(converted):
                        container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
    return path
