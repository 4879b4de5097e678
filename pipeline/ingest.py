"""Data source -> validated, immutable raw snapshot under data/raw/.

Sources: `digits` (scikit-learn's bundled 8x8 digits in the pixel-CSV layout), a CSV
file, a Parquet file, or a directory of either. Nothing is written until every file
has been read and validated, and then each output is replaced atomically, so a bad
file or a crash leaves the previous data version exactly as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import MAX_INGEST_BYTES, Params
from pipeline.validate import (
    LABEL,
    Schema,
    SchemaError,
    ValidationReport,
    infer_schema,
    validate_frame,
    why_refused,
)

log = logging.getLogger(__name__)


class DataFileError(ValueError):
    """A data file that cannot be used at all; the message names the file and the problem."""


@dataclass
class IngestReport:
    source: str
    snapshot: str
    data_hash: str
    schema: dict
    rows_in: int = 0
    rows_ok: int = 0
    rows_quarantined: int = 0
    files: list[dict] = field(default_factory=list)
    fixed_test_rows: int = 0  # a source's official test split (mnist), kept beside it
    source_hash: str = ""  # of the source's contents as read, before validation
    schema_change: str = ""  # how it differs from the data version it replaced (allowed)

    def to_dict(self) -> dict:
        return asdict(self)


def load_digits_frame(
    part: str = "all", fraction: float | None = None, seed: int | None = None
) -> pd.DataFrame:
    """scikit-learn's bundled digits as `label, pixel0..pixel63`.

    `part` selects the demo's split: `bootstrap` (a stratified `fraction` of the rows,
    the initial training pool), `stream` (the rest: the held-out production stream the
    simulated clients send), or `all`. The split needs params.yaml's
    `data.bootstrap_fraction` and `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    frame = pd.DataFrame(digits.data.astype(np.float32), columns=[f"pixel{i}" for i in range(64)])
    frame.insert(0, LABEL, digits.target.astype(np.int64))
    if part == "all":
        return frame
    if part not in {"bootstrap", "stream"}:
        raise ValueError(f"unknown digits part {part!r}: use all, bootstrap or stream")
    if fraction is None or seed is None:
        raise ValueError(f"the digits {part} part needs the bootstrap fraction and the seed")
    boot, stream = train_test_split(
        frame, train_size=fraction, stratify=frame[LABEL], random_state=seed
    )
    return (boot if part == "bootstrap" else stream).reset_index(drop=True)


def read_table(path: Path, max_bytes: int = MAX_INGEST_BYTES) -> pd.DataFrame:
    """Read one CSV or Parquet file, turning every way it can be unreadable into DataFileError."""
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataFileError(f"{path}: the file is empty")
    if size > max_bytes:
        raise DataFileError(
            f"{path}: {size:,} bytes is over the ingest limit of {max_bytes:,} "
            "(MLOPS_MAX_INGEST_BYTES); split the file or raise the limit"
        )
    kind = _table_kind(path)
    if kind == "parquet":
        return _read_parquet(path, max_bytes)
    if kind == "csv":
        return _read_csv(path)
    if kind in {"csv.gz", "zip"}:
        return _read_compressed(path, kind, max_bytes)
    raise DataFileError(
        f"{path}: unsupported file type {path.suffix.lower()!r} "
        "(use .csv, .csv.gz, .zip with one CSV, or .parquet)"
    )


def _table_kind(path: Path) -> str | None:
    """csv, parquet, csv.gz or zip (one CSV inside); None for anything else."""
    name = path.name.lower()
    for kind in ("csv.gz", "csv", "parquet", "pq", "zip"):
        if name.endswith("." + kind):
            return "parquet" if kind == "pq" else kind
    return None


def _read_compressed(path: Path, kind: str, max_bytes: int) -> pd.DataFrame:
    """A gzipped CSV, or a zip archive holding one CSV: decompressed into a temporary file
    (at most `max_bytes`: a decompression bomb is refused, not unpacked), then read as CSV.
    Errors name the archive, not the temporary file."""
    with tempfile.TemporaryDirectory(prefix="mlops-unpack-") as tmp:
        csv = Path(tmp) / "data.csv"
        try:
            if kind == "csv.gz":
                with gzip.open(path, "rb") as src:
                    _copy_bounded(src, csv, max_bytes, path)
            else:
                with zipfile.ZipFile(path) as archive:
                    inside = [
                        m
                        for m in archive.infolist()
                        if not m.is_dir()
                        and m.filename.lower().endswith(".csv")
                        and not m.filename.startswith("__MACOSX/")
                    ]
                    if len(inside) != 1:
                        raise DataFileError(
                            f"{path}: a zip source must hold exactly one .csv file, "
                            f"it holds {len(inside)}"
                        )
                    with archive.open(inside[0]) as src:
                        _copy_bounded(src, csv, max_bytes, path)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataFileError(f"{path}: not a readable {kind} file ({exc})") from exc
        if csv.stat().st_size == 0:
            raise DataFileError(f"{path}: the file is empty once decompressed")
        try:
            return _read_csv(csv)
        except DataFileError as exc:
            raise DataFileError(str(exc).replace(str(csv), f"{path} (decompressed)")) from exc


def _copy_bounded(src, dst: Path, max_bytes: int, origin: Path) -> None:
    written = 0
    with dst.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                raise DataFileError(
                    f"{origin}: over {max_bytes:,} bytes once decompressed "
                    "(MLOPS_MAX_INGEST_BYTES); split the file or raise the limit"
                )
            out.write(chunk)


# Bounds checked before a file is read (a compressed Parquet file of a few MB can declare
# tens of millions of rows; a 16 MB CSV can have a million columns).
MAX_INGEST_COLUMNS = 100_000


def _read_parquet(path: Path, max_bytes: int = MAX_INGEST_BYTES) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    _check_width(path, meta.num_columns)
    decoded = meta.num_rows * meta.num_columns * 8  # float64 cells once in pandas
    if decoded > 2 * max_bytes:
        raise DataFileError(
            f"{path}: declares {meta.num_rows:,} rows x {meta.num_columns:,} columns, "
            f"~{decoded:,} bytes once decoded, over twice the ingest limit of {max_bytes:,} "
            "(MLOPS_MAX_INGEST_BYTES); split the file or raise the limit"
        )
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from exc


def _check_width(path: Path, columns: int) -> None:
    if columns > MAX_INGEST_COLUMNS:
        raise DataFileError(
            f"{path}: {columns:,} columns, over the limit of {MAX_INGEST_COLUMNS:,}; "
            "a dataset is a label and its features"
        )


def _header_columns(path: Path) -> int:
    """Columns of a CSV's header line, counted in chunks (never one huge line in memory)."""
    commas = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            end = chunk.find(b"\n")
            commas += chunk.count(b",", 0, end if end >= 0 else len(chunk))
            if end >= 0 or commas > MAX_INGEST_COLUMNS:
                break
    return commas + 1


def _read_csv(path: Path) -> pd.DataFrame:
    _check_width(path, _header_columns(path))
    _check_not_truncated(path)
    try:
        frame = pd.read_csv(path, encoding="utf-8", low_memory=False)
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataFileError(f"{path}: no header row: the file holds no CSV data") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataFileError(f"{path}: not a valid CSV file ({exc})") from exc
    if frame.empty:
        raise DataFileError(f"{path}: a header but no data rows")
    return frame


def _check_not_truncated(path: Path) -> None:
    """A CSV cut off mid-row (a broken copy) is refused whole rather than half-trusted."""
    with path.open("rb") as fh:
        head = fh.readline()
        fh.seek(max(0, path.stat().st_size - 65536))
        tail = fh.read()
    if tail.endswith(b"\n"):
        return
    last = tail.rsplit(b"\n", 1)[-1]
    if last.count(b",") < head.count(b","):
        line = sum(1 for _ in path.open("rb"))
        raise DataFileError(
            f"{path}: truncated: line {line} ends mid-row "
            f"({last.count(b',') + 1} of {head.count(b',') + 1} fields, no final newline)"
        )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    """A snapshot name is a plain file name: never a path that could leave data/raw."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise DataFileError(
            f"snapshot name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(a name, not a path)"
        )
    return name


def source_files(source: Path) -> list[Path]:
    """The files to read. A symbolic link is followed only when it points inside the
    directory it was found in (a link in a data folder to a system file is refused, and
    nothing of that file is read)."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and _table_kind(p))
        if not files:
            raise DataFileError(f"{source}: directory holds no .csv or .parquet files")
        for file in files:
            _check_link(file, source)
        return files
    _check_link(source, source.parent)
    return [source]


def _check_link(path: Path, home: Path) -> None:
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(home.resolve()):
        raise DataFileError(
            f"{path}: a symbolic link to a file outside {home}; "
            "pass the real file's path if you mean to read it"
        )


def load_source(
    source: str, params: Params, max_bytes: int = MAX_INGEST_BYTES
) -> list[tuple[str, pd.DataFrame]]:
    """(name, frame) per input file of the source; the built-in digits come whole (all
    1,797 images: `mlops run` holds its production stream out of them, pipeline/stream.py)."""
    if source == "digits":
        return [("digits", load_digits_frame("all"))]
    path = Path(source)
    if not path.exists():
        raise DataFileError(f"{source}: no such file or directory (or use the built-in 'digits')")
    return [(str(p), read_table(p, max_bytes)) for p in source_files(path)]


# Sources up to this size in all are read once before a flow starts (`check_source`)
CHECK_BYTES = 16 << 20


def check_source(source: str, max_bytes: int = MAX_INGEST_BYTES) -> None:
    """Raise the DataFileError that ingesting `source` would raise, where it is cheap to
    find out first: `mlops run` calls this before Prefect's temporary server starts (10-20 s
    on a small machine), so a mistyped path or a broken file fails at once. A missing path
    or a directory without tables is found whatever the size; the files themselves are
    read (and parsed as ingest will) when they hold at most CHECK_BYTES in all, so a large
    source is not read twice."""
    if source in ("digits", "mnist"):
        return
    path = Path(source)
    if not path.exists():
        raise DataFileError(f"{source}: no such file or directory (or use the built-in 'digits')")
    files = source_files(path)
    if sum(f.stat().st_size for f in files) <= CHECK_BYTES:
        for file in files:
            read_table(file, max_bytes)


def validate_sources(
    frames: list[tuple[str, pd.DataFrame]],
    num_classes: int,
    schema: Schema | None = None,
    current: tuple[str, ...] | None = None,
) -> tuple[Schema, pd.DataFrame, pd.DataFrame, list[ValidationReport]]:
    """Validate every file against one schema (the given one, or the first file's, which
    keeps the `current` data version's features where it has them all)."""
    clean, quarantined, reports = [], [], []
    for name, frame in frames:
        try:
            columns = [str(c) for c in frame.columns]
            schema = schema or infer_schema(columns, num_classes, current)
            result = validate_frame(frame, schema, name)
        except SchemaError as exc:
            raise DataFileError(f"{name}: {exc}") from exc
        for column in result.report.extra_columns:
            log.warning("%s: extra column %r dropped", name, column)
        if result.report.rows_quarantined:
            log.warning(
                "%s: %d of %d rows quarantined (%s)",
                name,
                result.report.rows_quarantined,
                result.report.rows_in,
                result.report.summary(),
            )
        clean.append(result.clean)
        quarantined.append(result.quarantine)
        reports.append(result.report)
    assert schema is not None
    return schema, pd.concat(clean, ignore_index=True), pd.concat(quarantined), reports


def ingest(
    source: str,
    raw_dir: Path,
    quarantine_dir: Path,
    params: Params,
    name: str | None = None,
    schema: Schema | None = None,
    max_bytes: int = MAX_INGEST_BYTES,
    keep: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    allow_schema_change: bool = False,
    download_dir: Path | None = None,
) -> IngestReport:
    """Read, validate and snapshot a source as `raw_dir/<name>.parquet` (callers pass
    `settings.max_ingest_bytes`).

    `keep`, when given, takes the whole validated source and returns the part to snapshot
    (the loop holds out its production stream this way, pipeline/stream.py).

    A source whose columns or value scale differ from the snapshot it would replace is
    refused unless `allow_schema_change`; an allowed change is recorded in the report.

    `mnist` is downloaded once into `download_dir`; its official test split is validated
    too and written beside the snapshot (`<name>.test.parquet`, see `fixed_test_path`).

    This reads the source into memory; `pipeline.stages.ingest` streams sources larger than
    `data.streaming_above_rows` instead."""
    name = check_name(name or params.data.name)
    fixed_test: pd.DataFrame | None = None
    if source == "mnist":
        frames, fixed_test = _mnist(download_dir)
    else:
        frames = load_source(source, params, max_bytes)
    contents = content_hash(frame for _, frame in frames)
    # a file with more columns than the current data version keeps its features (the rest
    # are extra columns, dropped), unless a change of schema was asked for
    current = None if allow_schema_change else current_features(raw_dir / f"{name}.parquet")
    schema, clean, quarantine, reports = validate_sources(
        frames, params.data.num_classes, schema, current
    )
    if clean.empty:
        raise DataFileError(f"{source}: no valid rows; {why_refused(reports)}")
    snapshot = raw_dir / f"{name}.parquet"
    test_path = fixed_test_path(snapshot)
    if fixed_test is not None:
        _, fixed_test, bad_test, _ = validate_sources(
            [("mnist:test", fixed_test)], params.data.num_classes, schema
        )
        quarantine = pd.concat([quarantine, bad_test])
    change = allowed_change(source, schema_change(snapshot, clean, schema), allow_schema_change)
    if keep is not None:
        clean = keep(clean)
    # Always written, so the dvc.yaml stage has one fixed set of outputs: a source without an
    # official test split gets an empty one (its test split is then carved from the data).
    write_parquet_atomic(clean.iloc[:0] if fixed_test is None else fixed_test, test_path)
    write_parquet_atomic(clean, snapshot)
    safe = neutralise_formulas(quarantine)
    write_atomic(quarantine_dir / f"{name}.csv", lambda p: safe.to_csv(p, index=False))
    report = IngestReport(
        source=source,
        snapshot=str(snapshot),
        data_hash=file_md5(snapshot),
        schema=schema.to_dict(),
        rows_in=sum(r.rows_in for r in reports),
        rows_ok=len(clean),
        rows_quarantined=len(quarantine),
        files=[r.to_dict() for r in reports],
        source_hash=contents,
        schema_change=change,
        fixed_test_rows=0 if fixed_test is None else len(fixed_test),
    )
    log.info(
        "ingested %s: %d rows kept, %d quarantined -> %s (md5 %s)",
        source,
        report.rows_ok,
        report.rows_quarantined,
        snapshot,
        report.data_hash,
    )
    return report


def fixed_test_path(snapshot: Path) -> Path:
    """Where a snapshot's official test split lives (zero rows when its source has none)."""
    return snapshot.with_name(snapshot.name.removesuffix(".parquet") + ".test.parquet")


def read_fixed_test(snapshot: Path) -> pd.DataFrame | None:
    path = fixed_test_path(snapshot)
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    return frame if len(frame) else None


def _mnist(download_dir: Path | None) -> tuple[list[tuple[str, pd.DataFrame]], pd.DataFrame]:
    from pipeline.mnist import MnistUnavailable, load_mnist

    if download_dir is None:
        raise DataFileError("mnist: no download directory given")
    try:
        train, test = load_mnist(download_dir / "mnist")
    except MnistUnavailable as exc:
        raise DataFileError(f"mnist: {exc}") from exc
    except ValueError as exc:  # a cached file that is not what it claims
        raise DataFileError(f"mnist: {exc}") from exc
    return [("mnist:train", train)], test


def current_features(snapshot: Path) -> tuple[str, ...] | None:
    """The feature columns of the data version at `snapshot` (None: there is none)."""
    import pyarrow.parquet as pq

    if not snapshot.exists():
        return None
    return tuple(n for n in pq.ParquetFile(snapshot).schema_arrow.names if n != LABEL)


def schema_change(snapshot: Path, clean: pd.DataFrame, schema: Schema) -> str:
    """How a new source differs from the snapshot it would replace ("" when it does not):
    other feature columns, or values on another scale (the largest absolute value four times
    smaller or larger: 0-1 pixels replacing 0-255 ones). Reads only the snapshot's schema
    and its Parquet column statistics."""

    def peak() -> float:
        features = clean.loc[:, list(schema.feature_names)].to_numpy(np.float32)
        return float(np.abs(features).max()) if len(clean) else 0.0

    return change_from(snapshot, schema, peak)


def allowed_change(source: str, change: str, allow: bool) -> str:
    """The change, when allowed (logged); refused with what to do otherwise."""
    if change and not allow:
        raise DataFileError(
            f"{source}: {change}; pass --allow-schema-change to replace the current data "
            "version with it"
        )
    if change:
        log.warning("%s: %s (allowed)", source, change)
    return change


def change_from(snapshot: Path, schema: Schema, new_peak: float | Callable[[], float]) -> str:
    """`schema_change` given the new data's largest absolute feature value, or how to get it
    when it is needed (the streaming ingest keeps it as it goes)."""
    import pyarrow.parquet as pq

    if not snapshot.exists():
        return ""
    meta = pq.ParquetFile(snapshot)
    old = [n for n in meta.schema_arrow.names if n != LABEL]
    new = list(schema.feature_names)
    if old != new:
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        detail = f"{len(new)} feature columns where the current data has {len(old)}"
        if gone or added:
            detail += f" (missing {_preview(gone)}; new {_preview(added)})"
        return detail
    old_peak = _peak(meta, old)
    new_peak = new_peak() if callable(new_peak) else new_peak
    if old_peak and new_peak and not 0.25 <= new_peak / old_peak <= 4:
        return f"values up to {new_peak:g} where the current data goes up to {old_peak:g}"
    return ""


def _peak(meta, names: list[str]) -> float:
    """The largest absolute value of the columns, from the row-group statistics."""
    wanted = set(names)
    peak = 0.0
    for g in range(meta.metadata.num_row_groups):
        group = meta.metadata.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            stats = column.statistics
            if column.path_in_schema in wanted and stats is not None and stats.has_min_max:
                peak = max(peak, abs(float(stats.min)), abs(float(stats.max)))
    return peak


def _preview(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit]) or "none"
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def content_hash(frames: Iterable[pd.DataFrame]) -> str:
    """An md5 of tables' columns and values (not of their file format): the same data read
    from a CSV or a Parquet file hashes the same."""
    digest = hashlib.md5()
    for frame in frames:
        digest.update("\x1f".join(map(str, frame.columns)).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`.

    The file gets the mode an ordinary write would (0666 less the umask), not mkstemp's 0600:
    data outputs are shared with DVC, other users and containers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    write_atomic(path, lambda p: pq.write_table(table, p, compression="zstd"))


def write_json_atomic(data: dict, path: Path) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def file_md5(path: Path) -> str:
    """MD5 of the file's bytes: the hash DVC 3 records for a file output."""
    import hashlib

    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """The quarantine CSV is opened in spreadsheets: a text cell that a spreadsheet would
    run as a formula (`=cmd|' /C calc'!A0`, `+`, `-`, `@`, tab or CR first) gets a leading
    `'`, as OWASP recommends for CSV injection. Numbers, negative ones included, are kept."""
    out = frame.rename(
        columns=lambda c: "'" + c if isinstance(c, str) and c.startswith(_FORMULA_START) else c
    )
    for column in out.columns:
        values = out[column]
        if pd.api.types.is_numeric_dtype(values.dtype):
            continue
        text = values.map(lambda v: isinstance(v, str) and v.startswith(_FORMULA_START))
        if not text.any():
            continue
        numeric = pd.to_numeric(values.where(text), errors="coerce").notna()
        risky = text & ~numeric
        out.loc[risky, column] = "'" + values[risky].astype(str)
    return out
