"""Requests in flight, counted by the server's protocol, and what the log's hold makes of
them: a small group waits for the next one only while other answers are on their way."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import uvicorn
from uvicorn.server import ServerState

from pipeline.store import LoggedRequest, PredictionStore, new_ids
from serving import protocol
from serving.deps import State
from serving.protocol import GuardedHttpTools, requests_in_flight
from serving.runtime import LogWriter, MicroBatcher, answers_coming
from tests.serving.test_one_write import RecordingTransport

OK = [
    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
    {"type": "http.response.body", "body": b"ok"},
]


def test_a_request_is_in_flight_from_its_head_to_its_answer_or_its_cut_connection():
    """Counted from the moment its head is read, before its handler has run (the requests
    the batcher's own count misses), until its answer is complete; a connection cut before
    the answer releases it, and a head not yet complete is no request."""

    async def main() -> list[int]:
        gate = asyncio.Event()

        async def app(scope, receive, send) -> None:
            # a POST reads its body: the cut connection ends it
            if scope["method"] == "POST" and (await receive())["type"] == "http.disconnect":
                return
            await gate.wait()
            for message in OK:
                await send(message)

        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        config.load()
        loop = asyncio.get_running_loop()

        def connection() -> GuardedHttpTools:
            p = GuardedHttpTools(config, ServerState(), {}, loop)
            p.connection_made(RecordingTransport())
            return p

        base = requests_in_flight()
        seen = []
        waiting, cut, partial = connection(), connection(), connection()
        waiting.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        seen.append(requests_in_flight() - base)  # read; its handler has not run yet
        cut.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
        partial.data_received(b"GET / HTTP/1.1\r\nHo")  # no complete head: no request
        seen.append(requests_in_flight() - base)
        for _ in range(10):
            await asyncio.sleep(0)
        seen.append(requests_in_flight() - base)  # both handlers wait
        cut.connection_lost(None)
        seen.append(requests_in_flight() - base)
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        seen.append(requests_in_flight() - base)  # answered
        waiting.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the next on its connection
        seen.append(requests_in_flight() - base)
        for _ in range(20):
            await asyncio.sleep(0)
        waiting.connection_lost(None)  # closed after its answers: nothing more to release
        partial.connection_lost(None)
        seen.append(requests_in_flight() - base)
        return seen

    assert asyncio.run(main()) == [1, 2, 2, 1, 0, 1, 0]


def _request() -> LoggedRequest:
    x = np.ones((1, 4), np.float32)
    return LoggedRequest(new_ids(1), time.time(), "m", "1", x, [0], x, 1.0)


def test_answers_are_coming_for_requests_in_flight_but_not_for_the_writers_own(tmp_path):
    """Requests in flight make answers on their way, unless the writer already has their
    rows or they are in a pass on the inference thread; the batcher's own count (requests
    being parsed or queued) still counts where there is no protocol (ASGI test clients)."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()

    async def main() -> list[bool]:
        writer = LogWriter(store, max_queue=100)  # more_coming None: nothing is held
        writer.start()
        writer.schema_ready = True
        batcher = MicroBatcher(None, max_rows=256, max_wait_s=0.002)  # type: ignore[arg-type]
        seen = [answers_coming(0, writer, batcher), answers_coming(1, writer, batcher)]
        committed = writer.submit(_request())  # one request's rows are the writer's now
        seen += [answers_coming(1, writer, batcher), answers_coming(2, writer, batcher)]
        batcher.in_thread = 1  # the other one is in a pass on the inference thread
        seen.append(answers_coming(2, writer, batcher))
        batcher.in_thread = 0
        batcher.arriving = 1  # being parsed, with no protocol counting
        seen.append(answers_coming(0, writer, batcher))
        batcher.arriving = 0
        await asyncio.wait_for(committed, 5)
        seen.append(answers_coming(1, writer, batcher))  # settled: the one left is coming
        await writer.close()
        return seen

    assert asyncio.run(main()) == [False, True, False, True, False, True, True]
    store.dispose()


def test_the_servers_log_holds_for_requests_in_flight(settings, monkeypatch):
    """The server's writer asks the protocol's count: a request read by the server and
    not yet in a handler makes a small group wait for it."""
    state = State(settings)
    assert state.writer.more_coming is not None
    assert state.writer.more_coming() is False
    monkeypatch.setattr(protocol, "_in_flight", 1)
    assert state.writer.more_coming() is True
    state.store.dispose()


def test_the_servers_writer_knows_how_many_workers_share_its_log(settings):
    """MLOPS_SERVE_WORKERS (what `mlops serve --workers N` gives its workers) reaches the writer,
    whose checkpoints then spread over the workers (tests/pipeline/test_store.py)."""
    for workers in (1, 2):
        state = State(settings.model_copy(update={"serve_workers": workers}))
        assert state.writer.sharers == workers
        state.store.dispose()
    assert settings.serve_workers == 1  # the default: one process, checkpoints as measured
