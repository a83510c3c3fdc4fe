"""Shared fixtures of the integration tests: upstream servers that stop with the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
import uvloop

from tests.harness import HOST, Handler, Upstream, echo_handler


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every integration test runs on uvloop (what the edge runs on) and on asyncio's loop."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


StartUpstream = Callable[..., Awaitable[Upstream]]
RawCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
StartRaw = Callable[[RawCallback], Awaitable[int]]


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[StartUpstream]:
    """``await upstream(handler)`` starts an :class:`Upstream`; all are stopped afterwards."""
    started: list[Upstream] = []

    async def start(handler: Handler = echo_handler) -> Upstream:
        up = await Upstream(handler).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


@pytest_asyncio.fixture
async def raw_upstream() -> AsyncIterator[StartRaw]:
    """``await raw_upstream(callback)`` serves each connection with ``callback`` (no HTTP
    parsing at all) for tests that must watch bytes arrive; returns the port."""
    servers: list[asyncio.AbstractServer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(callback: RawCallback) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await callback(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(serve, HOST, 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        with contextlib.suppress(Exception):
            await server.wait_closed()
