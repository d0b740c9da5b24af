"""Object stores: the local folder (signed links) and MinIO/S3 over HTTP (moto server)."""

from __future__ import annotations

import re
import time
import urllib.request
from urllib.parse import parse_qs, urlparse

import pytest

from api.storage import LocalObjectStore, MinioObjectStore, ObjectNotFound, StoreError, StoreUnavailable, object_key

BUCKETS = ("res", "vid", "frm")


@pytest.fixture
def local(tmp_path):
    store = LocalObjectStore(tmp_path / "objects", BUCKETS, b"signing-key")
    store.ensure_buckets()
    return store


@pytest.fixture
def minio_store(s3_server):
    settings = s3_server["settings"]
    store = MinioObjectStore(s3_server["endpoint"], s3_server["access_key"], s3_server["secret_key"], secure=False,
                             region="us-east-1", buckets=(settings["BUCKET_RESULTS"], settings["BUCKET_VIDEOS"],
                                                          settings["BUCKET_FRAMES"]))
    store.ensure_buckets()
    store.ensure_buckets()  # idempotent
    return store


def test_object_keys_are_server_made():
    key = object_key("abc", ".json")
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/abc\.json", key)


@pytest.mark.parametrize("store_name", ["local", "minio_store"])
def test_round_trip_exists_delete(request, tmp_path, store_name):
    store = request.getfixturevalue(store_name)
    bucket = store.buckets[0]
    store.put_bytes(bucket, "2026/01/01/a.json", b'{"a": 1}', "application/json")
    assert store.get_bytes(bucket, "2026/01/01/a.json") == b'{"a": 1}'
    assert store.exists(bucket, "2026/01/01/a.json")
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 100_000)
    store.put_file(bucket, "2026/01/01/b.bin", source, "application/octet-stream")
    store.download_file(bucket, "2026/01/01/b.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    store.delete(bucket, "2026/01/01/a.json")
    assert not store.exists(bucket, "2026/01/01/a.json")
    with pytest.raises(ObjectNotFound):
        store.get_bytes(bucket, "2026/01/01/a.json")
    assert store.ping()


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "", "a b"])
def test_unsafe_keys_are_refused(local, key):
    with pytest.raises(ValueError):
        local.put_bytes("res", key, b"x", "text/plain")


def test_local_signed_links(local):
    local.put_bytes("res", "2026/01/01/a.json", b"{}", "application/json")
    url = urlparse(local.presigned_get_url("res", "2026/01/01/a.json", 60))
    assert url.path == "/objects/res/2026/01/01/a.json"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert local.verify_signature("res", "2026/01/01/a.json", query["expires"], query["signature"])
    assert not local.verify_signature("res", "2026/01/01/b.json", query["expires"], query["signature"])
    assert not local.verify_signature("res", "2026/01/01/a.json", str(int(query["expires"]) + 1), query["signature"])
    assert not local.verify_signature("res", "2026/01/01/a.json", str(int(time.time()) - 1), query["signature"])
    assert not local.verify_signature("res", "2026/01/01/a.json", "soon", query["signature"])


def test_signed_link_route_serves_and_refuses(client, app):
    store = app.extensions["d3"].store
    store.put_bytes(store.buckets[0], "2026/01/01/x.json", b'{"ok": true}', "application/json")
    url = store.presigned_get_url(store.buckets[0], "2026/01/01/x.json", 60)
    assert client.get(url).get_json() == {"ok": True}
    assert client.get(url.replace("signature=", "signature=0")).status_code == 404
    assert client.get(url.split("?")[0]).status_code == 404


def test_minio_presigned_url_works_over_http(minio_store):
    bucket = minio_store.buckets[0]
    minio_store.put_bytes(bucket, "2026/01/01/p.json", b'{"p": 1}', "application/json")
    with urllib.request.urlopen(minio_store.presigned_get_url(bucket, "2026/01/01/p.json", 60)) as response:
        assert response.read() == b'{"p": 1}'


def test_minio_unreachable_is_store_unavailable():
    store = MinioObjectStore("127.0.0.1:1", "a", "b", secure=False, region="us-east-1", buckets=("x",),
                             timeout_s=1)
    with pytest.raises(StoreUnavailable):
        store.put_bytes("x", "2026/01/01/a.json", b"{}", "application/json")
    assert store.ping() is False




def test_a_refusal_is_a_store_error_not_unavailable(minio_store):
    """A missing bucket is a configuration bug, not "retry shortly": StoreError (a 500), not StoreUnavailable."""
    with pytest.raises(StoreError) as refused:
        minio_store.put_bytes("no-such-bucket-d3", "2026/01/01/a.json", b"{}", "application/json")
    assert not isinstance(refused.value, StoreUnavailable) and "NoSuchBucket" in str(refused.value)
