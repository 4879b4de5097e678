"""Row-level validation: every row that enters is checked; bad rows are quarantined.

The outcome of each check is part of the data contract (see README, "Validation"):

| problem                                   | outcome                                   |
| ----------------------------------------- | ----------------------------------------- |
| missing feature or `label` column         | the file is refused (`SchemaError`)       |
| extra column                              | reported and dropped                      |
| non-numeric value (string) in a feature   | row quarantined: `non-numeric <column>`   |
| NaN / empty cell                          | row quarantined: `missing <column>`       |
| +/-inf or a number beyond float32         | row quarantined: `non-finite <column>`    |
| label missing, not an integer, or outside | row quarantined: `label ...`              |
| 0..num_classes-1                          |                                           |
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

LABEL = "label"
_PIXEL = re.compile(r"^pixel(\d+)$")


class SchemaError(ValueError):
    """The file's columns do not match the expected schema: the whole file is refused."""


@dataclass(frozen=True)
class Schema:
    """The expected columns of a dataset: feature names in order, and the label range."""

    feature_names: tuple[str, ...]
    num_classes: int

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def image_side(self) -> int | None:
        """Side of the square image when the features are one (pixel-CSV layout), else None."""
        side = math.isqrt(self.n_features)
        return side if side * side == self.n_features and side >= 2 else None

    def to_dict(self) -> dict:
        return {"feature_names": list(self.feature_names), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict) -> Schema:
        return cls(tuple(data["feature_names"]), int(data["num_classes"]))


def infer_schema(
    columns: list[str], num_classes: int, current: tuple[str, ...] | None = None
) -> Schema:
    """Derive the schema from a file's header.

    The pixel-CSV layout (`label, pixel0..pixel{N-1}`, as in Kaggle MNIST) is recognised
    by its column names: the expected features are pixel0..pixel{max}, so a gap is a
    missing column. Otherwise every column but `label` and `id` is a feature.

    `current`: the features of the data version this file would replace. A table (not the
    pixel layout) that has all of them and more keeps them (the others are extra columns,
    reported and dropped); any other difference is the schema change the caller refuses or
    records.
    """
    if LABEL not in columns:
        raise SchemaError(f"missing required column '{LABEL}' (found: {_preview(columns)})")
    pixels = [int(m.group(1)) for c in columns if (m := _PIXEL.match(str(c)))]
    if pixels:
        features = tuple(f"pixel{i}" for i in range(max(pixels) + 1))
    else:  # a column named `id` holds row ids (as `mlops predict` reads them), no feature
        features = tuple(str(c) for c in columns if c not in (LABEL, ID_COLUMN))
    if not features:
        raise SchemaError("no feature columns: a dataset needs numeric features besides 'label'")
    # not in the pixel layout, whose features are the image's pixels: a larger image has
    # all of a smaller one's pixel columns, and is a change of schema all the same
    if not pixels and current and features != current and set(current) <= set(map(str, columns)):
        features = current
    return Schema(features, num_classes)


ID_COLUMN = "id"  # row ids, not a feature (pipeline/batch.py and /feedback use the name)


@dataclass
class ValidationReport:
    source: str
    rows_in: int = 0
    rows_ok: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rows by kind: "non-numeric"
    # rows by whole reason, so by column: "non-numeric id" (at most columns x 3 + 4 keys)
    details: dict[str, int] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def add(self, reasons: dict[str, int], details: dict[str, int]) -> None:
        """Count in another chunk's rows (the streaming ingest)."""
        for mine, theirs in ((self.reasons, reasons), (self.details, details)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count

    def summary(self, top: int = 3) -> str:
        """The kinds of bad rows with their counts, each with the columns most often at
        fault: "non-numeric: 3000 (non-numeric id: 3000)"."""
        parts = []
        for kind, count in self.reasons.items():
            worst = sorted(
                ((n, r) for r, n in self.details.items() if r.split(" ")[0] == kind and r != kind),
                key=lambda item: (-item[0], item[1]),
            )
            shown = ", ".join(f"{r}: {n}" for n, r in worst[:top])
            more = f", {len(worst) - top} more" if len(worst) > top else ""
            parts.append(f"{kind}: {count}" + (f" ({shown}{more})" if shown else ""))
        return "; ".join(parts)

    def hint(self) -> str:
        """What to do, where the bad rows say it plainly: labels that are names, not
        class numbers; a column of ids or names taken for a feature."""
        bad = self.rows_quarantined
        if bad and self.details.get("label non-numeric", 0) * 2 >= bad:
            return (
                "labels must be class numbers 0..num_classes-1: map names such as 'cat' to "
                "numbers first, and set data.num_classes in params.yaml"
            )
        for reason, count in self.details.items():
            if reason.startswith("non-numeric ") and count == self.rows_in:
                column = reason.removeprefix("non-numeric ")
                return (
                    f"column {column!r} is not numeric in any row: features must be numbers "
                    "(drop that column from the file; a column named 'id' is taken as row ids)"
                )
        return ""


def why_refused(reports: list[ValidationReport]) -> str:
    """Why a source none of whose rows passed is refused, for its error line: every file's
    bad rows counted together, with the columns at fault and what to do where it is plain."""
    every = ValidationReport(source="", rows_in=sum(r.rows_in for r in reports))
    for report in reports:
        every.rows_quarantined += report.rows_quarantined
        every.add(report.reasons, report.details)
    hint = every.hint()
    return f"all {every.rows_quarantined} rows quarantined, {every.summary()}" + (
        f"; {hint}" if hint else ""
    )


@dataclass
class ValidationResult:
    clean: pd.DataFrame  # int64 label, then float32 features in schema order
    quarantine: pd.DataFrame  # the offending rows as sent, plus `source` and `reason`
    report: ValidationReport


def validate_frame(df: pd.DataFrame, schema: Schema, source: str) -> ValidationResult:
    """Check every row of `df` against `schema`; vectorised, no per-row Python loop."""
    columns = [str(c) for c in df.columns]
    df.columns = columns
    missing = [c for c in (*schema.feature_names, LABEL) if c not in df.columns]
    if missing:
        raise SchemaError(f"missing column(s) {_preview(missing)}")
    known = set(schema.feature_names)  # once: a set per column made 1M columns quadratic
    extra = [c for c in columns if c != LABEL and c not in known]
    report = ValidationReport(source=source, rows_in=len(df), extra_columns=extra)

    features, non_numeric = _numeric_matrix(df, schema.feature_names)
    labels = pd.to_numeric(df[LABEL], errors="coerce").to_numpy(dtype=np.float64)
    given = df[LABEL].notna().to_numpy()
    if not pd.api.types.is_numeric_dtype(df[LABEL]):  # text: a blank cell is no label either
        given = given & (df[LABEL].astype(str).str.strip() != "").to_numpy()

    reason = np.full(len(df), "", dtype=object)
    _mark(reason, non_numeric, schema.feature_names, "non-numeric")
    _mark(reason, np.isnan(features), schema.feature_names, "missing")
    _mark(reason, np.isinf(features), schema.feature_names, "non-finite")
    label_reason = _label_reasons(labels, given, schema.num_classes)
    take = (reason == "") & (label_reason != "")
    reason[take] = label_reason[take]

    bad = reason != ""
    report.rows_quarantined = int(bad.sum())
    report.rows_ok = report.rows_in - report.rows_quarantined
    report.details = dict(Counter(reason[bad]))
    report.reasons = dict(Counter(r.split(" ")[0] for r in reason[bad]))

    good = ~bad
    clean = pd.DataFrame(features[good], columns=list(schema.feature_names), copy=False)
    clean.insert(0, LABEL, labels[good].astype(np.int64))  # the pixel-CSV order: label first
    quarantine = df.loc[bad].copy()
    quarantine["source"] = source
    quarantine["reason"] = reason[bad]
    return ValidationResult(clean, quarantine, report)


def _numeric_matrix(df: pd.DataFrame, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, f) float32 matrix and a mask of cells that held something non-numeric."""
    block = df.loc[:, list(names)]
    non_numeric = np.zeros(block.shape, dtype=bool)
    object_cols = [i for i, dt in enumerate(block.dtypes) if not pd.api.types.is_numeric_dtype(dt)]
    if object_cols:
        block = block.copy()
        for i in object_cols:
            col = block.iloc[:, i]
            coerced = pd.to_numeric(col, errors="coerce")
            non_numeric[:, i] = coerced.isna().to_numpy() & col.notna().to_numpy()
            block[block.columns[i]] = coerced
    with np.errstate(over="ignore", invalid="ignore"):
        # Values beyond float32's range become inf here and are quarantined as non-finite.
        matrix = block.to_numpy(dtype=np.float32, na_value=np.nan)
    if object_cols:
        matrix = np.array(matrix)  # a writable copy: pandas may hand out a read-only view
        matrix[non_numeric] = 0.0  # reported as non-numeric, not also as missing
    return matrix, non_numeric


def _mark(reason: np.ndarray, mask: np.ndarray, names: tuple[str, ...], what: str) -> None:
    """Give rows not yet marked the reason `what <first offending column>`."""
    rows = mask.any(axis=1) & (reason == "")
    if rows.any():
        first = mask[rows].argmax(axis=1)
        reason[rows] = [f"{what} {names[i]}" for i in first]


def _label_reasons(labels: np.ndarray, given: np.ndarray, num_classes: int) -> np.ndarray:
    """Each row's label problem ("" for none); `given`: the cell held something (text
    that is no number is non-numeric, an empty cell missing)."""
    reason = np.full(len(labels), "", dtype=object)
    missing = ~np.isfinite(labels)
    with np.errstate(invalid="ignore"):
        fractional = ~missing & (labels != np.round(labels))
        out_of_range = ~missing & ~fractional & ((labels < 0) | (labels >= num_classes))
    reason[missing & ~given] = "label missing"
    reason[missing & given] = "label non-numeric"  # a name such as 'cat', or other text
    reason[fractional] = "label not an integer"
    reason[out_of_range] = f"label outside 0..{num_classes - 1}"
    return reason


_SHOWABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_ .()-]{0,39}")


def _preview(items: list[str], limit: int = 8) -> str:
    """A few column names for an error message. Only names that look like column names are
    shown: a "header" that is really the first line of some other file (a link to a system
    file, a binary) is not echoed back."""
    names = [str(i) for i in items[:limit]]
    shown = [n for n in names if _SHOWABLE.fullmatch(n)]
    hidden = len(names) - len(shown)
    text = ", ".join(shown)
    if hidden:
        text += (", " if text else "") + f"{hidden} name(s) not shown"
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")
