"""Write the service's OpenAPI document (GET /openapi.json on default settings) to a file.

The web front end's typed client is generated from it (`make web-client`); a test checks that the
committed document and client match what the service serves now, so the page and the API cannot drift.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = {"D3_BACKBONE": "d3-tiny", "D3_CLIP_WEIGHTS": "random:0", "D3_HEAD_WEIGHTS": "random:0",
              "D3_DEVICE": "cpu"}


def served_document() -> dict:
    """The document as the app serves it on its defaults (the tiny model: nothing to load or fetch)."""
    sys.path.insert(0, str(ROOT))
    for name in list(os.environ):  # the defaults, not this shell's settings
        if name.startswith(("D3_", "MINIO_")) or name in {"DATABASE_URL", "REDIS_URL", "AUTH_REQUIRED"}:
            os.environ.pop(name)
    from api import create_app
    from api.database import upgrade_schema

    with tempfile.TemporaryDirectory(prefix="d3-openapi-") as tmp:
        upgrade_schema(f"sqlite:///{tmp}/d3.sqlite")
        app = create_app({**TINY_MODEL, "INSTANCE_DIR": tmp, "AUTH_REQUIRED": "false"})
        try:
            return app.test_client().get("/openapi.json").get_json()
        finally:
            app.extensions["d3"].engine.stop()


def render(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "web" / "openapi.json"
    target.write_text(render(served_document()))
    print(f"wrote {target}")
