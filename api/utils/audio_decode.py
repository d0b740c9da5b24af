"""Decoding untrusted audio (or a video's soundtrack) to 16 kHz mono float32, in a child process.

The same rules as video decoding (api/utils/video_probe.py):
- the parent recognises the format from the first bytes only (`sniff_audio`): WAV, FLAC,
  Ogg (Opus/Vorbis/FLAC), MP3, AAC (ADTS), M4A/MP4, and the video containers video_probe knows
  (their first audio track). Nothing else reaches FFmpeg, and FFmpeg is told the demuxer to use
  and may open only the local file (protocol_whitelist=file): no playlists, no URLs;
- a child Python process (this file as a script: stdlib, NumPy and PyAV, no torch, no app code)
  decodes under RLIMIT_AS (memory), and the parent kills it when the time limit passes. A file
  that hangs or explodes the decoder kills only the child;
- the child stops as soon as the decoded audio passes the duration limit (no unbounded output).

PyAV (FFmpeg's libraries, bundled in its wheel) decodes; libswresample converts every channel to
float32 at 16 kHz (integer PCM scaled to [-1, 1), as soundfile does: a 16 kHz 16-bit WAV comes
out exactly x/32768) and the channels are averaged to mono. No gain, no DC removal: AASIST's
scores depend on the amplitude. One child is kept started and idle
("warm spare", as for video): its start is most of a short recording's decoding time
(docs/PERFORMANCE.md, "Speech and text"). The limits are applied when a job is handed over.

Protocol (child stdout): 8-byte little-endian length, a JSON document (ok or error), then on
success the samples as raw little-endian float32.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from api.utils.video_probe import SparePool

CHILD_SCRIPT = Path(__file__).resolve()
TARGET_RATE = 16_000
_LENGTH = struct.Struct("<Q")
_AUDIO_FORMATS = "WAV, FLAC, Ogg (Opus, Vorbis), MP3, AAC, M4A, or a video with a soundtrack"
# Sniffed container -> the FFmpeg demuxer forced for it.
DEMUXERS = {"wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mp3", "aac": "aac", "m4a": "mov",
            "mp4": "mov", "mov": "mov", "3gp": "mov", "webm": "matroska", "matroska": "matroska", "avi": "avi",
            "mpegts": "mpegts", "mpeg": "mpeg", "flv": "flv", "asf": "asf"}
_AUDIO_BRANDS = (b"M4A ", b"M4B ", b"M4P ", b"F4A ")


class AudioDecodeError(Exception):
    """The file cannot be used as audio. `kind`: empty, image, not_audio, undecodable, no_audio,
    too_long, timeout, memory, crashed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, TARGET_RATE
    container: str
    codec: str
    channels: int
    source_rate: int
    decode_s: float

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / TARGET_RATE

    def describe(self) -> dict:
        return {"container": self.container, "codec": self.codec, "channels": self.channels,
                "source_sample_rate": self.source_rate, "sample_rate": TARGET_RATE,
                "samples": int(self.samples.shape[0]), "duration_s": round(self.duration_s, 6),
                "decode_ms": round(self.decode_s * 1000, 3)}


# -- parent side: recognising the format ----------------------------------------------------------
def sniff_audio(path: str | os.PathLike) -> str:
    """The format named by the first bytes: an audio container, or a video container (its soundtrack)."""
    from api.utils.video_probe import VideoDecodeError, sniff

    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise AudioDecodeError("empty", "the file is empty (0 bytes)")
    audio = _audio_container(head)
    if audio:
        return audio
    try:
        return sniff(path)  # a video container: its audio track is decoded
    except VideoDecodeError as exc:
        if exc.kind == "image":
            raise AudioDecodeError("image", exc.message.split(";")[0] + ", not audio") from None
        raise AudioDecodeError("not_audio", f"not audio: the content is not a recognised format "
                                            f"({_AUDIO_FORMATS})") from None


def _audio_container(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    if head[4:8] == b"ftyp" and head[8:12] in _AUDIO_BRANDS:
        return "m4a"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS sync word, layer 00
            return "aac"
        if head[1] & 0xE0 == 0xE0 and (head[1] >> 1) & 0x03:  # MPEG audio frame sync, layer I-III
            return "mp3"
    return None


# -- parent side: the child --------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
                "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def _start_child() -> subprocess.Popen:
    # -s: no user site-packages; the script imports nothing from the app.
    return subprocess.Popen([sys.executable, "-s", str(CHILD_SCRIPT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(), close_fds=True,
                            start_new_session=True)


_SPARES: SparePool | None = None  # the parent's pool of one warm child; made on first use
_SPARES_LOCK = threading.Lock()


def _spares() -> SparePool:
    global _SPARES
    with _SPARES_LOCK:
        if _SPARES is None:
            from api.utils.video_probe import SparePool  # parent side only: the child script never needs it

            _SPARES = SparePool(_start_child)
            atexit.register(_SPARES.close)
        return _SPARES


def decode_audio(path: str | os.PathLike, container: str, *, timeout_s: float, memory_mb: int, max_seconds: float,
                 started: Callable[[subprocess.Popen], None] | None = None) -> DecodedAudio:
    """Decode the first audio track of a sniffed file to 16 kHz mono float32 in a child process.

    Raises AudioDecodeError (undecodable, no_audio, too_long, timeout, memory, crashed).
    `started` sees the child process (for tests that play a crashing decoder).
    """
    job = {"path": str(path), "demuxer": DEMUXERS.get(container, container), "memory_mb": int(memory_mb),
           "max_samples": int(max_seconds * TARGET_RATE) + 1}
    child = _spares().take(keep_warm=True)
    if started is not None:
        started(child)
    began = time.perf_counter()
    try:
        out, err = child.communicate(json.dumps(job).encode() + b"\n", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise AudioDecodeError("timeout", f"decoding the audio took longer than the limit of {timeout_s:g} s and "
                                          "was stopped; the file may be malformed") from None
    message = _message(out)
    if message is None:
        raise _failure(child.returncode, err, memory_mb)
    if message.get("type") == "error":
        raise AudioDecodeError(message.get("kind", "undecodable"), message.get("message", "decoding failed"))
    offset = _LENGTH.size + _LENGTH.unpack_from(out)[0]
    samples = np.frombuffer(out, dtype="<f4", offset=offset).astype(np.float32, copy=False)
    return DecodedAudio(samples=samples, container=container, codec=str(message.get("codec", "")),
                        channels=int(message.get("channels", 0)), source_rate=int(message.get("sample_rate", 0)),
                        decode_s=time.perf_counter() - began)


def _message(out: bytes) -> dict | None:
    if len(out) < _LENGTH.size:
        return None
    length = _LENGTH.unpack_from(out)[0]
    if len(out) < _LENGTH.size + length:
        return None
    try:
        return json.loads(out[_LENGTH.size:_LENGTH.size + length])
    except ValueError:
        return None


def _failure(code: int, stderr: bytes, memory_mb: int) -> AudioDecodeError:
    tail = stderr[-2000:].decode(errors="replace")
    if any(sign in tail for sign in ("MemoryError", "bad_alloc", "Cannot allocate", "Failed to allocate")):
        return AudioDecodeError("memory", f"decoding the audio needed more than the memory limit of {memory_mb} MB")
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return AudioDecodeError("crashed", f"the audio decoder crashed ({name}) while reading this file; it may be "
                                           f"malformed (memory limit {memory_mb} MB)")
    return AudioDecodeError("crashed", f"the audio decoder stopped unexpectedly (exit status {code}) while reading "
                                       f"this file; it may be malformed (memory limit {memory_mb} MB)")


# -- child side ------------------------------------------------------------------------------------
def _child_main() -> None:  # pragma: no cover - runs in the child; exercised by every audio test
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol stream
    import resource

    import av  # noqa: F401 - imported before the memory limit applies
    import numpy  # noqa: F401

    job = json.loads(sys.stdin.readline())
    limit = job["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        header, pcm = _decode(job)
    except MemoryError:
        header, pcm = {"type": "error", "kind": "memory",
                       "message": f"decoding the audio needed more than the memory limit of {job['memory_mb']} MB"}, b""
    except _ChildError as exc:
        header, pcm = {"type": "error", "kind": exc.kind, "message": exc.message}, b""
    except Exception as exc:  # av.error.FFmpegError and friends: the file, not the server
        text = str(exc).replace(job["path"], "the file").strip()  # no server paths in messages
        text = text.splitlines()[-1][:200] if text else type(exc).__name__
        kind = "memory" if "memory" in text.lower() or "alloc" in text.lower() else "undecodable"
        message = (f"decoding the audio needed more than the memory limit of {job['memory_mb']} MB"
                   if kind == "memory" else
                   f"the file could not be decoded as audio ({text}): it is truncated, corrupt or uses a codec this "
                   "server cannot decode")
        header, pcm = {"type": "error", "kind": kind, "message": message}, b""
    payload = json.dumps(header).encode()
    out.write(_LENGTH.pack(len(payload)) + payload)
    out.write(pcm)
    out.flush()
    sys.stderr.flush()
    # Everything is written: skip the interpreter's teardown of PyAV and NumPy, which takes longer
    # than a short recording's decoding, while the parent waits for this process to end.
    os._exit(0)


class _ChildError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _decode(job: dict) -> tuple[dict, bytes]:  # pragma: no cover - child
    import av
    import numpy as np

    max_samples = int(job["max_samples"])
    limit_s = (max_samples - 1) / TARGET_RATE
    with av.open(job["path"], mode="r", format=job["demuxer"], options={"protocol_whitelist": "file"}) as container:
        streams = container.streams.audio
        if not streams:
            raise _ChildError("no_audio", "the file has no audio track")
        stream = streams[0]
        declared = float(container.duration / 1_000_000) if container.duration else 0.0
        if declared > limit_s + 1.0:
            raise _ChildError("too_long", f"the audio is {declared:.1f} s long, over the limit of {limit_s:g} s")
        resampler = None
        pieces, total = [], 0
        channels, rate = 0, 0

        def take(frames) -> None:
            nonlocal total
            for frame in frames:
                data = frame.to_ndarray().reshape(-1, frame.layout.nb_channels)  # packed: (n, channels)
                mono = data.mean(axis=1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
                pieces.append(np.ascontiguousarray(mono, dtype="<f4"))
                total += mono.shape[0]
                if total > max_samples:
                    raise _ChildError("too_long", f"the audio is longer than the limit of {limit_s:g} s")

        for frame in container.decode(stream):
            if resampler is None:
                channels, rate = frame.layout.nb_channels, frame.sample_rate
                # Packed float, not planar: PyAV's to_ndarray crashes (SIGSEGV) on planar frames of 8 to
                # 15 channels of unnamed layout; one interleaved plane has no such case.
                resampler = av.AudioResampler(format="flt", layout=frame.layout.name, rate=TARGET_RATE)
            take(resampler.resample(frame))
        if resampler is None:
            raise _ChildError("no_audio", "the audio track holds no decodable audio")
        take(resampler.resample(None))
        codec = stream.codec_context.name
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise _ChildError("no_audio", "the audio track holds no samples")
    return {"type": "ok", "codec": codec, "channels": channels, "sample_rate": rate}, samples.tobytes()


if __name__ == "__main__":  # pragma: no cover - the child process
    _child_main()
