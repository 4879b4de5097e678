"""A real `mlops serve` on loopback against hostile HTTP: huge heads, slow heads and bodies,
idle connections, and a standard client sending an oversized body before reading."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ENV = {
    "MLOPS_HEADER_TIMEOUT_S": "1",
    "MLOPS_BODY_TIMEOUT_S": "1",
    "MLOPS_MAX_BODY_BYTES": str(1024 * 1024),
    "MLOPS_LINGER_BYTES": str(16 * 1024 * 1024),
}


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _read_all(sock: socket.socket, limit_s: float = 10) -> bytes:
    sock.settimeout(limit_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _health_ms(server) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(server.url + "/health", timeout=10) as res:
        assert res.status == 200
    return (time.perf_counter() - start) * 1000


def test_hostile_heads_bodies_and_idle_connections_are_bounded(live_server, digits_rows):
    server = live_server(env=ENV)

    # a 2 MB header: 431 as soon as the head passes 64 KiB, without reading the rest
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
    assert b" 431 " in _read_all(sock).split(b"\r\n", 1)[0]
    # too many header lines
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)))
    sock.sendall(b"\r\n")
    answer = _read_all(sock)
    assert b" 431 " in answer.split(b"\r\n", 1)[0], answer

    # slowloris: a head that never completes, and connections that never send a byte
    slow = _connect(server)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    idle = [_connect(server) for _ in range(20)]
    time.sleep(1.5)
    assert b" 408 " in _read_all(slow, 5)
    assert all(_read_all(s, 5) == b"" for s in idle)  # closed by the server, nothing sent

    # a body at a crawl: 408 once it stalls for the body timeout
    sock = _connect(server)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    time.sleep(1.5)
    assert b" 408 " in _read_all(sock, 5)

    # the server still answers quickly
    assert _health_ms(server) < 500

    # urllib sends the whole body before it reads: it must read the 413, not a reset
    rows = digits_rows[:1].tolist() * 20_000  # ~3 MB of JSON, over the 1 MiB limit
    body = json.dumps({"instances": rows}).encode()
    assert 1024 * 1024 < len(body) < 16 * 1024 * 1024
    request = urllib.request.Request(
        server.url + "/predict", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413
    assert "body larger than" in json.loads(err.value.read())["detail"]
