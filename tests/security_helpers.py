"""Helpers shared by the tests/test_security_*.py modules."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import make_app, post_form


def secure_app(tmp_path: Path, engine, **overrides: str):
    """An app with auth on (the production default) on the embedded backends."""
    return make_app(tmp_path, engine, AUTH_REQUIRED="true", **overrides)


def new_key(app, name: str, admin: bool = False) -> str:
    """A real key, created by the same service the `d3 keys create` command uses."""
    _, plaintext = app.extensions["d3"].keys.create(name, admin)
    return plaintext


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def post_image(client, data: bytes, filename: str = "x.png", headers: dict | None = None, **form):
    return post_form(client, "/predict", [("file", (filename, data)), *form.items()], headers)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def video_bytes() -> bytes:
    """A 2-second 64x48 MJPEG AVI made here with OpenCV."""
    import tempfile

    import cv2
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/clip.avi"
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
        rng = np.random.default_rng(0)
        for _ in range(20):
            writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        writer.release()
        with open(path, "rb") as handle:
            return handle.read()
