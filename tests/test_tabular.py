"""datasets_io.tabular: reading JSONL/CSV/Parquet tables and rejecting bad data with clear errors."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_io.tabular import ERROR_CODES, ColumnMapping, DatasetError, TableLimits, read_table
from settings import Settings

ROWS = [
    {"text": "a wonderful film", "label": "pos"},
    {"text": "dull and far too long", "label": "neg"},
    {"text": "I loved every minute", "label": "pos"},
    {"text": "the plot makes no sense", "label": "neg"},
]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    import csv

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def parquet_bytes(columns: dict[str, list]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def expect_error(data: bytes, filename: str, code: str, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        read_table(data, filename=filename, **kwargs)
    error = caught.value
    assert error.code == code, str(error)
    assert code in ERROR_CODES
    assert filename in str(error) or error.file is None
    return error


# --- round trips -----------------------------------------------------------------------


def test_jsonl_csv_and_parquet_with_the_same_rows_read_to_the_same_table(tmp_path: Path) -> None:
    files = {
        "d.jsonl": jsonl_bytes(ROWS),
        "d.csv": csv_bytes(["text", "label"], [[r["text"], r["label"]] for r in ROWS]),
        "d.parquet": parquet_bytes(
            {"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}
        ),
    }
    tables = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        table = read_table(tmp_path / name)
        assert table.sha256 == hashlib.sha256(data).hexdigest()
        assert table.filename == name
        tables.append(table)
    for table in tables:
        assert table.texts == [r["text"] for r in ROWS]
        assert table.labels == ["pos", "neg", "pos", "neg"]
        assert table.label_names == ["neg", "pos"]
        assert table.label_ids() == [1, 0, 1, 0]
        assert table.task_type == "classification"
        assert table.rows == 4
        assert table.text_pairs is None


def test_datasets_library_loads_the_same_three_formats_to_the_same_rows(tmp_path: Path) -> None:
    import datasets

    texts = [r["text"] for r in ROWS]
    files = {
        "d.jsonl": ("json", jsonl_bytes(ROWS)),
        "d.csv": ("csv", csv_bytes(["text", "label"], [[r["text"], r["label"]] for r in ROWS])),
        "d.parquet": (
            "parquet",
            parquet_bytes({"text": texts, "label": [r["label"] for r in ROWS]}),
        ),
    }
    for name, (builder, data) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        loaded = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
        )
        table = read_table(path)
        assert loaded["text"] == table.texts
        assert loaded["label"] == table.labels


def test_integer_and_string_labels_name_the_same_label() -> None:
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": "0"}, {"text": "z", "label": 1.0}]
    table = read_table(jsonl_bytes(rows), filename="d.jsonl", task_type="classification")
    assert table.labels == ["1", "0", "1"]
    assert table.label_names == ["0", "1"]


def test_csv_quoted_multiline_text_is_one_row_and_line_numbers_follow_the_file() -> None:
    data = b'text,label\n"first line\nsecond line",a\nplain,b\nshort\n'
    error = expect_error(data, "d.csv", "malformed_row")
    assert error.line == 5
    table = read_table(b'text,label\n"first line\nsecond line",a\nplain,b\n', filename="d.csv")
    assert table.texts == ["first line\nsecond line", "plain"]
    assert table.line_numbers == [2, 4]


def test_column_mapping_reads_other_column_names_and_a_text_pair() -> None:
    rows = [
        {"premise": "a cat sleeps", "hypothesis": "an animal rests", "gold": "yes"},
        {"premise": "a dog barks", "hypothesis": "it is silent", "gold": "no"},
    ]
    mapping = ColumnMapping(text_field="premise", text_pair_field="hypothesis", label_field="gold")
    table = read_table(jsonl_bytes(rows), filename="p.jsonl", mapping=mapping)
    assert table.task_type == "pair-classification"
    assert table.text_pairs == ["an animal rests", "it is silent"]
    assert table.to_records()[0] == rows[0]


def test_float_labels_make_a_regression_task() -> None:
    rows = [{"text": "ok", "label": 0.5}, {"text": "great", "label": 3}]
    table = read_table(jsonl_bytes(rows), filename="r.jsonl")
    assert table.task_type == "regression"
    assert table.labels == [0.5, 3.0]
    assert table.label_names == []


def test_csv_decimal_labels_make_a_regression_task_and_integer_labels_classes() -> None:
    decimal = read_table(b"text,label\na,0.25\nb,-1.5\n", filename="r.csv")
    assert decimal.task_type == "regression"
    assert decimal.labels == [0.25, -1.5]
    integer = read_table(b"text,label\na,1\nb,2\n", filename="c.csv")
    assert integer.task_type == "classification"
    assert integer.label_names == ["1", "2"]


def test_limits_from_settings_follow_the_settings_fields() -> None:
    limits = TableLimits.from_settings(Settings(max_rows=7, max_text_chars=9))
    assert limits.max_rows == 7
    assert limits.max_text_chars == 9


# --- bad data --------------------------------------------------------------------------


def test_unsupported_extension_is_rejected() -> None:
    error = expect_error(jsonl_bytes(ROWS), "data.xlsx", "unsupported_format")
    assert ".xlsx" in str(error)


def test_file_bigger_than_the_upload_limit_is_rejected_before_parsing(tmp_path: Path) -> None:
    data = jsonl_bytes(ROWS)
    limits = TableLimits(max_upload_bytes=len(data) - 1)
    expect_error(data, "big.jsonl", "too_large", limits=limits)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        read_table(path, limits=limits)
    assert caught.value.code == "too_large"
    assert "big.jsonl" in str(caught.value)


@pytest.mark.parametrize(
    ("filename", "data"),
    [("e.jsonl", b""), ("e.jsonl", b"\n \n"), ("e.csv", b"text,label\n"), ("e.csv", b"")],
)
def test_empty_file_is_rejected(filename: str, data: bytes) -> None:
    expect_error(data, filename, "empty_file")


def test_empty_parquet_table_is_rejected() -> None:
    data = parquet_bytes({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    expect_error(data, "e.parquet", "empty_file")


def test_malformed_json_line_is_rejected_with_its_line_number() -> None:
    data = jsonl_bytes(ROWS[:2]) + b'{"text": "oops", "label": \n' + jsonl_bytes(ROWS[2:])
    error = expect_error(data, "bad.jsonl", "malformed_row")
    assert error.line == 3
    assert "line 3" in str(error)


def test_json_line_that_is_not_an_object_is_rejected() -> None:
    error = expect_error(jsonl_bytes(ROWS[:2]) + b'["a list"]\n', "bad.jsonl", "malformed_row")
    assert error.line == 3


def test_csv_row_with_the_wrong_number_of_fields_is_rejected_with_its_line() -> None:
    error = expect_error(b"text,label\nfine,a\ntoo,many,fields\n", "bad.csv", "malformed_row")
    assert error.line == 3
    assert "line 3" in str(error)


def test_file_that_is_not_parquet_is_rejected() -> None:
    expect_error(b"PAR1 this is not parquet at all", "bad.parquet", "malformed_file")


def test_missing_text_column_is_rejected_naming_the_field() -> None:
    rows = [{"sentence": "x", "label": "a"}, {"sentence": "y", "label": "b"}]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "missing_column")
    assert error.field == "text"
    assert "'text'" in str(error) and "sentence" in str(error)


def test_missing_label_column_is_rejected_naming_the_field_in_csv_and_parquet() -> None:
    error = expect_error(b"text,stars\na,1\nb,2\n", "d.csv", "missing_column")
    assert error.field == "label"
    error = expect_error(parquet_bytes({"text": ["a", "b"]}), "d.parquet", "missing_column")
    assert error.field == "label"


def test_row_without_a_label_key_is_rejected_with_its_line() -> None:
    rows = ROWS[:2] + [{"text": "no label here"}]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "missing_column")
    assert (error.line, error.field) == (3, "label")


def test_null_label_is_rejected_with_its_line() -> None:
    rows = ROWS[:3] + [{"text": "who knows", "label": None}]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "missing_label")
    assert (error.line, error.field) == (4, "label")
    assert "line 4" in str(error) and "'label'" in str(error)


def test_empty_csv_label_is_rejected_with_its_line() -> None:
    error = expect_error(b"text,label\na,x\nb,\nc,y\n", "d.csv", "missing_label")
    assert error.line == 3


def test_non_string_text_is_rejected_with_its_line() -> None:
    rows = ROWS[:1] + [{"text": 42, "label": "neg"}] + ROWS[2:]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "text_not_string")
    assert (error.line, error.field) == (2, "text")
    assert "line 2" in str(error)


def test_null_text_pair_is_rejected_naming_the_pair_field() -> None:
    rows = [{"a": "x", "b": "y", "label": "1"}, {"a": "x", "b": None, "label": "0"}]
    mapping = ColumnMapping(text_field="a", text_pair_field="b")
    error = expect_error(jsonl_bytes(rows), "p.jsonl", "text_not_string", mapping=mapping)
    assert (error.line, error.field) == (2, "b")


def test_non_string_text_in_parquet_is_rejected_with_its_row() -> None:
    data = parquet_bytes({"text": [b"bytes", b"more"], "label": ["a", "b"]})
    error = expect_error(data, "d.parquet", "text_not_string")
    assert error.line == 1
    assert "row 1" in str(error)


def test_non_utf8_bytes_are_rejected_with_byte_offset_and_line() -> None:
    data = jsonl_bytes(ROWS[:2]) + '{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1")
    error = expect_error(data, "latin.jsonl", "not_utf8")
    assert error.line == 3
    offset = data.index(b"\xe9")
    assert f"byte offset {offset}" in str(error)


def test_non_utf8_csv_is_rejected() -> None:
    error = expect_error(b"text,label\n\xff\xfe,a\n", "d.csv", "not_utf8")
    assert error.line == 2


def test_single_class_is_rejected() -> None:
    rows = [{"text": t, "label": "pos"} for t in ("a", "b", "c")]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "single_class")
    assert error.field == "label"
    assert "'pos'" in str(error)


def test_text_longer_than_the_limit_is_rejected_with_its_line() -> None:
    rows = ROWS[:2] + [{"text": "x" * 31, "label": "pos"}]
    limits = TableLimits(max_text_chars=30)
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "text_too_long", limits=limits)
    assert (error.line, error.field) == (3, "text")
    assert "31 characters" in str(error)


@pytest.mark.parametrize("filename", ["d.jsonl", "d.csv", "d.parquet"])
def test_more_rows_than_the_limit_are_rejected(filename: str) -> None:
    texts = [f"t{i}" for i in range(6)]
    labels = ["a", "b"] * 3
    data = {
        "d.jsonl": jsonl_bytes(
            [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
        ),
        "d.csv": csv_bytes(["text", "label"], list(zip(texts, labels, strict=True))),
        "d.parquet": parquet_bytes({"text": texts, "label": labels}),
    }[filename]
    error = expect_error(data, filename, "too_many_rows", limits=TableLimits(max_rows=5))
    assert "5" in str(error)


def test_more_labels_than_the_limit_are_rejected_naming_the_field() -> None:
    rows = [{"text": f"t{i}", "label": f"class{i}"} for i in range(4)]
    limits = TableLimits(max_labels=3)
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "too_many_labels", limits=limits)
    assert error.field == "label"


def test_non_numeric_regression_label_is_rejected_with_its_line() -> None:
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": "high"}]
    error = expect_error(jsonl_bytes(rows), "r.jsonl", "label_not_numeric", task_type="regression")
    assert (error.line, error.field) == (2, "label")
    assert "'high'" in str(error)


def test_non_finite_regression_label_is_rejected() -> None:
    error = expect_error(b"text,label\na,0.5\nb,nan\n", "r.csv", "label_not_numeric")
    assert error.line == 3


def test_fractional_label_for_a_classification_task_is_rejected() -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0.5}]
    error = expect_error(jsonl_bytes(rows), "c.jsonl", "invalid_label", task_type="classification")
    assert error.line == 2


def test_list_label_is_rejected() -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": ["x", "y"]}]
    error = expect_error(jsonl_bytes(rows), "c.jsonl", "invalid_label")
    assert error.line == 2


def test_label_outside_the_training_labels_is_rejected_with_its_line() -> None:
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}]
    error = expect_error(
        jsonl_bytes(rows), "validation.jsonl", "unknown_label", label_names=["neg", "pos"]
    )
    assert (error.line, error.field) == (2, "label")
    assert "'neutral'" in str(error)


def test_unknown_task_type_is_rejected_naming_the_field() -> None:
    error = expect_error(jsonl_bytes(ROWS), "d.jsonl", "invalid_task_type", task_type="ranking")
    assert error.field == "task_type"


def test_pair_classification_without_a_pair_field_is_rejected() -> None:
    error = expect_error(
        jsonl_bytes(ROWS), "d.jsonl", "missing_column", task_type="pair-classification"
    )
    assert error.field == "text_pair_field"


def test_error_dict_carries_code_field_file_and_line() -> None:
    rows = ROWS[:1] + [{"text": None, "label": "neg"}]
    error = expect_error(jsonl_bytes(rows), "d.jsonl", "text_not_string")
    assert error.to_dict() == {
        "code": "text_not_string",
        "message": str(error),
        "field": "text",
        "file": "d.jsonl",
        "line": 2,
    }


def test_parquet_without_the_mapped_columns_names_the_missing_one() -> None:
    error = expect_error(parquet_bytes({"other": ["a", "b"]}), "d.parquet", "missing_column")
    assert error.field == "text"


def test_csv_header_with_a_repeated_column_is_rejected() -> None:
    error = expect_error(b"text,label,text\na,b,c\n", "d.csv", "malformed_row")
    assert error.line == 1
    assert "'text'" in str(error)


def test_boolean_labels_are_classes_named_true_and_false() -> None:
    rows = [{"text": "a", "label": True}, {"text": "b", "label": False}]
    table = read_table(jsonl_bytes(rows), filename="b.jsonl")
    assert table.label_names == ["false", "true"]


def test_unicode_line_separator_inside_a_json_string_is_text_not_a_line_break() -> None:
    rows = [{"text": "one\u2028two", "label": "a"}, {"text": "three", "label": "b"}]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    table = read_table(data, filename="u.jsonl")
    assert table.texts[0] == "one\u2028two"
    assert table.line_numbers == [1, 2]


def test_a_parquet_file_that_decodes_past_the_upload_limit_is_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    bomb = pa.table({"text": ["a" * 100_000] * 2_000, "label": ["x", "y"] * 1_000})
    pq.write_table(bomb, buffer, compression="zstd")  # under a kilobyte, 200 MB decoded
    assert len(buffer.getvalue()) < 10_000
    error = expect_error(buffer.getvalue(), "d.parquet", "too_large")
    assert "decodes to" in str(error)


def test_dictionary_encoded_parquet_strings_read_as_plain_text() -> None:
    table = read_table(
        parquet_bytes({"text": ["good film", "bad film"] * 10, "label": ["pos", "neg"] * 10}),
        filename="d.parquet",
    )
    assert table.rows == 20 and table.texts[:2] == ["good film", "bad film"]
    assert table.label_names == ["neg", "pos"]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ('{"text": "a", "label": "\\udfff"}', "not_utf8"),
        ('{"text": "\\ud800 x", "label": "pos"}', "not_utf8"),
        (json.dumps({"text": "a", "label": "l" * 300}), "label_too_long"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", "malformed_row"),
        (
            '{"text": "a", "label": "pos", "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
            "malformed_row",
        ),
    ],
    ids=["surrogate_label", "surrogate_text", "long_label", "huge_number", "deep_nesting"],
)
def test_jsonl_values_no_table_can_hold_are_refused(line: str, code: str) -> None:
    data = jsonl_bytes(ROWS) + line.encode() + b"\n"
    expect_error(data, "d.jsonl", code)


def test_a_parquet_file_that_repeats_a_column_name_is_refused() -> None:
    buffer = io.BytesIO()
    arrays = [pa.array(["a", "b"]), pa.array(["c", "d"]), pa.array(["x", "y"])]
    pq.write_table(pa.Table.from_arrays(arrays, names=["text", "text", "label"]), buffer)
    error = expect_error(buffer.getvalue(), "d.parquet", "malformed_file")
    assert "'text'" in str(error)
