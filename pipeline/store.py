"""The prediction log: every served row, and the ground truth that arrives for it later.

SQLAlchemy Core over SQLite (WAL mode) by default, PostgreSQL when
`MLOPS_PREDICTION_DB_URL` names one. Inserts are idempotent on the prediction id
(`ON CONFLICT DO NOTHING`), so a retried client id is never logged twice, whichever
server worker receives the retry.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pipeline.config import DataParams

log = logging.getLogger(__name__)

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    # The row as the model received it and its output: little-endian float32 arrays (compact,
    # and cheap to write on the request path), the row one byte a value where its request's
    # values were all whole numbers 0-255 (at least BYTE_ROWS_FROM of them;
    # `encode_features`); `decode_array` turns either back into float32 numbers.
    sa.Column("features", sa.LargeBinary, nullable=False),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("probabilities", sa.LargeBinary, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("true_label", sa.Integer, nullable=True),
    sa.Column("labelled_at", sa.Float(precision=53), nullable=True),
    # Only labelled rows enter this index: a prediction is logged unlabelled, so its insert
    # does not touch it (one B-tree fewer per commit: ~18% less SQLite work on small groups).
    # The feedback pull's `labelled_at > ?` implies the condition, so both databases use it.
    sa.Index(
        "ix_predictions_labelled",
        "labelled_at",
        sqlite_where=sa.text("labelled_at IS NOT NULL"),
        postgresql_where=sa.text("labelled_at IS NOT NULL"),
    ),
)
_OLD_INDEXES = ("ix_predictions_labelled_at",)  # replaced above; dropped from older logs

# The server's requests whose ids it made itself (SQLite): one record a request, not one a
# row. Row k's id is `prefix` + k in four hex digits (`new_ids`), so an id still finds its
# row (one lookup in the prefix index), and a commit writes three B-tree entries a request
# instead of three a row (a 64-row request 130 against 202 us of CPU, checkpoints included).
# A row gets a record of its own in `predictions` when its label arrives (`add_labels`),
# so what reads labelled rows reads that table alone; the view `prediction_rows` shows both.
prediction_requests = sa.Table(
    "prediction_requests",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prefix", sa.String(28), nullable=False, unique=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("n_rows", sa.Integer, nullable=False),
    sa.Column("features", sa.LargeBinary, nullable=False),  # n_rows rows, `encode_features`
    sa.Column("feature_bytes", sa.Integer, nullable=False),  # one row's share of it
    sa.Column("labels", sa.Text, nullable=False),  # JSON array, one label a row
    sa.Column("probabilities", sa.LargeBinary, nullable=False),  # (n_rows, c) float32
    sa.Column("probability_bytes", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)
ROW_DIGITS = 4  # hex digits of a row's index at the end of a generated id
# The rows kept in requests alone (the readers query it and `predictions` apart, each in
# its created_at index's order up to the limit, and merge: a view of the two together
# would be sorted whole for every ORDER BY ... LIMIT).
request_rows = sa.Table(
    "prediction_request_rows",
    sa.MetaData(),
    *(sa.Column(c.name, c.type) for c in predictions.columns),
)
_ROW_ID = "r.prefix || printf('%04x', j.key)"
_VIEW_SQL = (
    "CREATE VIEW IF NOT EXISTS prediction_request_rows AS "
    f"SELECT {_ROW_ID} AS id, r.created_at AS created_at, r.model_name AS model_name, "
    "r.model_version AS model_version, "
    "substr(r.features, j.key * r.feature_bytes + 1, r.feature_bytes) AS features, "
    "j.value AS label, "
    "substr(r.probabilities, j.key * r.probability_bytes + 1, r.probability_bytes) "
    "AS probabilities, r.latency_ms AS latency_ms, NULL AS true_label, NULL AS labelled_at "
    "FROM prediction_requests AS r, json_each(r.labels) AS j "
    f"WHERE NOT EXISTS (SELECT 1 FROM predictions AS p WHERE p.id = {_ROW_ID})",
    "CREATE VIEW IF NOT EXISTS prediction_rows AS "
    "SELECT id, created_at, model_name, model_version, features, label, probabilities, "
    "latency_ms, true_label, labelled_at FROM predictions "
    "UNION ALL SELECT * FROM prediction_request_rows",
)
_UNIT_SQL = (
    "INSERT INTO prediction_requests (prefix, created_at, model_name, model_version, n_rows, "
    "features, feature_bytes, labels, probabilities, probability_bytes, latency_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (prefix) DO NOTHING"
)
_UNITS_PER_STATEMENT = 90  # 11 parameters a record: under the 999 of SQLite before 3.32


@functools.lru_cache(maxsize=_UNITS_PER_STATEMENT)
def _units_sql(count: int) -> str:
    """`_UNIT_SQL` for `count` records in one statement (one VALUES list each)."""
    head, values = _UNIT_SQL.split(" VALUES ")
    one, tail = values.split(" ON CONFLICT ")
    return f"{head} VALUES {', '.join([one] * count)} ON CONFLICT {tail}"


drift_reports = sa.Table(
    "drift_reports",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("report", sa.Text, nullable=False),  # JSON
)


# What a challenger answered in shadow for a served prediction (serving/shadow.py): the
# champion's answer is in `predictions` under the same id, so agreement and, once the label
# arrives there, both versions' accuracy on the same rows are one join away.
shadow_predictions = sa.Table(
    "shadow_predictions",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(32), primary_key=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False, index=True),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("probabilities", sa.LargeBinary, nullable=False),
)
SHADOW_COLUMNS = ("id", "model_version", "model_name", "created_at", "label", "probabilities")

# A row's label before each overwrite (`add_labels(overwrite=True)`), keyed by the new
# label's stamp: what a reader that counted the old label must take back. The server's
# shadow figures (serving/shadow.py) read it beside the labelled rows.
label_history = sa.Table(
    "label_history",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("labelled_at", sa.Float(precision=53), primary_key=True),
    sa.Column("previous_label", sa.Integer, nullable=False),
    sa.Column("previous_labelled_at", sa.Float(precision=53), nullable=False),
)

# The monitor's performance figures per model version and window (pipeline/performance.py),
# newest last; the server's /metrics shows the latest.
performance_reports = sa.Table(
    "performance_reports",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("report", sa.Text, nullable=False),  # JSON: a list of windows
)

# Canary rollouts (pipeline/rollout.py): every server process of a deployment reads the
# running one from here, so the split, the guard rails and the decision are shared.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False, index=True),
    sa.Column("candidate", sa.String(32), nullable=False),
    sa.Column("champion", sa.String(32), nullable=True),
    sa.Column("fraction", sa.Float, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # running | promoted | aborted
    sa.Column("started_at", sa.Float(precision=53), nullable=False),
    sa.Column("ended_at", sa.Float(precision=53), nullable=True),
    sa.Column("guards", sa.Text, nullable=False),  # JSON: RolloutParams at the start
    sa.Column("reason", sa.Text, nullable=True),
)

# Requests a server could not answer with the version it routed them to (a canary that
# failed to load or raised): answered by the champion instead, and counted here so the
# guard rails of every process see the candidate's error rate.
serving_events = sa.Table(
    "serving_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
)


# Leases that serialise an operation across every process sharing this database (promotion
# and rollback: `pipeline.registry.champion_lock`). A holder that dies leaves a lease that
# expires; short transactions only, so the prediction log never waits on a lock holder.
locks = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(100), nullable=False),
    sa.Column("expires_at", sa.Float(precision=53), nullable=False),
)


class LockTimeout(RuntimeError):
    """Another process held the lease for longer than we were willing to wait."""


class StoreUnavailable(RuntimeError):
    """The prediction store cannot be written or read right now."""


class _LostRace(Exception):
    """A label compare-and-set found the row changed since it was read."""


COLUMNS = (
    "id",
    "created_at",
    "model_name",
    "model_version",
    "features",
    "label",
    "probabilities",
    "latency_ms",
)
ARRAY_COLUMNS = ("features", "probabilities")
# the tables `insert` writes: their columns in tuple order, and the conflict key
_INSERTS = {
    "predictions": (COLUMNS, "id"),
    "shadow_predictions": (SHADOW_COLUMNS, "id, model_version"),
}
_ROWS_PER_STATEMENT = 4000  # 8 parameters a row: under the 32,766 variables SQLite allows


class GeneratedIds(list):
    """The ids `new_ids` made for one request: row k's is `prefix` + k in ROW_DIGITS hex
    digits. The store keeps such a request as one record (`prediction_requests`); a list
    of ids from anywhere else (a client's, a file's) is logged row by row."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str, n: int) -> None:
        super().__init__([f"{prefix}{k:04x}" for k in range(n)])
        self.prefix = prefix


@dataclass(slots=True)
class LoggedRequest:
    """One request's rows as the server logs them: every row shares the request's time,
    model and latency; `features` and `probabilities` are (n, k) float32 arrays."""

    ids: list[str]
    created_at: float
    model_name: str
    model_version: str
    features: np.ndarray
    labels: list[int]
    probabilities: np.ndarray
    latency_ms: float
    # False: logged as rows even with ids new_ids made (a shadow's figures join rows by id)
    whole: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[tuple]:
        """The rows as `PredictionStore.insert` takes them (COLUMNS order)."""
        head = (self.created_at, self.model_name, self.model_version)
        return [
            (i, *head, f, label, p, self.latency_ms)
            for i, f, label, p in zip(
                self.ids,
                encode_feature_rows(self.features),
                self.labels,
                encode_rows(self.probabilities),
                strict=True,
            )
        ]

    def parts(self, rows: int) -> list[LoggedRequest]:
        """This request cut into requests of at most `rows` rows."""
        if len(self.ids) <= rows:
            return [self]
        return [
            LoggedRequest(
                self.ids[i : i + rows],
                self.created_at,
                self.model_name,
                self.model_version,
                self.features[i : i + rows],
                self.labels[i : i + rows],
                self.probabilities[i : i + rows],
                self.latency_ms,
            )
            for i in range(0, len(self.ids), rows)
        ]

    def without(self, ids: set[str]) -> LoggedRequest:
        """This request less the rows of `ids`."""
        keep = [k for k, pid in enumerate(self.ids) if pid not in ids]
        return LoggedRequest(
            [self.ids[k] for k in keep],
            self.created_at,
            self.model_name,
            self.model_version,
            self.features[keep],
            [self.labels[k] for k in keep],
            self.probabilities[keep],
            self.latency_ms,
        )

    def unit_parameters(self) -> tuple | None:
        """`_UNIT_SQL`'s parameters, where the request is kept as one record (its ids are
        the `GeneratedIds` of one request, and it is no larger than one statement's rows);
        else None."""
        prefix = getattr(self.ids, "prefix", None)
        if prefix is None or not self.whole or len(self.ids) > _ROWS_PER_STATEMENT:
            return None
        head = (prefix, self.created_at, self.model_name, self.model_version, len(self.ids))
        return head + self._payload()

    def _payload(self) -> tuple:
        """The values both statements end with: the blobs, row widths, labels, latency."""
        probabilities = np.ascontiguousarray(self.probabilities, dtype="<f4")
        if not len(self.features) == len(probabilities) == len(self.labels) == len(self.ids):
            raise ValueError("a logged request needs one id, row, label and output per row")
        return (
            *encode_features(self.features),
            orjson.dumps(self.labels).decode(),
            probabilities.tobytes(),
            probabilities.shape[1] * 4,
            self.latency_ms,
        )

    def parameters(self) -> tuple:
        """`_REQUEST_SQL`'s parameters: ten values, whatever the number of rows."""
        ids = orjson.dumps(self.ids).decode()
        return (ids, self.created_at, self.model_name, self.model_version) + self._payload()


def _sqlite_file(url: sa.engine.URL) -> str | None:
    """The file an SQLite URL opens, also when spelled as a URI (`sqlite:///file:log.db?
    uri=true`); None for an in-memory database (`sqlite://`, `:memory:`, `mode=memory`)."""
    database = url.database or ""
    if database.startswith("file:") and url.query.get("uri") in ("true", "1"):  # else a name
        if url.query.get("mode") == "memory":
            return None
        database = urllib.parse.unquote(database[len("file:") :].split("?", 1)[0])
        if database.startswith("//"):  # file://host/path: the host is empty or localhost
            database = "/" + database[2:].partition("/")[2]
    if not database or database == ":memory:":
        return None
    return os.path.abspath(database)


@functools.cache
def _has_json_each() -> bool:
    """The request records' rows are read through json_each (JSON1: built in since SQLite
    3.38, and in nearly every build before); without it every request is logged as rows."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("SELECT count(*) FROM json_each('[1]')")
        return True
    except sqlite3.Error:
        return False


# SQLite 3.38 made JSON functions and `->>` part of every build: an older library (Ubuntu
# 22.04 ships 3.37) logs the rows themselves
REQUEST_STATEMENTS = sqlite3.sqlite_version_info >= (3, 38)
# One request's rows in one statement (SQLite): json_each walks the ids, and each row's
# features and probabilities are cut from the request's blobs at the row's index (`substr`
# counts bytes in a blob). Rows equal to `insert`'s, skipped the same way on a known id.
_REQUEST_SQL = (
    "INSERT INTO predictions (id, created_at, model_name, model_version, features, label, "
    "probabilities, latency_ms) "
    "SELECT j.value, ?2, ?3, ?4, substr(?5, j.key * ?6 + 1, ?6), ?7 ->> j.key, "
    "substr(?8, j.key * ?9 + 1, ?9), ?10 FROM json_each(?1) AS j WHERE true "
    "ON CONFLICT (id) DO NOTHING"
)
# Rows per chunk of the large reads (the feedback pull, the drift check) where no params are
# at hand: params.data.chunk_rows' default, from the one place it is set.
CHUNK_ROWS: int = DataParams.model_fields["chunk_rows"].default


@dataclass
class LabelOutcome:
    id: str
    status: str  # labelled | unchanged | overwritten | conflict | unknown_id | invalid_label
    detail: str = ""


class PredictionStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = sa.engine.make_url(url).get_backend_name()
        kwargs: dict = {}
        if self.dialect == "sqlite":  # a local file: no stale connections to ping for
            kwargs["connect_args"] = {"timeout": 10, "check_same_thread": False}
        elif self.dialect == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 3}
            kwargs["pool_pre_ping"] = True  # a restarted server leaves dead pooled connections
        self.engine = sa.create_engine(url, **kwargs)
        self._sql_cache: dict[tuple[str, int], str] = {}
        self._insert_conn = None  # the DBAPI connection `insert` keeps (opened on first use)
        self._insert_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._written = threading.Event()  # set by each insert: the WAL has new pages
        self._unsynced = 0  # bytes of arrays committed since the last checkpoint began
        # SQLite: a checkpoint has copied the whole WAL back, so the next commit starts the
        # WAL over and syncs its header to disk (0.2 ms here, several ms at times): such a
        # commit is better made off the event loop (serving.runtime.LogWriter)
        self.wal_restart_pending = False
        self._dbapi_error = self.engine.dialect.loaded_dbapi.Error
        # requests the server named kept as one record each (SQLite with json_each); the
        # readers of every logged row then read those records' rows too (`_tables`)
        self.units = self.dialect == "sqlite" and _has_json_each()
        self._path: str | None = None  # SQLite: the file every reader of the URL opens
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file we write
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self._path = _sqlite_file(sa.engine.make_url(url))

    def create(self) -> PredictionStore:
        """Create the tables if missing (safe to call from several threads and processes at
        once: one of this store's threads at a time, and a table another process created
        first is taken as made)."""
        with self._create_lock:
            for attempt in range(5):
                try:
                    metadata.create_all(self.engine)
                    with self.engine.begin() as conn:  # a log made by an older release
                        for index in predictions.indexes:
                            index.create(conn, checkfirst=True)
                        for name in _OLD_INDEXES:
                            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
                        if self.units:
                            for view in _VIEW_SQL:
                                conn.exec_driver_sql(view)
                    return self
                except sa.exc.IntegrityError:  # PostgreSQL: another process at the same moment
                    time.sleep(0.2 * (attempt + 1))
                except sa.exc.OperationalError as exc:
                    if "already exists" not in str(exc):  # SQLite's way of that race
                        raise StoreUnavailable(
                            f"prediction store {self.safe_url}: {_short(exc)}"
                        ) from exc
                    time.sleep(0.05 * (attempt + 1))
                except sa.exc.SQLAlchemyError as exc:  # not a database, say
                    raise StoreUnavailable(
                        f"prediction store {self.safe_url}: {_short(exc)}"
                    ) from exc
        return self

    @property
    def safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def insert(
        self, rows: Sequence[tuple], table: str = "predictions", blocking: bool = True
    ) -> int | None:
        """Insert rows (tuples in COLUMNS order, arrays already encoded), skipping ids
        already stored; returns how many were new. Committed when it returns.

        The server's hot path, so it bypasses the engine: one DBAPI connection kept open
        for inserts, in autocommit mode, and one multi-row statement per 4,000 rows (most
        of the writer's groups fit in one; larger ones get an explicit transaction).
        SQLAlchemy's checkout, begin and reset cost ~200 us per commit, all of it holding
        the GIL the event loop needs. `table="shadow_predictions"` takes SHADOW_COLUMNS
        tuples the same way (the log writer commits a shadow's answers too). With
        `blocking=False`, None at once when another thread is inserting.
        """
        if not rows:
            return 0
        size = len(rows) * sum(len(v) for v in rows[0] if isinstance(v, bytes))
        return self._committed(lambda: self._insert_once(rows, table), blocking, size)

    def insert_requests(
        self, requests: Sequence[LoggedRequest], blocking: bool = True
    ) -> int | None:
        """`insert` for the server's log: whole requests, not rows. On SQLite a request
        whose ids `new_ids` made is one record (`prediction_requests`, `_UNIT_SQL`), and
        any other is one statement that SQLite itself cuts into rows (`_REQUEST_SQL`): its
        features and probabilities bound as one blob each and its ids and labels as one
        JSON array each (a 64-row request 204-214 against 247-255 us as 512 bound values).
        Several requests are one transaction, their records one statement per size. The
        same rows as `insert` makes of `LoggedRequest.rows()`, which PostgreSQL takes, and
        an SQLite older than 3.38 for the requests it does not keep whole; a request over
        _ROWS_PER_STATEMENT rows is cut into several statements, one whose ids hold a NUL
        goes in as rows, and a client's id that names a row already kept in a request
        record is skipped."""
        if not requests:
            return 0
        if not self.units:
            return self.insert(
                [r for request in requests for r in request.rows()], "predictions", blocking
            )
        size = sum(r.features.nbytes + r.probabilities.nbytes for r in requests)
        return self._committed(lambda: self._insert_requests_once(requests), blocking, size)

    def _committed(self, write, blocking: bool, size: int = 0) -> int | None:
        """`write()` on the kept insert connection, under the insert lock, retried once on a
        new connection if the kept one had died; the file checked after the commit. `size`
        (bytes of arrays) paces the checkpoints."""
        if not self._insert_lock.acquire(blocking):
            return None
        try:
            for attempt in (1, 2):
                reused = self._insert_conn is not None
                try:
                    new = self._write_when_free(write, blocking)
                    if new is _BUSY:
                        return None
                    self.wal_restart_pending = False
                    self._check_file()  # committed where a reader of the path finds it?
                    self._unsynced += size
                    self._written.set()
                    return new
                except (self._dbapi_error, sa.exc.SQLAlchemyError) as exc:
                    if _locked(exc):  # waited out BUSY_TIMEOUT_MS: the connection is fine
                        raise StoreUnavailable(
                            f"prediction store {self.safe_url}: {_short(exc)}"
                        ) from exc
                    self._drop_insert_conn()
                    # A kept connection may have died since its last use (a database
                    # restart): one retry on a new one, safe since inserts are idempotent.
                    if attempt == 2 or not reused:
                        raise StoreUnavailable(
                            f"prediction store {self.safe_url}: {_short(exc)}"
                        ) from exc
                except BaseException:
                    # Anything else (a value that cannot be bound, memory) may have struck
                    # inside a BEGIN: the connection goes, and its transaction with it, so
                    # no later commit is made into a transaction that never commits.
                    self._drop_insert_conn()
                    raise
        finally:
            self._insert_lock.release()
        raise AssertionError("unreachable")

    def _write_when_free(self, write, blocking: bool):
        """`write()` once SQLite's write lock is free. The insert connection never waits
        inside SQLite (its busy_timeout is 0, `_connection`): SQLite's own wait sleeps 1,
        2, 5 ms and more between its tries, while another worker's commit holds the lock
        for a fraction of a millisecond, and with `--workers 2` the event loop's inline
        commits slept with it. Non-blocking (the server's event loop): `_BUSY` at once, and
        the caller hands the rows to its writer thread. Blocking: tried again after 0.05
        ms, the pause doubling up to 5 ms (a long holder then costs a try every 5 ms, each
        a rebuilt statement on the GIL), for up to BUSY_TIMEOUT_MS, then the error (not
        retried on a new connection)."""
        pause, deadline = 0.00005, None
        while True:
            try:
                return write()
            except (self._dbapi_error, sa.exc.DBAPIError) as exc:
                if not _locked(exc):
                    raise
                self._leave_transaction()
                if not blocking:
                    return _BUSY
                now = time.monotonic()
                deadline = deadline or now + BUSY_TIMEOUT_MS / 1000
                if now >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.005)

    def _leave_transaction(self) -> None:
        conn = self._insert_conn and self._insert_conn.driver_connection
        if conn is not None and conn.in_transaction:
            conn.rollback()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path)
        except (OSError, TypeError):
            return None
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        """SQLite: the file at the configured path must still be the one we write into.
        Deleted or replaced while open, our connections would keep writing into a file no
        reader can find; so the rows of this commit are not acknowledged, the connections
        are dropped, the schema is made at the path again, and the next commit goes there."""
        if self._path is None or self._identity is None:
            return
        now = self._file_identity()
        if now == self._identity:
            return
        what = "deleted" if now is None else "replaced"
        self._drop_insert_conn()
        self.engine.dispose()
        self._identity = None
        log.error(
            "prediction store %s was %s while open: this commit is not acknowledged; "
            "reopening it at that path",
            self._path,
            what,
        )
        with contextlib.suppress(StoreUnavailable):  # else the next commit tries again
            self.create()
        raise StoreUnavailable(
            f"prediction store {self._path} was {what} while open; nothing of this request "
            "was kept; it has been reopened, retry"
        )

    def check_file(self) -> bool:
        """The timer's check (and the health check's): False once a change was handled."""
        with self._insert_lock:
            try:
                self._check_file()
            except StoreUnavailable:
                return False
        return True

    def _connection(self):
        """The DBAPI connection kept for inserts (opened on first use, autocommit)."""
        if self._insert_conn is None:
            self._insert_conn = self.engine.raw_connection()
            _autocommit(self._insert_conn.driver_connection, self.dialect)
            if self.dialect == "sqlite":  # its waits for a lock are `_write_when_free`'s
                self._insert_conn.driver_connection.execute("PRAGMA busy_timeout=0")
            if self._path is not None:
                self._identity = self._file_identity()
        return self._insert_conn.driver_connection

    def _insert_requests_once(self, requests: Sequence[LoggedRequest]) -> int:
        # everything that can fail outside the database is done before any BEGIN
        units, others = _unit_statements(requests)
        params, rows = _row_statements(others)
        # a client's ids that have the shape of the server's may name rows kept in a
        # request (a client that sends back the ids it was given): such rows are known
        suspects = [
            pid for r in others if not isinstance(r.ids, GeneratedIds) for pid in r.ids
            if len(pid) == 32
        ]  # fmt: skip
        conn = self._connection()
        cursor = conn.cursor()
        try:
            if not suspects and len(units) == 1 and not params and not rows:  # atomic
                sql, values, n = units[0]
                cursor.execute(sql, values)
                return max(cursor.rowcount, 0) * n
            if not suspects and len(params) == 1 and not rows and not units:
                cursor.execute(_REQUEST_SQL, params[0])
                return max(cursor.rowcount, 0)
            # IMMEDIATE: the write lock first (waiting out busy_timeout for another
            # worker's commit), since `_kept_ids` may read before anything is written, and
            # a read snapshot that another commit overtook cannot become a write
            cursor.execute("BEGIN IMMEDIATE")
            new = 0
            for sql, values, n in units:  # a known prefix (a retried commit) adds nothing
                cursor.execute(sql, values)
                new += max(cursor.rowcount, 0) * n
            known = _kept_ids(cursor, suspects) if suspects else set()
            if known:
                params, rows = _row_statements([r.without(known) for r in others])
            if params:
                cursor.executemany(_REQUEST_SQL, params)
                new += max(cursor.rowcount, 0)
            new += self._execute_rows(cursor, rows, "predictions")
            cursor.execute("COMMIT")
            return new
        finally:
            cursor.close()

    def _insert_once(self, rows: Sequence[tuple], table: str = "predictions") -> int:
        conn = self._connection()
        cursor = conn.cursor()
        try:
            if len(rows) <= _ROWS_PER_STATEMENT:
                # One statement in autocommit mode is its own atomic transaction: no BEGIN
                # and COMMIT round trips, and the writer thread gives up the GIL once per
                # group instead of three times (each time it must wait to get it back).
                return self._execute_rows(cursor, rows, table)
            cursor.execute("BEGIN")
            new = self._execute_rows(cursor, rows, table)
            cursor.execute("COMMIT")
            return new
        finally:
            cursor.close()

    def _execute_rows(self, cursor, rows: Sequence[tuple], table: str) -> int:
        """Rows as multi-row statements of at most _ROWS_PER_STATEMENT rows; the caller
        holds the transaction."""
        new, step = 0, _ROWS_PER_STATEMENT
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            cursor.execute(self._insert_sql(len(chunk), table), _flat(chunk))
            new += max(cursor.rowcount, 0)
        return new

    def _drop_insert_conn(self) -> None:
        conn, self._insert_conn = self._insert_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is broken already; never mask the cause
                conn.invalidate()

    def _insert_sql(self, n: int, table: str = "predictions") -> str:
        sql = self._sql_cache.get((table, n))
        if sql is None:
            columns, key = _INSERTS[table]
            mark = "?" if self.dialect == "sqlite" else "%s"
            one = "(" + ", ".join([mark] * len(columns)) + ")"
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                + ", ".join([one] * n)
                + f" ON CONFLICT ({key}) DO NOTHING"
            )
            self._sql_cache[(table, n)] = sql
        return sql

    def get(self, ids: Iterable[str]) -> dict[str, dict]:
        ids = list(ids)
        with self._read() as conn:
            rows = conn.execute(sa.select(predictions).where(predictions.c.id.in_(ids)))
            found = {r.id: _decoded(r) for r in rows}
            missing = [i for i in ids if i not in found]
            for pid, row in self._request_rows(conn, missing).items():
                found[pid] = {
                    **row,
                    **{c: decode_array(row[c]).tolist() for c in ARRAY_COLUMNS},
                }
            return found

    def _request_rows(self, conn, ids: Sequence[str]) -> dict[str, dict]:
        """The rows of `ids` kept in `prediction_requests`, as `predictions` rows (arrays
        still encoded, unlabelled); ids not made by `new_ids` are not looked for."""
        if not self.units:
            return {}
        wanted = _by_prefix(ids)
        out: dict[str, dict] = {}
        r = prediction_requests
        prefixes = list(wanted)
        for i in range(0, len(prefixes), 500):  # well under SQLite's bound on parameters
            stmt = sa.select(r).where(r.c.prefix.in_(prefixes[i : i + 500]))
            for req in conn.execute(stmt):
                labels = orjson.loads(req.labels)
                fb, pb = req.feature_bytes, req.probability_bytes
                for pid, k in wanted[req.prefix]:
                    if k >= req.n_rows:
                        continue
                    out[pid] = {
                        "id": pid,
                        "created_at": req.created_at,
                        "model_name": req.model_name,
                        "model_version": req.model_version,
                        "features": req.features[k * fb : (k + 1) * fb],
                        "label": labels[k],
                        "probabilities": req.probabilities[k * pb : (k + 1) * pb],
                        "latency_ms": req.latency_ms,
                        "true_label": None,
                        "labelled_at": None,
                    }
        return out

    def add_labels(
        self, labels: Sequence[tuple[str, int]], overwrite: bool = False
    ) -> list[LabelOutcome]:
        """Join ground-truth labels to logged predictions, all in one transaction.

        A different label for an already labelled id is a conflict; unless `overwrite`,
        any conflict leaves the whole request unapplied.
        """
        for attempt in range(1, 6):
            try:
                return self._add_labels_once(labels, overwrite)
            except _LostRace:
                # another request labelled one of these ids between the read and the write
                # (only where the read takes no lock): read again, decide again
                time.sleep(random.uniform(0, 0.002 * attempt))
                continue
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 5:  # SQLite's busy snapshot: retry
                    raise StoreUnavailable(
                        f"prediction store {self.safe_url}: {_short(exc)}"
                    ) from exc
                time.sleep(0.01 * attempt)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc
        raise StoreUnavailable(f"prediction store {self.safe_url}: labels kept changing under us")

    def _add_labels_once(
        self, labels: Sequence[tuple[str, int]], overwrite: bool
    ) -> list[LabelOutcome]:
        """One attempt. A first label is written only where the id is still unlabelled (or
        already has that label): a compare-and-set, so of two concurrent requests with
        different labels for one id exactly one wins and the other is told `conflict`."""
        ids = [i for i, _ in labels]
        now = time.time()
        with self.engine.begin() as conn:
            # Label requests are decided one at a time over the rows they touch: SQLite's
            # write lock is taken before the read (pysqlite would begin only at the first
            # write, so the read was no part of the transaction), PostgreSQL's rows are
            # locked in id order as they are read (no two requests lock in opposite
            # orders). Without it, overlapping requests read the same labels and all but
            # one lost the compare-and-set below, each retried at once: 2-9 of 640
            # requests of 16 threads answered 503, and two identical first labels both
            # answered `labelled` (and stamped the row twice). An in-memory database (one
            # connection for every checkout, the tests') keeps only the compare-and-set.
            if self.dialect == "sqlite" and self._path is not None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            read = sa.select(
                predictions.c.id,
                predictions.c.true_label,
                predictions.c.probabilities,
                predictions.c.labelled_at,
            ).where(predictions.c.id.in_(ids))
            if self.dialect != "sqlite":
                read = read.order_by(predictions.c.id).with_for_update()
            existing, classes, stamps = {}, {}, {}
            for r in conn.execute(read):
                existing[r.id] = r.true_label
                stamps[r.id] = r.labelled_at
                classes[r.id] = len(r.probabilities) // 4  # float32 per class it predicted
            # a row kept in its request is decided on like any other (unlabelled), and
            # gets a record of its own only when a label is written to it
            kept = self._request_rows(conn, [i for i in dict.fromkeys(ids) if i not in existing])
            for pid, row in kept.items():
                existing[pid] = None
                classes[pid] = len(row["probabilities"]) // 4
            outcomes, updates = _label_outcomes(labels, existing, overwrite, classes)
            if any(o.status == "conflict" for o in outcomes):
                return outcomes  # nothing applied
            # ON CONFLICT: another request may be copying the same row; the compare-and-
            # set below still decides between them
            records = [kept[pid] for pid in dict.fromkeys(pid for pid, _ in updates) if pid in kept]
            for i in range(0, len(records), 1000):  # 10 parameters a row, under SQLite's bound
                conn.execute(
                    sqlite_insert(predictions)
                    .values(records[i : i + 1000])
                    .on_conflict_do_nothing(index_elements=["id"])
                )
            status = {o.id: o.status for o in outcomes}
            changed = set()  # ids this request has updated already
            for pid, label in updates:
                stmt = (
                    predictions.update()
                    .where(predictions.c.id == pid)
                    .values(true_label=label, labelled_at=now)
                )
                if status[pid] == "labelled":  # only if nobody labelled it meanwhile
                    stmt = stmt.where(
                        sa.or_(
                            predictions.c.true_label.is_(None),
                            predictions.c.true_label == label,
                        )
                    )
                elif pid not in changed and existing[pid] is not None:
                    # an overwrite of the label read, only if nobody changed it meanwhile: the
                    # caller is told what it replaced, and label_history keeps it
                    stmt = stmt.where(predictions.c.true_label == existing[pid])
                changed.add(pid)
                if conn.execute(stmt).rowcount != 1:
                    raise _LostRace  # rolls the whole request back
            # the labels overwritten, once an id (the stored one, not one this request set)
            replaced = {
                pid: existing[pid]
                for pid, _ in updates
                if existing.get(pid) is not None and stamps.get(pid) is not None
            }
            if replaced:
                conn.execute(
                    label_history.insert(),
                    [
                        {
                            "id": pid,
                            "labelled_at": now,
                            "previous_label": old,
                            "previous_labelled_at": stamps[pid],
                        }
                        for pid, old in replaced.items()
                    ],
                )
            return outcomes

    @contextmanager
    def lock(self, name: str, ttl_s: float = 120.0, wait_s: float = 60.0):
        """Hold the lease `name` for the block: every process using this database waits
        its turn. A lease older than `ttl_s` (its holder died) is taken over."""
        holder = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait_s
        pause = 0.02
        while not self._try_lock(name, holder, ttl_s):
            if time.monotonic() > deadline:
                raise LockTimeout(f"{name} is held by another process (waited {wait_s:.0f} s)")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)
        try:
            yield
        finally:
            with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
                conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder))

    def _try_lock(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(locks.delete().where(locks.c.name == name, locks.c.expires_at < now))
                conn.execute(
                    locks.insert().values(name=name, holder=holder, expires_at=now + ttl_s)
                )
            return True
        except sa.exc.IntegrityError:
            return False  # held
        except sa.exc.OperationalError as exc:
            if "locked" in str(exc):
                return False  # SQLite busy: try again
            raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc

    def labelled_since(self, after: float, limit: int | None = None) -> list[dict]:
        """Labelled predictions with labelled_at > after, oldest first (the feedback pull)."""
        with self._read() as conn:
            return [_decoded(r) for r in conn.execute(labelled_query(after, limit))]

    def labelled_chunks(self, after: float, chunk_rows: int) -> Iterator[Sequence[sa.Row]]:
        """The rows `labelled_since` reads, as (id, features, true_label, labelled_at) with
        the features still encoded, in lists of at most `chunk_rows`: the feedback pull's
        read, its memory bounded by the chunk whatever the size of the log."""
        p = predictions
        stmt = labelled_query(after).with_only_columns(
            p.c.id, p.c.features, p.c.true_label, p.c.labelled_at
        )
        yield from self._chunks(stmt, chunk_rows)

    def count_labelled_since(self, after: float, upto: float | None = None) -> int:
        """How many rows `labelled_since(after)` would return, without reading them; with
        `upto`, only those labelled at or before it."""
        p = predictions
        stmt = (
            sa.select(sa.func.count())
            .select_from(p)
            .where(p.c.true_label.is_not(None), p.c.labelled_at > after)
        )
        if upto is not None:
            stmt = stmt.where(p.c.labelled_at <= upto)
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def labelled_stamps(self, after: float, upto: float) -> list[tuple[str, float]]:
        """(id, labelled_at) of the rows labelled after `after`, at or before `upto`."""
        p = predictions
        stmt = sa.select(p.c.id, p.c.labelled_at).where(
            p.c.true_label.is_not(None), p.c.labelled_at > after, p.c.labelled_at <= upto
        )
        with self._read() as conn:
            return [(r.id, float(r.labelled_at)) for r in conn.execute(stmt)]

    def recent(self, since: float = 0.0, limit: int = 100_000) -> list[dict]:
        def build(t: sa.Table) -> sa.Select:
            return sa.select(t).where(t.c.created_at > since).order_by(t.c.created_at).limit(limit)

        return [_decoded(r) for r in self._both(build, limit)]

    def logged_since(self, since: float) -> int:
        """How many rows were logged after `since` (epoch seconds), of any shape."""
        with self._read() as conn:
            return sum(
                int(
                    conn.execute(
                        sa.select(sa.func.count()).select_from(t).where(t.c.created_at > since)
                    ).scalar_one()
                )
                for t in self._tables()
            )

    def recent_arrays(
        self,
        since: float = 0.0,
        limit: int = 100_000,
        chunk_rows: int = CHUNK_ROWS,
        features: int | None = None,
        classes: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, probabilities) of the rows `recent` returns, as float32 arrays (n, k)
        and (n, c): the drift check's read. The rows are counted first, then decoded
        `chunk_rows` at a time straight into the output, the log's rows and its requests'
        rows merged by time as they come: what is held is the output (4 bytes a value, not
        a Python float) and a chunk of each table.

        `features` / `classes`: only the rows of that many feature values / probabilities
        (the current model's shape; a log holds rows of older models too, whose classes or
        features may have been others), chosen by the arrays' lengths in bytes. Without
        them, rows of several shapes are a ValueError."""
        # SQLite's two tables in one snapshot; PostgreSQL's one table may have more rows by
        # the time it is streamed than were counted: the read stops at the count
        with self._read() as conn:
            statements = [
                sa.select(t.c.created_at, t.c.features, t.c.probabilities)
                .where(t.c.created_at > since, *_shape_filter(t, features, classes, self.dialect))
                .order_by(t.c.created_at)
                .limit(limit)
                for t in self._tables()
            ]
            n = min(
                limit,
                sum(
                    int(conn.execute(sa.select(sa.func.count()).select_from(s.subquery())).scalar())
                    for s in statements
                ),
            )
            if n == 0:
                return np.empty((0, 0), np.float32), np.empty((0, 0), np.float32)
            # a chunk of each table is held beside the output: a small share of it
            chunk_rows = min(chunk_rows, max(1_024, n // 8))
            runs = [_Run(self._decoded_chunks(s, chunk_rows, conn)) for s in statements]
            return _merge_runs(runs, n)

    def _decoded_chunks(
        self, stmt: sa.Select, chunk_rows: int, conn: sa.Connection
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(created_at, features, probabilities) of `stmt`'s rows (those three columns), a
        chunk at a time as arrays; each chunk's rows are let go before it is handed on (as
        `_chunks` streams them)."""
        streaming = conn.execution_options(stream_results=True, yield_per=chunk_rows)
        result = streaming.execute(stmt)
        while part := result.fetchmany(chunk_rows):
            decoded = (
                np.array([r.created_at for r in part], np.float64),
                decode_rows([r.features for r in part]),
                decode_rows([r.probabilities for r in part]),
            )
            del part
            yield decoded

    def _tables(self) -> tuple[sa.Table, ...]:
        """Where every logged row is: the rows, and (SQLite) the requests' rows."""
        return (predictions, request_rows) if self.units else (predictions,)

    def _both(
        self,
        build: Callable[[sa.Table], sa.Select],
        limit: int | None = None,
        descending: bool = False,
    ) -> list[sa.Row]:
        """`build(table)` on each of `_tables()`, each in its own created_at order up to
        the limit, merged by created_at and cut to the limit: the rows the same query on
        all the log's rows gives. Two statements in one read transaction (`_read`)."""
        with self._read() as conn:
            parts = [conn.execute(build(t)).all() for t in self._tables()]
        if len(parts) == 1 or not parts[1]:
            return parts[0]
        merged = sorted(parts[0] + parts[1], key=lambda r: r.created_at, reverse=descending)
        return merged[:limit] if limit is not None else merged

    def _chunks(
        self, stmt: sa.Select, chunk_rows: int, conn: sa.Connection | None = None
    ) -> Iterator[Sequence[sa.Row]]:
        """The rows of `stmt` in lists of at most `chunk_rows`. PostgreSQL streams them
        through a server-side cursor (`stream_results`), so neither the driver nor this
        process ever holds more than a chunk; SQLite's cursor steps through the table the
        same way. One statement, so one consistent snapshot, however many chunks; on
        `conn` (a `_read` connection), in that reader's snapshot."""
        if conn is None:
            with self._read() as own:
                yield from self._chunks(stmt, chunk_rows, own)
            return
        streaming = conn.execution_options(stream_results=True, yield_per=chunk_rows)
        result = streaming.execute(stmt)
        # Result.partitions() would do, but its generator keeps the chunk it yielded while
        # fetching the next one: two chunks at once (a caller that drops its own reference
        # before asking for the next holds one).
        while rows := result.fetchmany(chunk_rows):
            yield rows
            del rows

    def count(self, labelled: bool | None = None) -> int:
        """Logged rows (labelled ones only, with `labelled=True`). A row kept in its request
        that has a record of its own (it was labelled) counts once."""
        p = predictions
        stmt = sa.select(sa.func.count()).select_from(p)
        if labelled is True:  # a labelled row always has a record of its own
            stmt = stmt.where(p.c.true_label.is_not(None))
        with self._read() as conn:
            n = int(conn.execute(stmt).scalar_one())
            if labelled is True or not self.units:
                return n
            r = prediction_requests
            n += int(conn.execute(sa.select(sa.func.sum(r.c.n_rows))).scalar_one() or 0)
            # records whose id is a request's row (copies made for a label, and a client's
            # row that came first), which the readers show in its place
            copies = conn.execute(
                sa.select(p.c.id, r.c.n_rows)
                .join(r, r.c.prefix == sa.func.substr(p.c.id, 1, 32 - ROW_DIGITS))
                .where(sa.func.length(p.c.id) == 32)
            )
            return n - sum(1 for pid, rows in copies if _row_index(pid) < rows)

    def insert_shadow(self, rows: Sequence[tuple]) -> int:
        """Shadow answers (tuples in SHADOW_COLUMNS order), idempotent on (id, version)."""
        return self.insert(rows, "shadow_predictions")

    def add_event(self, name: str, version: str, kind: str, rows: int) -> None:
        self._write(
            serving_events.insert().values(
                created_at=time.time(), model_name=name, model_version=version, kind=kind,
                rows=rows,
            )
        )  # fmt: skip

    def shadow_pairs(
        self, name: str, candidate: str, champion: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(truth, shadow's labels, champion's labels) of labelled rows the champion served
        and `candidate` scored in shadow."""
        p, sh = predictions, shadow_predictions
        stmt = (
            sa.select(p.c.true_label, sh.c.label, p.c.label)
            .join(sh, sh.c.id == p.c.id)
            .where(
                p.c.model_name == name,
                p.c.model_version == champion,
                sh.c.model_version == candidate,
                p.c.true_label.is_not(None),
            )
        )
        with self._read() as conn:
            found = np.array(conn.execute(stmt).all(), dtype=np.int64).reshape(-1, 3)
        return found[:, 0], found[:, 1], found[:, 2]

    def shadow_summary(self, name: str, since: float = 0.0) -> list[dict]:
        """Per (champion, shadow) version pair since `since`: rows scored, agreement, and
        both versions' accuracy on exactly the same labelled rows."""
        p, sh = predictions, shadow_predictions
        agree = sa.case((p.c.label == sh.c.label, 1), else_=0)
        labelled = sa.case((p.c.true_label.is_not(None), 1), else_=0)
        right_p = sa.case((p.c.true_label == p.c.label, 1), else_=0)
        right_s = sa.case((p.c.true_label == sh.c.label, 1), else_=0)
        stmt = (
            sa.select(
                p.c.model_version,
                sh.c.model_version,
                sa.func.count(),
                sa.func.sum(agree),
                sa.func.sum(labelled),
                sa.func.sum(right_p),
                sa.func.sum(right_s),
            )
            .join(sh, sh.c.id == p.c.id)
            .where(p.c.model_name == name, sh.c.created_at > since)
            .group_by(p.c.model_version, sh.c.model_version)
        )
        with self._read() as conn:
            found = conn.execute(stmt).all()
        out = []
        for champ, shadow, n, agreed, n_lab, ok_p, ok_s in found:
            n_lab = int(n_lab or 0)
            out.append(
                {
                    "champion": champ,
                    "shadow": shadow,
                    "rows": int(n),
                    "agreement": int(agreed or 0) / n if n else None,
                    "labelled": n_lab,
                    "champion_accuracy": int(ok_p or 0) / n_lab if n_lab else None,
                    "shadow_accuracy": int(ok_s or 0) / n_lab if n_lab else None,
                }
            )
        return out

    def label_before(self, pid: str, at: float) -> tuple[int | None, float | None]:
        """(label, labelled_at) that the label of `pid` stamped `at` overwrote; (None,
        None) where that label was the first (`label_history`)."""
        h = label_history
        stmt = sa.select(h.c.previous_label, h.c.previous_labelled_at).where(
            h.c.id == pid, h.c.labelled_at == at
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return (None, None) if row is None else (row[0], row[1])

    def shadow_labelled_since(self, name: str, after: float) -> list[tuple]:
        """(id, champion version, shadow version, champion's label, shadow's label, truth,
        labelled_at, previous label, its labelled_at) of rows labelled after `after` that a
        shadow scored: what the server adds to its running accuracy figures (the
        labelled-rows index keeps it cheap). The last two are the label this one
        overwrote, else None (`label_history`). A pair shows once both halves are in: a
        shadow answer is written a moment after it is scored, so a label can come first;
        the caller reads again from a little before its last read and keeps the ids it
        counted."""
        p, sh, h = predictions, shadow_predictions, label_history
        stmt = (
            sa.select(
                p.c.id, p.c.model_version, sh.c.model_version, p.c.label, sh.c.label,
                p.c.true_label, p.c.labelled_at, h.c.previous_label, h.c.previous_labelled_at,
            )
            .join(sh, sh.c.id == p.c.id)
            .outerjoin(h, sa.and_(h.c.id == p.c.id, h.c.labelled_at == p.c.labelled_at))
            .where(p.c.model_name == name, p.c.labelled_at > after)
        )  # fmt: skip
        with self._read() as conn:
            return [tuple(r) for r in conn.execute(stmt)]

    def version_stats(self, name: str, since: float, limit: int = 200_000) -> dict[str, dict]:
        """Per model version, for rows served since `since`: rows, p99 latency (ms) of the
        newest `limit` rows, labelled rows and accuracy on them, and failed rows counted in
        serving_events (answered by the champion instead)."""

        def build(p: sa.Table) -> sa.Select:
            return (
                sa.select(
                    p.c.model_version, p.c.latency_ms, p.c.label, p.c.true_label, p.c.created_at
                )
                .where(p.c.model_name == name, p.c.created_at >= since)
                .order_by(p.c.created_at.desc())
                .limit(limit)
            )

        rows = self._both(build, limit, descending=True)
        ev = serving_events
        errors = (
            sa.select(ev.c.model_version, sa.func.sum(ev.c.rows))
            .where(ev.c.model_name == name, ev.c.created_at >= since)
            .group_by(ev.c.model_version)
        )
        with self._read() as conn:
            failed = {v: int(n or 0) for v, n in conn.execute(errors).all()}
        out: dict[str, dict] = {}
        by_version: dict[str, list] = {}
        for version, latency, label, truth, _ in rows:
            by_version.setdefault(version, []).append((latency, label, truth))
        for version in set(by_version) | set(failed):
            got = by_version.get(version, [])
            latency = np.array([r[0] for r in got], dtype=float)
            pairs = [(lbl, t) for _, lbl, t in got if t is not None]
            out[version] = {
                "rows": len(got),
                "failed_rows": failed.get(version, 0),
                "p99_ms": float(np.percentile(latency, 99)) if len(latency) else None,
                "labelled": len(pairs),
                "accuracy": (float(np.mean([lbl == t for lbl, t in pairs])) if pairs else None),
            }
        return out

    def performance_rows(
        self, name: str, since: float, until: float | None = None, limit: int = 1_000_000
    ) -> list[tuple]:
        """(version, created_at, labelled_at, label, true_label, probabilities) of rows
        served since `since`, oldest first: what pipeline/performance.py windows."""

        def build(p: sa.Table) -> sa.Select:
            stmt = (
                sa.select(
                    p.c.model_version, p.c.created_at, p.c.labelled_at, p.c.label,
                    p.c.true_label, p.c.probabilities,
                )
                .where(p.c.model_name == name, p.c.created_at >= since)
                .order_by(p.c.created_at)
                .limit(limit)
            )  # fmt: skip
            return stmt if until is None else stmt.where(p.c.created_at < until)

        return [(*r[:5], decode_array(r[5])) for r in self._both(build, limit)]

    def unlabelled(self, name: str, since: float = 0.0, limit: int = 100_000) -> list[dict]:
        """Logged predictions still waiting for a label (for the label queue), newest first,
        with the shadow's label where a shadow scored them."""
        sh = shadow_predictions

        def build(p: sa.Table) -> sa.Select:
            return (
                sa.select(
                    p.c.id, p.c.created_at, p.c.model_version, p.c.label, p.c.probabilities,
                    sh.c.label.label("shadow_label"),
                )
                .outerjoin(sh, sh.c.id == p.c.id)
                .where(
                    p.c.model_name == name, p.c.true_label.is_(None), p.c.created_at >= since
                )
                .order_by(p.c.created_at.desc())
                .limit(limit)
            )  # fmt: skip

        found = self._both(build, limit, descending=True)
        return [{**r._mapping, "probabilities": decode_array(r.probabilities)} for r in found]

    def add_performance(self, report: str) -> None:
        self._write(performance_reports.insert().values(created_at=time.time(), report=report))

    def latest_performance(self) -> list[dict] | None:
        stmt = (
            sa.select(performance_reports.c.report)
            .order_by(performance_reports.c.seq.desc())
            .limit(1)
        )
        with self._read() as conn:
            found = conn.execute(stmt).scalar_one_or_none()
        return None if found is None else json.loads(found)

    def start_rollout(
        self, name: str, candidate: str, champion: str | None, fraction: float, guards: str
    ) -> int:
        """A new running rollout; refused while another one runs for `name`."""
        with self.engine.begin() as conn:
            if self._running_rollout(conn, name) is not None:
                raise ValueError(f"a rollout of {name} is already running")
            res = conn.execute(
                rollouts.insert().values(
                    model_name=name, candidate=candidate, champion=champion, fraction=fraction,
                    state="running", started_at=time.time(), guards=guards,
                )
            )  # fmt: skip
            return int(res.inserted_primary_key[0])

    def running_rollout(self, name: str) -> dict | None:
        with self._read() as conn:
            return self._running_rollout(conn, name)

    def latest_rollout(self, name: str) -> dict | None:
        stmt = (
            sa.select(rollouts)
            .where(rollouts.c.model_name == name)
            .order_by(rollouts.c.seq.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).mappings().first()
        return dict(row) if row else None

    @staticmethod
    def _running_rollout(conn, name: str) -> dict | None:
        stmt = (
            sa.select(rollouts)
            .where(rollouts.c.model_name == name, rollouts.c.state == "running")
            .order_by(rollouts.c.seq.desc())
            .limit(1)
        )
        row = conn.execute(stmt).mappings().first()
        return dict(row) if row else None

    def end_rollout(self, seq: int, state: str, reason: str) -> bool:
        """running -> `state`; False when it had already ended (another process decided)."""
        stmt = (
            rollouts.update()
            .where(rollouts.c.seq == seq, rollouts.c.state == "running")
            .values(state=state, ended_at=time.time(), reason=reason)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def _write(self, stmt) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc

    def start_checkpoints(
        self,
        interval_s: float = 0.01,
        check_s: float = 1.0,
        max_interval_s: float = 0.05,
        batch_bytes: int = 32 * 1024,
        sharers: int = 1,
    ) -> threading.Event | None:
        """SQLite: checkpoint the WAL from a background thread (PASSIVE: never blocks a
        writer), so commits on the request path do not pay for it. Returns a stop event.

        `sharers`: the processes that write and checkpoint this file the same way (the
        workers of `mlops serve --workers N`). Each waits `sharers` times as long, so the
        file is checkpointed about as often as by one process, the rate the figures below
        were measured at. Two workers, 64-row requests at concurrency 8: each waiting
        twice as long gave 7.5-12% more requests a second than each on one worker's
        interval in five A/Bs (three times as long: 5%), and 8% less server CPU a request;
        1 x 8 stayed within the noise, and the 64 x 1 p99 within it or shorter
        (docs/benchmarks.md).

        Checkpoints run at most once per `interval_s`: once `batch_bytes` of arrays were
        committed, the next one runs at once and the thread then pauses `interval_s` (so
        under steady load, one every `interval_s`); smaller commits gather as below. An
        idle server runs none. Its pages go to the database file and are synced,
        and while that sync runs the commits made meanwhile wait on the disk (ext4 here: a
        WAL write waits for the journal the sync commits), so the smaller each checkpoint,
        the shorter the wait.
        `mlops serve` with 64-row requests from one client, p99 latency, servers side by
        side taking turns of 4 s: a checkpoint every 2 s 121-167 ms, every 0.5 s 23-36 ms,
        every 0.1 s 5.4-18.6 ms, every 0.03 s 3.7-4.5 ms, every 0.01 s 2.5-3.4 ms (the log
        off: 1.7-2.5 ms); back to back (0 s) as short a tail but a quarter fewer requests
        at one client; 1-row requests and 64 rows x 8 clients the same within the noise
        at 0.01 and 0.1 s. None (SQLite's own autocheckpoint, on the request path):
        93-126 ms. The file check (a deleted or replaced file is noticed between commits
        too) runs every `check_s`. A checkpoint that copied the whole WAL sets
        `wal_restart_pending`.

        Small commits wait longer: until `batch_bytes` of arrays were committed since the
        last checkpoint, or `max_interval_s`. A checkpoint copies each page once however
        many commits changed it, and 1-row requests change the same few pages over and
        over: at 1 x 8, one every 0.05 s instead of 0.01 s gave 5.8% more requests a second
        (docs/benchmarks.md), while the p99 that small checkpoints keep short is a matter
        of a server busy with large requests, which still gets one every 0.01 s (64-row
        requests, 18.5 KiB each, come several to 0.01 s even from one client). The bytes
        are counted as the arrays' size in memory (4 a float32 value), also for features
        logged one byte a value (`encode_features`): such requests are checkpointed as
        often as before, as measured there.
        """
        if self.dialect != "sqlite":
            return None
        if sharers < 1:
            raise ValueError(f"sharers must be at least 1, not {sharers}")
        interval_s, max_interval_s = interval_s * sharers, max_interval_s * sharers
        stop = threading.Event()

        def run() -> None:
            # one connection kept for the checkpoints, as for the inserts: a checkout from
            # SQLAlchemy's pool and its reset cost ~0.2 ms of GIL each, up to 100 times a
            # second; reopened when the file was replaced or a checkpoint failed
            conn, opened_for = None, None
            checked = time.monotonic()
            while not stop.is_set():
                written = self._written.wait(check_s)
                if time.monotonic() - checked >= check_s:
                    self.check_file()
                    checked = time.monotonic()
                if not written or stop.is_set():
                    continue
                # small commits gather, in steps of interval_s, up to max_interval_s
                waited = interval_s
                while self._unsynced < batch_bytes and waited < max_interval_s:
                    if stop.wait(interval_s):
                        break
                    waited += interval_s
                if stop.is_set():
                    continue
                self._written.clear()
                self._unsynced = 0
                try:
                    if conn is not None and opened_for != self._identity:
                        conn, _ = None, conn.close()
                    if conn is None:
                        conn, opened_for = self.engine.raw_connection(), self._identity
                    cursor = conn.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    busy, frames, copied = cursor.fetchone()
                    cursor.close()
                    if not busy and frames > 0 and copied == frames:
                        self.wal_restart_pending = True
                except (self._dbapi_error, sa.exc.SQLAlchemyError) as exc:
                    log.warning("WAL checkpoint failed: %s", _short(exc))
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.invalidate()
                    conn = None
                stop.wait(interval_s)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

        threading.Thread(target=run, name="wal-checkpoint", daemon=True).start()
        return stop

    def add_drift(self, score: float, report: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    drift_reports.insert().values(
                        created_at=time.time(), score=score, report=report
                    )
                )
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc

    def recent_drift(self, k: int) -> list[dict]:
        """The last `k` drift reports (newest first)."""
        stmt = sa.select(drift_reports.c.report).order_by(drift_reports.c.seq.desc()).limit(k)
        with self._read() as conn:
            return [json.loads(r) for (r,) in conn.execute(stmt)]

    def latest_drift(self) -> float | None:
        stmt = sa.select(drift_reports.c.score).order_by(drift_reports.c.seq.desc()).limit(1)
        with self._read() as conn:
            return conn.execute(stmt).scalar_one_or_none()

    @contextmanager
    def _read(self):
        """A connection for reads. Where the log has request records, one read transaction:
        a reader's statements over the two tables see one snapshot, so a row whose label
        (and so its own record) is written between them is neither missed nor seen twice.
        The connection's close ends it (the pool rolls it back)."""
        try:
            conn = self.engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc
        try:
            # a file only: an in-memory database's pool hands this thread's one connection
            # to every checkout, the insert connection's included, and a BEGIN here would
            # take in (and roll back) an insert made while a reader is open
            if self.units and self._path is not None:
                conn.exec_driver_sql("BEGIN")  # pysqlite begins nothing before a SELECT
            yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"prediction store {self.safe_url}: {_short(exc)}") from exc
        finally:
            conn.close()

    def dispose(self) -> None:
        with self._insert_lock:
            # invalidated, not returned to the pool: it is in autocommit mode and its
            # busy timeout is 0, which no other checkout of the pool expects
            self._drop_insert_conn()
        self.engine.dispose()


class _Run:
    """One table's rows in created_at order, read a chunk at a time: the rows not yet
    merged (`t`, `f`, `p`) and whether the table has more."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        self.chunks = chunks
        self.t = np.empty(0, np.float64)
        self.f: np.ndarray | None = None
        self.p: np.ndarray | None = None
        self.done = False

    def fill(self) -> None:
        """The next chunk after the rows still here (or `done`)."""
        chunk = next(self.chunks, None)
        if chunk is None:
            self.done = True
        elif len(self.t):
            assert self.f is not None and self.p is not None
            self.t = np.concatenate([self.t, chunk[0]])
            self.f = np.concatenate([self.f, chunk[1]])
            self.p = np.concatenate([self.p, chunk[2]])
        else:
            self.t, self.f, self.p = chunk

    @property
    def frontier(self) -> float:
        """Every row of this table before this time is here (its last row's time)."""
        return np.inf if self.done else float(self.t[-1])

    def take(self, cut: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows before `cut` (all of them past the last chunk), let go of here."""
        k = len(self.t) if cut == np.inf else int(np.searchsorted(self.t, cut, "left"))
        assert self.f is not None and self.p is not None or k == 0
        if k == 0:
            empty = np.empty(0, np.float64)
            return empty, np.empty((0, 0), np.float32), np.empty((0, 0), np.float32)
        taken = self.t[:k], self.f[:k], self.p[:k]  # type: ignore[index]
        self.t, self.f, self.p = self.t[k:], self.f[k:], self.p[k:]  # type: ignore[index]
        return taken


def _shape_filter(t: sa.Table, features: int | None, classes: int | None, dialect: str) -> list:
    """Conditions on `t`'s rows: `features` values (float32, or one byte each with the
    trailer `encode_features` writes) and `classes` probabilities (float32). A byte row of
    k + 1 values can have the length of one of k (783 and 784 pixels are both 785 bytes):
    the last byte, the trailer's length, tells them apart, so it is matched too."""
    conditions = []
    if features is not None:
        pad = _byte_pad(features)
        column = t.c.features
        if dialect == "sqlite":
            last = sa.func.hex(sa.func.substr(column, -1)) == f"{pad:02X}"
        else:  # PostgreSQL's bytea
            last = sa.func.get_byte(column, sa.func.length(column) - 1) == pad
        as_bytes = sa.and_(sa.func.length(column) == features + pad, last)
        conditions.append(sa.or_(sa.func.length(column) == 4 * features, as_bytes))
    if classes is not None:
        conditions.append(sa.func.length(t.c.probabilities) == 4 * classes)
    return conditions


def _merge_runs(runs: list[_Run], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` rows of the runs by time (ties in the runs' order, then each run's
    own), written into arrays of `n` rows as they come. A row is placed once every run has
    shown a later time or ended, so the order is that of one stable sort of all the rows."""
    out_f = out_p = None
    at = 0
    while at < n:
        for run in runs:
            if not run.done and not len(run.t):
                run.fill()
        cut = min(run.frontier for run in runs)
        taken = [run.take(cut) for run in runs]
        taken = [piece for piece in taken if len(piece[0])]
        if not taken:
            if cut == np.inf:
                break  # every run ended short of `n`
            for run in runs:  # rows at the cut only: read on where they end
                if run.frontier == cut:
                    run.fill()
            continue
        if out_f is None:
            f, p = taken[0][1], taken[0][2]
            out_f = np.empty((n, f.shape[1]), f.dtype)
            out_p = np.empty((n, p.shape[1]), p.dtype)
        assert out_p is not None
        # each piece's rows straight to their places (no stacked copy of the pieces)
        order = np.argsort(np.concatenate([t for t, _, _ in taken]), kind="stable")
        place = np.empty(len(order), np.int64)
        place[order] = np.arange(at, at + len(order))
        start = 0
        for _, f, p in taken:
            places = place[start : start + len(f)]
            start += len(f)
            if places.max() >= n:  # past the limit: only the first rows are kept
                keep = places < n
                places, f, p = places[keep], f[keep], p[keep]
            out_f[places] = f
            out_p[places] = p
        at = min(n, at + len(order))
    if out_f is None or out_p is None:  # fewer rows than counted: none at all
        return np.empty((0, 0), np.float32), np.empty((0, 0), np.float32)
    return out_f[:at], out_p[:at]


def _unit_statements(
    requests: Sequence[LoggedRequest],
) -> tuple[list[tuple[str, list, int]], list[LoggedRequest]]:
    """The requests kept as records, as (statement, parameters, rows per record): one
    statement for all the records of one size (up to _UNITS_PER_STATEMENT), not one each,
    so a group of 1-row requests is one statement and, alone, its own transaction (no
    BEGIN and COMMIT). Each statement gives up the GIL and takes it back. Four 1-row
    requests alone on a file: 10-11 against 12-16 us a request; `mlops serve` at 64 x 8:
    1,304 against 1,368 us of CPU a request, 3% more requests. Also the requests that
    are not kept as records."""
    by_size: dict[int, list] = {}
    others: list[LoggedRequest] = []
    for request in requests:
        unit = request.unit_parameters()
        if unit is None:
            others.append(request)
        else:
            by_size.setdefault(len(request), []).append(unit)
    statements = []
    for n, units in by_size.items():
        for start in range(0, len(units), _UNITS_PER_STATEMENT):
            chunk = units[start : start + _UNITS_PER_STATEMENT]
            values = [v for unit in chunk for v in unit]
            statements.append((_units_sql(len(chunk)), values, n))
    return statements, others


def _row_statements(requests: Sequence[LoggedRequest]) -> tuple[list[tuple], list[tuple]]:
    """`_REQUEST_SQL`'s parameters for `requests`, and the rows of those it cannot take."""
    params: list[tuple] = []
    rows: list[tuple] = []
    for request in requests:
        for part in request.parts(_ROWS_PER_STATEMENT):  # no blob near SQLite's limit
            values = part.parameters()
            # json_each would end an id at a NUL; an SQLite before 3.38 has no `->>`
            if not REQUEST_STATEMENTS or "\\u0000" in values[0]:
                rows += part.rows()
            else:
                params.append(values)
    return params, rows


def _kept_ids(cursor, ids: Sequence[str]) -> set[str]:
    """Of `ids`, those that name a row kept in a request record (DBAPI cursor, SQLite)."""
    wanted = _by_prefix(ids)
    prefixes = list(wanted)
    known: set[str] = set()
    for i in range(0, len(prefixes), 500):
        chunk = prefixes[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT prefix, n_rows FROM prediction_requests WHERE prefix IN ({marks})"
        for prefix, n_rows in cursor.execute(sql, chunk).fetchall():
            known.update(pid for pid, k in wanted[prefix] if k < n_rows)
    return known


def _flat(rows: Sequence[tuple]) -> tuple:
    """Rows -> the parameters of one multi-row INSERT (the driver steps once, not per row);
    chained in C: half the time of a generator, on the GIL the event loop needs."""
    return tuple(itertools.chain.from_iterable(rows))


def _autocommit(conn, dialect: str) -> None:
    """The insert connection commits each statement itself (see `_insert_once`)."""
    if dialect == "sqlite":
        conn.isolation_level = None
    else:
        conn.rollback()  # the pool's ping may have opened a transaction
        conn.autocommit = True


def labelled_query(after: float, limit: int | None = None) -> sa.Select:
    stmt = (
        sa.select(predictions)
        .where(predictions.c.true_label.is_not(None), predictions.c.labelled_at > after)
        .order_by(predictions.c.labelled_at, predictions.c.id)
    )
    return stmt.limit(limit) if limit else stmt


def _label_outcomes(labels, existing, overwrite, classes=None):
    """Each label against the stored row: new, the same, a conflict, an overwrite, or
    outside the classes of the model that made that prediction (its probabilities say how
    many), which holds whether or not a model is loaded now."""
    outcomes, updates, seen = [], [], {}
    for pid, label in labels:
        if pid not in existing:
            outcomes.append(LabelOutcome(pid, "unknown_id", "no prediction logged with this id"))
            continue
        n = (classes or {}).get(pid)
        if n and not 0 <= label < n:
            outcomes.append(
                LabelOutcome(
                    pid, "invalid_label", f"the model that predicted it has classes 0..{n - 1}"
                )
            )
            continue
        current = seen.get(pid, existing[pid])
        if current is None:
            outcomes.append(LabelOutcome(pid, "labelled"))
        elif current == label:
            outcomes.append(LabelOutcome(pid, "unchanged"))
            continue
        elif overwrite:
            outcomes.append(LabelOutcome(pid, "overwritten", f"was {current}"))
        else:
            outcomes.append(
                LabelOutcome(pid, "conflict", f"already labelled {current}; send overwrite=true")
            )
            continue
        seen[pid] = label
        updates.append((pid, label))
    return outcomes, updates


_GENERATED = re.compile(r"[0-9a-f]{32}")  # the shape of an id new_ids makes


def _row_index(pid: str) -> int:
    """The row a generated id names in its request (past any request's rows if it names
    none: a client's id that only looks like one)."""
    return int(pid[-ROW_DIGITS:], 16) if _GENERATED.fullmatch(pid) else 16**ROW_DIGITS


def _by_prefix(ids: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
    """Ids shaped like new_ids' grouped by the request prefix they name, with their row."""
    out: dict[str, list[tuple[str, int]]] = {}
    for pid in ids:
        if _GENERATED.fullmatch(pid):
            out.setdefault(pid[:-ROW_DIGITS], []).append((pid, int(pid[-ROW_DIGITS:], 16)))
    return out


def new_ids(n: int) -> list[str]:
    """`n` fresh prediction ids for one request: UUIDv7 (RFC 9562) as 32 hex characters.

    They begin with the millisecond they were made, so each insert lands at the right-hand
    edge of an index instead of on a random page: random ids (uuid4) made SQLite write
    ~3.5x fewer rows per second once the index outgrows the page cache, since every row of a
    commit dirtied a different page. Up to 16^ROW_DIGITS rows, the ids share 58 random bits
    (unique across requests and workers) and end in the row's index (`GeneratedIds`): the
    log keeps such a request as one record; more rows get 74 random bits each.
    """
    ms = time.time_ns() // 1_000_000
    if n > 16**ROW_DIGITS:
        return _many_ids(ms, n)
    raw = bytearray(os.urandom(14))
    raw[:6] = ms.to_bytes(6, "big")  # unix ms
    raw[6] = 0x70 | raw[6] & 0x0F  # version 7, then 12 random bits (with byte 7)
    raw[8] = 0x80 | raw[8] & 0x3F  # the RFC variant (binary 10), then 46 random bits
    return GeneratedIds(raw.hex(), n)


def _many_ids(ms: int, n: int) -> list[str]:
    """`new_ids` for larger n: the 16 bytes of each id set as columns of one array, then
    one hex string cut in 32s (half the time at 64 ids, held on the event loop's GIL)."""
    raw = np.frombuffer(bytearray(os.urandom(16 * n)), np.uint8).reshape(n, 16)
    raw[:, :6] = np.frombuffer(ms.to_bytes(6, "big"), np.uint8)  # unix ms
    raw[:, 6] &= 0x0F  # version 7, then 12 random bits (with byte 7)
    raw[:, 6] |= 0x70
    raw[:, 8] &= 0x3F  # the RFC variant (binary 10), then 62 random bits
    raw[:, 8] |= 0x80
    text = raw.tobytes().hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def encode_rows(array: np.ndarray) -> list[bytes]:
    """(n, k) array -> n little-endian float32 blobs, one per row."""
    data = np.ascontiguousarray(array, dtype="<f4")
    width = data.shape[1] * 4
    buf = data.tobytes()
    return [buf[i : i + width] for i in range(0, len(buf), width)]


BYTE_ROWS_FROM = 1024  # values (4 KiB as float32, one SQLite page) from which bytes are tried


def encode_features(array: np.ndarray) -> tuple[bytes, int]:
    """(n, k) features as logged -> (the rows' blob, one row's share of it in bytes).

    Float32, 4 bytes a value, unless every value of the array is a whole number from 0 to
    255 (pixels, counts, codes) whose float32 bits the byte gives back exactly (so not
    -0.0), in an array of at least BYTE_ROWS_FROM values: then one byte a value, each row
    followed by a trailer of 1 or 2 bytes that makes its length no multiple of 4 (float32
    rows are), whose last byte is the trailer's length (`decode_array` tells the two
    apart by that). A 64-pixel row is 65 bytes instead of 256, so a 64-row request's
    features are 4,160 bytes instead of 16,384, written to the WAL and again by the
    checkpoint: `mlops serve -w 2` at 64 x 8 served 5.4-13.9% more requests a second
    (medians of 10 paired turns, three runs; 1 x 8 the same within the noise), and the
    log file took 2.4x fewer bytes a row (docs/benchmarks.md)."""
    data = np.ascontiguousarray(array, dtype="<f4")
    n, k = data.shape
    # the check costs 4-7 us on the event loop; under a page of float32 it saves no page
    if data.size >= BYTE_ROWS_FROM and data.min() >= 0 and data.max() <= 255:  # no cast warning
        small = data.astype(np.uint8)
        if small.astype("<f4").tobytes() == data.tobytes():  # bit for bit
            pad = _byte_pad(k)
            out = np.zeros((n, k + pad), np.uint8)
            out[:, :k] = small
            out[:, -1] = pad
            return out.tobytes(), k + pad
    return data.tobytes(), k * 4


def encode_feature_rows(array: np.ndarray) -> list[bytes]:
    """(n, k) features -> n blobs, one per row, as `encode_features` writes them."""
    buf, width = encode_features(array)
    return [buf[i : i + width] for i in range(0, len(buf), width)]


def _byte_pad(k: int) -> int:
    """The trailer of a row of k byte values: 1 byte, or 2 where k + 1 is a multiple of 4."""
    return 2 if (k + 1) % 4 == 0 else 1


def _byte_width(width: int, last: int) -> int:
    """The values in a byte row of `width` bytes whose last byte is `last`; ValueError
    for bytes no encoder wrote."""
    k = width - last
    if last not in (1, 2) or k < 0 or _byte_pad(k) != last:
        raise ValueError(f"a logged array of {width} bytes is neither float32 nor byte values")
    return k


def decode_array(blob: bytes) -> np.ndarray:
    """One logged array -> its float32 values (either encoding of `encode_features`)."""
    if len(blob) % 4 == 0:
        return np.frombuffer(blob, dtype="<f4")
    k = _byte_width(len(blob), blob[-1])
    return np.frombuffer(blob, np.uint8, k).astype(np.float32)


def decode_rows(blobs: Sequence[bytes]) -> np.ndarray:
    """n blobs of `encode_rows` or `encode_feature_rows` -> (n, k) float32 array (no Python
    floats); rows of both encodings, and of several widths of bytes, may be mixed."""
    if len(blobs) == 0:
        return np.empty((0, 0), np.float32)
    widths = {len(b) for b in blobs}
    if len(widths) == 1:  # one encoding (the usual case): one join, no index
        out = _decode_joined(b"".join(blobs), len(blobs), widths.pop())
        if out is not None:
            return out
    # byte rows of k and k + 1 values share a length where k + 1 is a multiple of 4: the
    # last byte (the trailer's length) tells them apart
    by_kind: dict[tuple[int, int], list[int]] = {}
    for i, blob in enumerate(blobs):
        by_kind.setdefault((len(blob), blob[-1] if len(blob) % 4 else 0), []).append(i)
    parts = {
        kind: _decode_joined(b"".join(blobs[i] for i in rows), len(rows), kind[0])
        for kind, rows in by_kind.items()
    }
    sizes = {part.shape[1] for part in parts.values()}
    if len(sizes) > 1:
        raise ValueError(f"logged arrays of different lengths: {sorted(sizes)}")
    out = np.empty((len(blobs), sizes.pop()), np.float32)
    for kind, rows in by_kind.items():
        out[rows] = parts[kind]
    return out


def _decode_joined(joined: bytes, n: int, width: int) -> np.ndarray | None:
    """n rows of `width` bytes each, joined -> (n, k) float32; None for byte rows whose
    trailers differ (rows of two widths of values)."""
    if width % 4 == 0:
        return np.frombuffer(joined, dtype="<f4").reshape(n, width // 4)
    raw = np.frombuffer(joined, np.uint8).reshape(n, width)
    if (raw[:, -1] != raw[0, -1]).any():
        return None
    return raw[:, : _byte_width(width, int(raw[0, -1]))].astype(np.float32)


def _decoded(row) -> dict:
    out = dict(row._mapping)
    for column in ARRAY_COLUMNS:
        out[column] = decode_array(out[column]).tolist()
    return out


BUSY_TIMEOUT_MS = 10_000  # how long a blocking SQLite statement waits for a lock
_BUSY = object()  # `_write_when_free`: the lock was taken and the caller would not wait


def _locked(exc: BaseException) -> bool:
    """An SQLite error that says another connection holds the lock (SQLITE_BUSY)."""
    cause = getattr(exc, "orig", exc)
    code = getattr(cause, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == 5  # SQLITE_BUSY and its extended codes
    return "database is locked" in str(cause)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a committed transaction survives a crash of the process (kill -9);
    # only an OS crash or power loss can lose the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Checkpoints (WAL -> database, with fsync) normally run inside a commit every 1,000
    # pages; the server runs them in the background instead (start_checkpoints), and this
    # larger bound only caps the WAL should that thread ever stop.
    cursor.execute("PRAGMA wal_autocheckpoint=20000")
    cursor.close()


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
