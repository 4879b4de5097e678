"""Shadow scoring: a second version (`MLOPS_SHADOW_MODEL`, e.g. `challenger`) scores a share
of the requests off the response path, and its answers are logged under the same ids.

A request offers its rows once the champion's answer is computed; `offer` only appends to a
bounded list, so the answer is never delayed or changed by the shadow. A thread of its own
scores whatever has gathered (in passes of at most `batch_max_rows`) and hands the rows to
the log writer, which commits them between the prediction log's groups. A shadow
that is not loaded or falls behind (more than `shadow_max_pending_rows` waiting) skips rows,
one that raises fails them: either costs its rows only, counted on /metrics. Agreement and both
versions' accuracy on the same labelled rows come from the prediction store, where the
labels that arrive through /feedback join the champion's rows.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time

import numpy as np

from pipeline.store import PredictionStore, encode_rows
from serving import metrics
from serving.runtime import LogWriter, ModelManager

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 10.0  # how often the agreement and accuracy gauges are read from the store
# Once rows wait, gather for this long before a pass: a pass per request would cost the
# event loop a wake-up and the GIL per request (1-row traffic paid ~25% for that).
GATHER_S = 0.01
# A label can arrive before the shadow's answer is written, and its stamp is taken before
# its commit: each read of the labelled pairs starts this long before the previous read
# did, so a pair completed late is still counted (once).
LATENESS_S = 60.0


class Shadow:
    def __init__(self, settings, store: PredictionStore, writer: LogWriter) -> None:
        self.settings = settings
        self.store, self.writer = store, writer
        self.manager = ModelManager(settings, ref=settings.shadow_model, primary=False)
        self.fraction = settings.shadow_fraction
        self.max_pending = settings.shadow_max_pending_rows
        self._pending: list[tuple] = []
        self._pending_rows = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._random = random.Random()
        self.started_at = time.time()
        self.counts = {"scored": 0, "agreed": 0, "skipped": 0, "failed": 0}
        self.summary: list[dict] = []
        self._pairs: dict[tuple[str, str], list[int]] = {}  # labelled, right each
        self._after = self.started_at  # rows labelled after this are read again
        # (id, shadow version) -> (labelled at, champion version, right each) of the pairs
        # counted that were labelled after _after: what a read may return a second time
        self._seen: dict[tuple[str, str], tuple[float, str, int, int]] = {}
        self._summary_lock = threading.Lock()  # the thread's reads, and any caller's

    def start(self) -> None:
        self._thread.start()
        self.manager.start_polling()  # follows the alias as the champion's manager does

    def stop(self) -> None:
        self.manager.stop()
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def offer(self, ids: list[str], rows: np.ndarray, labels: list[int], version: str) -> None:
        """On the event loop, after the champion answered: queue the rows, or count them
        as skipped when the shadow is behind. Never raises."""
        if self.fraction < 1.0 and self._random.random() >= self.fraction:
            return
        n = len(ids)
        if self.manager.current is None:  # not loaded (yet): /model says why
            self._count("skipped", n)
            return
        with self._cond:
            if self._pending_rows + n > self.max_pending:
                self._count("skipped", n)
                return
            if not self._pending:
                self._cond.notify()  # the first of a gathering wakes the thread
            self._pending.append((ids, rows, labels, version))
            self._pending_rows += n

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        metrics.SHADOW_ROWS.labels(outcome).inc(n)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # refresh() reports on /ready; keep going
            self.manager.refresh()
        next_summary = time.monotonic() + SUMMARY_EVERY_S
        while True:
            with self._cond:
                if not self._pending and not self._stop:
                    self._cond.wait(timeout=1.0)
                if self._stop and not self._pending:
                    return
            if not self._stop:
                time.sleep(GATHER_S)
            with self._cond:
                items, self._pending, self._pending_rows = self._pending, [], 0
            if items:
                self._score(items)
            if time.monotonic() >= next_summary:
                self._summarise()
                next_summary = time.monotonic() + SUMMARY_EVERY_S

    def _score(self, items: list[tuple]) -> None:
        """Score in passes of at most batch_max_rows (larger passes cost more per row)."""
        chunk: list[tuple] = []
        rows = 0
        for item in items:
            if chunk and rows + len(item[0]) > self.settings.batch_max_rows:
                self._score_pass(chunk)
                chunk, rows = [], 0
            chunk.append(item)
            rows += len(item[0])
        if chunk:
            self._score_pass(chunk)

    def _score_pass(self, items: list[tuple]) -> None:
        n = sum(len(ids) for ids, *_ in items)
        model = self.manager.current
        if model is None:
            self._count("failed", n)
            return
        try:
            rows = np.concatenate([r for _, r, _, _ in items])
            probs = model.predictor.predict_proba(rows)
        except Exception as exc:  # noqa: BLE001 - the shadow's failure is its own
            self._count("failed", n)
            log.warning("shadow v%s failed on %d rows: %s", model.version, n, exc)
            return
        labels = probs.argmax(axis=1)
        champion = np.concatenate([np.asarray(lbl) for _, _, lbl, _ in items])
        self._count("scored", n)
        self._count("agreed", int((labels == champion).sum()))
        ids = [i for batch, *_ in items for i in batch]
        now = time.time()
        out = [
            (i, model.version, model.name, now, int(lbl), p)
            for i, lbl, p in zip(ids, labels.tolist(), encode_rows(probs), strict=True)
        ]
        self.writer.submit_shadow(out)

    def _summarise(self) -> None:
        """Agreement (this process's own counts) and both versions' accuracy on the same
        labelled rows, kept up to date incrementally: each call reads only the rows
        labelled since LATENESS_S before the last call (a full join every few seconds grew
        with the log) and counts each pair once, though it is read again and its shadow
        answer may land after its label. A re-labelled row is counted with its new label
        instead of its old: within LATENESS_S of the old label by the ids kept, later by
        the old label the store keeps for each overwrite (`label_history`), taken back
        where it was stamped after this shadow started: the newest one stamped before the
        ids kept begin (a later one, not among them, was never counted)."""
        with self._summary_lock:
            self._summarise_locked()

    def _summarise_locked(self) -> None:
        start = time.time()
        try:
            found = self.store.shadow_labelled_since(self.settings.model_name, self._after)
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not stop the shadow
            log.debug("shadow summary: %s", exc)
            return
        for pid, champ, shadow, label, shadow_label, truth, at, before, before_at in found:
            right_c, right_s = int(label == truth), int(shadow_label == truth)
            old = self._seen.get((pid, shadow))
            if old is None and before is not None:
                # re-labelled after its old label left the ids kept: every label counted
                # since _after is among them, so the one counted is the newest stamped
                # at or before it (later ones were overwritten before their pair was read)
                while before is not None and before_at > self._after:
                    before, before_at = self.store.label_before(pid, before_at)
                if before is not None and before_at > self.started_at:
                    old = (before_at, champ, int(label == before), int(shadow_label == before))
                    if not self._pairs.get((champ, shadow), [0])[0]:
                        old = None  # nothing to take it back from (not counted after all)
            elif old is not None and old[1:] == (champ, right_c, right_s):
                self._seen[(pid, shadow)] = (max(old[0], at), *old[1:])  # a newer stamp
                continue  # counted already
            if old is not None:
                earlier = self._pairs[(old[1], shadow)]  # re-labelled: the new label counts
                earlier[0] -= 1
                earlier[1] -= old[2]
                earlier[2] -= old[3]
            pair = self._pairs.setdefault((champ, shadow), [0, 0, 0])
            pair[0] += 1
            pair[1] += right_c
            pair[2] += right_s
            self._seen[(pid, shadow)] = (at, champ, right_c, right_s)
        self._after = max(self.started_at, start - LATENESS_S)
        self._seen = {k: v for k, v in self._seen.items() if v[0] > self._after}
        self.summary = [
            {
                "champion": champ,
                "shadow": shadow,
                "labelled": n,
                "champion_accuracy": right_c / n,
                "shadow_accuracy": right_s / n,
            }
            for (champ, shadow), (n, right_c, right_s) in self._pairs.items()
            if n
        ]
        if self.counts["scored"]:
            metrics.SHADOW.labels("agreement").set(self.counts["agreed"] / self.counts["scored"])
        labelled = sum(s["labelled"] for s in self.summary)
        metrics.SHADOW.labels("labelled_rows").set(labelled)
        if labelled:
            for role in ("champion", "shadow"):
                right = sum(s[f"{role}_accuracy"] * s["labelled"] for s in self.summary)
                metrics.SHADOW.labels(f"{role}_accuracy").set(right / labelled)

    def info(self) -> dict:
        model = self.manager.current
        return {
            "model_ref": self.settings.shadow_model,
            "model_version": model.version if model else None,
            "fraction": self.fraction,
            "rows": dict(self.counts),
            "last_error": self.manager.last_error,
        }
