"""A broken gRPC peer over raw HTTP/2 (the h2 library): it opens streams, sends
part of a length-prefixed gRPC message and stalls, to see what the sidecar
holds and when it lets go. Used by tests/test_strangers.py."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


def grpc_frame(message: bytes) -> bytes:
    """A whole gRPC message: uncompressed flag, 4-byte big-endian length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def truncated_frame(claimed: int, sent: bytes) -> bytes:
    """The prefix of a `claimed`-byte message followed by only `sent` bytes of it."""
    assert len(sent) < claimed
    return struct.pack(">BI", 0, claimed) + sent


@dataclass
class StreamEnd:
    """How the sidecar ended one stream: its grpc-status (None if it reset the
    stream instead) and grpc-message."""

    status: int | None
    message: str = ""
    reset: bool = False


@dataclass
class RawPeer:
    """One HTTP/2 connection to the sidecar, driven by hand."""

    host: str
    port: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    conn: h2.connection.H2Connection = field(
        default_factory=lambda: h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    )
    ended: dict[int, StreamEnd] = field(default_factory=dict)
    _trailers: dict[int, dict[str, str]] = field(default_factory=dict)
    closed: bool = False
    settled: bool = False

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.conn.initiate_connection()
        await self._flush()
        # The server's SETTINGS (its stream limit, its windows) before any stream.
        assert self.reader is not None
        while not self.settled:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise ConnectionError("the sidecar closed the connection during the HTTP/2 handshake")
            for event in self.conn.receive_data(data):
                self._handle(event)
            await self._flush()

    async def _flush(self) -> None:
        assert self.writer is not None
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def open(self, method: str, data: bytes, *, end: bool = False, metadata: dict[str, str] | None = None) -> int:
        """Opens a stream for `method`, sends `data` (closing the request side if `end`)."""
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(metadata or {}).items(),
        ]
        self.conn.send_headers(stream_id, headers)
        if data or end:
            self.conn.send_data(stream_id, data, end_stream=end)
        await self._flush()
        return stream_id

    async def read_until(self, stream_ids: set[int], timeout: float) -> None:
        """Reads frames until every stream in `stream_ids` has ended, the
        connection closes, or `timeout` passes (then returns; check `ended`)."""
        assert self.reader is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed and not stream_ids <= self.ended.keys():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                return
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                self._handle(event)
            await self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            assert event.stream_id is not None
            headers = {_text(k): _text(v) for k, v in event.headers or ()}
            trailers = self._trailers.setdefault(event.stream_id, {})
            trailers.update(headers)
            if "grpc-status" in headers:
                self.ended[event.stream_id] = StreamEnd(int(headers["grpc-status"]), headers.get("grpc-message", ""))
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.flow_controlled_length is not None
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self.ended.setdefault(event.stream_id, StreamEnd(None, reset=True))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
