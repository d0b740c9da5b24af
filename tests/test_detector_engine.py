"""The batching inference engine, with injected models whose scores the tests control."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from api.detector.config import DetectorConfig
from api.detector.engine import InferenceEngine
from api.detector.errors import EngineNotReady, EngineOverloaded, EngineTimeout, InferenceError
from api.detector.factory import build_model


def image(value: float) -> torch.Tensor:
    """A 'preprocessed image' whose score under PixelModel is `value`."""
    return torch.full((3, 224, 224), value)


class PixelModel(nn.Module):
    """Scores an image by its first pixel; records batch sizes; can be slowed or gated."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device to read
        self.delay, self.gate = delay, gate
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.seen.extend(x[:, 0, 0, 0].tolist())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        return x[:, 0, 0, 0] + self.anchor


def started(model: nn.Module, **kw) -> InferenceEngine:
    engine = InferenceEngine(DetectorConfig(**{"max_wait_ms": 5.0, **kw}), model=model)
    engine.start()
    assert engine.wait_ready(10)
    return engine


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_ready_only_after_load_and_warm_up():
    model = PixelModel()
    engine = InferenceEngine(DetectorConfig(), model=model)
    assert engine.ready is False
    with pytest.raises(EngineNotReady, match="loading"):
        engine.predict([image(0.5)])
    engine.start()
    assert engine.wait_ready(10) is True
    assert model.batches[0] == 1  # the warm-up forward ran before ready
    info = engine.describe()
    assert info["loaded"] and info["warmed"] and info["ready"] and info["device"] == "cpu"
    assert info["trained"] is False and info["error"] is None and info["max_batch_size"] == 32
    engine.stop()


def test_predict_returns_results_in_order():
    engine = started(PixelModel())
    values = [0.1, 0.9, 0.3, 0.7, 0.5]
    assert engine.predict([image(v) for v in values]) == pytest.approx(values)
    assert engine.predict([]) == []
    engine.stop()


def test_32_concurrent_callers_each_get_their_own_results():
    model = PixelModel(delay=0.02)
    engine = started(model, max_batch_size=16, max_wait_ms=20)
    sizes: list[int] = []
    engine.add_batch_listener(lambda size, seconds: sizes.append(size))
    barrier = threading.Barrier(32)
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        mine = [i / 100 + j / 1000 for j in range(1 + i % 3)]  # 1-3 images, unique values
        barrier.wait()
        try:
            results[i] = (mine, engine.predict([image(v) for v in mine], timeout=30))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 32
    for mine, got in results.values():
        assert got == pytest.approx(mine, abs=1e-6)
    total = sum(1 + i % 3 for i in range(32))
    stats = engine.stats()
    assert stats["images_processed"] == total  # the warm-up forward is not counted
    assert max(sizes) > 1 and max(sizes) <= 16  # requests shared batches, capped at max_batch_size
    assert stats["batches_run"] < total
    engine.stop()


def test_result_does_not_depend_on_the_batch_with_the_real_model(tmp_path):
    model = build_model(DetectorConfig(backbone="d3-tiny", clip_weights="random:1", head_weights="random:2",
                                       device="cpu", cache_dir=str(tmp_path)))
    engine = started(model, max_batch_size=8, max_wait_ms=50)
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    together = engine.predict(list(x))
    alone = engine.predict([x[3]])
    assert abs(alone[0] - together[3]) <= 1e-6
    with torch.inference_mode():
        direct = model(x).tolist()
    assert together == pytest.approx(direct, abs=1e-6)
    assert engine.model_version == model.model_version and engine.trained is False
    engine.stop()


def test_overload_fails_at_once_with_retry_after():
    gate = threading.Event()
    model = PixelModel(gate=gate)
    gate.set()
    engine = started(model, max_batch_size=1, queue_size=4)
    gate.clear()
    model.entered.clear()
    results: list[list[float]] = []
    first = threading.Thread(target=lambda: results.append(engine.predict([image(0.1)])))
    first.start()
    assert model.entered.wait(5)  # the batch thread is now stuck in forward
    waiting = [threading.Thread(target=lambda v=v: results.append(engine.predict([image(v)])))
               for v in (0.2, 0.3, 0.4, 0.5)]
    for t in waiting:
        t.start()
    wait_until(lambda: engine.stats()["queue_depth"] == 4)
    start = time.monotonic()
    with pytest.raises(EngineOverloaded) as err:
        engine.predict([image(0.9)])
    assert time.monotonic() - start < 0.5
    assert err.value.retry_after >= 1
    gate.set()
    for t in [first, *waiting]:
        t.join(10)
    assert sorted(r[0] for r in results) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert engine.predict([image(0.9)]) == pytest.approx([0.9])  # recovers once drained
    engine.stop()


def test_timeout_drops_items_that_have_not_started():
    gate = threading.Event()
    model = PixelModel(gate=gate)
    gate.set()
    engine = started(model, max_batch_size=1)
    gate.clear()
    model.entered.clear()
    blocker = threading.Thread(target=lambda: engine.predict([image(0.1)]))
    blocker.start()
    assert model.entered.wait(5)
    start = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.predict([image(0.77), image(0.78)], timeout=0.2)
    assert 0.15 < time.monotonic() - start < 2
    assert engine.stats()["queue_depth"] == 0
    gate.set()
    blocker.join(5)
    assert engine.predict([image(0.3)]) == pytest.approx([0.3])
    assert 0.77 not in [round(v, 2) for v in model.seen] and 0.78 not in [round(v, 2) for v in model.seen]
    engine.stop()


def test_default_timeout_comes_from_the_config():
    gate = threading.Event()
    model = PixelModel(gate=gate)
    gate.set()
    engine = started(model, infer_timeout_s=0.2)
    gate.clear()
    with pytest.raises(EngineTimeout):
        engine.predict([image(0.5)])
    gate.set()
    engine.stop()


class OomAbove(PixelModel):
    """Raises CUDA out-of-memory for batches above `limit`, and always for the poison value 0.666."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit or bool((x[:, 0, 0, 0] - 0.666).abs().min() < 1e-6):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return x[:, 0, 0, 0] + self.anchor


def test_cuda_oom_splits_the_batch_in_halves():
    model = OomAbove(limit=2)
    engine = started(model, max_batch_size=8, max_wait_ms=50)
    model.batches.clear()
    values = [i / 10 for i in range(8)]
    assert engine.predict([image(v) for v in values]) == pytest.approx(values)
    assert model.batches == [8, 4, 2, 2, 4, 2, 2]
    engine.stop()


def test_single_image_oom_fails_only_its_caller():
    model = OomAbove(limit=8)
    engine = started(model, max_batch_size=8, max_wait_ms=200)
    outcome: dict[str, object] = {}

    def call(name: str, values: list[float]) -> None:
        try:
            outcome[name] = engine.predict([image(v) for v in values], timeout=10)
        except Exception as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=call, args=("good", [0.1, 0.2, 0.3])),
               threading.Thread(target=call, args=("poison", [0.666])),
               threading.Thread(target=call, args=("also-good", [0.4]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert isinstance(outcome["poison"], InferenceError) and "out of GPU memory" in str(outcome["poison"])
    assert outcome["good"] == pytest.approx([0.1, 0.2, 0.3])
    assert outcome["also-good"] == pytest.approx([0.4])
    assert engine.predict([image(0.5)]) == pytest.approx([0.5])  # the engine survives
    engine.stop()


def test_a_failing_forward_fails_that_batch_only():
    class Flaky(PixelModel):
        def forward(self, x):
            if bool((x[:, 0, 0, 0] < 0).any()):
                raise RuntimeError("boom")
            return super().forward(x)

    engine = started(Flaky(), max_batch_size=1)
    with pytest.raises(InferenceError, match="boom"):
        engine.predict([image(-1.0)])
    assert engine.predict([image(0.25)]) == pytest.approx([0.25])
    engine.stop()


def test_stats_and_batch_listener():
    engine = started(PixelModel(), max_batch_size=4, max_wait_ms=50)
    seen: list[tuple[int, float]] = []
    engine.add_batch_listener(lambda size, seconds: seen.append((size, seconds)))
    engine.add_batch_listener(lambda size, seconds: 1 / 0)  # a broken listener must not break serving
    before = engine.stats()
    assert engine.predict([image(0.1 * i) for i in range(6)]) == pytest.approx([0.1 * i for i in range(6)])
    after = engine.stats()
    assert [s for s, _ in seen] == [4, 2] and all(sec >= 0 for _, sec in seen)
    assert after["images_processed"] - before["images_processed"] == 6
    assert after["batches_run"] - before["batches_run"] == 2
    assert after["last_batch_size"] == 2 and after["forward_seconds_total"] >= before["forward_seconds_total"]
    assert after["queue_depth"] == 0
    engine.stop()


def test_wrong_input_shape_is_a_value_error():
    engine = started(PixelModel())
    with pytest.raises(ValueError, match="3, 224, 224"):
        engine.predict([torch.zeros(3, 100, 100)])
    engine.stop()


def test_stop_refuses_new_work():
    engine = started(PixelModel())
    engine.stop()
    assert engine.ready is False
    with pytest.raises(EngineNotReady, match="stopped"):
        engine.predict([image(0.5)])


def test_load_failure_is_reported_not_raised(tmp_path):
    config = DetectorConfig(backbone="d3-tiny", clip_weights="random:0", head_weights=str(tmp_path / "nope.pth"),
                            device="cpu", cache_dir=str(tmp_path))
    engine = InferenceEngine(config)
    engine.start()
    assert engine.wait_ready(30) is False
    assert "nope.pth" in engine.load_error and "d3 fetch-weights" in engine.load_error
    assert engine.describe()["error"] == engine.load_error and engine.describe()["ready"] is False
    with pytest.raises(EngineNotReady, match="failed to load"):
        engine.predict([image(0.5)])


def test_engine_builds_its_own_model_from_the_config(tmp_path):
    config = DetectorConfig(backbone="d3-tiny", clip_weights="random:0", head_weights="random:0", device="cpu",
                            cache_dir=str(tmp_path))
    engine = InferenceEngine(config)
    engine.start()
    assert engine.wait_ready(30)
    info = engine.describe()
    assert info["backbone"] == "d3-tiny" and info["precision"] == "fp32" and info["trained"] is False
    assert info["model_version"] == "d3/d3-tiny/random:0/head-random:0/seed0/fp32"
    p = engine.predict([torch.zeros(3, 224, 224)])
    assert len(p) == 1 and 0 < p[0] < 1
    engine.stop()
