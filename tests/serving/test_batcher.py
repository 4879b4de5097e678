"""The micro-batcher: concurrent requests share forward passes that never exceed the row
cap (larger passes cost more per row), and each request gets back exactly its own rows."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np

from serving.runtime import MicroBatcher


class SlowRowSum:
    """A stand-in predictor (the batching logic is under test, not the model): each pass
    takes a little while so requests queue behind it; records each pass's size."""

    def __init__(self) -> None:
        self.passes: list[int] = []
        self.gate = threading.Event()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.passes.append(len(x))
        return np.stack([x.sum(axis=1), -x.sum(axis=1)], axis=1)


def _batcher(max_rows: int) -> tuple[MicroBatcher, SlowRowSum]:
    predictor = SlowRowSum()
    manager = SimpleNamespace(current=SimpleNamespace(predictor=predictor))
    return MicroBatcher(manager, max_rows=max_rows, max_wait_s=0.002), predictor


def test_passes_never_exceed_the_row_cap_and_answers_stay_with_their_requests():
    async def run():
        batcher, predictor = _batcher(max_rows=256)
        batcher.start()
        predictor.gate.clear()  # hold the first pass so the other requests queue up
        sizes = [100, 100, 100, 60, 200, 30, 256, 1]
        requests = [np.full((n, 3), float(k), np.float32) for k, n in enumerate(sizes)]
        tasks = [asyncio.create_task(batcher.predict(r)) for r in requests]
        await asyncio.sleep(0.05)
        predictor.gate.set()
        answers = await asyncio.gather(*tasks)
        await batcher.stop()
        return predictor.passes, requests, answers

    passes, requests, answers = asyncio.run(run())
    assert sum(passes) == sum(len(r) for r in requests)
    assert max(passes) <= 256, passes
    assert len(passes) < len(requests)  # queued requests did share passes
    for rows, (probs, _model) in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(probs[:, 0], rows.sum(axis=1))


def test_a_request_larger_than_the_cap_still_gets_one_pass():
    async def run():
        batcher, predictor = _batcher(max_rows=8)
        batcher.start()
        probs, _ = await batcher.predict(np.ones((20, 3), np.float32))
        await batcher.stop()
        return predictor.passes, probs

    passes, probs = asyncio.run(run())
    assert passes == [20]
    assert probs.shape == (20, 2)
