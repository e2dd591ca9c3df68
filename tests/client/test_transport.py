"""The transport's worker pool without a server: what may join it, and when."""

from __future__ import annotations

import asyncio

from embed_client.transport import Dispatcher, Server, ServerSpec, TransportConfig


def test_a_server_that_joins_after_the_dispatcher_closed_gets_no_workers():
    async def scenario():
        dispatcher = Dispatcher([], on_result=lambda *a: None, on_reject=lambda *a: None)
        await dispatcher.close()
        late = Server(ServerSpec.parse("127.0.0.1:1"), TransportConfig(max_in_flight=2))
        joined = dispatcher.add(late)
        return joined, len(dispatcher._tasks), dispatcher.servers

    joined, tasks, servers = asyncio.run(scenario())
    assert (joined, tasks, servers) == (False, 0, [])
