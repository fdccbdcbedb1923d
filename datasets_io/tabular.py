"""Reading and validating labelled text tables (JSONL, CSV, Parquet) into a `Table`.

No torch here: the API validates uploads with this module before anything is stored.
Every problem raises `DatasetError` with a stable `code` and the file, line and field
it concerns, so the HTTP layer can answer a 4xx that points at the offending spot.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from settings import Settings

TASK_TYPES = ("classification", "pair-classification", "regression")
MAX_LABEL_CHARS = 256  # label names are echoed in every list and prediction
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}

# Every `DatasetError.code`, with what it means. The HTTP API maps them to 4xx answers.
ERROR_CODES = {
    "unsupported_format": "the file extension is not .jsonl, .csv or .parquet",
    "too_large": "the file is bigger than max_upload_bytes",
    "not_utf8": "the file is not valid UTF-8 (the message gives the byte offset and line)",
    "empty_file": "the file holds no data rows",
    "malformed_row": "a row cannot be parsed (bad JSON, wrong CSV field count, not an object)",
    "malformed_file": "the file as a whole cannot be parsed (e.g. not a Parquet file)",
    "missing_column": "a mapped column (text, text pair or label field) is absent",
    "text_not_string": "a text value is null or not a string",
    "text_too_long": "a text is longer than max_text_chars",
    "missing_label": "a label is null or empty",
    "invalid_label": "a classification label is not a string, an integer or a boolean",
    "label_not_numeric": "a regression label is not a finite number",
    "single_class": "a classification table has fewer than two distinct labels",
    "too_many_labels": "more distinct labels than max_labels",
    "too_many_rows": "more rows than max_rows",
    "label_too_long": "a classification label is longer than 256 characters",
    "too_many_columns": "more columns (or JSON keys in a row) than max_columns",
    "too_few_rows": "too few rows to carve a validation split",
    "unknown_label": "a validation label never seen in training",
    "invalid_task_type": "task_type is not one of classification, pair-classification, regression",
    "field_conflict": "two of text_field, text_pair_field and label_field name the same column",
    "unused_text_pair": "a text_pair_field for a task type that takes single texts",
    "missing_file": "a dataset directory has no train.* file",
    "ambiguous_file": "a dataset directory has more than one train.* (or validation.*) file",
}


class DatasetError(ValueError):
    """A dataset problem: `code` is stable, `file`/`line`/`field` say where it is."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        line_kind: str = "line",
    ) -> None:
        self.code = code
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.line_kind = line_kind
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.line is not None:
            where.append(f"{self.line_kind} {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return (
            f"{prefix}: {self.message} [{self.code}]" if prefix else f"{self.message} [{self.code}]"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form the HTTP API puts under `error`."""
        return {
            "code": self.code,
            "message": str(self),
            "field": self.field,
            "file": self.file,
            "line": self.line,
        }


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold the text, the optional second text, and the label."""

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"

    def columns(self) -> list[str]:
        """The mapped column names, text first, label last."""
        names = [self.text_field]
        if self.text_pair_field:
            names.append(self.text_pair_field)
        names.append(self.label_field)
        return names


@dataclass(frozen=True)
class TableLimits:
    """Size limits on submitted data (defaults mirror `Settings`)."""

    max_upload_bytes: int = 64 * 1024 * 1024
    max_rows: int = 500_000
    max_labels: int = 1_000
    max_text_chars: int = 20_000
    max_columns: int = 1_000

    @classmethod
    def from_settings(cls, settings: Settings) -> TableLimits:
        """The limits configured in `settings`."""
        return cls(
            max_upload_bytes=settings.max_upload_bytes,
            max_rows=settings.max_rows,
            max_labels=settings.max_labels,
            max_text_chars=settings.max_text_chars,
            max_columns=settings.max_columns,
        )


@dataclass
class Table:
    """A validated labelled table.

    `labels` are the label names (str) for classification and floats for regression;
    `label_names` is the sorted list of distinct label names (classification only,
    empty for regression), so a label's id is its position there. `sha256` is the hash
    of the raw bytes of the file the rows came from.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[Any]
    label_names: list[str]
    task_type: str
    rows: int
    sha256: str
    mapping: ColumnMapping
    filename: str = ""
    line_numbers: list[int] = field(default_factory=list, repr=False)

    def label_ids(self) -> list[int]:
        """Each row's label as an index into `label_names` (classification only)."""
        if self.task_type == "regression":
            raise ValueError("a regression table has no label ids")
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]

    def select(self, indices: Sequence[int]) -> Table:
        """A new table with the given rows, in that order (same label set and hash)."""
        return replace(
            self,
            texts=[self.texts[i] for i in indices],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            rows=len(indices),
            line_numbers=[self.line_numbers[i] for i in indices] if self.line_numbers else [],
        )

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as dicts under the mapped column names."""
        records = []
        for i in range(self.rows):
            record: dict[str, Any] = {self.mapping.text_field: self.texts[i]}
            if self.text_pairs is not None and self.mapping.text_pair_field:
                record[self.mapping.text_pair_field] = self.text_pairs[i]
            record[self.mapping.label_field] = self.labels[i]
            records.append(record)
        return records


def format_of(filename: str) -> str:
    """The table format named by a file's extension ("jsonl", "csv" or "parquet")."""
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        raise DatasetError(
            "unsupported_format",
            f"unsupported file extension {suffix or '(none)'!r}; use .jsonl, .csv or .parquet",
            file=filename,
        )
    return FORMATS[suffix]


def read_table(
    source: Path | str | bytes,
    *,
    filename: str | None = None,
    mapping: ColumnMapping | None = None,
    task_type: str | None = None,
    limits: TableLimits | None = None,
    label_names: Sequence[str] | None = None,
) -> Table:
    """Parse and validate a JSONL/CSV/Parquet table; infer the task type when None.

    `filename` picks the format by extension (required for bytes; defaults to the
    path's name). `label_names`, when given, is the fixed label set (a validation table
    checked against its training table): a label outside it is `unknown_label`.
    """
    mapping = mapping or ColumnMapping()
    limits = limits or TableLimits()
    if isinstance(source, bytes):
        if filename is None:
            raise ValueError("filename is required when reading bytes")
        name = filename
        _check_size(len(source), name, limits)
        data = source
    else:
        path = Path(source)
        name = path.name if filename is None else filename
        _check_size(path.stat().st_size, name, limits)
        data = path.read_bytes()
    kind = format_of(name)
    if task_type is not None and task_type not in TASK_TYPES:
        raise DatasetError(
            "invalid_task_type",
            f"task_type {task_type!r} is not one of {', '.join(TASK_TYPES)}",
            field="task_type",
        )
    if task_type == "pair-classification" and not mapping.text_pair_field:
        raise DatasetError(
            "missing_column",
            "pair-classification needs a text_pair_field",
            file=name,
            field="text_pair_field",
        )
    _check_mapping(mapping, task_type, name)
    if not data.strip():
        raise DatasetError("empty_file", "the file is empty", file=name)

    if kind == "jsonl":
        rows, columns = _read_jsonl(data, name, limits), None
        line_kind = "line"
    elif kind == "csv":
        rows, columns = _read_csv(data, name, limits)
        line_kind = "line"
    else:
        rows, columns = _read_parquet(data, name, limits, mapping.columns())
        line_kind = "row"
    return _build_table(
        rows,
        columns=columns,
        name=name,
        line_kind=line_kind,
        mapping=mapping,
        task_type=task_type,
        limits=limits,
        label_names=label_names,
        sha256=hashlib.sha256(data).hexdigest(),
        from_csv=kind == "csv",
    )


def _check_mapping(mapping: ColumnMapping, task_type: str | None, name: str) -> None:
    """Refuse a mapping that reads one column twice, or a pair the task type would ignore."""
    pairs = (
        ("label_field", mapping.label_field, "text_field", mapping.text_field),
        ("text_pair_field", mapping.text_pair_field, "text_field", mapping.text_field),
        ("text_pair_field", mapping.text_pair_field, "label_field", mapping.label_field),
    )
    for field_name, column, other_name, other in pairs:
        if column is not None and column == other:
            raise DatasetError(
                "field_conflict",
                f"{field_name} and {other_name} both name column {column!r}; "
                "the text and the label must come from different columns",
                file=name,
                field=field_name,
            )
    if mapping.text_pair_field and task_type in ("classification", "regression"):
        raise _unused_text_pair(task_type, name)


def _unused_text_pair(task_type: str, name: str) -> DatasetError:
    """A text_pair_field given for a task type that takes single texts."""
    return DatasetError(
        "unused_text_pair",
        f"a {task_type} task takes single texts; drop text_pair_field or use pair-classification",
        file=name,
        field="text_pair_field",
    )


# --- parsing -------------------------------------------------------------------------

Row = tuple[int, dict[str, Any]]  # (line or row number, record)


def _check_size(size: int, name: str, limits: TableLimits) -> None:
    if size > limits.max_upload_bytes:
        raise DatasetError(
            "too_large",
            f"the file has {size} bytes, more than the limit of {limits.max_upload_bytes}",
            file=name,
        )


def _decode_utf8(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            "not_utf8",
            f"the file is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}",
            file=name,
            line=line,
        ) from None
    return text.removeprefix("\ufeff")


def _too_many_rows(name: str, limits: TableLimits) -> DatasetError:
    return DatasetError(
        "too_many_rows",
        f"the file has more than the limit of {limits.max_rows} rows",
        file=name,
    )


def _too_many_columns(name: str, limits: TableLimits, found: int, line: int | None):
    return DatasetError(
        "too_many_columns",
        f"{found} columns; at most {limits.max_columns} are accepted",
        file=name,
        line=line,
    )


def _read_jsonl(data: bytes, name: str, limits: TableLimits) -> list[Row]:
    rows: list[Row] = []
    # split on "\n" only: str.splitlines() would also break at U+2028 etc. inside strings
    for line_no, line in enumerate(_decode_utf8(data, name).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                "malformed_row",
                f"invalid JSON: {exc.msg} (column {exc.colno})",
                file=name,
                line=line_no,
            ) from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, deep nesting
            raise DatasetError(
                "malformed_row",
                f"JSON beyond the parser's limits ({exc})"[:200],
                file=name,
                line=line_no,
            ) from None
        if not isinstance(record, dict):
            raise DatasetError(
                "malformed_row",
                f"expected a JSON object per line, got {_json_type(record)}",
                file=name,
                line=line_no,
            )
        if len(record) > limits.max_columns:
            raise _too_many_columns(name, limits, len(record), line_no)
        rows.append((line_no, record))
        if len(rows) > limits.max_rows:
            raise _too_many_rows(name, limits)
    return rows


def _read_csv(data: bytes, name: str, limits: TableLimits) -> tuple[list[Row], list[str]]:
    reader = csv.reader(io.StringIO(_decode_utf8(data, name), newline=""), strict=True)
    header: list[str] | None = None
    rows: list[Row] = []
    last_line = 0
    try:
        for fields in reader:
            start_line, last_line = last_line + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if header is None:
                if len(fields) > limits.max_columns:
                    raise _too_many_columns(name, limits, len(fields), start_line)
                header = [h.strip() for h in fields]
                duplicates = sorted(h for h, n in collections.Counter(header).items() if n > 1)
                if duplicates:
                    raise DatasetError(
                        "malformed_row",
                        f"the header repeats column(s) {', '.join(map(repr, duplicates))}",
                        file=name,
                        line=start_line,
                    )
                continue
            if len(fields) != len(header):
                raise DatasetError(
                    "malformed_row",
                    f"expected {len(header)} fields as in the header, got {len(fields)}",
                    file=name,
                    line=start_line,
                )
            rows.append((start_line, dict(zip(header, fields, strict=True))))
            if len(rows) > limits.max_rows:
                raise _too_many_rows(name, limits)
    except csv.Error as exc:
        raise DatasetError(
            "malformed_row", f"invalid CSV: {exc}", file=name, line=reader.line_num
        ) from None
    return rows, header or []


def _uncompressed_bytes(parquet: Any, columns: list[str]) -> int:
    """Uncompressed bytes of the column chunks of `columns`, from the file's metadata."""
    meta, total = parquet.metadata, 0
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if chunk.path_in_schema in columns:
                total += chunk.total_uncompressed_size
    return total


def _is_byte_array(arrow_type: Any) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type))
    )


def _decoded_bytes(column: Any) -> int:
    """Bytes a (possibly dictionary-encoded) string column decodes to, without decoding it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            lengths = pc.binary_length(chunk.dictionary)
            total += pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0
        else:
            total += pc.sum(pc.binary_length(chunk)).as_py() or 0
    return total


def _check_decoded_size(size: int, name: str, limits: TableLimits) -> None:
    if size > limits.max_upload_bytes:
        raise DatasetError(
            "too_large",
            f"the file decodes to {size} bytes of data, more than max_upload_bytes "
            f"({limits.max_upload_bytes})",
            file=name,
        )


def _read_parquet(
    data: bytes, name: str, limits: TableLimits, wanted: list[str]
) -> tuple[list[Row], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        if parquet.metadata.num_rows > limits.max_rows:
            raise _too_many_rows(name, limits)
        columns = parquet.schema_arrow.names
        if len(columns) > limits.max_columns:
            raise _too_many_columns(name, limits, len(columns), None)
        repeated = sorted(c for c, n in collections.Counter(columns).items() if n > 1)
        if repeated:  # which of the two would be the text is anyone's guess
            raise DatasetError(
                "malformed_file",
                f"the file repeats column(s) {', '.join(map(repr, repeated[:5]))}",
                file=name,
            )
        present = [c for c in wanted if c in columns]
        # A few compressed bytes can decode to gigabytes: what is read, and what it decodes
        # to, must fit the upload limit (as the same rows in JSONL would).
        _check_decoded_size(_uncompressed_bytes(parquet, present), name, limits)
        strings = [c for c in present if _is_byte_array(parquet.schema_arrow.field(c).type)]
        # Strings stay dictionary-encoded until their decoded size is known to fit.
        encoded = pq.ParquetFile(io.BytesIO(data), read_dictionary=strings)
        arrow_table = encoded.read(columns=present)
        _check_decoded_size(
            sum(_decoded_bytes(arrow_table.column(c)) for c in strings), name, limits
        )
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(
            "malformed_file", f"not a readable Parquet file: {exc}", file=name
        ) from None
    try:
        records = arrow_table.to_pylist()
    except UnicodeDecodeError as exc:
        raise DatasetError(
            "not_utf8", f"a string column is not valid UTF-8: {exc.reason}", file=name
        ) from None
    return [(i, record) for i, record in enumerate(records, start=1)], columns


# --- validation ----------------------------------------------------------------------


def _build_table(
    rows: list[Row],
    *,
    columns: list[str] | None,
    name: str,
    line_kind: str,
    mapping: ColumnMapping,
    task_type: str | None,
    limits: TableLimits,
    label_names: Sequence[str] | None,
    sha256: str,
    from_csv: bool,
) -> Table:
    def error(code: str, message: str, line: int | None = None, column: str | None = None):
        return DatasetError(code, message, file=name, line=line, field=column, line_kind=line_kind)

    if not rows and columns is None:
        raise error("empty_file", "the file holds no data rows")
    for column in mapping.columns():
        present = column in columns if columns is not None else any(column in r for _, r in rows)
        if not present:
            known = columns if columns is not None else sorted({k for _, r in rows for k in r})
            shown = ", ".join(repr(str(k)[:64]) for k in known[:20]) or "none"
            more = f" and {len(known) - 20} more" if len(known) > 20 else ""
            raise error(
                "missing_column",
                f"no column {column!r} in the file (columns: {shown}{more})",
                column=column,
            )

    if not rows:
        raise error("empty_file", "the file holds no data rows")
    texts = _text_column(rows, mapping.text_field, limits, error)
    pairs = (
        _text_column(rows, mapping.text_pair_field, limits, error)
        if mapping.text_pair_field
        else None
    )
    raw_labels = []
    for line, record in rows:
        if mapping.label_field not in record:
            raise error("missing_column", "the row has no label", line, mapping.label_field)
        raw_labels.append((line, record[mapping.label_field]))

    if task_type is None:
        task_type = _infer_task_type(raw_labels, mapping, from_csv)
        if task_type == "regression" and mapping.text_pair_field:
            raise _unused_text_pair(task_type, name)
    if task_type == "regression":
        labels: list[Any] = [
            _regression_label(value, line, mapping.label_field, error) for line, value in raw_labels
        ]
        names: list[str] = []
    else:
        labels = [
            _class_label(value, line, mapping.label_field, error) for line, value in raw_labels
        ]
        names = _label_names(labels, raw_labels, label_names, limits, mapping.label_field, error)

    return Table(
        texts=texts,
        text_pairs=pairs,
        labels=labels,
        label_names=names,
        task_type=task_type,
        rows=len(rows),
        sha256=sha256,
        mapping=mapping,
        filename=name,
        line_numbers=[line for line, _ in rows],
    )


def _text_column(rows: list[Row], column: str, limits: TableLimits, error) -> list[str]:
    texts = []
    for line, record in rows:
        if column not in record:
            raise error("missing_column", "the row has no text", line, column)
        value = record[column]
        if not isinstance(value, str):
            raise error(
                "text_not_string",
                f"the text is {_json_type(value)}, expected a string",
                line,
                column,
            )
        if len(value) > limits.max_text_chars:
            raise error(
                "text_too_long",
                f"the text has {len(value)} characters, more than the limit of "
                f"{limits.max_text_chars}",
                line,
                column,
            )
        if not _is_unicode(value):
            raise error(
                "not_utf8", "the text is not valid Unicode (a lone surrogate)", line, column
            )
        texts.append(value)
    return texts


def _infer_task_type(
    raw_labels: list[tuple[int, Any]], mapping: ColumnMapping, from_csv: bool
) -> str:
    values = [value for _, value in raw_labels]
    if any(isinstance(v, float) and not isinstance(v, bool) for v in values):
        return "regression"
    if from_csv and values and all(_parses_as_float(v) for v in values):
        if any(not _parses_as_int(v) for v in values):
            return "regression"
    return "pair-classification" if mapping.text_pair_field else "classification"


def _regression_label(value: Any, line: int, column: str, error) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise error("missing_label", "the label is missing", line, column)
    if isinstance(value, bool):
        raise error(
            "label_not_numeric", f"regression label {value!r} is not a number", line, column
        )
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _parses_as_float(value):
        number = float(value)
    else:
        raise error(
            "label_not_numeric",
            f"regression label {_short(value)} is not a number",
            line,
            column,
        )
    if not math.isfinite(number):
        raise error("label_not_numeric", f"regression label {value!r} is not finite", line, column)
    return number


def _class_label(value: Any, line: int, column: str, error) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise error("missing_label", "the label is missing", line, column)
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise error(
            "invalid_label",
            f"a classification label must be a string, an integer or a boolean, "
            f"got {_json_type(value)}",
            line,
            column,
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise error(
                "invalid_label",
                f"classification label {value!r} is not an integer "
                "(use task_type='regression' for numeric targets)",
                line,
                column,
            )
        value = int(value)
    label = str(value)
    if len(label) > MAX_LABEL_CHARS:
        raise error(
            "label_too_long",
            f"the label has {len(label)} characters, more than the limit of {MAX_LABEL_CHARS}",
            line,
            column,
        )
    if not _is_unicode(label):
        raise error("not_utf8", "the label is not valid Unicode (a lone surrogate)", line, column)
    return label


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes to UTF-8 (JSON escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _label_names(
    labels: list[str],
    raw_labels: list[tuple[int, Any]],
    fixed: Sequence[str] | None,
    limits: TableLimits,
    column: str,
    error,
) -> list[str]:
    if fixed is not None:
        known = set(fixed)
        for (line, _), label in zip(raw_labels, labels, strict=True):
            if label not in known:
                raise error(
                    "unknown_label",
                    f"label {label!r} never occurs in the training data",
                    line,
                    column,
                )
        return list(fixed)
    names = sorted(set(labels))
    if len(names) > limits.max_labels:
        raise error(
            "too_many_labels",
            f"{len(names)} distinct labels, more than the limit of {limits.max_labels}",
            column=column,
        )
    if len(names) < 2:
        raise error(
            "single_class",
            f"classification needs at least two distinct labels, found only {names!r}",
            column=column,
        )
    return names


def _parses_as_float(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _parses_as_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bytes):
        return "bytes"
    return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
