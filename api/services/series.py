"""What a time-series prediction (a video's sampled frames, a recording's windows) shares once stored.

Both kinds keep the same rows (a `predictions` row with a `video_predictions` detail), a per-item JSON
document in the frames bucket and a timeline picture beside the summary in the results bucket;
reading them back is the same code for both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from api.exceptions import NotFound
from api.models import Prediction
from api.storage import ObjectNotFound, ObjectStore, StoreUnavailable, object_key

log = logging.getLogger(__name__)

TIMELINE_SUFFIX = "-timeline.png"


@dataclass(frozen=True)
class Submission:
    """What a submitted video or recording became: its result now, or a queued job (`queued`)."""

    body: dict[str, Any]
    queued: bool


def timeline_key(row: Prediction) -> str:
    """The timeline picture lives beside the summary: `<date>/<id>-timeline.png` in the results bucket."""
    return timeline_key_for(row.result_object or object_key(str(row.id), ".json", row.created_at))


def timeline_key_for(result_object: str) -> str:
    """The timeline picture's key beside a summary's key."""
    return result_object.removesuffix(".json") + TIMELINE_SUFFIX


def aggregates(row: Prediction) -> dict[str, Any] | None:
    """mean / vote / max over the items, once the prediction is done."""
    detail = row.video
    if row.status != "done" or detail is None:
        return None
    return {"mean": detail.mean_probability, "vote": detail.vote_share, "max": detail.max_probability}


def common_fields(row: Prediction) -> dict[str, Any]:
    """The fields a video and a recording show alike (the caller checked that `row.video` is set)."""
    detail = row.video
    return {
        "aggregation": detail.aggregation,
        "aggregates": aggregates(row),
        "duration_s": detail.duration_s,
        "container": detail.container,
        "codec": detail.codec,
        "progress": {"done": detail.progress_done, "total": detail.progress_total},
        "segments": detail.segments,
    }


def timeline_url(store: ObjectStore, settings: Any, row: Prediction) -> str | None:
    """A signed link to the timeline picture of a finished prediction (None before, or when the store is down)."""
    if row.status != "done" or not row.result_object:
        return None
    try:
        return store.presigned_get_url(settings.bucket_results, timeline_key(row), settings.result_url_expiry_s)
    except StoreUnavailable:
        log.warning("could not sign timeline URL for %s", row.id)
        return None


def read_items(store: ObjectStore, settings: Any, row: Prediction, field: str) -> list[dict] | None:
    """The per-frame (`frames`) or per-window (`windows`) results of a finished prediction, None if unreadable."""
    if row.status != "done" or row.video is None or not row.video.frames_object:
        return None
    try:
        document = json.loads(store.get_bytes(settings.bucket_frames, row.video.frames_object))
        return document.get(field)
    except (ObjectNotFound, StoreUnavailable, ValueError):
        log.warning("per-item results (%s) of %s could not be read", field, row.id)
        return None


def stored_timeline(store: ObjectStore, settings: Any, row: Prediction) -> bytes | None:
    """The stored timeline picture; NotFound while the job runs, None when the object is gone."""
    if row.status != "done":
        raise NotFound(f"the timeline of prediction {row.id} is not ready: the job is {row.status}",
                       job_status=row.status)
    try:
        return store.get_bytes(settings.bucket_results, timeline_key(row))
    except ObjectNotFound:
        return None
