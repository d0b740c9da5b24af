"""Schemathesis against /openapi.json: generated requests to every operation, with a key and
without one; no 5xx, and every response matches the document. Bounded and deterministic."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import image_bytes
from tests.security_helpers import bearer, new_key, post_image, secure_app

CHECKS = (not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance)
EXAMPLES = 20  # per operation and per test: about 500 requests in all


@pytest.fixture
def fuzz_target(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT="100000/minute", RATE_LIMIT_VIDEO="100000/minute",
                     MAX_IMAGE_PIXELS="4000000", VIDEO_WORKERS="1")
    key = new_key(app, "fuzzer", admin=True)
    client = app.test_client()
    for seed in (1, 2):  # a few stored records, so list and detail answers have bodies to check
        assert post_image(client, image_bytes(seed=seed), f"seed-{seed}.png", bearer(key)).status_code == 200
    return app, key


@pytest.fixture
def fuzz_schema(fuzz_target):
    app, _ = fuzz_target
    return schemathesis.from_wsgi("/openapi.json", app)


schema = schemathesis.from_pytest_fixture("fuzz_schema")
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_a_key(case, fuzz_target):
    _, key = fuzz_target
    case.call_and_validate(headers=bearer(key), checks=CHECKS)


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_a_key(case):
    # Without a key: protected operations must answer the documented 401, public ones as usual.
    response = case.call_and_validate(checks=CHECKS)
    if case.operation.definition.raw.get("security") is None:  # the global security applies
        assert response.status_code == 401
