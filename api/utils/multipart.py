"""multipart/form-data parsed by python-multipart, with Werkzeug's semantics.

Why: Werkzeug's own parser compiles two regular expressions for every request's boundary and
scans the file bytes with them, a large share of the service's per-image budget beyond the model;
python-multipart finds the boundary with `bytes.find`, far faster on the same body
(docs/PERFORMANCE.md, "API load", has the figures).

Everything around the parsing is still Werkzeug's: the body limit (max_content_length, applied to
the stream before it gets here), `stream_factory` for file parts (spooled to disk when large),
`max_form_parts` and `max_form_memory_size` (413), header decoding (UTF-8, strict), the
Content-Disposition rules (`werkzeug.http.parse_options_header`) and the results (`MultiDict`s
of `str` and `FileStorage`). One difference, on purpose: where Werkzeug silently hands a route
an empty form for a malformed body (so the client reads "field required"), this says what is
wrong with the body (400, `invalid_input`).

Part headers are bounded by python-multipart itself (8 per part, about 4 kB each); more is a 400.
python-multipart is also stricter than Werkzeug in one corner: an empty part must carry its blank
line (headers, CRLF, CRLF, CRLF, delimiter), as curl, browsers and `requests` send it. Werkzeug's
test client leaves that CRLF out for an empty file; such a body gets the 400 above.
"""

from __future__ import annotations

from typing import IO, Any

from flask import Request as FlaskRequest
from python_multipart import MultipartParser
from werkzeug.datastructures import FileStorage, Headers, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from api.exceptions import InvalidInput

READ_SIZE = 64 * 1024
FIELD_CHARSETS = frozenset({"ascii", "us-ascii", "utf-8", "iso-8859-1"})  # Werkzeug's safe list


def _plain_int(value: str | None) -> int:
    return int(value) if value and value.isascii() and value.isdigit() else 0


class _FormCollector:
    """python-multipart callbacks that build Werkzeug's fields and files, part by part."""

    def __init__(self, parser: FormDataParser, content_length: int | None) -> None:
        self.parser = parser
        self.content_length = content_length
        self.fields: list[tuple[str | None, str]] = []
        self.files: list[tuple[str | None, FileStorage]] = []
        self.ended = False
        self._parts = 0
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self._header_name = b""
        self._header_value = b""
        self._headers = Headers()
        self._name: str | None = None
        self._filename: str | None = None
        self._container: IO[bytes] | None = None
        self._chunks: list[bytes] = []
        self._field_size = 0

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self._parts += 1
        if self.parser.max_form_parts is not None and self._parts > self.parser.max_form_parts:
            raise RequestEntityTooLarge(f"the form has more than the limit of {self.parser.max_form_parts} parts")
        self._header_pairs = []
        self._chunks = []
        self._field_size = 0
        self._container = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._header_pairs.append((self._header_name, self._header_value))
        self._header_name = self._header_value = b""

    def headers_finished(self) -> None:
        try:  # strict UTF-8, as Werkzeug
            self._headers = Headers([(name.decode().strip(" \t"), value.decode().strip(" \t"))
                                     for name, value in self._header_pairs])
        except UnicodeDecodeError:
            raise ValueError("a part's headers are not UTF-8") from None
        if "content-disposition" not in self._headers:
            raise ValueError("a multipart part has no Content-Disposition header")
        _, extra = parse_options_header(self._headers["content-disposition"])
        self._name, self._filename = extra.get("name"), extra.get("filename")
        if self._filename is not None:  # a file part, however empty its name
            self._container = self.parser.stream_factory(
                total_content_length=self.content_length, content_type=self._headers.get("content-type"),
                filename=self._filename, content_length=_plain_int(self._headers.get("content-length")))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._container is not None:
            self._container.write(data[start:end])
            return
        self._field_size += end - start
        limit = self.parser.max_form_memory_size
        if limit is not None and self._field_size > limit:
            raise RequestEntityTooLarge(f"a form field (not a file) is larger than the limit of {limit} bytes")
        self._chunks.append(data[start:end])

    def part_end(self) -> None:
        if self._container is not None:
            self._container.seek(0)
            self.files.append((self._name, FileStorage(self._container, self._filename, self._name,
                                                       headers=self._headers)))
        else:
            self.fields.append((self._name, b"".join(self._chunks).decode(self._charset(), "replace")))

    def end(self) -> None:
        self.ended = True

    def _charset(self) -> str:
        content_type = self._headers.get("content-type")
        if content_type:
            charset = parse_options_header(content_type)[1].get("charset", "").lower()
            if charset in FIELD_CHARSETS:
                return charset
        return "utf-8"


class MultipartFormDataParser(FormDataParser):
    """Werkzeug's form parser with multipart bodies parsed here.

    Only Werkzeug's public API is used: `parse` (the documented entry point, overridden for
    multipart/form-data only) and the parser's constructor attributes (stream_factory,
    max_form_parts, max_form_memory_size, cls). Nothing private of Werkzeug is overridden.
    """

    def parse(self, stream: IO[bytes], mimetype: str, content_length: int | None,
              options: dict[str, str] | None = None) -> tuple[IO[bytes], MultiDict, MultiDict]:
        if mimetype != "multipart/form-data":
            return super().parse(stream, mimetype, content_length, options)
        return self.parse_multipart(stream, content_length, options or {})

    def parse_multipart(self, stream: IO[bytes], content_length: int | None,
                        options: dict[str, str]) -> tuple[IO[bytes], MultiDict, MultiDict]:
        # Malformed bodies raise InvalidInput (a 400 saying why), never Werkzeug's silent empty form.
        boundary = options.get("boundary", "")
        if not boundary:
            raise InvalidInput("malformed multipart body: the Content-Type has no boundary")
        collector = _FormCollector(self, content_length)
        try:
            parser = MultipartParser(boundary.encode("ascii"), collector.callbacks())
            while chunk := stream.read(READ_SIZE):
                parser.write(chunk)
        except ValueError as exc:  # python-multipart's parse errors, undecodable headers, bad boundary
            raise InvalidInput(f"malformed multipart body: {str(exc)[:200]}") from None
        if not collector.ended:
            raise InvalidInput("malformed multipart body: it ends before its closing boundary")
        return stream, self.cls(collector.fields), self.cls(collector.files)


class Request(FlaskRequest):
    """Flask's request with the faster multipart parser; set as `app.request_class`."""

    form_data_parser_class = MultipartFormDataParser
