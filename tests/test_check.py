"""`d3 check`: the app's own deployment checks, on real backends (SQLite/PostgreSQL, the S3 server,
weights files the tests write); an inference tier and a broker that do not answer."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from api.checks import is_placeholder, run_checks
from api.cli import cli
from tests.helpers import TINY_MODEL, free_port


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A deployment's settings in the environment, as check_deployment.sh exports them."""
    from api.database import upgrade_schema

    values = {**TINY_MODEL, "INSTANCE_DIR": str(tmp_path / "instance"), "SECRET_KEY": "k" * 40,
              "D3_CACHE_DIR": str(tmp_path / "cache")}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    upgrade_schema(f"sqlite:///{tmp_path / 'instance' / 'd3.sqlite'}")
    return monkeypatch


def by_name(checks) -> dict:
    return {check.name: check for check in checks}


def test_a_working_setup_passes_and_the_json_says_so(env):
    result = CliRunner().invoke(cli, ["check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True and report["summary"] == {"pass": 6, "warn": 0, "fail": 0}
    assert [c["name"] for c in report["checks"]] == ["settings", "weights", "inference", "database", "objectstore",
                                                     "broker"]
    assert all(c["status"] == "PASS" for c in report["checks"])
    objectstore = next(c for c in report["checks"] if c["name"] == "objectstore")
    for bucket in ("d3-results", "d3-videos", "d3-frames", "d3-media", "d3-models"):  # every one written to
        assert bucket in objectstore["message"], objectstore
    text = CliRunner().invoke(cli, ["check", "--only", "database,settings"])
    assert text.exit_code == 0
    assert text.output.splitlines()[0].startswith("PASS  settings")  # always in the checks' own order
    assert "schema migrated" in text.output and text.output.rstrip().endswith("0 fail")


def test_each_broken_part_fails_alone_with_a_hint(env, tmp_path, s3_server):
    env.setenv("D3_HEAD_WEIGHTS", str(tmp_path / "nowhere" / "classifier.pth"))
    env.setenv("DATABASE_URL", f"postgresql+psycopg2://d3@127.0.0.1:{free_port()}/d3")
    for name, value in s3_server["settings"].items():
        env.setenv(name, value)
    checks = by_name(run_checks())
    assert checks["settings"].status == "PASS" and checks["objectstore"].status == "PASS"
    assert checks["weights"].status == "FAIL" and "not found" in checks["weights"].message
    assert checks["database"].status == "FAIL" and "cannot connect" in checks["database"].message
    assert all(checks[n].hint for n in ("weights", "database"))
    result = CliRunner().invoke(cli, ["check", "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["summary"]["fail"] == 2


def test_secrets_a_deployment_may_not_keep(env):
    for value in ("change-me", "minioadmin", "short", "", "<your secret>"):
        env.setenv("SECRET_KEY", value) if value else env.delenv("SECRET_KEY")
        [check] = run_checks(["settings"])
        assert check.status == "FAIL" and "SECRET_KEY" in check.message and "openssl rand" in check.hint
    assert is_placeholder("YOUR-password-here") and not is_placeholder("9f2c" * 10)


def test_settings_the_app_refuses_stop_every_check(env):
    env.setenv("D3_DEVICE", "gpu7")
    checks = run_checks()
    assert checks[0].name == "settings" and checks[0].status == "FAIL" and "D3_DEVICE" in checks[0].message
    assert all(c.status == "FAIL" and "not checked" in c.message for c in checks[1:])


def test_unknown_check_is_a_usage_error(env):
    result = CliRunner().invoke(cli, ["check", "--only", "settings,nonsense"])
    assert result.exit_code == 2 and "unknown check: nonsense" in result.output


def test_inference_tier_not_set_then_not_answering(env):
    [check] = run_checks(["inference"])
    assert check.status == "PASS" and "D3_INFERENCE_URL not set" in check.message
    env.setenv("D3_INFERENCE_URL", f"http://127.0.0.1:{free_port()}")
    env.setenv("D3_INFERENCE_TIMEOUT_S", "2")
    [check] = run_checks(["inference"])
    assert check.status == "WARN" and "does not answer" in check.message  # a local tier: deploy.sh starts it
    assert "d3-inference" in check.hint


def test_broker_not_configured_then_not_answering(env):
    [check] = run_checks(["broker"])
    assert check.status == "PASS" and "no job queue" in check.message
    env.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    [check] = run_checks(["broker"])
    assert check.status == "FAIL" and "does not answer" in check.message and "Redis" in check.hint
