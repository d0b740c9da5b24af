"""Probing and frame decoding of untrusted video files, in a child process with time and memory limits.

Decoding a video is the riskiest thing the service does with a stranger's bytes (FFmpeg parses
dozens of containers and codecs), so it never happens in the process that serves requests:

- The parent only reads the first bytes to recognise the container (`sniff`): magic numbers of
  known video containers, never the filename. Images, playlists (HLS, ffconcat), text and anything
  else are refused before FFmpeg sees them, so demuxers that open other files or URLs never run.
- A child Python process (this file run as a script: stdlib, OpenCV, NumPy and Pillow only, no
  torch, no app code) opens the file with OpenCV's FFmpeg backend under `RLIMIT_AS` (memory) and
  the parent kills it when the time limit passes. A hostile file can crash or hang only the child;
  the parent reports a clear error and keeps serving.
- One child is kept started and idle ("warm spare") so a request does not wait for Python and
  OpenCV to import (docs/PERFORMANCE.md, "Video throughput"). The limits are applied when a job is handed over.

Protocol (child stdout, length-prefixed messages): a JSON probe reply, then, after the parent sends
the frame indices it wants, one message per frame (RGB pixels, already squashed to the model's
input size with Pillow's bilinear filter, exactly spec §1 step 2, so that `preprocess_image` on the
result equals `preprocess_image` on the full frame; the tests check it) and a final JSON summary.

Decoding strategy (measured by bench/video_throughput.py; figures in docs/PERFORMANCE.md):
seeking (CAP_PROP_POS_FRAMES) costs a keyframe seek plus decoding from that keyframe; grabbing
sequentially is cheap per frame, but pays for every frame of the span. Seeking wins on long clips
sampled sparsely, grabbing on short clips sampled densely, so the child uses a cost model
("auto"): for each next sampled frame it grabs forward when gap x measured grab cost < measured
seek cost, and seeks otherwise. A request's decoding cost is then bounded by the frames sampled (at most one seek
each), never by the length of the video.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_SCRIPT = Path(__file__).resolve()
STRATEGIES = ("auto", "seek", "sequential")
MAX_PLAUSIBLE_FPS = 1000.0
_HEADER = struct.Struct("<cI")  # message type, payload length
_FRAME = struct.Struct("<iiii")  # position in the plan, frame index, width, height

# Which container the first bytes say it is. Only these reach FFmpeg.
_VIDEO_CONTAINERS = "MP4/MOV, AVI, WebM/Matroska, MPEG-TS, MPEG-PS, FLV, Ogg or ASF/WMV"
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"jp2 ")


class VideoDecodeError(Exception):
    """The file cannot be used as a video. `kind` says why (stable names, see KINDS)."""

    KINDS = ("empty", "image", "not_video", "undecodable", "no_frames", "no_fps", "timeout", "memory",
             "crashed")

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ProbeInfo:
    container: str
    codec: str
    fps: float
    frame_count: int
    duration_s: float
    width: int
    height: int
    probe_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DecodedFrame:
    position: int  # place in the requested list of indices
    index: int  # frame number in the video (0-based, in decoding order)
    rgb: bytes | None  # width*height*3 bytes, None when this frame could not be decoded
    width: int
    height: int


# -- parent side: recognising the container ------------------------------------------------------
def sniff(path: str | os.PathLike) -> str:
    """The container named by the file's first bytes, or VideoDecodeError (empty, image, not_video).

    Hand-written magic numbers rather than `filetype` or `puremagic`: the answer picks the one
    FFmpeg demuxer the child may open, so it must name exactly the containers allowed, no more.
    """
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise VideoDecodeError("empty", "the file is empty (0 bytes)")
    image = _image_format(head)
    if image:
        raise VideoDecodeError("image", f"the file is a {image} image, not a video; send images to POST /predict")
    container = _video_container(head)
    if container is None:
        raise VideoDecodeError("not_video", "not a video: the content is not a recognised video container "
                                            f"({_VIDEO_CONTAINERS})")
    return container


def _image_format(head: bytes) -> str | None:
    signatures = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
                  (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
                  (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
        return "AVIF/HEIF"
    return None


def _video_container(head: bytes) -> str | None:
    if head[4:8] in _ISO_BOXES:
        brand = head[8:12] if head[4:8] == b"ftyp" else b""
        if brand == b"qt  ":
            return "mov"
        return "3gp" if brand.startswith(b"3g") else "mp4"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in head[:64] else "matroska"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "asf"
    return None


# -- sampling -----------------------------------------------------------------------------------
def sample_indices(frame_count: int, wanted: int) -> list[int]:
    """`wanted` frames spread uniformly: the centre frame of each of n equal slices of the video.

    n = min(wanted, frame_count); index_i = floor((i + 1/2) * frame_count / n), i = 0..n-1.
    Integer arithmetic, so the indices are exact and strictly increasing.
    """
    n = max(0, min(wanted, frame_count))
    return [((2 * i + 1) * frame_count) // (2 * n) for i in range(n)]


# -- parent side: the child process --------------------------------------------------------------
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # One BLAS/OpenMP thread and two malloc arenas: a smaller, more predictable address space
        # under RLIMIT_AS (FFmpeg's own decoding threads are unaffected).
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
        "OPENCV_LOG_LEVEL": "ERROR", "OPENCV_FFMPEG_LOGLEVEL": "-8",
        # FFmpeg may read only the local file it was given: no http, no other protocols.
        "OPENCV_FFMPEG_CAPTURE_OPTIONS": "protocol_whitelist;file",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


def _start_child() -> subprocess.Popen:
    # -s: no user site-packages; the script imports nothing from the app.
    return subprocess.Popen([sys.executable, "-s", str(CHILD_SCRIPT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(), close_fds=True,
                            start_new_session=True)


class SparePool:
    """One idle, already-imported child per process, so requests skip the interpreter start-up.

    `start` launches a child that imports what it needs, then waits on stdin for its job (and only
    then applies the job's limits). Also the audio decoder's (api/utils/audio_decode.py).
    """

    def __init__(self, start: Callable[[], subprocess.Popen]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._spare: subprocess.Popen | None = None
        self._pid = os.getpid()

    def take(self, keep_warm: bool) -> subprocess.Popen:
        with self._lock:
            if self._pid != os.getpid():  # forked (e.g. Gunicorn): that child belongs to the parent
                self._spare, self._pid = None, os.getpid()
            child, self._spare = self._spare, None
            if child is None or child.poll() is not None:
                child = self._start()
            if keep_warm:
                self._spare = self._start()
            return child

    def close(self) -> None:
        with self._lock:
            child, self._spare = self._spare, None
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()


SPARES = SparePool(_start_child)


atexit.register(SPARES.close)


class VideoReader:
    """One probe-and-decode session in a child process. Use as a context manager.

    `timeout_s` covers everything the child does for this session (probe and decoding);
    `memory_mb` is the child's whole address space (RLIMIT_AS), interpreter and OpenCV included.
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float, memory_mb: int, keep_warm: bool = True) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.info: ProbeInfo | None = None
        self.stats: dict = {}
        self._messages: queue.Queue = queue.Queue()
        self._timed_out = threading.Event()
        self._stderr_tail = b""
        self._child = SPARES.take(keep_warm)
        self._watchdog = threading.Timer(timeout_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        threading.Thread(target=self._read_stdout, daemon=True, name="video-child-out").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="video-child-err").start()
        self._send({"path": self.path, "memory_mb": memory_mb})

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child (if still running) and reap it. Safe to call twice."""
        self._watchdog.cancel()
        child = self._child
        if child.poll() is None:
            with contextlib.suppress(OSError):
                child.stdin.close()
            try:
                child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for stream in (child.stdout, child.stderr, child.stdin):
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    # -- public ------------------------------------------------------------------------------
    def probe(self) -> ProbeInfo:
        message = self._next_json()
        if message.get("type") != "probe":
            raise VideoDecodeError("crashed", f"video decoder sent an unexpected reply: {message.get('type')!r}")
        fields = {name: message[name] for name in ProbeInfo.__dataclass_fields__}
        self.info = ProbeInfo(**fields)
        return self.info

    def frames(self, indices: Sequence[int], size: int | None, strategy: str = "auto") -> Iterator[DecodedFrame]:
        """Decode these frame indices (sorted ascending); frames come back in that order.

        `size`: squash each frame to size x size (spec §1 step 2) in the child; None: full frames.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        if list(indices) != sorted(set(indices)):
            raise ValueError("indices must be strictly increasing")
        self._send({"indices": list(indices), "size": size, "strategy": strategy})
        while True:
            kind, payload = self._next()
            if kind == b"F":
                position, index, width, height = _FRAME.unpack_from(payload)
                yield DecodedFrame(position, index, payload[_FRAME.size:], width, height)
                continue
            message = json.loads(payload)
            if message.get("type") == "frame_failed":
                yield DecodedFrame(message["position"], message["index"], None, 0, 0)
            elif message.get("type") == "done":
                self.stats = message.get("stats", {})
                return
            else:
                raise VideoDecodeError("crashed", f"video decoder sent an unexpected reply: {message!r:.200}")

    # -- internals ------------------------------------------------------------------------
    def _expire(self) -> None:
        self._timed_out.set()
        with contextlib.suppress(OSError):
            self._child.kill()

    def _send(self, message: dict) -> None:
        try:
            self._child.stdin.write(json.dumps(message).encode() + b"\n")
            self._child.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child is gone; reading its output reports why

    def _read_stdout(self) -> None:
        stream = self._child.stdout
        try:
            while True:
                header = _read_exactly(stream, _HEADER.size)
                if header is None:
                    break
                kind, length = _HEADER.unpack(header)
                payload = _read_exactly(stream, length)
                if payload is None:
                    break
                self._messages.put((kind, payload))
        except (OSError, ValueError):
            pass
        self._messages.put(None)

    def _read_stderr(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._child.stderr:
                self._stderr_tail = (self._stderr_tail + line)[-2000:]

    def _next(self) -> tuple[bytes, bytes]:
        # The watchdog kills the child at the deadline, which ends the stream: no wait is unbounded.
        item = self._messages.get()
        if item is None:
            self._messages.put(None)  # later calls see the end too
            raise self._failure()
        kind, payload = item
        if kind == b"J":
            message = json.loads(payload)
            if message.get("type") == "error":
                raise VideoDecodeError(message.get("kind", "undecodable"), message.get("message", "decoding failed"))
        return kind, payload

    def _next_json(self) -> dict:
        kind, payload = self._next()
        if kind != b"J":
            raise VideoDecodeError("crashed", "video decoder sent a frame before its probe reply")
        return json.loads(payload)

    def _failure(self) -> VideoDecodeError:
        """Why the child's output ended early."""
        if self._timed_out.is_set():
            return VideoDecodeError("timeout", f"decoding the video took longer than the limit of {self.timeout_s:g} s "
                                               "and was stopped; the file may be malformed")
        try:
            code = self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._child.kill()
            code = self._child.wait()
        tail = self._stderr_tail.decode(errors="replace")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            reason = f"the video decoder crashed ({name})"
        else:
            reason = f"the video decoder stopped unexpectedly (exit status {code})"
        if any(sign in tail for sign in ("MemoryError", "bad_alloc", "Insufficient memory", "Failed to allocate")):
            return VideoDecodeError("memory", f"decoding the video needed more than the memory limit of "
                                              f"{self.memory_mb} MB")
        return VideoDecodeError("crashed", f"{reason} while reading this file; it may be malformed "
                                           f"(memory limit {self.memory_mb} MB)")


def _read_exactly(stream, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- child side ---------------------------------------------------------------------------------
class _Channel:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)

    def json(self, message: dict) -> None:
        payload = json.dumps(message).encode()
        self._out.write(_HEADER.pack(b"J", len(payload)) + payload)

    def frame(self, position: int, index: int, rgb) -> None:
        height, width = rgb.shape[:2]
        data = rgb.tobytes()
        self._out.write(_HEADER.pack(b"F", _FRAME.size + len(data)) + _FRAME.pack(position, index, width, height))
        self._out.write(data)


def _fourcc(value: float) -> str:
    try:
        code = int(value)
    except (ValueError, OverflowError):
        return ""
    if code <= 0:
        return ""
    text = code.to_bytes(4, "little").decode("ascii", errors="replace")
    return "".join(ch for ch in text if ch.isprintable()).strip()


class _Decoder:
    """Runs in the child: holds the capture, the current position and the cost estimates."""

    def __init__(self, cv2, capture, first_frame, clock=time.perf_counter) -> None:
        self.cv2 = cv2
        self.clock = clock  # the tests pass a scripted clock: the cost model's choices are then exact
        self.capture = capture
        self.position = 1  # next frame a grab() returns; frame 0 was read by the probe
        self.first_frame = first_frame
        self.grab_s = None  # measured seconds per sequential grab
        self.seek_s = None  # measured seconds per seek + read
        self.seeks = 0
        self.grabs = 0

    def _estimate(self, value, sample: float) -> float:
        return sample if value is None else 0.7 * value + 0.3 * sample

    def read(self, index: int, strategy: str):
        """The frame with this index, or None."""
        if index == 0 and self.first_frame is not None:
            frame, self.first_frame = self.first_frame, None
            return frame
        gap = index - self.position
        if strategy == "auto" and self.grab_s is None and gap > 0:
            # Measure one sequential grab first: the cost model needs its price.
            started = self.clock()
            if not self.capture.grab():
                self.position = index + 1
                return None
            self.grab_s = self.clock() - started
            self.grabs += 1
            self.position += 1
            gap -= 1
        if strategy == "auto":
            # Until a seek is measured, assume it costs 20 grabs (OpenCV's MPEG-4 at 720p; H.264 with
            # long GOPs costs more, and the first measured seek corrects the estimate).
            grab = self.grab_s if self.grab_s is not None else 1.0
            seek = self.seek_s if self.seek_s is not None else 20.0 * grab
            use_seek = gap < 0 or gap * grab > seek
        else:
            use_seek = strategy == "seek" or gap < 0
        if use_seek:
            started = self.clock()
            self.capture.set(self.cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = self.capture.read()
            self.seeks += 1
            self.seek_s = self._estimate(self.seek_s, self.clock() - started)
            self.position = index + 1
            return frame if ok else None
        started = self.clock()
        for _ in range(gap):
            if not self.capture.grab():
                self.position = index + 1
                return None
        self.grabs += gap
        if gap:
            self.grab_s = self._estimate(self.grab_s, (self.clock() - started) / gap)
        ok, frame = self.capture.read()
        self.grabs += 1
        self.position = index + 1
        return frame if ok else None


def _child_main() -> None:  # pragma: no cover - runs in the child; exercised by every video test
    protocol_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol stream
    channel = _Channel(protocol_fd)
    import resource

    import cv2
    import numpy  # noqa: F401 - imported before the memory limit applies
    from PIL import Image

    cv2.setNumThreads(1)
    line = sys.stdin.readline()  # a warm spare waits here for its job
    if not line:
        return
    job = json.loads(line)
    limit = int(job["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        _serve_job(channel, cv2, Image, job["path"], int(job["memory_mb"]))
    except VideoDecodeError as exc:
        channel.json({"type": "error", "kind": exc.kind, "message": exc.message})
    except OSError as exc:
        channel.json({"type": "error", "kind": "undecodable",
                      "message": f"the file could not be read ({exc.strerror})"})
    except MemoryError:
        channel.json({"type": "error", "kind": "memory",
                      "message": f"decoding the video needed more than the memory limit of {job['memory_mb']} MB"})
    except cv2.error as exc:
        text = str(exc)
        if "memory" in text.lower() or "alloc" in text.lower():
            channel.json({"type": "error", "kind": "memory",
                          "message": f"decoding the video needed more than the memory limit of {job['memory_mb']} MB"})
        else:
            channel.json({"type": "error", "kind": "undecodable",
                          "message": f"the video could not be decoded ({text.strip().splitlines()[-1][:200]})"})


def _memory_starved(memory_mb: int) -> str | None:  # pragma: no cover - child
    """A message when OpenCV's failure is more likely the memory limit than the file.

    OpenCV reports a failed allocation as "cannot open" or "no frame", not as an error, so the
    child looks at how much of its address-space limit start-up already used.
    """
    try:
        with open("/proc/self/status") as status:
            used_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    left_mb = memory_mb - used_kb // 1024
    if left_mb >= 256:
        return None
    return (f"decoding the video needed more than the memory limit of {memory_mb} MB "
            f"(only {max(left_mb, 0)} MB of it was left for decoding)")


def _serve_job(channel: _Channel, cv2, Image, path: str, memory_mb: int) -> None:  # pragma: no cover - child
    started = time.perf_counter()
    container = sniff(path)
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not capture.isOpened():
        starved = _memory_starved(memory_mb)
        channel.json({"type": "error", "kind": "memory" if starved else "undecodable",
                      "message": starved or f"the file looks like {container} but could not be opened as a video: "
                                            "it is truncated, corrupt or uses a codec this server cannot decode"})
        return
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    codec = _fourcc(capture.get(cv2.CAP_PROP_FOURCC))
    ok, first = capture.read()
    if not ok or first is None:
        starved = _memory_starved(memory_mb)
        channel.json({"type": "error", "kind": "memory" if starved else "no_frames",
                      "message": starved or "the video has no decodable frames (zero frames, or the first frame "
                                            "is corrupt)"})
        return
    if not (math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS):
        channel.json({"type": "error", "kind": "no_fps",
                      "message": f"the video has no usable frame rate (the container says {fps:g} frames/s)"})
        return
    if frame_count <= 0:
        # No count in the container: count by grabbing (bounded by the time limit), then reopen.
        frame_count = 1
        while capture.grab():
            frame_count += 1
        capture.release()
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        ok, first = capture.read()
    height, width = first.shape[:2]
    channel.json({"type": "probe", "container": container, "codec": codec, "fps": fps, "frame_count": frame_count,
                  "duration_s": frame_count / fps, "width": int(width), "height": int(height),
                  "probe_s": round(time.perf_counter() - started, 6)})

    line = sys.stdin.readline()  # the plan, or end of input when the parent only wanted the probe
    if not line:
        return
    plan = json.loads(line)
    size = plan.get("size")
    strategy = plan.get("strategy", "auto")
    decoder = _Decoder(cv2, capture, first)
    decode_started = time.perf_counter()
    failed = 0
    for position, index in enumerate(plan["indices"]):
        frame = decoder.read(int(index), strategy) if index < frame_count else None
        if frame is None:
            failed += 1
            channel.json({"type": "frame_failed", "position": position, "index": index})
            continue
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR
        if size:
            # Spec §1 step 2 on a PIL RGB image of the frame, as preprocess_image does it.
            rgb = numpy_from(Image.fromarray(rgb, "RGB").resize((int(size), int(size)), Image.BILINEAR))
        channel.frame(position, int(index), rgb)
    channel.json({"type": "done", "stats": {
        "strategy": strategy, "seeks": decoder.seeks, "grabs": decoder.grabs, "failed": failed,
        "decode_s": round(time.perf_counter() - decode_started, 6),
        "seek_ms": None if decoder.seek_s is None else round(decoder.seek_s * 1000, 3),
        "grab_ms": None if decoder.grab_s is None else round(decoder.grab_s * 1000, 3)}})


def numpy_from(image: Any) -> Any:  # pragma: no cover - child: a PIL image -> its uint8 array
    import numpy as np

    return np.asarray(image, dtype=np.uint8)


if __name__ == "__main__":  # pragma: no cover - the child process
    _child_main()
