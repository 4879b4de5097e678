"""Each answer leaves in one write: the head and the body of a response, written by
uvicorn as two system calls, are joined by serving.protocol's transport wrapper."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from serving.protocol import GuardedHttpTools, _OneWrite


class RecordingTransport(asyncio.Transport):
    """A socket's stand-in that keeps each write (the protocol is real; the socket is not
    needed to see how many writes it makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        pass


async def _hello(scope, receive, send) -> None:
    assert scope["type"] == "http"
    body = b'{"hello": "world"}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"18")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def test_a_response_head_and_body_leave_in_one_write_and_keep_alive_still_works():
    async def main() -> RecordingTransport:
        config = uvicorn.Config(_hello, lifespan="off", log_level="warning")
        config.load()
        protocol = GuardedHttpTools(config, ServerState(), {}, asyncio.get_running_loop())
        transport = RecordingTransport()
        protocol.connection_made(transport)
        for _ in range(2):  # two requests on one connection
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(20):
                await asyncio.sleep(0)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for _ in range(20):
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(main())
    assert len(transport.writes) == 3  # one per response, not head + body
    for write in transport.writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n")
        assert write.endswith(b'\r\n\r\n{"hello": "world"}')
    assert transport.closed  # the client asked to close: done after the last answer


def test_the_wrapper_flushes_before_the_stream_ends_and_drops_nothing_it_was_given():
    async def main() -> tuple[RecordingTransport, list[int]]:
        transport = RecordingTransport()
        wrapped = _OneWrite(transport, asyncio.get_running_loop())
        wrapped.write(b"a")
        wrapped.write(b"b")
        sizes = [wrapped.get_write_buffer_size()]  # pending bytes count as buffered
        await asyncio.sleep(0)  # end of the loop's turn: one write
        wrapped.write(b"c")
        wrapped.write_eof()  # flushes first
        wrapped.write(b"d")
        wrapped.close()  # flushes first, then closes
        wrapped.write(b"e")  # after close: the transport would drop it too
        await asyncio.sleep(0)
        return transport, sizes

    transport, sizes = asyncio.run(main())
    assert sizes == [2]
    assert transport.writes == [b"ab", b"c", b"d"]
    assert transport.eof and transport.closed
