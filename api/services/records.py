"""Storing a record all or nothing: its objects first, then its row.

If the row cannot be written the objects are removed again, so no row ever points at a missing
object and a failed request leaves nothing behind. Either failure propagates (a 503 at the HTTP boundary).

"Removed" covers every object whose put was attempted, not only those the store confirmed: a put
that timed out may have landed, or may still land when a frozen store wakes up. What cannot be
deleted now is owed (`store.pending_deletes`, retried by the prober once the store answers
again); the reconciler (api/services/reconcile.py) removes whatever still slips through.
"""

from __future__ import annotations

import logging
import os

from sqlalchemy.exc import IntegrityError

from api.database import Database, DatabaseUnavailable
from api.storage import ObjectNotFound, ObjectStore, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

# bucket, key, the bytes or the path of a file holding them, content type
StoredObject = tuple[str, str, bytes | str | os.PathLike, str]


def put_objects(store: ObjectStore, objects: list[StoredObject]) -> list[tuple[str, str]]:
    """Write every object or none: a failure removes every one attempted and re-raises."""
    written: list[tuple[str, str]] = []
    for bucket, key, payload, content_type in objects:
        try:
            if isinstance(payload, bytes):
                store.put_bytes(bucket, key, payload, content_type)
            else:
                store.put_file(bucket, key, payload, content_type)
        except BaseException as exc:
            log.error("objects not stored; removing the %d already written", len(written))
            delete_objects(store, written)
            if isinstance(exc, StoreUnavailable):
                # This put failed on our side but may have landed, or land when the store wakes
                # up. Not deleted now: the store just failed, and waiting on it again would double
                # this request's time; the delete is owed and done once the store answers.
                store.pending_deletes.add(bucket, key)
            raise
        written.append((bucket, key))
    return written


def delete_objects(store: ObjectStore, objects: list[tuple[str, str]]) -> None:
    """Delete now, or owe the delete (retried once the store answers again)."""
    for bucket, key in objects:
        try:
            store.delete(bucket, key)
        except ObjectNotFound:
            pass
        except (StoreError, ValueError):
            log.warning("could not remove object %s/%s", bucket, key)
        except StoreUnavailable:
            log.warning("could not remove object %s/%s now; owed until the store answers", bucket, key)
            store.pending_deletes.add(bucket, key)


def insert_with_objects(db: Database, store: ObjectStore, row: object, objects: list[StoredObject],
                        content_addressed: bool = False) -> None:
    """`content_addressed`: the keys are named by the bytes, so a row that already exists (IntegrityError,
    another request storing the same content meanwhile) refers to these very objects: they stay."""
    written = put_objects(store, objects)
    try:
        with db.session() as session:
            session.add(row)
    except IntegrityError:
        if not content_addressed:
            log.error("row not stored; removing its %d objects", len(written))
            delete_objects(store, written)
        raise
    except DatabaseUnavailable as exc:
        if exc.commit_unknown:
            # The commit was sent and no answer came: the row may exist (a frozen server commits
            # when it wakes). Its objects stay; the reconciler removes them if the row never came.
            log.error("row may not be stored; its %d objects are left to the reconciler", len(written))
        else:
            log.error("row not stored; removing its %d objects", len(written))
            delete_objects(store, written)
        raise
    except BaseException:
        log.error("row not stored; removing its %d objects", len(written))
        delete_objects(store, written)
        raise
