"""What /health reports: readiness worked out from the prober's verdicts and the detectors' states.

No I/O: the database, the object store, Redis and any inference tier are checked by
api/health_probe.py on threads of their own, so a report is cheap even while one of them hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.detector.config import UNTRAINED_WARNING
from api.detector.registry import DetectorRegistry
from api.health_probe import HealthProber

# A retry soon for an outside system that is down (the prober looks again within seconds); later
# while the model is still loading.
RETRY_AFTER_DOWN_S = 2
RETRY_AFTER_LOADING_S = 10
PUBLIC_FIELDS = ("status", "ready")


@dataclass(frozen=True)
class HealthReport:
    ready: bool
    body: dict[str, Any]
    retry_after_s: int | None  # None when ready

    def public(self) -> dict[str, Any]:
        """The summary a caller without a key may see: no model, backends or queue."""
        return {name: self.body[name] for name in PUBLIC_FIELDS}


def health_report(engine: Any, detectors: DetectorRegistry, prober: HealthProber, database_backend: str,
                  store_kind: str) -> HealthReport:
    """Ready when the image model is loaded, the database and the store answer and nothing is down."""
    model = engine.describe()
    model_ready = bool(model.get("ready"))
    verdicts = prober.snapshot()
    down = sorted(name for name, verdict in verdicts.items() if not verdict.ok)
    database_ok = "database" in verdicts and verdicts["database"].ok
    store_ok = "object_store" in verdicts and verdicts["object_store"].ok
    ready = model_ready and not down and database_ok and store_ok
    body: dict[str, Any] = {
        "status": "ok" if ready else "unavailable",
        "ready": ready,
        "model": model,
        "database": {"reachable": database_ok, "backend": database_backend},
        "object_store": {"reachable": store_ok, "kind": store_kind},
        "down": down,
        "systems": {name: verdict.as_dict() for name, verdict in verdicts.items()},
        "queue_depth": engine.stats().get("queue_depth", 0),
        # Each kind of media on its own: a modality whose weights are missing is unavailable (naming the
        # file) while the others serve; `ready` above stays the image/video model's.
        "modalities": modalities(engine, detectors, model_ready),
    }
    if model_ready and not model.get("trained", True):
        body["warning"] = UNTRAINED_WARNING
    retry_after = None if ready else (RETRY_AFTER_DOWN_S if model_ready else RETRY_AFTER_LOADING_S)
    return HealthReport(ready=ready, body=body, retry_after_s=retry_after)


def modalities(engine: Any, detectors: DetectorRegistry, d3_ready: bool) -> dict[str, Any]:
    """Each kind of media's detector state; images and videos share the D³ engine."""
    d3 = {"status": "ready" if d3_ready else ("unavailable" if engine.load_error else "loading"),
          "ready": d3_ready, "detector": "d3", "trained": engine.trained}
    return {"image": d3, "video": d3, **detectors.describe()}
