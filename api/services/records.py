"""Storing a record all or nothing: its objects first, then its row.

If the row cannot be written the objects are removed again, so no row ever points at a missing
object and a failed request leaves nothing behind. Either failure propagates (a 503 at the HTTP boundary).
"""

from __future__ import annotations

import logging
import os

from api.database import Database
from api.storage import ObjectNotFound, ObjectStore, StoreUnavailable

log = logging.getLogger(__name__)

# bucket, key, the bytes or the path of a file holding them, content type
StoredObject = tuple[str, str, bytes | str | os.PathLike, str]


def put_objects(store: ObjectStore, objects: list[StoredObject]) -> list[tuple[str, str]]:
    """Write every object or none: a failure removes those already written and re-raises."""
    written: list[tuple[str, str]] = []
    try:
        for bucket, key, payload, content_type in objects:
            if isinstance(payload, bytes):
                store.put_bytes(bucket, key, payload, content_type)
            else:
                store.put_file(bucket, key, payload, content_type)
            written.append((bucket, key))
    except BaseException:
        log.error("objects not stored; removing the %d already written", len(written))
        delete_objects(store, written)
        raise
    return written


def delete_objects(store: ObjectStore, objects: list[tuple[str, str]]) -> None:
    """Best effort: a leftover object is harmless, a leftover row pointing nowhere is not."""
    for bucket, key in objects:
        try:
            store.delete(bucket, key)
        except (StoreUnavailable, ObjectNotFound, ValueError):
            log.warning("could not remove object %s/%s", bucket, key)


def insert_with_objects(db: Database, store: ObjectStore, row: object, objects: list[StoredObject]) -> None:
    written = put_objects(store, objects)
    try:
        with db.session() as session:
            session.add(row)
    except BaseException:
        log.error("row not stored; removing its %d objects", len(written))
        delete_objects(store, written)
        raise
