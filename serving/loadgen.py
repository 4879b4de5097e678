"""A client-side load generator: soak a running prediction server and account for what it
acknowledged. M client threads send N predictions (1-row and batched requests, alternating,
with client ids), then post the true labels of every acknowledged id.

Used by the reliability tests and by bench/soak.py. It talks HTTP only (httpx), so it can
point at any server, and imports nothing else of the project.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    """Filled in while the load runs: a caller may watch `acknowledged` grow from another
    thread (appends happen under a lock)."""

    acknowledged: list[str] = field(default_factory=list)  # ids answered 200
    failures: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # id -> version that answered
    labels_posted: int = 0
    seconds: float = 0.0


def run_load(
    url: str,
    rows: Sequence[Sequence[float]],
    labels: Sequence[int],
    n: int,
    clients: int,
    batch: int = 8,
    prefix: str = "load",
    send_labels: bool = True,
    stop: threading.Event | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """Send n rows in requests of 1 row and of `batch` rows, alternating, from `clients`
    threads; then post every acknowledged id's true label (in batches of 200).

    `rows` are plain lists of numbers (`array.tolist()`); id `{prefix}-{k}` carries row
    `k % len(rows)` and label `labels[k % len(labels)]`. `stop` ends the sending early.
    """
    result = result if result is not None else LoadResult()
    lock = threading.Lock()
    plan, i = [], 0
    while i < n:
        size = 1 if len(plan) % 2 == 0 else min(batch, n - i)
        plan.append(list(range(i, i + size)))
        i += size

    def client(part: list[list[int]]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for idx in part:
                if stop is not None and stop.is_set():
                    return
                ids = [f"{prefix}-{k}" for k in idx]
                body = {"instances": [rows[k % len(rows)] for k in idx], "ids": ids}
                try:
                    res = http.post("/predict", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        result.failures.append(f"{type(exc).__name__}")
                    continue
                with lock:
                    if res.status_code == 200:
                        version = res.json()["model_version"]
                        result.acknowledged.extend(ids)
                        result.versions.update(dict.fromkeys(ids, version))
                    else:
                        result.failures.append(f"{res.status_code} {res.text[:200]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(plan[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if send_labels:
        _post_labels(url, result, labels)
    result.seconds = time.perf_counter() - start
    return result


def _post_labels(url: str, result: LoadResult, labels: Sequence[int]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        acked = list(result.acknowledged)
        for s in range(0, len(acked), 200):
            payload = [
                {"id": pid, "label": int(labels[int(pid.rsplit("-", 1)[1]) % len(labels)])}
                for pid in acked[s : s + 200]
            ]
            res = http.post("/feedback", json={"labels": payload})
            if res.status_code != 200:
                result.failures.append(f"feedback {res.status_code} {res.text[:200]}")
            else:
                result.labels_posted += res.json()["counts"].get("labelled", 0)
