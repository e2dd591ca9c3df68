"""An asyncio event loop on a daemon thread, started only once its setup coroutine has succeeded,
and stopped with every task on it cancelled.

The HTTP front end and the gRPC proxy each serve from such a thread beside embed-server's
supervision; a setup failure (e.g. the port is taken) is raised in the caller, not lost in the thread.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, Optional, Tuple


def start_loop_thread(setup: Callable[[], Awaitable], name: str) -> Tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """Runs `setup()` on a new loop in a new daemon thread, then the loop forever; returns
    (loop, thread) once setup has finished, or raises setup's error."""
    ready = threading.Event()
    failure: list = []
    loop = asyncio.new_event_loop()

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(setup())
        except BaseException as err:  # noqa: BLE001 - raised in the caller below
            failure.append(err)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    return loop, thread


def stop_loop_thread(loop: Optional[asyncio.AbstractEventLoop], thread: Optional[threading.Thread],
                     close: Optional[Callable[[], object]] = None) -> None:
    """Stops a start_loop_thread loop: `close()` on it first (e.g. the listening server's), every
    other task cancelled and awaited, the loop stopped, the thread joined (10 s at most)."""
    if loop is None or thread is None or not loop.is_running():
        return

    async def shutdown():
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.stop()

    asyncio.run_coroutine_threadsafe(shutdown(), loop)
    thread.join(10)
