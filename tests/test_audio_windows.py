"""Windows of a recording are scored like a video's frames: the video code's aggregates and runs,
with the windows' own times."""

from __future__ import annotations

import pytest

from api.detector.aasist import WINDOW_SAMPLES
from api.services.audio import plan_windows, result_fields, window_segments


def windows(probabilities, hop_s=4.0375, last_end=None):
    out = []
    for k, p in enumerate(probabilities):
        start = k * hop_s
        out.append({"index": k, "position": k, "start_s": start, "end_s": start + WINDOW_SAMPLES / 16000,
                    "timestamp_s": start, "score": 0.0, "fake_probability": p})
    if last_end is not None:
        out[-1]["end_s"] = last_end
    return out


def test_plan_windows_uses_the_hop_and_ends_on_the_last_sample():
    assert plan_windows(8_000, 4.0375) == [(0, 8_000)]  # shorter than a window: the authors' pad does the rest
    spans = plan_windows(16_000 * 10, 2.0)
    assert spans[0] == (0, WINDOW_SAMPLES) and spans[1] == (32_000, 32_000 + WINDOW_SAMPLES)
    assert spans[-1] == (160_000 - WINDOW_SAMPLES, 160_000)
    assert all(end - start == WINDOW_SAMPLES for start, end in spans)


def test_segments_are_runs_of_windows_with_their_own_times():
    ws = windows([0.1, 0.9, 0.8, 0.2, 0.7], hop_s=2.0)
    segments = window_segments(ws, threshold=0.5)
    assert [(s["start_window"], s["end_window"], s["windows"]) for s in segments] == [(1, 2, 2), (4, 4, 1)]
    assert segments[0]["start_s"] == 2.0 and segments[0]["end_s"] == pytest.approx(4.0 + 4.0375)
    assert segments[0]["mean_probability"] == pytest.approx(0.85) and segments[0]["max_probability"] == 0.9


@pytest.mark.parametrize("aggregation, expected, label", [("mean", 0.54, "fake"), ("vote", 0.6, "fake"),
                                                          ("max", 0.9, "fake")])
def test_aggregates_decide_the_verdict(aggregation, expected, label):
    fields = result_fields(windows([0.1, 0.9, 0.8, 0.2, 0.7]), threshold=0.5, aggregation=aggregation)
    assert fields["fake_probability"] == pytest.approx(expected) and fields["prediction"] == label
    assert fields["aggregates"] == pytest.approx({"mean": 0.54, "vote": 0.6, "max": 0.9})
    assert [w["index"] for w in fields["top_windows"]][:3] == [1, 2, 4]
    low = result_fields(windows([0.1, 0.9, 0.2, 0.2, 0.2]), threshold=0.5, aggregation=aggregation)
    assert low["prediction"] == ("fake" if aggregation == "max" else "real")
