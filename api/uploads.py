"""Streaming multipart uploads: the file part goes to a temp file, the size limit holds while reading."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

FILE_FIELD = "file"
MAX_FORM_FIELD_BYTES = 4096
MAX_FORM_FIELDS = 16
MAX_FILENAME_CHARS = 200  # the catalog stores file names in 255 characters
# Multipart framing around the file (boundaries, part headers, small form fields).
FRAMING_ALLOWANCE_BYTES = 64 * 1024


@dataclass
class Upload:
    """A received file (in a temp file the caller removes with `discard()`) and the form fields."""

    path: Path | None = None
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        """Remove the temp file."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def too_large(max_bytes: int) -> ApiError:
    """413 for a file over the upload limit."""
    return ApiError(
        413,
        "too_large",
        f"the file is larger than the limit of {max_bytes} bytes",
        field=FILE_FIELD,
    )


class _PartCollector:
    """python-multipart callbacks writing the file part to disk and keeping small fields."""

    def __init__(self, upload: Upload, max_bytes: int, tmp_dir: str | None) -> None:
        self.upload = upload
        self.max_bytes = max_bytes
        self.tmp_dir = tmp_dir
        self.complete = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._data = bytearray()
        self._out = None
        self.error: ApiError | None = None

    def on_part_begin(self) -> None:
        """A new form part: forget the previous part's headers and data."""
        self._disposition, self._name, self._data = b"", None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        """More bytes of a header name."""
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        """More bytes of a header value."""
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        """One header complete: keep it if it is the Content-Disposition."""
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        """The part's name is known: open the temporary file for the upload, or count a field."""
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise _Abort(ApiError(422, "malformed_form", "a form part has no name", field=None))
        self._name = name.decode("utf-8", "replace")
        if self._name == FILE_FIELD:
            if self.upload.path is not None:
                raise _Abort(
                    ApiError(422, "malformed_form", "send exactly one file", field=FILE_FIELD)
                )
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            filename = os.path.basename(filename.replace("\\", "/"))
            if len(filename) > MAX_FILENAME_CHARS or any(ord(c) < 32 for c in filename):
                raise _Abort(
                    ApiError(
                        422,
                        "invalid_filename",
                        f"the file name must be at most {MAX_FILENAME_CHARS} characters with "
                        "no control characters",
                        field=FILE_FIELD,
                    )
                )
            self.upload.filename = filename
            fd, path = tempfile.mkstemp(prefix="upload-", dir=self.tmp_dir)
            self.upload.path = Path(path)
            self._out = os.fdopen(fd, "wb")
        elif len(self.upload.fields) >= MAX_FORM_FIELDS:
            raise _Abort(ApiError(422, "malformed_form", "too many form fields", field=self._name))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        """Part bytes: to the file (size-limited) or to the field's buffer (length-limited)."""
        chunk = data[start:end]
        if self._out is not None:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise _Abort(too_large(self.max_bytes))
            self._out.write(chunk)
            return
        self._data += chunk
        if len(self._data) > MAX_FORM_FIELD_BYTES:
            raise _Abort(
                ApiError(
                    422,
                    "field_too_long",
                    f"form field {self._name!r} is too long",
                    field=self._name,
                )
            )

    def on_end(self) -> None:
        """The closing boundary arrived: the body is complete."""
        self.complete = True

    def on_part_end(self) -> None:
        """A part complete: close the file, or decode the field as UTF-8."""
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._name is not None:
            try:
                self.upload.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise _Abort(
                    ApiError(
                        422,
                        "malformed_form",
                        f"form field {self._name!r} is not UTF-8",
                        field=self._name,
                    )
                ) from None

    def close(self) -> None:
        """Close the file of an interrupted upload."""
        if self._out is not None:
            self._out.close()
            self._out = None


class _Abort(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def receive_upload(request: Request, *, max_bytes: int, tmp_dir: str | None = None) -> Upload:
    """Read a multipart request; the file part (field `file`) is streamed into a temp file.

    Bytes past `max_bytes` are never written: the upload stops with 413 and the temp file goes.
    """
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the dataset as multipart/form-data with the file in field 'file'",
            field=FILE_FIELD,
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + FRAMING_ALLOWANCE_BYTES:
        raise too_large(max_bytes)

    upload = Upload()
    collector = _PartCollector(upload, max_bytes, tmp_dir)
    try:
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
                "on_end": collector.on_end,
            },
        )
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except _Abort as abort:
        collector.close()
        upload.discard()
        raise abort.error from None
    except (FormParserError, ValueError) as exc:
        collector.close()
        upload.discard()
        raise ApiError(
            422, "malformed_form", f"the multipart body cannot be parsed: {exc}", field=FILE_FIELD
        ) from None
    except BaseException:
        collector.close()
        upload.discard()
        raise
    collector.close()
    if not collector.complete:  # cut short: what arrived may be a prefix of the file
        upload.discard()
        raise ApiError(
            422,
            "truncated_form",
            "the multipart body ended before its closing boundary (an upload cut short?)",
            field=FILE_FIELD,
        )
    if upload.path is None:
        raise ApiError(
            422, "missing_file", "no file: send it in the multipart field 'file'", field=FILE_FIELD
        )
    return upload
