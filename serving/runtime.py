"""What runs behind the routes: the model (hot-swapped), the micro-batcher, the log writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.model import Predictor
from pipeline.redact import redact
from pipeline.registry import alias_version, download_model
from pipeline.store import LoggedRequest, PredictionStore, StoreUnavailable
from serving import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    predictor: Predictor
    name: str
    version: str
    run_id: str | None
    data_hash: str | None
    loaded_at: float

    def info(self) -> dict:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "run_id": self.run_id,
            "data_hash": self.data_hash,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "n_features": self.predictor.cfg.n_features,
            "num_classes": self.predictor.cfg.num_classes,
        }


class ModelManager:
    """Holds the serving model; loads new versions off the request path and swaps atomically.

    A batch takes `self.current` once, so every request finishes on the version it started
    with. A failed load leaves the old model serving and is reported in `last_error`.
    """

    def __init__(self, settings, ref: str | None = None, primary: bool = True) -> None:
        self.settings = settings
        self.ref = ref  # what refresh() follows (default: settings.model_ref)
        self.primary = primary  # the champion's manager: the one /metrics reports
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self, ref: str) -> LoadedModel:
        tmp = Path(tempfile.mkdtemp(prefix="mlops-serve-"))
        try:
            model_dir, mv = download_model(self.settings.model_name, ref, tmp)
            predictor = Predictor.from_dir(model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        predictor.predict_proba(np.zeros((8, predictor.cfg.n_features), np.float32))  # warm up
        return LoadedModel(
            predictor,
            self.settings.model_name,
            str(mv.version),
            mv.run_id,
            (mv.tags or {}).get("data_hash"),
            time.time(),
        )

    def refresh(self, ref: str | None = None) -> bool:
        """Load `ref` (default: the configured alias/version) if it names another version."""
        import mlflow

        ref = str(ref or self.ref or self.settings.model_ref)
        with self._lock:  # one load at a time; requests never wait on this lock
            mlflow.set_tracking_uri(self.settings.tracking_uri)  # this server's store, always
            try:
                target = ref if ref.isdigit() else alias_version(self.settings.model_name, ref)
                if target is None:
                    raise LookupError(f"{self.settings.model_name}@{ref} does not exist yet")
                if self.current is not None and self.current.version == target:
                    return False
                loaded = self.load(target)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old model
                self.last_error = redact(f"loading {self.settings.model_name}@{ref}: {exc}")
                metrics.LOAD_FAILURES.inc()
                log.error(
                    "model load failed, still serving %s: %s",
                    self.current.version if self.current else "nothing",
                    self.last_error,
                )
                raise
            previous = self.current
            self.current = loaded  # the atomic swap
            self.last_error = None
            if self.primary:
                metrics.MODEL_VERSION.set(float(loaded.version))
            log.info(
                "%s %s v%s (was %s)",
                "serving" if self.primary else f"loaded for {ref}:",
                loaded.name,
                loaded.version,
                previous.version if previous else "none",
            )
            return True

    def start_polling(self) -> None:
        interval = self.settings.reload_interval_s
        if interval <= 0:
            return

        def poll() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(Exception):  # refresh() reports; keep polling
                    self.refresh()

        self._thread = threading.Thread(target=poll, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class NoModel(RuntimeError):
    pass


# An inline pass that takes longer than this held every other request; after a few such
# passes in a row that model's small passes go to the inference thread (the default
# ConvNet's 32-row pass: under 1 ms here)
INLINE_PASS_MAX_S = 0.005
INLINE_SLOW_PASSES = 3


class MicroBatcher:
    """Gathers concurrent requests into one forward pass.

    Rows that queue up while a pass runs form the next batch (up to `max_rows`); when
    requests are known to be on their way (parsed but not yet queued), it waits for them at
    most `max_wait_s`. One inference thread: passes never compete for the cores. A pass of
    at most `inline_rows` rows runs on the event loop instead (MLOPS_BATCH_INLINE_ROWS):
    small forwards are mostly Python dispatch that holds the GIL, so the thread bought no
    parallelism there, only two hand-offs and a fight for the GIL at every layer. Not on a
    GPU, and not for a model whose inline passes took over `INLINE_PASS_MAX_S`.
    """

    def __init__(
        self,
        manager: ModelManager,
        max_rows: int,
        max_wait_s: float,
        executor: ThreadPoolExecutor | None = None,
        inline_rows: int = 0,
    ) -> None:
        self.manager = manager
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.inline_rows = inline_rows  # passes this small run on the event loop itself
        self._slow_inline: dict[str, int] = {}  # version -> slow inline passes in a row
        self.arriving = 0  # requests inside a handler that will call predict()
        self.in_thread = 0  # requests in a pass on the inference thread
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # one inference thread for the champion and a canary alike (passes never compete)
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="inference")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def busy(self) -> bool:
        """Answers on their way: requests being parsed or queued for a pass. Not a pass on
        the inference thread: that one may well take longer than a log group's hold."""
        return self.arriving > 0 or not (self._queue is None or self._queue.empty())

    async def predict(self, rows: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((rows, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        held = None  # a request that would have made the last batch too big: the next one's
        while True:
            items = [held if held is not None else await self._queue.get()]
            held = None
            count = len(items[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_rows:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                    if count + len(item[0]) > self.max_rows:
                        held = item  # a pass never exceeds max_rows, unless one request does
                        break
                    items.append(item)
                elif self.arriving > 0 and loop.time() < deadline:
                    await asyncio.sleep(0.0005)
                    continue
                else:
                    break
                count += len(items[-1][0])
            await self._forward(items, count)

    async def _forward(self, items: list, count: int) -> None:
        model = self.manager.current  # one version for the whole batch
        try:
            if model is None:
                raise NoModel("no model is loaded yet")
            batch = items[0][0] if len(items) == 1 else np.concatenate([x for x, _ in items])
            metrics.BATCH_ROWS.observe(count)
            if count <= self.inline_rows and self._inline_suits(model):
                started = time.perf_counter()
                probs = model.predictor.predict_proba(batch)
                slow = time.perf_counter() - started > INLINE_PASS_MAX_S
                # in a row: a pause of the whole process now and then is no heavy model
                self._slow_inline[model.version] = (
                    self._slow_inline.get(model.version, 0) + 1 if slow else 0
                )
            else:
                self.in_thread += len(items)
                try:
                    probs = await asyncio.get_running_loop().run_in_executor(
                        self._executor, model.predictor.predict_proba, batch
                    )
                finally:
                    self.in_thread -= len(items)
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        start = 0
        for x, fut in items:
            if not fut.done():
                fut.set_result((probs[start : start + len(x)], model))
            start += len(x)

    def _inline_suits(self, model: LoadedModel) -> bool:
        """A small pass may run on the loop: on the CPU (a GPU pass would hold the loop while
        it waits for the device) and for a model whose small passes have been quick."""
        slow = self._slow_inline.get(model.version, 0)
        return model.predictor.device.type == "cpu" and slow < INLINE_SLOW_PASSES


def answers_coming(in_flight: int, writer: LogWriter, *batchers: MicroBatcher) -> bool:
    """Whether answers other than those the writer already has are on their way: requests
    being parsed or queued for a pass, or read by the server (`in_flight`, from
    serving/protocol.py) and not yet answered, less those whose rows the writer has and
    those in a pass on the inference thread (that pass may well take longer than a hold)."""
    if any(b.busy() for b in batchers):
        return True
    return in_flight - writer.unsettled - sum(b.in_thread for b in batchers) > 0


INLINE_ROWS = 64
# A small group whose next one is already on its way (`answers_coming`) waits for it, at
# most this long, so the two are one commit: 1-row requests at concurrency 8 made 4 a
# commit, and a commit of a few rows costs the loop about the same whatever its size. A
# hold that nothing joined turns holding off for HOLD_PAUSE_S (a slow upload, counted as on
# its way, would otherwise cost every group the whole hold).
HOLD_S = 0.002
HOLD_PAUSE_S = 0.1


class LogWriter:
    """A background thread that commits prediction rows to the store in groups.

    `submit` (on the event loop) returns an asyncio future that resolves once the rows are
    committed, or fails with StoreUnavailable; in durable mode the response waits for it.

    Hand-offs between the threads are per event-loop iteration, not per request: the
    requests one forward pass answered all submit in the same iteration, and go to the
    writer as one item once it ends; after each commit the writer wakes the loop once for
    the whole group. Per-request hand-offs made most commits one row long, and the writer
    then spent more CPU per request than the event loop did on logging.
    """

    def __init__(
        self, store: PredictionStore, max_queue: int, max_group: int = 2048, sharers: int = 1
    ) -> None:
        self.store = store
        self.sharers = sharers  # processes writing the same log (their checkpoints spread)
        # groups this small commit on the event loop itself when the writer is idle (SQLite
        # only: a local file; a network round trip to PostgreSQL would stall the loop)
        self.inline_rows = INLINE_ROWS if store.dialect == "sqlite" else 0
        self.max_queue = max_queue  # requests submitted and not yet settled
        self.max_group = max_group
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # a shadow's answers (serving/shadow.py), committed by this thread between groups:
        # one writer, so they never wait on the prediction log's write lock or hold it
        self._shadow: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[tuple] = []  # this iteration's submissions (event loop only)
        self._held: list[tuple] = []  # a small group waiting for the next (event loop only)
        self._hold_timer: asyncio.TimerHandle | None = None  # commits it if none comes
        self._hold_after = 0.0  # loop time before which no group is held
        # whether more answers are on their way (`answers_coming`): a small group then
        # waits for them, up to HOLD_S; None: never
        self.more_coming: Callable[[], bool] | None = None
        self._queued = 0  # submitted, not yet settled (event loop only)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None
        self.schema_ready = False
        self._checkpoints: threading.Event | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._checkpoints = self.store.start_checkpoints(sharers=self.sharers)
        self._thread.start()

    @property
    def unsettled(self) -> int:
        """Requests submitted and not yet settled (committed or failed)."""
        return self._queued

    def submit(self, request: LoggedRequest, wait: bool = True) -> asyncio.Future | None:
        """Queue a request's rows for the next commit; with `wait`, a future for that commit.

        Raises StoreUnavailable at once when too much is queued (the store is down or
        slower than the traffic): the request fails instead of being answered unlogged.
        """
        assert self._loop is not None, "start() first"
        if self._queued >= self.max_queue:
            raise StoreUnavailable("prediction log queue is full")
        future = self._loop.create_future() if wait else None
        if not self._pending:
            self._loop.call_soon(self._flush)  # after the handlers this iteration resumes
        self._pending.append((request, future, time.monotonic()))
        self._queued += 1
        return future

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        held = bool(self._held)
        if held:
            items, self._held = self._held + items, []
            if self._hold_timer is not None:
                self._hold_timer.cancel()  # a timer left over would cut a later hold short
                self._hold_timer = None
        if not items:
            return
        rows = sum(len(batch) for batch, _, _ in items)
        small = (
            rows <= self.inline_rows
            and self.schema_ready
            and self._queue.empty()
            and not self.store.wal_restart_pending  # that commit waits on the disk
        )
        # held only where two such groups still commit here (larger ones gain little)
        hold = small and not held and rows <= self.inline_rows // 2
        if hold and self.more_coming is not None and self.more_coming():
            assert self._loop is not None
            if self._loop.time() >= self._hold_after:
                self._held = items  # the next group's flush takes these along, or the timer
                self._hold_timer = self._loop.call_later(HOLD_S, self._release)
                return
        if small and self._commit_inline(items, rows):
            return
        metrics.LOG_QUEUE.inc(rows)
        self._queue.put(items)

    def _release(self) -> None:
        """The held group, if no next group came for it (one that came has a flush due);
        holding then pauses."""
        self._hold_timer = None
        if self._held and not self._pending:
            assert self._loop is not None
            self._hold_after = self._loop.time() + HOLD_PAUSE_S
            self._flush()

    def _commit_inline(self, items: list, rows: int) -> bool:
        """A small group on SQLite, committed here on the event loop when no other commit
        is under way (tens of microseconds): the answers wait for the commit, not for two
        hand-offs between threads as well. Anything else goes to the writer thread, and so
        does the first commit after a checkpoint emptied the WAL: it syncs the WAL's new
        header to disk, which stalled every request on the loop (0.2-5 ms here)."""
        try:
            done = self.store.insert_requests([request for request, _, _ in items], blocking=False)
        except Exception:  # noqa: BLE001 - the writer thread retries it and reports
            return False
        if done is None:  # the writer thread is committing: queue behind it
            return False
        self.last_error = None
        metrics.LOGGED.inc(rows)
        now = time.monotonic()
        for _, _, submitted in items:
            metrics.COMMIT_LAG.observe(now - submitted)
        self._settle([f for _, f, _ in items], None)
        return True

    async def close(self, timeout: float = 30.0) -> None:
        """Stop after draining everything already submitted (graceful shutdown)."""
        self.more_coming = None  # nothing is held from here on
        self._flush()
        self._stop.set()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._checkpoints is not None:
            self._checkpoints.set()

    def submit_shadow(self, rows: list[tuple]) -> None:
        """From any thread: a shadow's rows (SHADOW_COLUMNS tuples), best effort."""
        self._shadow.put(rows)

    def _commit_shadow(self) -> None:
        rows: list[tuple] = []
        while len(rows) < self.max_group:
            try:
                rows += self._shadow.get_nowait()
            except queue.Empty:
                break
        if not rows:
            return
        try:
            self.store.insert_shadow(rows)
        except Exception as exc:  # noqa: BLE001 - the shadow's rows only; answers are safe
            metrics.SHADOW_ROWS.labels("unlogged").inc(len(rows))
            log.warning("shadow rows not logged: %s", exc)

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty() and self._shadow.empty()):
            self._commit_shadow()
            try:
                group = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            rows = sum(len(r) for r, _, _ in group)
            while rows < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                group += more
                rows += sum(len(r) for r, _, _ in more)
            self._commit(group, rows)

    def _commit(self, group: list, rows: int) -> None:
        metrics.LOG_QUEUE.dec(rows)
        error: StoreUnavailable | None = None
        try:
            if not self.schema_ready:  # the store may have been down at start-up
                self.store.create()
                self.schema_ready = True
            self.store.insert_requests([request for request, _, _ in group])
        except Exception as exc:  # noqa: BLE001 - the writer must outlive any one commit
            # Anything else (a driver bug, a value the database refuses) fails these
            # requests the same way: otherwise they would wait for a thread that died.
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
            self.last_error = str(error)
            metrics.LOG_FAILURES.inc()
            log.error("prediction log commit failed: %s", error)
        else:
            self.last_error = None
            metrics.LOGGED.inc(rows)
            now = time.monotonic()
            for _, _, submitted in group:
                metrics.COMMIT_LAG.observe(now - submitted)
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            self._loop.call_soon_threadsafe(self._settle, [f for _, f, _ in group], error)

    def _settle(self, futures: list[asyncio.Future | None], error: BaseException | None) -> None:
        """On the event loop: resolve every request of one commit."""
        self._queued -= len(futures)
        for fut in futures:
            if fut is None or fut.done():  # async mode, or the client went away
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


class SideWriter:
    """A thread for writes off the response path whose loss costs no answer (shadow rows,
    canary failure events): best effort, counted when they fail, bounded."""

    def __init__(self, max_queue: int = 10_000) -> None:
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="side-writer", daemon=True)
        self.failures = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, call) -> bool:
        try:
            self._queue.put_nowait(call)
            return True
        except queue.Full:
            self.failures += 1
            return False

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - best effort: counted and reported
                self.failures += 1
                self.last_error = redact(str(exc))[:300]
                log.warning("side write failed: %s", self.last_error)
