"""Audio decoding in a child process: real files in several containers (and a video's soundtrack),
encoded at test time, come back as 16 kHz mono float32; hostile files fail cleanly in the child."""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest

from api.utils.audio_decode import AudioDecodeError, decode_audio, sniff_audio
from tests.audio_clips import audio_file, encode, noise, tone, video_with_soundtrack

LIMITS = {"timeout_s": 60.0, "memory_mb": 4096, "max_seconds": 120.0}


def dominant_hz(samples: np.ndarray, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))


def decode(path, **limits):
    return decode_audio(path, sniff_audio(path), **{**LIMITS, **limits})


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_files_decode_exactly_like_soundfile(tmp_path, fmt):
    x = tone(1.5)
    audio = decode(audio_file(tmp_path, fmt, x))
    quantised = np.round(np.clip(x, -1, 32767 / 32768) * 32768) / 32768  # int16 PCM scaled to [-1, 1)
    assert audio.samples.dtype == np.float32
    assert audio.samples.shape == x.shape
    assert np.array_equal(audio.samples, quantised.astype(np.float32))
    assert audio.source_rate == 16_000 and audio.channels == 1 and audio.container == fmt


@pytest.mark.parametrize("fmt, container", [("opus", "ogg"), ("mp3", "mp3"), ("m4a", "m4a"), ("aac", "aac")])
def test_lossy_files_keep_pitch_level_and_length(tmp_path, fmt, container):
    x = tone(2.0, freq=440.0)
    audio = decode(audio_file(tmp_path, fmt, x))
    assert audio.container == container
    assert abs(audio.duration_s - 2.0) < 0.15  # encoder priming/padding only
    assert dominant_hz(audio.samples) == pytest.approx(440.0, abs=2.0)
    assert rms(audio.samples) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)  # no gain normalisation


@pytest.mark.parametrize("rate", [44_100, 48_000, 8_000])
def test_other_rates_are_resampled_to_16_khz(tmp_path, rate):
    audio = decode(audio_file(tmp_path, "wav", tone(1.0, rate=rate, freq=1000.0), rate=rate, name=str(rate)))
    assert audio.source_rate == rate
    assert abs(audio.samples.size - 16_000) <= 2
    assert dominant_hz(audio.samples) == pytest.approx(1000.0, abs=2.0)


def test_stereo_is_the_mean_of_its_channels(tmp_path):
    left, right = tone(1.0), noise(1.0, seed=3)
    audio = decode(encode(tmp_path / "stereo.wav", np.stack([left, right]), 16_000, "wav"))
    q = [np.round(np.clip(c, -1, 32767 / 32768) * 32768) / 32768 for c in (left, right)]
    assert audio.channels == 2
    assert np.allclose(audio.samples, (q[0] + q[1]) / 2, atol=1e-7)


@pytest.mark.parametrize("channels", [3, 6, 8, 10, 16])
def test_many_channels_of_an_unnamed_layout_are_averaged(tmp_path, channels):
    """A WAV's channel count alone (no channel mask): 8 to 15 channels crashed PyAV's planar to_ndarray."""
    import wave

    pcm = np.round(np.stack([noise(1.0, seed=c) for c in range(channels)], axis=1) * 32767).astype(np.int16)
    path = tmp_path / f"ch{channels}.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(pcm.tobytes())
    audio = decode(path)
    assert audio.channels == channels and audio.samples.shape == (16_000,)
    expected = (pcm.astype(np.float64) / 32768).mean(axis=1).astype(np.float32)
    assert np.array_equal(audio.samples, expected)


def test_a_videos_soundtrack_is_decoded(tmp_path):
    path = video_with_soundtrack(tmp_path / "talk.mp4", tone(2.0, freq=660.0))
    audio = decode(path)
    assert audio.container == "mp4" and audio.codec == "aac"
    assert dominant_hz(audio.samples) == pytest.approx(660.0, abs=2.0)
    silent = video_with_soundtrack(tmp_path / "silent.mp4", None)
    with pytest.raises(AudioDecodeError) as caught:
        decode(silent)
    assert caught.value.kind == "no_audio" and "no audio track" in caught.value.message


def test_the_format_comes_from_the_bytes_never_the_name(tmp_path):
    wav = audio_file(tmp_path, "wav")
    renamed = tmp_path / "song.mp3"
    renamed.write_bytes(wav.read_bytes())
    assert sniff_audio(renamed) == "wav"
    cases = {b"": "empty", b"\x89PNG\r\n\x1a\n" + b"\0" * 64: "image", b"hello, this is text" * 10: "not_audio",
             b"#EXTM3U\n#EXT-X-VERSION:3\nhttp://example.invalid/a.ts\n": "not_audio"}
    for number, (content, kind) in enumerate(cases.items()):
        path = tmp_path / f"case{number}.wav"
        path.write_bytes(content)
        with pytest.raises(AudioDecodeError) as caught:
            sniff_audio(path)
        assert caught.value.kind == kind


def test_the_duration_limit_stops_the_decoder(tmp_path):
    path = audio_file(tmp_path, "flac", tone(3.0))
    with pytest.raises(AudioDecodeError) as caught:
        decode(path, max_seconds=1.0)
    assert caught.value.kind == "too_long" and "limit of 1 s" in caught.value.message


def test_truncated_and_garbage_files_are_undecodable(tmp_path):
    path = audio_file(tmp_path, "flac", tone(1.0))
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(AudioDecodeError) as caught:
        decode(path)
    assert caught.value.kind in ("undecodable", "no_audio")
    assert str(tmp_path) not in caught.value.message  # no server paths in what a client sees
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"ID3" + os.urandom(5000))
    with pytest.raises(AudioDecodeError) as caught:
        decode(garbage)
    assert caught.value.kind in ("undecodable", "no_audio")


def test_a_hanging_decoder_is_killed_at_the_time_limit(tmp_path):
    fifo = tmp_path / "never.wav"
    os.mkfifo(fifo)  # FFmpeg blocks forever opening it
    children = []
    started = time.monotonic()
    with pytest.raises(AudioDecodeError) as caught:
        decode_audio(fifo, "wav", timeout_s=1.0, memory_mb=4096, max_seconds=10, started=children.append)
    assert caught.value.kind == "timeout" and "longer than the limit of 1 s" in caught.value.message
    assert time.monotonic() - started < 10
    assert children[0].poll() is not None  # killed and reaped
    assert decode(audio_file(tmp_path, "wav")).samples.size == 16_000  # the next file is fine


def test_a_crashing_decoder_is_reported(tmp_path):
    fifo = tmp_path / "crash.wav"
    os.mkfifo(fifo)

    def crash(child):
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGSEGV)  # what a decoder bug on a hostile file looks like

    with pytest.raises(AudioDecodeError) as caught:
        decode_audio(fifo, "wav", timeout_s=30.0, memory_mb=4096, max_seconds=10, started=crash)
    assert caught.value.kind == "crashed" and "SIGSEGV" in caught.value.message


def test_the_memory_limit_applies_to_the_child(tmp_path):
    path = audio_file(tmp_path, "wav", tone(60.0))
    with pytest.raises(AudioDecodeError) as caught:
        decode(path, memory_mb=150)
    assert caught.value.kind in ("memory", "crashed")
    # Over the limit the decoder either fails to allocate or is killed by it: both name the limit.
    assert re.search(r"memory limit (of )?150 MB", caught.value.message), caught.value.message
    assert decode(path).duration_s == pytest.approx(60.0)
