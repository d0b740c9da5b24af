"""Switching heads under a running model: the D³ backbone is frozen and shared, only the small head changes.

Every process that serves the model (each API worker's InferenceEngine, the Triton tier) holds one
`HeadSwitcher`. It starts on the configured head (D3_HEAD_WEIGHTS), polls a `HeadCatalog` (the
database row that says which model version is active, api/services/model_versions.py) every few
seconds, loads a newly activated head from the catalog's store and swaps one reference. A request
pins the `Head` current when it is submitted and keeps it: every image of that request is scored
by that head, whatever is activated meanwhile, and a head that is no longer active stays in memory
for as long as a pinned request holds it. `score_heads` runs the backbone once for a whole batch
and each head only on its own rows, so heads are never mixed inside one head forward.

This module knows nothing of databases or HTTP: the catalog is a protocol.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from api.detector.errors import DetectorError
from api.detector.weights import backbone_is_random, head_identity, head_state_from_bytes, with_head

log = logging.getLogger(__name__)
CONFIGURED = "configured"  # the name that pins the configured head (D3_HEAD_WEIGHTS) explicitly


@dataclass(frozen=True, eq=False)
class Head:
    """One head as it answers: `version` is its model version's id (sha256:<12 hex>), None for the
    configured head; `module` None means the model's own head."""

    version: str | None
    model_version: str
    trained: bool
    threshold: float | None = None  # the default threshold from its model card (None: DEFAULT_THRESHOLD)
    module: Any = None

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "model_version": self.model_version, "trained": self.trained,
                "threshold": self.threshold, "source": "configured" if self.version is None else "model_versions"}


@dataclass(frozen=True)
class Scores:
    """A scored call: the probabilities in order and the one head that scored all of them."""

    probabilities: list[float]
    head: Head


class HeadCatalog(Protocol):
    def active_version(self) -> str | None:
        """The active version's id, or None for the configured head (a cheap read, polled)."""

    def head_files(self, version: str) -> tuple[bytes, float | None]:
        """The head checkpoint's bytes and its card's threshold; NotFound for an unknown version."""


class UnknownVersion(DetectorError):
    """A request named a model version that does not exist (or cannot be read)."""


class HeadSwitcher:
    """The configured head, the active one and a few recent ones, loaded on a model of width `dim`."""

    def __init__(self, base: Head, dim: int, device: Any, catalog: HeadCatalog | None = None,
                 poll_s: float = 2.0, keep: int = 4) -> None:
        self.base = base
        self.dim = dim
        self.device = device
        self.catalog = catalog
        self.poll_s = poll_s
        self.keep = keep
        self.error: str | None = None  # why the last poll failed (None: it did not)
        self.polled_at: float | None = None  # time.time() of the last successful poll
        self._active = base
        self._cache: OrderedDict[str, Head] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Any] = []

    @property
    def active(self) -> Head:
        return self._active  # one reference read: a request pins whatever is current at this instant

    def on_switch(self, fn: Any) -> None:
        """fn(head) after every switch (the engine mirrors model_version and trained)."""
        self._listeners.append(fn)

    def get(self, version: str | None) -> Head:
        """The head of a version (None or CONFIGURED: the configured one), loading it if needed."""
        if version is None or version == CONFIGURED:
            return self.base
        if self._active.version == version:
            return self._active
        cached = self._cache.get(version)
        if cached is not None:
            return cached
        if self.catalog is None:
            raise UnknownVersion(f"model version {version!r} is unknown here (no catalog of versions)")
        with self._lock:
            cached = self._cache.get(version)
            if cached is None:
                cached = self._load(version)
                self._cache[version] = cached
                while len(self._cache) > self.keep:
                    self._cache.popitem(last=False)  # pinned requests still hold their own reference
            return cached

    def _load(self, version: str) -> Head:
        assert self.catalog is not None
        from api.detector.model import build_head

        data, threshold = self.catalog.head_files(version)
        if head_identity(hashlib.sha256(data).hexdigest()) != version:
            raise UnknownVersion(f"the stored head of model version {version} does not match its hash")
        state = head_state_from_bytes(data, self.dim, f"model version {version}")
        module = build_head(self.dim)
        module.load_state_dict(state, strict=True)
        module = module.to(self.device).eval().requires_grad_(False)
        trained = not backbone_is_random(self.base.model_version)
        return Head(version, with_head(self.base.model_version, version), trained, threshold, module)

    def sync(self) -> bool:
        """Read the active version once and switch to it; True when the head changed."""
        if self.catalog is None:
            return False
        try:
            wanted = self.catalog.active_version()
            head = self.get(wanted)
        except Exception as exc:  # noqa: BLE001 - database or store down, bad head: keep serving the current one
            message = f"{type(exc).__name__}: {exc}"
            if message != self.error:
                log.warning("model version poll failed (still serving %s): %s", self._active.model_version, message)
            self.error = message
            return False
        self.error, self.polled_at = None, time.time()
        if head is self._active:
            return False
        previous, self._active = self._active, head
        log.info("model version switched: %s -> %s", previous.model_version, head.model_version)
        for fn in list(self._listeners):
            fn(head)
        return True

    def start(self) -> None:
        if self.catalog is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="d3-model-versions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sync()

    def describe(self) -> dict[str, Any]:
        return {**self._active.describe(), "poll_s": self.poll_s if self.catalog else None,
                "polled_at": self.polled_at, "poll_error": self.error}


def base_head(model: Any) -> Head:
    """The configured head of a loaded model (its own head module answers)."""
    version = getattr(model, "model_version", "") or f"custom/{type(model).__name__}"
    return Head(None, version, bool(getattr(model, "trained", False)))


def score_heads(model: Any, x: torch.Tensor, heads: Sequence[Head]) -> list[float]:
    """Fake probabilities of a batch whose rows may be pinned to different heads.

    The backbone runs once on the whole batch (it is the same for every head); each head then runs
    on its own rows only. A batch of the model's own head is exactly `model(x)`.
    """
    if all(head.module is None for head in heads):
        return model(x).float().cpu().tolist()
    features = model.features(x.float())
    out = torch.empty(len(heads), dtype=torch.float32)
    groups: dict[int, list[int]] = {}
    for row, head in enumerate(heads):
        groups.setdefault(id(head), []).append(row)
    for rows in groups.values():
        module = heads[rows[0]].module or model.head
        index = torch.tensor(rows, dtype=torch.long, device=features.device)
        out[rows] = torch.sigmoid(module(features.index_select(0, index))).float().cpu()
    return out.tolist()
