"""The log writer on a real SQLite store: grouping, back-pressure, failures, draining."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import numpy as np
import pytest

from pipeline.store import LoggedRequest, PredictionStore, StoreUnavailable
from serving.runtime import LogWriter


class RecordingStore(PredictionStore):
    """A real store that records each insert's size and can be held or made to fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def insert_requests(self, requests, blocking=True):
        if not blocking:  # never the event loop's inline commit: these tests are the thread's
            return None
        self.gate.wait(10)
        self.calls.append(sum(map(len, requests)))
        if self.fail:
            raise self.fail
        return super().insert_requests(requests)


def _rows(prefix: str, n: int = 1) -> LoggedRequest:
    x = np.ones((n, 4), np.float32)
    return LoggedRequest(
        [f"{prefix}-{i}" for i in range(n)], time.time(), "m", "1", x, [0] * n, x, 1.0
    )


@pytest.fixture
def store(tmp_path):
    s = RecordingStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    yield s
    s.dispose()


def test_one_iterations_submissions_are_one_commit(store):
    async def main():
        writer = LogWriter(store, max_queue=100)
        writer.start()
        # as after one forward pass: several handlers submit in the same loop iteration
        futures = [writer.submit(_rows(f"r{i}")) for i in range(5)]
        await asyncio.gather(*futures)
        await writer.close()

    asyncio.run(main())
    assert store.calls == [5]
    assert store.count() == 5


def test_back_pressure_then_recovery(store):
    async def main():
        writer = LogWriter(store, max_queue=3)
        writer.start()
        store.gate.clear()  # the store stalls
        waiting = [writer.submit(_rows(f"a{i}")) for i in range(3)]
        with pytest.raises(StoreUnavailable, match="queue is full"):
            writer.submit(_rows("refused"))
        store.gate.set()
        await asyncio.gather(*waiting)
        await asyncio.wait_for(writer.submit(_rows("after")), 5)  # room again
        await writer.close()

    asyncio.run(main())
    assert store.count() == 4 and not store.get(["refused-0"])


def test_a_failed_commit_fails_its_requests_only(store):
    async def main():
        writer = LogWriter(store, max_queue=100)
        writer.start()
        store.fail = StoreUnavailable("down for the test")
        with pytest.raises(StoreUnavailable, match="down for the test"):
            await writer.submit(_rows("lost"))
        assert writer.last_error and "down" in writer.last_error
        store.fail = TypeError("an unexpected bug")  # not a store error: still answered
        with pytest.raises(StoreUnavailable, match="unexpected bug"):
            await asyncio.wait_for(writer.submit(_rows("lost-too")), 5)
        store.fail = None
        await writer.submit(_rows("kept"))  # the writer thread survived both
        assert writer.last_error is None
        await writer.close()

    asyncio.run(main())
    assert set(store.get(["lost-0", "lost-too-0", "kept-0"])) == {"kept-0"}


def test_close_drains_unawaited_async_submissions(store):
    async def main():
        writer = LogWriter(store, max_queue=1000)
        writer.start()
        for i in range(50):  # async mode: nobody waits for the commit
            assert writer.submit(_rows(f"q{i}", 3), wait=False) is None
        await writer.close()

    asyncio.run(main())
    assert store.count() == 150


class CountingStore(PredictionStore):
    """A real store that notes which path each commit took; with `checkpoints=False`, no
    background checkpoints (a test then sets the flag a complete checkpoint would set)."""

    def __init__(self, url: str, checkpoints: bool = True) -> None:
        super().__init__(url)
        self.paths: list[tuple[int, str]] = []
        self.checkpoints = checkpoints

    def start_checkpoints(self, **kwargs):
        return super().start_checkpoints(**kwargs) if self.checkpoints else None

    def insert_requests(self, requests, blocking=True):
        done = super().insert_requests(requests, blocking)
        if done is not None:
            self.paths.append((sum(map(len, requests)), "loop" if not blocking else "thread"))
        return done


def test_small_groups_commit_on_the_loop_and_large_ones_on_the_thread(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = LogWriter(store, max_queue=100)
        writer.schema_ready = True
        writer.start()
        await asyncio.gather(*[writer.submit(_rows(f"s{i}")) for i in range(3)])
        assert store.count() == 3  # committed before the answers were released
        await writer.submit(_rows("big", 200))  # over INLINE_ROWS: the writer thread's
        await writer.close()

    asyncio.run(main())
    assert store.paths == [(3, "loop"), (200, "thread")]
    assert store.count() == 203
    store.dispose()


def test_small_groups_commit_on_the_loop_but_not_the_one_that_restarts_the_wal(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'log.db'}", checkpoints=False).create()

    async def main():
        writer = LogWriter(store, max_queue=100)
        writer.schema_ready = True
        writer.start()
        await writer.submit(_rows("a", 4))  # small, writer idle: on the event loop
        store.wal_restart_pending = True  # as after a checkpoint that emptied the WAL
        await writer.submit(_rows("b", 4))  # its commit syncs the WAL header: the thread's
        await writer.submit(_rows("c", 4))  # the WAL has restarted: the loop's again
        await writer.close()

    try:
        asyncio.run(main())
        assert store.paths == [(4, "loop"), (4, "thread"), (4, "loop")]
        assert store.wal_restart_pending is False
        assert store.count() == 12
    finally:
        store.dispose()


def test_a_small_group_never_waits_on_the_loop_for_another_workers_commit(tmp_path):
    """With `--workers N` every worker has its own store on the same file. While another
    process's commit holds SQLite's write lock, the event loop's inline commit finds it
    taken at once (SQLite's own wait sleeps 1, 2, 5 ms and more between its tries, and the
    loop would sleep with it) and the writer thread commits the group once the lock is
    free: nothing lost, the kept connection kept, the next small group on the loop again."""
    path = tmp_path / "log.db"
    store = CountingStore(f"sqlite:///{path}", checkpoints=False).create()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def main():
        writer = LogWriter(store, max_queue=100)
        writer.schema_ready = True
        writer.start()
        await writer.submit(_rows("a"))  # opens the kept connection, on the loop
        kept = store._insert_conn
        other.execute("BEGIN IMMEDIATE")  # another worker's commit, under way
        threading.Timer(0.5, other.rollback).start()
        answered = writer.submit(_rows("b", 2))
        await answered  # committed by the writer thread, which waits for the lock
        await writer.submit(_rows("c"))
        assert store._insert_conn is kept
        await writer.close()

    try:
        asyncio.run(main())
        assert store.paths == [(1, "loop"), (2, "thread"), (1, "loop")]
        assert store.count() == 4
    finally:
        other.close()
        store.dispose()


def test_a_blocking_commit_waits_for_the_lock_up_to_the_timeout_then_fails(tmp_path, monkeypatch):
    """The writer thread's commit tries again while another connection holds the write
    lock (the insert connection's own SQLite wait is off), and fails as SQLite's timeout
    would once BUSY_TIMEOUT_MS are up; the rows are then not in the log, and go in on the
    next try once the lock is free."""
    import pipeline.store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "log.db"
    store = PredictionStore(f"sqlite:///{path}").create()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        assert store.insert_requests([_rows("first")]) == 1
        kept = store._insert_conn
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.insert_requests([_rows("late", 3)])
        assert store._insert_conn is kept  # a lock is no broken connection: not reopened
        assert store.insert_requests([_rows("late", 3)], blocking=False) is None
        threading.Timer(0.1, other.rollback).start()  # freed within the timeout
        assert store.insert_requests([_rows("late", 3)]) == 3
        assert store.count() == 4
    finally:
        other.close()
        store.dispose()


class InlineStore(PredictionStore):
    """A real store that records the size of each commit, the event loop's inline ones too."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.commits: list[int] = []

    def insert_requests(self, requests, blocking=True):
        new = super().insert_requests(requests, blocking)
        if new is not None:
            self.commits.append(sum(map(len, requests)))
        return new


def _holding_writer(store: PredictionStore, coming: bool = True) -> LogWriter:
    """A started writer (inside a running loop) whose batcher says more is `coming`."""
    writer = LogWriter(store, max_queue=100)
    writer.more_coming = lambda: coming
    writer.start()
    writer.schema_ready = True
    return writer


@pytest.mark.parametrize("coming", [True, False])
def test_a_small_group_waits_for_the_next_when_it_is_on_its_way(tmp_path, coming):
    """While more answers are on their way (the batcher is busy), a small group is not
    answered on its own commit: it waits for the next group, and the two are one commit.
    Nothing is answered before its rows are committed. With nothing coming, each group
    commits at once."""
    store = InlineStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = _holding_writer(store, coming)
        first = [writer.submit(_rows(f"a{i}")) for i in range(3)]
        await asyncio.sleep(0)  # the iteration ends: its flush runs
        await asyncio.sleep(0)
        assert all(f.done() for f in first) is not coming  # held, unanswered
        assert store.count() == (0 if coming else 3)
        second = [writer.submit(_rows(f"b{i}")) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*first, *second), 5)
        await writer.close()

    asyncio.run(main())
    assert store.commits == ([5] if coming else [3, 2])
    assert store.count() == 5
    store.dispose()


def test_a_held_group_that_no_group_follows_is_committed_after_the_hold(tmp_path):
    from serving.runtime import HOLD_S

    store = InlineStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = _holding_writer(store)  # it says more is coming, but nothing comes
        started = time.monotonic()
        await asyncio.wait_for(writer.submit(_rows("alone")), 5)
        waited = time.monotonic() - started
        await writer.close()
        return waited

    waited = asyncio.run(main())
    assert HOLD_S * 0.9 <= waited < 1.0  # the hold's length, then its own commit
    assert store.commits == [1] and store.count() == 1
    store.dispose()


def test_a_hold_nothing_joined_pauses_holding_and_close_holds_nothing(tmp_path, monkeypatch):
    """A slow upload counts as on its way for as long as it lasts: after one hold that
    nothing joined, groups commit at once for a while. And close() commits what it drains
    at once, however long a hold would be."""
    import serving.runtime as runtime

    store = InlineStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = _holding_writer(store)
        await asyncio.wait_for(writer.submit(_rows("alone")), 5)  # held, then released
        following = writer.submit(_rows("next"))
        await asyncio.sleep(0)  # the iteration ends: its flush runs
        await asyncio.sleep(0)
        assert following.done()  # committed at once, not held again
        writer._hold_after = 0.0  # the pause over
        monkeypatch.setattr(runtime, "HOLD_S", 30.0)
        last = writer.submit(_rows("last"))  # and close() in the same iteration
        started = time.monotonic()
        await writer.close()
        assert last.done() and last.exception() is None
        assert time.monotonic() - started < 5

    asyncio.run(main())
    assert store.count() == 3 and store.commits == [1, 1, 1]
    store.dispose()


def test_a_group_over_half_the_inline_bound_is_not_held(tmp_path):
    """Two such groups would be too large to commit on the loop together: no gain in
    holding one (64-row requests commit one a commit, as before)."""
    from serving.runtime import INLINE_ROWS

    store = InlineStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = _holding_writer(store)
        future = writer.submit(_rows("big", INLINE_ROWS // 2 + 1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert future.done()  # committed in its own iteration
        await writer.close()

    asyncio.run(main())
    assert store.commits == [INLINE_ROWS // 2 + 1]
    store.dispose()


def test_a_hold_that_was_joined_leaves_no_timer_to_cut_the_next_one_short(tmp_path, monkeypatch):
    import serving.runtime as runtime

    monkeypatch.setattr(runtime, "HOLD_S", 0.05)
    store = InlineStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main():
        writer = _holding_writer(store)
        first = writer.submit(_rows("a"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not first.done()  # held
        await asyncio.wait_for(asyncio.gather(first, writer.submit(_rows("b"))), 5)  # joined
        await asyncio.sleep(0.03)
        started = time.monotonic()
        await asyncio.wait_for(writer.submit(_rows("c")), 5)  # its own hold, all of it
        waited = time.monotonic() - started
        await writer.close()
        return waited

    assert asyncio.run(main()) >= 0.04  # the first hold's timer would have ended it at 0.02
    assert store.commits == [2, 1]
    store.dispose()
