"""The micro-batcher: concurrent requests share forward passes that never exceed the row
cap (larger passes cost more per row), and each request gets back exactly its own rows."""

from __future__ import annotations

import asyncio
import threading
import time
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


class _Writer:
    """Collects what the shadow hands to the log writer."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def submit_shadow(self, rows) -> None:
        self.rows += rows


def _shadow(predictor, max_pending: int = 1000):
    from serving.shadow import Shadow

    settings = SimpleNamespace(
        shadow_model="2", shadow_fraction=1.0, shadow_max_pending_rows=max_pending,
        batch_max_rows=256, model_name="m", model_ref="champion", reload_interval_s=0,
    )  # fmt: skip
    shadow = Shadow(settings, store=None, writer=_Writer())
    model = SimpleNamespace(predictor=predictor, version="2", name="m")
    shadow.manager.current = model  # as if loaded (the load itself is tested on a real app)
    return shadow


class Raising:
    def predict_proba(self, x):
        raise RuntimeError("the shadow model broke")


def test_a_shadow_that_raises_or_falls_behind_only_counts_its_rows():
    import time

    broken = _shadow(Raising())
    broken._thread.start()
    broken.offer(["a", "b"], np.ones((2, 3), np.float32), [1, 1], "1")  # never raises
    deadline = time.monotonic() + 5
    while broken.counts["failed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    broken.stop()
    assert broken.counts["failed"] == 2 and broken.writer.rows == []

    slow = SlowRowSum()
    slow.gate.clear()  # the shadow's pass hangs: what arrives meanwhile must not pile up
    behind = _shadow(slow, max_pending=10)
    behind._thread.start()
    behind.offer(["x"], np.ones((1, 3), np.float32), [0], "1")
    time.sleep(0.1)  # the thread took it and is stuck in the pass
    for k in range(5):
        behind.offer([f"r{k}-{j}" for j in range(4)], np.ones((4, 3), np.float32), [0] * 4, "1")
    assert behind.counts["skipped"] == 12  # 8 rows wait (<= 10); the other 12 are skipped
    slow.gate.set()
    behind.stop()
    assert behind.counts["scored"] == 9 and len(behind.writer.rows) == 9


class ThreadNoting(SlowRowSum):
    """Also notes the thread each pass ran on; `delay_s` makes each pass that slow."""

    def __init__(self, device: str = "cpu", delays_s: tuple[float, ...] = (0.0,)) -> None:
        super().__init__()
        self.gate.set()
        self.threads: list[str] = []
        self.device = SimpleNamespace(type=device)  # as torch.device(...).type
        self.delays_s = delays_s  # pass k takes delays_s[k % len(delays_s)]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delays_s[len(self.threads) % len(self.delays_s)])
        self.threads.append(threading.current_thread().name)
        return super().predict_proba(x)


def _passes(predictor: ThreadNoting, sizes: list[int]) -> tuple[list[str], list, list]:
    async def run():
        manager = SimpleNamespace(current=SimpleNamespace(predictor=predictor, version="1"))
        batcher = MicroBatcher(manager, max_rows=256, max_wait_s=0.002, inline_rows=32)
        batcher.start()
        requests = [np.arange(n * 3, dtype=np.float32).reshape(n, 3) for n in sizes]
        answers = [await batcher.predict(r) for r in requests]
        await batcher.stop()
        return predictor.threads, requests, answers

    return asyncio.run(run())


def test_small_passes_run_on_the_event_loop_and_larger_ones_on_the_inference_thread():
    threads, requests, answers = _passes(ThreadNoting(), [32, 33, 1])
    assert threads[0] == "MainThread" and threads[1].startswith("inference")
    assert threads[2] == "MainThread"
    for rows, (probs, _model) in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(probs[:, 0], rows.sum(axis=1))


def test_no_inline_pass_on_a_gpu_or_for_a_model_whose_small_passes_are_slow():
    # a GPU cannot run here: the stand-in only says its device is one (an inline pass
    # would hold the event loop while waiting for the device)
    threads, _, _ = _passes(ThreadNoting(device="cuda"), [1, 1])
    assert all(t.startswith("inference") for t in threads)
    # a heavy model: after a few slow inline passes in a row, its small passes leave the loop
    threads, _, answers = _passes(ThreadNoting(delays_s=(0.02,)), [1] * 5)
    assert threads[:3] == ["MainThread"] * 3
    assert all(t.startswith("inference") for t in threads[3:])
    assert all(probs.shape == (1, 2) for probs, _ in answers)
    # a slow pass now and then (a pause of the whole process) is no heavy model
    threads, _, _ = _passes(ThreadNoting(delays_s=(0.02, 0.02, 0.0)), [1] * 8)
    assert threads == ["MainThread"] * 8
