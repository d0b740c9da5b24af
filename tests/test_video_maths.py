"""The pure video arithmetic, without a video: which frames are sampled, how frame scores become a
verdict, where the fake segments are, which frames are the most suspicious."""

from __future__ import annotations

import math

import pytest

from api.services.videos import VideoParams, aggregate, find_segments, plan_indices, top_frames
from api.utils.video_probe import ProbeInfo, sample_indices


def info(frame_count: int, fps: float = 25.0) -> ProbeInfo:
    return ProbeInfo(container="mp4", codec="h264", fps=fps, frame_count=frame_count,
                     duration_s=frame_count / fps, width=64, height=48, probe_s=0.0)


# -- sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_count", [1, 2, 7, 31, 100, 1001])
@pytest.mark.parametrize("wanted", [1, 2, 5, 32, 2000])
def test_sample_indices_are_slice_centres_strictly_increasing_and_in_range(frame_count, wanted):
    indices = sample_indices(frame_count, wanted)
    n = min(wanted, frame_count)
    assert len(indices) == n
    assert all(0 <= i < frame_count for i in indices)
    assert all(a < b for a, b in zip(indices, indices[1:], strict=False))
    for k, index in enumerate(indices):  # index_k is the centre of the k-th of n equal slices
        assert index == math.floor((k + 0.5) * frame_count / n)
        assert k * frame_count / n < index + 1 and index < (k + 1) * frame_count / n  # frame overlaps the slice


def test_sample_indices_edge_cases():
    assert sample_indices(0, 8) == [] and sample_indices(10, 0) == []
    assert sample_indices(10, 10) == list(range(10))
    assert sample_indices(10, 20) == list(range(10))  # never more frames than there are


def test_plan_by_frame_count_default_and_cap():
    indices, sampling = plan_indices(info(100), VideoParams(threshold=0.5, frames=4), max_frames=64,
                                     default_frames=32)
    assert indices == [12, 37, 62, 87]
    assert sampling["mode"] == "frames" and sampling["requested_frames"] == 4 and sampling["planned_frames"] == 4
    assert sampling["capped"] is False
    default, sampling = plan_indices(info(100), VideoParams(threshold=0.5), max_frames=64, default_frames=32)
    assert len(default) == 32 and sampling["requested_frames"] == 32
    capped, sampling = plan_indices(info(1000), VideoParams(threshold=0.5, frames=500), max_frames=64,
                                    default_frames=32)
    assert len(capped) == 64 and sampling["capped"] is True and sampling["requested_frames"] == 500
    assert capped == sample_indices(1000, 64)
    short, sampling = plan_indices(info(3), VideoParams(threshold=0.5, frames=10), max_frames=64, default_frames=32)
    assert short == [0, 1, 2] and sampling["planned_frames"] == 3 and sampling["capped"] is False


def test_plan_by_rate():
    # 4 s at 25 fps, sampled at 2 per second: 8 frames, one per half second.
    indices, sampling = plan_indices(info(100), VideoParams(threshold=0.5, fps=2.0), max_frames=64, default_frames=32)
    assert sampling["mode"] == "fps" and sampling["fps"] == 2.0 and sampling["requested_frames"] == 8
    assert indices == sample_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]
    # A rate so low that no whole frame falls in the video still samples one frame.
    one, sampling = plan_indices(info(100), VideoParams(threshold=0.5, fps=0.1), max_frames=64, default_frames=32)
    assert one == [50] and sampling["requested_frames"] == 1
    # 0.3 fps x 10 s is 3 frames exactly, despite 0.3 * 10 = 2.9999999999999996 in floating point.
    three, _ = plan_indices(info(250), VideoParams(threshold=0.5, fps=0.3), max_frames=64, default_frames=32)
    assert len(three) == 3
    capped, sampling = plan_indices(info(100), VideoParams(threshold=0.5, fps=1000.0), max_frames=64,
                                    default_frames=32)
    assert len(capped) == 64 and sampling["capped"] is True and sampling["requested_frames"] == 4000


# -- aggregation ----------------------------------------------------------------------------------
def test_aggregate_mean_vote_max():
    result = aggregate([0.1, 0.6, 0.5, 0.9], threshold=0.5)
    assert result["mean"] == pytest.approx(0.525)
    assert result["vote"] == 0.5  # 0.6 and 0.9 are over; 0.5 is not (p > threshold, strictly)
    assert result["max"] == 0.9
    assert aggregate([0.3], threshold=0.0) == {"mean": 0.3, "vote": 1.0, "max": 0.3}
    assert aggregate([0.3, 0.3], threshold=1.0)["vote"] == 0.0


def test_aggregate_mean_is_exact_for_many_frames():
    # fsum, not a running float sum: 0.1 x 10 is exactly 1.0 / 10.
    assert aggregate([0.1] * 10, threshold=0.5)["mean"] == 0.1


# -- segments --------------------------------------------------------------------------------------
def frames(probabilities: list[float | None], planned: int | None = None, fps: float = 1.0) -> list[dict]:
    """Sampled frames in plan order; None = that frame could not be decoded (left out, as the service does)."""
    planned = planned or len(probabilities)
    out = []
    for position, p in enumerate(probabilities):
        if p is not None:
            out.append({"position": position, "index": position * 10, "timestamp_s": position * 10 / fps,
                        "fake_probability": p})
    return out


def test_segments_are_runs_over_the_threshold():
    sampled = frames([0.1, 0.8, 0.9, 0.2, 0.7, 0.4, 0.6])
    segments = find_segments(sampled, threshold=0.5, duration_s=70.0, planned=7)
    assert [(s["start_s"], s["end_s"], s["frames"]) for s in segments] == [(10.0, 30.0, 2), (40.0, 50.0, 1),
                                                                             (60.0, 70.0, 1)]
    first = segments[0]
    assert (first["start_frame"], first["end_frame"]) == (10, 20)
    assert (first["first_timestamp_s"], first["last_timestamp_s"]) == (10.0, 20.0)
    assert first["mean_probability"] == pytest.approx(0.85) and first["max_probability"] == 0.9


def test_a_frame_that_could_not_be_decoded_breaks_a_run():
    sampled = frames([0.9, None, 0.9, 0.9])
    segments = find_segments(sampled, threshold=0.5, duration_s=40.0, planned=4)
    assert [(s["start_s"], s["end_s"], s["frames"]) for s in segments] == [(0.0, 10.0, 1), (20.0, 40.0, 2)]


def test_segments_edge_cases():
    assert find_segments(frames([0.1, 0.5, 0.2]), threshold=0.5, duration_s=3.0, planned=3) == []  # 0.5 is not over
    everything = find_segments(frames([0.9] * 3), threshold=0.5, duration_s=2.5, planned=3)
    assert len(everything) == 1 and everything[0]["start_s"] == 0.0
    assert everything[0]["end_s"] == 2.5  # clamped to the video's duration
    assert find_segments([], threshold=0.5, duration_s=10.0, planned=0) == []


# -- the most suspicious frames --------------------------------------------------------------------
def test_top_frames_highest_first_earlier_on_ties():
    sampled = frames([0.2, 0.9, 0.5, 0.9, 0.7, 0.1, 0.3])
    top = top_frames(sampled, count=3)
    assert [(f["index"], f["fake_probability"]) for f in top] == [(10, 0.9), (30, 0.9), (40, 0.7)]
    assert set(top[0]) == {"index", "timestamp_s", "fake_probability"}
    assert len(top_frames(sampled)) == 5 and len(top_frames(sampled[:2])) == 2
