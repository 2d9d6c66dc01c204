"""A loopback TCP proxy that fails like a network.

`cut()` drops every connection and refuses new ones; `partition()` goes silent
(bytes dropped, nothing closed, like a lost route); `resume()` and `heal()` bring
the path back. `hold()` keeps what clients send until `release()` (a slow
target, without a sleep). Tests and the chaos bench put one between a client and
the broker (or the API server).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testkit.broker import Broker


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a target.

    `cut()` severs it (connections reset, new ones refused) and `resume()` heals
    that. `partition()` is the silent kind a real network fault makes: nothing is
    closed, bytes in both directions are dropped and new connections are
    accepted but never reach the target, until `heal()`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._healed = asyncio.Event()
        self._healed.set()
        self._released = asyncio.Event()
        self._released.set()
        self.holding = asyncio.Event()
        """Set once `hold()` keeps bytes a client sent."""
        self.passes: int | None = None
        """How many more connections reach the target (None: all); the others are closed
        at once, as a broker at its connection limit does."""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._healed.wait()  # a partitioned network never answers the SYN's peer
        if self._server is None:  # cut or closed meanwhile
            writer.transport.abort()
            return
        if self.passes is not None:
            if self.passes == 0:
                writer.close()
                return
            self.passes -= 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for source, sink, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(source, sink, upstream=upstream))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if not self._healed.is_set():
                    continue  # dropped on the floor, as a partitioned link does
                if upstream and not self._released.is_set():
                    self.holding.set()
                    await self._released.wait()  # kept, in order: later bytes queue behind
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()
            self._writers.discard(sink)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def resume(self) -> None:
        """Accept connections again on the same port."""
        await self.start()

    def partition(self) -> None:
        """Drop every byte silently, in both directions, without closing anything."""
        self._healed.clear()

    def heal(self) -> None:
        """Forward again; connections that lived through the partition carry on."""
        self._healed.set()

    def hold(self) -> None:
        """Keep the bytes clients send (nothing dropped, nothing closed) until `release()`."""
        self.holding.clear()
        self._released.clear()

    def release(self) -> None:
        """Forward what `hold()` kept, in order, and whatever follows."""
        self._released.set()

    async def close(self) -> None:
        self.release()
        self.heal()
        await self.cut()

    def url(self, broker: Broker, user: str = "actor") -> str:
        return broker.url(user).replace(f":{broker.port}", f":{self.port}")
