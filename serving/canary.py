"""The server's side of a canary rollout (pipeline/rollout.py): follow the running rollout
in the prediction store, load its candidate, route a sticky share of clients to it, and let
the guard rails decide.

A client is named by its `X-Client-Id` header; a request without one is routed at random
(it still lands on the candidate with the rollout's probability). A row the candidate fails
on is answered by the champion and counted, so a broken candidate costs no client request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time

from pipeline import rollout
from pipeline.store import PredictionStore
from serving import metrics
from serving.runtime import MicroBatcher, ModelManager, SideWriter

log = logging.getLogger(__name__)


class Canary:
    def __init__(
        self,
        settings,
        store: PredictionStore,
        side: SideWriter,
        champion: ModelManager,
        batcher: MicroBatcher,
    ) -> None:
        self.settings, self.store, self.side = settings, store, side
        self.champion = champion
        self.manager = ModelManager(settings, primary=False)
        self.batcher = MicroBatcher(
            self.manager,
            batcher.max_rows,
            batcher.max_wait_s,
            executor=batcher._executor,  # a candidate, unknown until measured: never inline
        )
        self.rollout: dict | None = None  # the running rollout, when its candidate is loaded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._random = random.Random()
        self._last_check = 0.0

    def start(self) -> None:
        self.batcher.start()
        if self.settings.rollout_poll_s > 0:
            self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        await self.batcher.stop()

    def pick(self, client_id: str | None) -> bool:
        """Whether this request goes to the candidate."""
        current = self.rollout
        if current is None:
            return False
        place = rollout.bucket(client_id) if client_id else self._random.random()
        return place < current["fraction"]

    def failed(self, version: str, rows: int) -> None:
        metrics.CANARY_ROWS.labels("failed").inc(rows)
        name = self.settings.model_name
        self.side.submit(lambda: self.store.add_event(name, version, "canary_failed", rows))

    def _run(self) -> None:
        while not self._stop.wait(self.settings.rollout_poll_s):
            with contextlib.suppress(Exception):  # a store hiccup: try again next time
                self.poll()

    def poll(self) -> None:
        """Follow the store: load a new rollout's candidate, stop routing to an ended one,
        and evaluate the guard rails (one process at a time decides)."""
        running = self.store.running_rollout(self.settings.model_name)
        if running is None:
            if self.rollout is not None:
                # Promoted or aborted: follow the champion now, not at the next poll, and only
                # then stop routing: until the promoted candidate is loaded as the champion,
                # its clients stay on it instead of bouncing back to the old champion.
                with contextlib.suppress(Exception):
                    self.champion.refresh()
                self.rollout = None
                metrics.CANARY_FRACTION.set(0)
            return
        if self.manager.current is None or self.manager.current.version != running["candidate"]:
            # A candidate that cannot load is routed to anyway: every row it gets is
            # answered by the champion and counted, so the error-rate guard rolls it back.
            with contextlib.suppress(Exception):
                self.manager.refresh(running["candidate"])
        self.rollout = running
        metrics.CANARY_FRACTION.set(running["fraction"])
        guards = rollout.guards_of(running)
        if time.monotonic() - self._last_check >= guards.check_interval_s:
            self._last_check = time.monotonic()
            verdict = rollout.step(self.settings, self.store)
            if verdict is not None and verdict.decision != "wait":
                self.poll()  # act on it at once in this process

    def info(self) -> dict | None:
        current = self.rollout
        if current is None:
            return None
        loaded = self.manager.current
        return {
            "candidate": current["candidate"],
            "champion": current["champion"],
            "fraction": current["fraction"],
            "candidate_loaded": loaded is not None and loaded.version == current["candidate"],
            "last_error": self.manager.last_error,
        }
