"""Helpers shared by the test modules: ports, forms, images, apps on the tiny model.

Test modules import these from here, never from conftest.py (which holds only fixtures).
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from pathlib import Path

import urllib3
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# The tiny seeded random model: the whole stack runs in a second on a CPU.
# Transformers (Fast-DetectGPT) must never reach the Hugging Face hub from a test.
os.environ["HF_HUB_OFFLINE"] = "1"
# The speech and text detectors on tiny seeded random models (reported trained: false).
TINY_DETECTORS = {
    "AASIST_MODEL": "aasist-tiny", "AASIST_WEIGHTS": "random:0", "AASIST_DEVICE": "cpu",
    "TEXT_SCORING_MODEL": "random:0", "TEXT_SAMPLING_MODEL": "random:1", "TEXT_DEVICE": "cpu",
    "TEXT_MIN_TOKENS": "16",
}
TINY_MODEL = {
    "D3_BACKBONE": "d3-tiny",
    "D3_CLIP_WEIGHTS": "random:0",
    "D3_HEAD_WEIGHTS": "random:0",
    "D3_DEVICE": "cpu",
    "D3_PRECISION": "fp32",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def raw_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes on a connected (plain or TLS) socket; read to EOF: status, headers, body."""
    sock.sendall(request)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, body


def multipart_body(fields: list[tuple[str, object]]) -> tuple[bytes, str]:
    """A form encoded as `requests`, curl and browsers send it: (body, content type).

    fields: (name, value) or (name, (filename, bytes)). Werkzeug's test client would leave the
    blank line out of an empty file part, which the service's parser refuses (api/utils/multipart.py).
    """
    body, content_type = urllib3.encode_multipart_formdata(fields)
    return body, content_type


def post_form(client, path: str, fields: list[tuple[str, object]], headers: dict | None = None):
    body, content_type = multipart_body(fields)
    return client.post(path, data=body, content_type=content_type, headers=headers or {})


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color=(200, 30, 60), mode: str = "RGB",
                seed: int | None = None) -> bytes:
    """A real encoded image; with a seed, random pixels so different seeds give different scores."""
    if seed is not None:
        import numpy as np

        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        if mode != "RGB":
            image = image.convert(mode)
    else:
        image = Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()



# -- apps -------------------------------------------------------------------------
def app_settings(tmp_path: Path, **overrides: str) -> dict[str, str]:
    settings = {**TINY_MODEL, "INSTANCE_DIR": str(tmp_path / "instance"), "AUTH_REQUIRED": "false",
                "SECRET_KEY": "test-secret-" + uuid.uuid4().hex}
    settings.update(overrides)
    return settings


def make_app(tmp_path: Path, engine, detectors=None, **overrides: str):
    from api import create_app
    from api.database import upgrade_schema

    settings = app_settings(tmp_path, **overrides)
    if "DATABASE_URL" not in settings:
        upgrade_schema(f"sqlite:///{tmp_path / 'instance' / 'd3.sqlite'}")
    return create_app(settings, engine=engine, detectors=detectors)
