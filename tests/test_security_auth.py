"""Who may call: API keys (CLI lifecycle, storage as hashes), every 401 path, public routes, start-up rules, CORS."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from api.cli import cli
from api.config import ConfigError, load_settings
from api.models import ApiKey, Prediction
from api.services.keys import KEY_PATTERN
from tests.helpers import ROOT, TINY_MODEL, image_bytes, make_app
from tests.security_helpers import api_key, bearer, new_key, post_image, secure_app

KEY_LINE = re.compile(r"^d3_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$")


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    instance = tmp_path / "instance"
    return {**TINY_MODEL, "INSTANCE_DIR": str(instance), "DATABASE_URL": f"sqlite:///{instance / 'd3.sqlite'}",
            "AUTH_REQUIRED": "true"}


def _run(env: dict[str, str], *args: str):
    result = CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)
    return result


# -- key lifecycle through the `d3 keys` commands ---------------------------------------------
def test_key_lifecycle_via_the_cli(cli_env, tmp_path, tiny_engine):
    assert _run(cli_env, "db", "upgrade").exit_code == 0
    created = _run(cli_env, "keys", "create", "--name", "alice")
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert KEY_LINE.match(key), "stdout carries exactly the key, nothing else"
    assert "only time" in created.stderr
    key_id = key.split("_")[1]
    admin = _run(cli_env, "keys", "create", "--name", "ops", "--admin").stdout.strip()
    assert KEY_LINE.match(admin) and admin != key

    listing = _run(cli_env, "keys", "list")
    assert listing.exit_code == 0
    assert key_id in listing.stdout and "alice" in listing.stdout and "ops" in listing.stdout
    assert key not in listing.stdout and key.split("_", 2)[2] not in listing.stdout  # never the secret
    rows = {r["id"]: r for r in json.loads(_run(cli_env, "keys", "list", "--json").stdout)}
    assert rows[key_id]["name"] == "alice" and rows[key_id]["admin"] is False
    assert rows[admin.split("_")[1]]["admin"] is True
    assert rows[key_id]["revoked_at"] == "-" and rows[key_id]["last_used_at"] == "-"

    # Stored only as a hash: the plaintext is nowhere in the database files.
    app = make_app(tmp_path, tiny_engine, AUTH_REQUIRED="true", DATABASE_URL=cli_env["DATABASE_URL"])
    with app.extensions["d3"].db.session() as session:
        row = session.get(ApiKey, key_id)
        assert row.key_hash.startswith("sha256:") and key not in row.key_hash
    app.extensions["d3"].db.engine.dispose()  # checkpoint the WAL so every byte is in the files
    raw = b"".join(p.read_bytes() for p in Path(cli_env["INSTANCE_DIR"]).glob("d3.sqlite*"))
    assert key_id.encode() in raw
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw

    # The key works, records its use, then a revocation takes effect on the next request.
    client = app.test_client()
    assert client.get("/predictions", headers=bearer(key)).status_code == 200
    listed = json.loads(_run(cli_env, "keys", "list", "--json").stdout)
    assert next(r for r in listed if r["id"] == key_id)["last_used_at"] != "-"
    revoked = _run(cli_env, "keys", "revoke", key_id)
    assert revoked.exit_code == 0 and f"revoked key {key_id} (alice)" in revoked.stdout
    response = client.get("/predictions", headers=bearer(key))
    assert response.status_code == 401
    assert response.get_json()["error"]["message"] == "the API key has been revoked"
    assert client.get("/predictions", headers=bearer(admin)).status_code == 200  # others unaffected
    assert "revoked_at" in _run(cli_env, "keys", "list").stdout.splitlines()[0].lower()
    assert next(r for r in json.loads(_run(cli_env, "keys", "list", "--json").stdout)
                if r["id"] == key_id)["revoked_at"] != "-"

    missing = _run(cli_env, "keys", "revoke", "0123456789abcdef")
    assert missing.exit_code != 0 and "no API key with id" in missing.output
    assert _run(cli_env, "keys", "create", "--name", "   ").exit_code != 0


def test_keys_commands_refuse_an_unmigrated_database(cli_env):
    result = _run(cli_env, "keys", "list")
    assert result.exit_code != 0 and "d3 db upgrade" in result.output


def test_d3_console_script_creates_and_lists_keys(cli_env):
    """The installed `d3` script itself, as an operator runs it."""
    d3 = Path(sys.executable).parent / "d3"
    env = {**os.environ, **cli_env}
    subprocess.run([str(d3), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    created = subprocess.run([str(d3), "keys", "create", "--name", "from-shell"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert KEY_LINE.match(key)
    listing = subprocess.run([str(d3), "keys", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert key.split("_")[1] in listing.stdout and key not in listing.stdout + listing.stderr


# -- every 401 path ------------------------------------------------------------------------
@pytest.fixture
def secured(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine)
    keys = {"alice": new_key(app, "alice"), "revoked": new_key(app, "gone")}
    app.extensions["d3"].keys.revoke(keys["revoked"].split("_")[1])
    return app, keys


def _bad_keys(keys: dict[str, str]) -> dict[str, tuple[str, str]]:
    alice = keys["alice"]
    key_id, secret = alice.split("_")[1], alice.split("_", 2)[2]
    wrong_secret = f"d3_{key_id}_{('A' if secret[0] != 'A' else 'B') + secret[1:]}"
    return {
        "malformed": ("not-a-key", "malformed"),
        "malformed (key with a newline-free suffix)": (alice + "x", "malformed"),
        "unknown id": (f"d3_{'0' * 16}_{secret}", "not valid"),
        "wrong secret": (wrong_secret, "not valid"),
        "revoked": (keys["revoked"], "revoked"),
    }


PROTECTED = [("GET", "/predictions"), ("GET", "/predictions/stats"), ("GET", f"/predictions/{uuid.uuid4()}"),
             ("POST", "/predict"), ("POST", "/predict/batch"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("style", [bearer, api_key], ids=["authorization-bearer", "x-api-key"])
def test_every_bad_key_gets_401_with_a_challenge(secured, style):
    app, keys = secured
    client = app.test_client()
    for case, (presented, words) in _bad_keys(keys).items():
        for method, path in PROTECTED:
            response = client.open(path, method=method, headers=style(presented))
            assert response.status_code == 401, (case, path)
            body = response.get_json()
            assert body["error"]["code"] == "unauthorized" and words in body["error"]["message"], case
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="d3-api", error="invalid_token"'
            assert presented not in response.get_data(as_text=True)
    # Unknown id and wrong secret are indistinguishable to the caller.
    unknown = client.get("/predictions", headers=style(_bad_keys(keys)["unknown id"][0]))
    wrong = client.get("/predictions", headers=style(_bad_keys(keys)["wrong secret"][0]))
    assert unknown.get_json() == wrong.get_json()


def test_missing_key_and_odd_credentials_get_401(secured):
    app, keys = secured
    client = app.test_client()
    for method, path in PROTECTED:
        response = client.open(path, method=method)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="d3-api"'
        assert "X-API-Key" in response.get_json()["error"]["message"]
    for headers in ({"Authorization": f"Basic {keys['alice']}"}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer "}, {"X-API-Key": ""}, {"Authorization": "Bearer " + "a" * 100_000},
                    # Authorization wins over X-API-Key: a bad one is not rescued by a good one.
                    {"Authorization": "Bearer nope", "X-API-Key": keys["alice"]}):
        response = client.get("/predictions", headers=headers)
        assert response.status_code == 401, headers.keys()
        assert response.get_json()["error"]["code"] == "unauthorized"


def test_a_refused_upload_stores_nothing(secured):
    app, keys = secured
    client = app.test_client()
    for headers in ({}, bearer(keys["revoked"]), api_key("d3_x")):
        assert post_image(client, image_bytes(seed=3), headers=headers).status_code == 401
    with app.extensions["d3"].db.session() as session:
        assert session.scalars(select(Prediction)).all() == []
    objects = app.extensions["d3"].settings.resolved_object_store_dir
    assert not any(p.is_file() for p in objects.rglob("*"))


@pytest.mark.parametrize("style", [bearer, api_key], ids=["authorization-bearer", "x-api-key"])
def test_a_valid_key_works_in_both_headers_and_owns_its_predictions(secured, style):
    app, keys = secured
    client = app.test_client()
    response = post_image(client, image_bytes(seed=4), headers=style(keys["alice"]))
    assert response.status_code == 200
    with app.extensions["d3"].db.session() as session:
        assert session.get(Prediction, uuid.UUID(response.get_json()["id"])).owner == keys["alice"].split("_")[1]
    assert client.get("/predictions", headers=style(keys["alice"])).get_json()["total"] == 1


def test_public_routes_need_no_key_and_health_details_do(secured):
    app, keys = secured
    client = app.test_client()
    summary = client.get("/health")
    assert summary.status_code == 200 and summary.get_json() == {"status": "ok", "ready": True}
    assert client.get("/health", headers=bearer("garbage")).get_json() == {"status": "ok", "ready": True}
    assert client.get("/health", headers=bearer(keys["revoked"])).get_json() == {"status": "ok", "ready": True}
    detailed = client.get("/health", headers=api_key(keys["alice"])).get_json()
    assert {"model", "database", "object_store", "queue_depth"} <= detailed.keys()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs/").status_code == 200
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200
    # A signed result link is its own proof: it opens without a key, a tampered one does not.
    url = post_image(client, image_bytes(seed=5), headers=bearer(keys["alice"])).get_json()["result_url"]
    path = url.replace("http://localhost", "")
    assert client.get(path).status_code == 200
    assert client.get(path[:-4] + ("0000" if not path.endswith("0000") else "1111")).status_code == 404


def test_without_auth_required_anonymous_calls_work_but_bad_keys_still_fail(tmp_path, tiny_engine):
    app = make_app(tmp_path, tiny_engine)  # AUTH_REQUIRED=false, loopback BIND
    client = app.test_client()
    assert post_image(client, image_bytes(seed=6)).status_code == 200
    assert client.get("/health").get_json().keys() >= {"model", "database"}  # details for everyone
    assert client.get("/predictions", headers=bearer("d3_bad")).status_code == 401
    key = new_key(app, "bob")
    mine = post_image(client, image_bytes(seed=7), headers=bearer(key)).get_json()
    anonymous = client.get("/predictions").get_json()
    assert mine["id"] not in {r["id"] for r in anonymous["results"]} and anonymous["total"] == 1
    assert [r["id"] for r in client.get("/predictions", headers=bearer(key)).get_json()["results"]] == [mine["id"]]


def test_key_format_and_hash(secured):
    app, keys = secured
    assert KEY_PATTERN.match(keys["alice"])
    service = app.extensions["d3"].keys
    assert service.verify(keys["alice"]).key.name == "alice"
    assert service.verify(keys["alice"].upper()).key is None
    listed = {k.id: k for k in service.list()}
    assert listed[keys["revoked"].split("_")[1]].revoked
    assert [k.name for k in service.list(include_revoked=False)] == ["alice"]


# -- start-up rules ------------------------------------------------------------------------
def _settings(tmp_path, **values):
    base = {**TINY_MODEL, "INSTANCE_DIR": str(tmp_path), "SECRET_KEY": "a-real-secret-" + uuid.uuid4().hex}
    return load_settings({**base, **values}, environ={}, env_file=tmp_path / "none")


@pytest.mark.parametrize("bind", ["0.0.0.0:6000", "10.0.0.5:6000", "[::]:6000", "api.example.com:443"])
def test_auth_cannot_be_turned_off_off_loopback(tmp_path, bind):
    with pytest.raises(ConfigError, match="AUTH_REQUIRED=false is only allowed"):
        _settings(tmp_path, AUTH_REQUIRED="false", BIND=bind)
    assert _settings(tmp_path, AUTH_REQUIRED="true", BIND=bind).auth_required


@pytest.mark.parametrize("bind", ["127.0.0.1:6000", "localhost:6000", "[::1]:6000", "127.0.0.2:7000"])
def test_auth_can_be_turned_off_on_loopback(tmp_path, bind):
    assert _settings(tmp_path, AUTH_REQUIRED="false", BIND=bind).auth_required is False


def test_example_secrets_are_refused_outside_loopback(tmp_path):
    for secret in ("change-me", "changeme", ""):
        with pytest.raises(ConfigError, match="SECRET_KEY must be set to a real secret"):
            _settings(tmp_path, BIND="0.0.0.0:6000", SECRET_KEY=secret)
        _settings(tmp_path, BIND="127.0.0.1:6000", SECRET_KEY=secret)  # the quick-start may keep them
    minio = {"MINIO_ENDPOINT": "minio.internal:9000", "MINIO_ACCESS_KEY": "minioadmin"}
    with pytest.raises(ConfigError, match="MINIO_SECRET_KEY must be set to a real secret"):
        _settings(tmp_path, BIND="0.0.0.0:6000", MINIO_SECRET_KEY="minioadmin", **minio)
    _settings(tmp_path, BIND="0.0.0.0:6000", MINIO_SECRET_KEY="s3cr3t-" + uuid.uuid4().hex, **minio)


def test_the_app_refuses_to_start_with_unsafe_settings(tmp_path, tiny_engine):
    with pytest.raises(ConfigError, match="AUTH_REQUIRED"):
        make_app(tmp_path, tiny_engine, BIND="0.0.0.0:6000")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        make_app(tmp_path, tiny_engine, BIND="0.0.0.0:6000", AUTH_REQUIRED="true", SECRET_KEY="change-me")
    with pytest.raises(ConfigError, match="RATE_LIMIT_VIDEO"):
        make_app(tmp_path, tiny_engine, RATE_LIMIT_VIDEO="lots")


def test_dotenv_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert result.returncode == 0


# -- CORS ----------------------------------------------------------------------------------
def test_cors_is_off_without_an_allow_list(secured):
    app, keys = secured
    response = app.test_client().get("/predictions", headers={**bearer(keys["alice"]), "Origin": "https://evil.example"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers


def test_cors_allows_only_listed_origins(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, CORS_ORIGINS="https://app.example, https://admin.example")
    key = new_key(app, "web")
    client = app.test_client()
    allowed = client.get("/predictions", headers={**bearer(key), "Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    other = client.get("/predictions", headers={**bearer(key), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    # A preflight carries no key by design: it is answered, not refused, and grants nothing by itself.
    preflight = client.options("/predict", headers={"Origin": "https://admin.example",
                                                    "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://admin.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    upload = client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=8)), "x.png")},
                         headers={"Origin": "https://admin.example"})
    assert upload.status_code == 401
