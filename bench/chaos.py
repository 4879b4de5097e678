"""The chaos thread of `bench/soak.py --chaos`: the reliability suite's faults, at random,
against a running server, each checked for the outcome it must have."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import httpx


class Chaos:
    def __init__(self, url: str, root: Path, row: list[float], seed: int = 0) -> None:
        self.url, self.root, self.row = url, root, row
        self.port = int(url.rsplit(":", 1)[1])
        self.rng = random.Random(seed)
        self.applied: Counter[str] = Counter()
        self.anomalies: list[str] = []
        self.acknowledged: list[str] = []  # the chaos's own predictions answered 200
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._sockets: list[socket.socket] = []
        self._n = 0

    def start(self) -> Chaos:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        for sock in self._sockets:
            sock.close()

    def report(self) -> list[str]:
        print("chaos applied: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.applied.items())))
        self._check_champion()
        for line in self.anomalies:
            print(f"chaos anomaly: {line}")
        return self.anomalies

    def _run(self) -> None:
        faults = [
            self.header_bomb,
            self.slowloris,
            self.oversized_body,
            self.stalled_body,
            self.conflicting_labels,
            self.promotion_race,
        ]
        while not self._stop.wait(self.rng.uniform(0.3, 1.2)):
            fault = self.rng.choice(faults)
            try:
                fault()
                self.applied[fault.__name__] += 1
            except Exception as exc:  # noqa: BLE001 - a fault that breaks the harness is news
                self.anomalies.append(f"{fault.__name__}: {type(exc).__name__}: {exc}")

    # --- the faults ---------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    @staticmethod
    def _first_line(sock: socket.socket) -> bytes:
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return data.split(b"\r\n", 1)[0]

    def header_bomb(self) -> None:
        with self._connect() as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000)
            line = self._first_line(sock)
        if b" 431 " not in line:
            self.anomalies.append(f"header bomb answered {line!r}, not 431")

    def slowloris(self) -> None:
        for _ in range(40):
            sock = self._connect()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            self._sockets.append(sock)

    def oversized_body(self) -> None:
        body = json.dumps({"instances": [self.row] * 30_000}).encode()  # ~5 MB
        request = urllib.request.Request(
            self.url + "/predict", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=30)
            self.anomalies.append("oversized body accepted")
        except urllib.error.HTTPError as exc:
            if exc.code != 413:
                self.anomalies.append(f"oversized body answered {exc.code}, not 413")
        except urllib.error.URLError as exc:
            self.anomalies.append(f"oversized body: no 413 to read ({exc.reason})")

    def stalled_body(self) -> None:
        with self._connect() as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            line = self._first_line(sock)
        if b" 408 " not in line:
            self.anomalies.append(f"stalled body answered {line!r}, not 408")

    def conflicting_labels(self) -> None:
        self._n += 1
        pid = f"chaos-{self._n}"
        with httpx.Client(base_url=self.url, timeout=30) as http:
            res = http.post("/predict", json={"instances": [self.row], "ids": [pid]})
            if res.status_code != 200:
                self.anomalies.append(f"chaos predict answered {res.status_code}")
                return
            self.acknowledged.append(pid)
        outcomes: dict[int, int] = {}
        barrier = threading.Barrier(2)

        def post(label: int) -> None:
            with httpx.Client(base_url=self.url, timeout=30) as http:
                barrier.wait()
                body = {"labels": [{"id": pid, "label": label}]}
                outcomes[label] = http.post("/feedback", json=body).status_code

        threads = [threading.Thread(target=post, args=(label,)) for label in (3, 7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if sorted(outcomes.values()) != [200, 409]:
            self.anomalies.append(
                f"conflicting labels for {pid}: {outcomes}, not one 200 and one 409"
            )

    def promotion_race(self) -> None:
        from pipeline.config import get_settings
        from pipeline.registry import RegistryError, rollback, set_champion
        from pipeline.tracking import configure_tracking

        get_settings.cache_clear()
        settings = get_settings()
        configure_tracking(settings)

        def promote() -> None:
            with contextlib.suppress(RegistryError):
                set_champion(settings, "2", reason="chaos")

        def back() -> None:
            with contextlib.suppress(RegistryError):
                rollback(settings, reason="chaos")

        threads = [threading.Thread(target=f) for _ in range(3) for f in (promote, back)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _check_champion(self) -> None:
        if not self.applied["promotion_race"]:
            return
        from pipeline.config import get_settings
        from pipeline.ledger import champion_history
        from pipeline.registry import CHAMPION, alias_version

        settings = get_settings()
        alias = alias_version(settings.model_name, CHAMPION)
        ledger = champion_history(settings)
        if not ledger or ledger[-1] != alias:
            self.anomalies.append(f"champion alias v{alias} but the ledger says {ledger[-1:]}")
