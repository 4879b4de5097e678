"""Request parsing without pandas: JSON bytes straight into a float32 array.

Every way a body can be wrong becomes a `BadRequest` with a status and a message that
says what is wrong; nothing here can raise anything else.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from typing import Any

import numpy as np
import orjson

from pipeline.store import new_ids

try:  # simdjson: a numbers-only body straight to an array, no Python float per value
    import simdjson
except ImportError:  # no wheel for this Python: the orjson path serves every body
    simdjson = None

MAX_ID_LENGTH = 128
# printable ASCII, no spaces; matched whole (fullmatch: `$` would take "abc\n" too)
_ID = re.compile(r"[\x21-\x7e]{1,128}")


class BadRequest(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def parse_json(body: bytes, content_type: str | None) -> Any:
    if not content_type or content_type.split(";")[0].strip().lower() != "application/json":
        raise BadRequest(415, f"Content-Type must be application/json, got {content_type!r}")
    if not body:
        raise BadRequest(400, "empty body: expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply") from None


def may_hold_booleans(body: bytes) -> bool:
    """False when a JSON body cannot hold a true or false: the literals are absent (a
    string such as "true" only makes this answer True, never the other way round)."""
    return b"true" in body or b"false" in body


# What is left of a body of numbers under one key once its digits, signs, exponents,
# points, brackets, commas, colons and white space are deleted: the key's quotes and letters
# (less e and E). A string, a true, false or null, or a second key leaves more.
_NUMERIC = b"0123456789.,[]{}:eE+- \t\r\n"


def numbers_only(body: bytes, key: bytes) -> bool:
    """True when a JSON body holds nothing but numbers (in lists) under its one key `key`:
    one C pass over the bytes (half the time of the scan for true and false it replaces)."""
    return body.translate(None, _NUMERIC) == b'"' + key.translate(None, b"eE") + b'"'


_parsers = threading.local()  # a simdjson parser is reused, so one per thread


def numeric_rows(body: bytes, key: str, n_features: int, max_rows: int) -> np.ndarray | None:
    """A body `numbers_only` passed for `key` -> its (n, n_features) float32 rows, parsed by
    simdjson straight into one float64 buffer (a third of the time of orjson's Python
    floats and numpy's walk over them, on the event loop's GIL), with the general path's
    exact bits; None for anything that path must decide and word (invalid JSON, a row of
    another width, nesting, too many rows, values beyond +-2^24, NaN)."""
    if simdjson is None:
        return None
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    try:
        doc = parser.parse(body)
        try:
            rows = doc[key]
            n = len(rows)
            # one "[" a row and one around them: rows of numbers, nothing nested deeper
            if not 0 < n <= max_rows or body.count(b"[") != n + 1:
                return None
            if any(len(row) != n_features for row in rows):
                return None
            flat = np.frombuffer(rows.as_buffer(of_type="d"), np.float64)
        finally:
            rows = doc = None  # the parser is reused only once nothing refers to its document
    except RuntimeError:  # the parser still held a document: a new one for this thread
        _parsers.parser = None
        return None
    except (ValueError, TypeError, KeyError):
        return None
    if flat.size != n * n_features or not np.abs(flat).max() <= _EXACT:  # NaN fails it too
        return None
    return flat.astype(np.float32).reshape(n, n_features)


def expect_object(payload: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(payload, dict):
        raise BadRequest(422, f"expected a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise BadRequest(422, f"unknown field(s): {', '.join(unknown)}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(payload))
    if missing:
        raise BadRequest(422, f"missing field(s): {', '.join(missing)}")
    return payload


def rows_to_array(
    rows: Any,
    n_features: int,
    max_rows: int,
    field: str = "instances",
    booleans: bool = True,
    numbers: bool = False,
) -> np.ndarray:
    """A list of rows of numbers -> (n, n_features) float32, finite, or BadRequest.

    `booleans=False` skips the scan for true/false, for a caller that knows the body holds
    none (`may_hold_booleans`): the scan is half this function's time on a 64 x 64 body.
    `numbers=True`, for a caller that knows every value is a number (`numbers_only`), tries
    a straight cast to float32 first (`_plain_numbers`): numpy's pass to find the values'
    type, which keeps strings and booleans from being cast silently, is a quarter of the
    conversion. Whatever that cast does not take, the general path decides and words."""
    if not isinstance(rows, list):
        raise BadRequest(422, f"{field} must be a list of rows, got {type(rows).__name__}")
    if not rows:
        raise BadRequest(422, f"{field} is empty: send at least one row")
    if len(rows) > max_rows:
        raise BadRequest(413, f"{len(rows)} rows in one request; the limit is {max_rows}")
    if numbers:
        array = _plain_numbers(rows, n_features)
        if array is not None:
            return array
        booleans = False  # numbers_only saw none
    # true/false among numbers would become 1/0 silently; map(type) keeps the scan in C
    if booleans and any(isinstance(row, list) and bool in map(type, row) for row in rows):
        raise BadRequest(422, f"{field}: values must be numbers, found booleans")
    try:
        array = np.asarray(rows)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(
            422,
            f"{field}: every row must be a list of {n_features} numbers "
            "(rows of different lengths or mixed types)",
        ) from None
    return checked_array(array, n_features, field)


# Every integer up to this size is a float32. Beyond it a body of integers only would round
# twice in the straight cast (int -> double -> float32) and once on the general path (int64
# -> float32), so the last bit could differ.
_EXACT = float(2**24)


def _plain_numbers(rows: list, n_features: int) -> np.ndarray | None:
    """Rows of numbers -> float32 in one cast, where that gives the general path's exact
    bits: 2-D, `n_features` wide, every value within +-2^24 (so NaN and inf too are left
    to the general path, with its words for them); else None."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(rows, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 2 or array.shape[1] != n_features or not array.size:
        return None
    if not np.abs(array).max() <= _EXACT:  # written so that NaN fails it too
        return None
    return array


def checked_array(array: np.ndarray, n_features: int, field: str) -> np.ndarray:
    """A 2-D array of numbers `n_features` wide -> finite float32, or BadRequest."""
    if array.ndim != 2:
        raise BadRequest(422, f"{field} must be a 2-D list (rows of numbers), got {array.ndim}-D")
    if array.dtype.kind not in "iuf":
        raise BadRequest(422, f"{field}: values must be numbers, found {_kind(array)}")
    if array.shape[1] != n_features:
        raise BadRequest(
            422, f"{field}: each row needs {n_features} features, got {array.shape[1]}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.argmin(finite.all(axis=1)))
        raise BadRequest(
            422,
            f"{field}: row {row} holds a value that is not a finite float32 "
            "(NaN, Infinity or too large)",
        )
    return array


def _kind(array: np.ndarray) -> str:
    return {"U": "strings", "S": "strings", "b": "booleans", "O": "non-numeric values"}.get(
        array.dtype.kind, str(array.dtype)
    )


def parse_ids(ids: Any, n: int) -> list[str]:
    if ids is None:
        return new_ids(n)  # time-ordered: cheap to index
    if not isinstance(ids, list) or len(ids) != n:
        raise BadRequest(422, f"ids must be a list of {n} strings, one per row")
    for i, value in enumerate(ids):
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise BadRequest(
                422, f"ids[{i}] must be 1-{MAX_ID_LENGTH} printable ASCII characters without spaces"
            )
    if len(set(ids)) != n:
        raise BadRequest(422, "ids must be unique within a request")
    return ids


CSV_TYPES = ("text/csv", "application/csv")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_csv(body: bytes, names: tuple[str, ...], max_rows: int) -> np.ndarray:
    """MLflow's `text/csv` input: a header row of column names (any order, extra columns
    ignored), then one row per line. A first row of numbers only is taken as data in
    feature order (a headerless file)."""
    if not body:
        raise BadRequest(400, "empty body: expected CSV with a header row")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest(400, "CSV body is not UTF-8") from None
    # newline="": rows end at LF, CRLF or a lone CR, as pandas reads them (the csv module's
    # own advice); without it a CR raised "new-line character seen in unquoted field".
    # Blank lines are dropped, as pandas skips them.
    try:
        lines = [line for line in csv.reader(io.StringIO(text, newline="")) if line]
    except csv.Error as exc:
        # A cell over the module's field_size_limit (131,072 characters): no number is
        # that long, so the limit (process-wide) is kept and the body refused.
        raise BadRequest(400, f"CSV cannot be parsed: {exc}") from None
    if not lines:
        raise BadRequest(422, "CSV body holds no rows")
    header, data = lines[0], lines[1:]
    if all(_is_number(cell) for cell in header):
        header, data = list(names), lines
    if len(data) > max_rows:
        raise BadRequest(413, f"{len(data)} rows in one request; the limit is {max_rows}")
    if not data:
        raise BadRequest(422, "CSV body has a header but no rows")
    index = _column_index([c.strip() for c in header], names, "CSV")
    if any(len(row) != len(header) for row in data):
        bad = next(i for i, row in enumerate(data) if len(row) != len(header))
        raise BadRequest(
            422, f"CSV: row {bad} has {len(data[bad])} cells, the header {len(header)}"
        )
    loose = _loose_cell(data) if "_" in text or not text.isascii() else None
    if loose is not None:
        raise BadRequest(422, f"CSV: every cell must be a number (found {loose[:32]!r})")
    try:
        array = np.array(data, dtype=np.float64)
    except ValueError:
        raise BadRequest(
            422, "CSV: every cell must be a number (found text or an empty cell)"
        ) from None
    return checked_array(
        np.ascontiguousarray(array[:, [index[c] for c in names]]), len(names), "CSV"
    )


def _column_index(columns: list[str], names: tuple[str, ...], where: str) -> dict[str, int]:
    """Each feature's position among `columns`. A feature named twice is refused: which of
    the two the client meant cannot be known (a dict would silently keep the last).
    Other columns are ignored, so they may repeat."""
    index: dict[str, int] = {}
    wanted = set(names)
    for i, column in enumerate(columns):
        if column in index and column in wanted:
            raise BadRequest(422, f"{where}: column {column} is named twice")
        index.setdefault(column, i)
    missing = [c for c in names if c not in index]
    if missing:
        raise BadRequest(422, f"{where}: missing column(s) {', '.join(missing[:5])}")
    return index


def _loose_cell(rows: list[list[str]]) -> str | None:
    """The first cell that Python's float() (and NumPy's cast, which calls it) reads as a
    number but pandas does not: digits grouped with underscores ("1_000") or digits of
    another script ("١", "１")."""
    return next((c for row in rows for c in row if "_" in c or not c.isascii()), None)


def _is_number(cell: str) -> bool:
    if "_" in cell or not cell.isascii():
        return False  # no number to pandas either (see _loose_cell)
    try:
        float(cell)
    except ValueError:
        return False
    return True


def parse_invocations(payload: Any, names: tuple[str, ...], max_rows: int) -> np.ndarray:
    """MLflow's scoring protocol: dataframe_split, dataframe_records, instances or inputs."""
    keys = {"dataframe_split", "dataframe_records", "instances", "inputs"}
    if not isinstance(payload, dict):
        raise BadRequest(422, "expected a JSON object with one of " + ", ".join(sorted(keys)))
    present = keys & set(payload)
    if len(present) != 1:
        raise BadRequest(
            422,
            "send exactly one of dataframe_split, dataframe_records, "
            f"instances, inputs (got {sorted(present) or 'none'})",
        )
    unknown = set(payload) - keys - {"params"}
    if unknown:
        raise BadRequest(422, f"unknown field(s): {', '.join(sorted(unknown))}")
    key = present.pop()
    data = payload[key]
    if key == "dataframe_split":
        if not isinstance(data, dict) or "data" not in data:
            raise BadRequest(422, "dataframe_split needs {'columns': [...], 'data': [[...]]}")
        columns = data.get("columns")
        rows = data["data"]
        if columns is None:
            return rows_to_array(rows, len(names), max_rows, "dataframe_split.data")
        return _reorder(columns, rows, names, max_rows)
    if isinstance(data, dict):  # inputs / instances as {column: [values]}
        missing = [c for c in names if c not in data]
        if missing:
            raise BadRequest(422, f"{key}: missing column(s) {', '.join(missing[:5])}")
        columns = [data[c] for c in names]
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
            raise BadRequest(422, f"{key}: every column must be a list of the same length")
        return rows_to_array(
            [list(r) for r in zip(*columns, strict=True)], len(names), max_rows, key
        )
    if isinstance(data, list) and data and isinstance(data[0], dict) or key == "dataframe_records":
        if not isinstance(data, list):
            raise BadRequest(422, f"{key} must be a list of records")
        if len(data) > max_rows:
            raise BadRequest(413, f"{len(data)} rows in one request; the limit is {max_rows}")
        rows = []
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise BadRequest(422, f"{key}[{i}] must be an object of column: value")
            try:
                rows.append([record[c] for c in names])
            except KeyError as exc:
                raise BadRequest(422, f"{key}[{i}]: missing column {exc.args[0]}") from None
        return rows_to_array(rows, len(names), max_rows, key)
    return rows_to_array(data, len(names), max_rows, key)


def _reorder(columns: Any, rows: Any, names: tuple[str, ...], max_rows: int) -> np.ndarray:
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise BadRequest(422, "dataframe_split.columns must be a list of column names")
    index = _column_index(columns, names, "dataframe_split")
    array = rows_to_array(rows, len(columns), max_rows, "dataframe_split.data")
    return np.ascontiguousarray(array[:, [index[c] for c in names]])


def parse_labels(payload: Any, max_rows: int) -> tuple[list[tuple[str, int]], list[dict], bool]:
    """-> (valid (id, label) pairs, per-row errors, overwrite). A label is any integer
    >= 0 here: the store checks it against the classes of the model that made that
    prediction (its logged probabilities), which need not be the model served now."""
    body = expect_object(payload, {"labels", "overwrite"}, {"labels"})
    labels, overwrite = body["labels"], body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise BadRequest(422, "overwrite must be true or false")
    if not isinstance(labels, list) or not labels:
        raise BadRequest(422, "labels must be a non-empty list of {id, label}")
    if len(labels) > max_rows:
        raise BadRequest(413, f"{len(labels)} labels in one request; the limit is {max_rows}")
    valid, errors = [], []
    for i, item in enumerate(labels):
        pid = item.get("id") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        if not isinstance(item, dict) or set(item) - {"id", "label"}:
            errors.append(
                {
                    "index": i,
                    "id": pid if isinstance(pid, str) else None,
                    "status": "invalid",
                    "detail": "each item is {id, label}",
                }
            )
        elif not isinstance(pid, str) or not _ID.fullmatch(pid):
            errors.append(
                {
                    "index": i,
                    "id": None,
                    "status": "invalid",
                    "detail": "id must be 1-128 printable ASCII characters",
                }
            )
        elif isinstance(label, bool) or not isinstance(label, int) or label < 0:
            errors.append(
                {
                    "index": i,
                    "id": pid,
                    "status": "invalid_label",
                    "detail": "label must be an integer >= 0",
                }
            )
        else:
            valid.append((pid, label))
    return valid, errors, overwrite
