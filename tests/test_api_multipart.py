"""The multipart parser (python-multipart behind Werkzeug's interface) reads what Werkzeug's reads."""

from __future__ import annotations

import io
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from api.exceptions import InvalidInput
from api.utils.multipart import READ_SIZE, MultipartFormDataParser
from tests.helpers import image_bytes, multipart_body, post_form


def parse(parser_class, body: bytes, content_type: str, **limits):
    mimetype, options = parse_options_header(content_type)
    parser = parser_class(silent=False, **limits)
    _, form, files = parser.parse(io.BytesIO(body), mimetype, len(body), options)
    return form, files


def summary(form, files) -> tuple:
    return (sorted(form.items(multi=True)),
            sorted((name, f.filename, f.content_type, f.read()) for name, f in files.items(multi=True)))


names = st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n\0'), min_size=1, max_size=12)
values = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
payloads = st.one_of(st.binary(max_size=300),
                     st.integers(READ_SIZE - 8, READ_SIZE + 8).map(lambda n: b"\r\n--x" * (n // 5)))
field = st.tuples(names, values)
upload = st.tuples(names, st.tuples(names, payloads))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(field, upload), min_size=1, max_size=6))
def test_same_form_and_files_as_werkzeug(fields):
    body, content_type = multipart_body(fields)
    assert summary(*parse(MultipartFormDataParser, body, content_type)) == \
        summary(*parse(FormDataParser, body, content_type))


def test_a_large_file_is_spooled_to_disk_and_read_back_whole():
    data = image_bytes("BMP", (700, 500))  # ~1 MB, over the 500 kB in-memory limit of Flask's stream factory
    body, content_type = multipart_body([("threshold", "0.5"), ("file", ("big.bmp", data))])

    def factory(total_content_length, content_type, filename, content_length=None):
        return tempfile.SpooledTemporaryFile(max_size=500 * 1024)

    form, files = parse(MultipartFormDataParser, body, content_type, stream_factory=factory)
    assert form["threshold"] == "0.5"
    assert files["file"].stream._rolled  # on disk, not in memory
    assert files["file"].read() == data


def test_part_and_field_limits_are_werkzeugs_413():
    body, content_type = multipart_body([(f"f{i}", "1") for i in range(5)])
    with pytest.raises(RequestEntityTooLarge):
        parse(MultipartFormDataParser, body, content_type, max_form_parts=4)
    body, content_type = multipart_body([("note", "x" * 1001)])
    with pytest.raises(RequestEntityTooLarge):
        parse(MultipartFormDataParser, body, content_type, max_form_memory_size=1000)
    assert parse(MultipartFormDataParser, body, content_type, max_form_memory_size=1001)[0]["note"] == "x" * 1001


def test_part_headers_are_bounded_not_buffered():
    endless = b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\nX-Pad: " + b"a" * (4 * READ_SIZE)
    with pytest.raises(InvalidInput):
        parse(MultipartFormDataParser, endless, "multipart/form-data; boundary=b")
    many = b"--b\r\nContent-Disposition: form-data; name=\"note\"\r\n" + b"X-Pad: 1\r\n" * 100
    with pytest.raises(InvalidInput):
        parse(MultipartFormDataParser, many + b"\r\nhello\r\n--b--\r\n", "multipart/form-data; boundary=b")
    # Ordinary headers, a few kB of them, still pass.
    padded = b"".join(f"X-Pad-{i}: {'a' * 1000}\r\n".encode() for i in range(5))
    body = b"--b\r\nContent-Disposition: form-data; name=\"note\"\r\n" + padded + b"\r\nhello\r\n--b--\r\n"
    assert parse(MultipartFormDataParser, body, "multipart/form-data; boundary=b")[0]["note"] == "hello"


@pytest.mark.parametrize(("body", "words"), [
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc", "closing boundary"),
    (b"--b\r\nContent-Type: image/png\r\n\r\nabc\r\n--b--\r\n", "Content-Disposition"),
    (b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"\xff.png\"\r\n\r\nabc\r\n--b--\r\n", "UTF-8"),
    (b"garbage", "malformed"),
])
def test_malformed_bodies_say_what_is_wrong(body, words):
    with pytest.raises(InvalidInput) as caught:
        parse(MultipartFormDataParser, body, "multipart/form-data; boundary=b")
    assert "malformed multipart body" in caught.value.message and words in caught.value.message


def test_a_malformed_body_is_a_json_400_naming_the_problem(client):
    # An empty file part without its blank line (Werkzeug's test client writes this; clients don't).
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n--b--\r\n")
    response = client.post("/predict", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_input"
    assert "malformed multipart body" in response.get_json()["error"]["message"]
    ok = post_form(client, "/predict", [("file", ("a.png", image_bytes(seed=3)))])
    assert ok.status_code == 200, ok.get_json()


def test_the_parser_overrides_only_werkzeugs_public_api():
    """Werkzeug's private names may change in any release: the subclass must not override one."""
    from werkzeug.formparser import FormDataParser

    from api.utils.multipart import MultipartFormDataParser

    overridden = {name for name in vars(MultipartFormDataParser)
                  if hasattr(FormDataParser, name) and not name.startswith("__")}
    assert overridden == {"parse"}
