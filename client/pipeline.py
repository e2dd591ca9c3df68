"""The streaming pipeline: frames -> blocks -> requests on the shared queue -> embeddings -> commits.

The prep runs in a worker thread, one block (`window` consecutive frames) at a time. A block
is opened only when the request queue runs low and fewer than MAX_OPEN_BLOCKS are held
(back-pressure: memory holds the embeddings of a few blocks only). Its requests, cut per
model by the token budget, are interleaved on the dispatcher's queue; each answer fills its
rows of the block, and a block whose requests are all answered is committed (its parts, then
its manifest line). A block with a rejected frame is never committed: the run ends incomplete.
While sequences wait and no server has answered for `--silence-warning` seconds (a frozen
server holds its requests until `--timeout`), the run says so, and again each time as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import resume
from .dispatcher import Dispatcher
from .errors import InterruptedRun, OutputWriteError
from .options import RunOptions
from .progress import Counters, MetricsPoller, Progress
from .report import Rejection, Tally
from .representations import Answer, Ask, BlockRows
from .schedule import Block, Item, Request, blocks_of, cut_requests, interleave
from .servers import ServerPool
from .sink import OutputDir
from .virnucpro import PrepStats, prepare, record_of

log = logging.getLogger("embed_client")

# Letters per model token, for sizing requests: ESM-2 has one token per residue; DNABERT-S's
# BPE averages ~4-4.5 bp per token (59 bp -> 15 tokens on the published tokenizer), so
# counting its letters as tokens made its requests ~4x smaller than the budget meant.
LETTERS_PER_TOKEN = {"esm2": 1.0, "dnabert_s": 4.0}
MODEL_INPUT = {"dnabert_s": "nucleotide", "esm2": "protein"}  # Frame field each model embeds
MAX_OPEN_BLOCKS = 6          # blocks in memory at once (bounds the embeddings held)


def frames_of(records: Iterable[Tuple[str, str]], chunk: int, models: Sequence[str],
              stats: PrepStats, counters: Counters) -> Iterator[Tuple[str, Dict[str, str]]]:
    """(frame id, {model: text}) in input order; counts records and frames as the prep reads them."""
    fields = {m: MODEL_INPUT[m] for m in models}
    for frame in prepare(records, chunk, stats=stats):
        # prep works in batches: its counters move together, a batch at a time
        counters.records_read = stats.records
        counters.frames_prepped = stats.frames
        yield frame.frame_id, {m: getattr(frame, f) for m, f in fields.items()}
    counters.records_read = stats.records
    counters.frames_prepped = stats.frames
    counters.prep_done = True


@dataclass
class OpenBlock:
    """A block whose requests are out: its rows fill as the answers come back."""

    block: Block
    models: Tuple[str, ...]                          # the models computed for it in this run
    remaining: int                                   # items still unanswered (those models)
    embeddings: Dict[str, np.ndarray]                # model -> [block size, hidden]
    rejected: int = 0                                # frames a server rejected
    extras: Optional[BlockRows] = None               # bos, per-token rows, sequences (asked)


class Pipeline:
    """Streams the input's frames through the servers into committed blocks."""

    def __init__(self, options: RunOptions, frames: Iterator[Tuple[str, Dict[str, str]]],
                 out: OutputDir, pool: ServerPool, plan: resume.ResumePlan, tally: Tally,
                 counters: Counters):
        self.options = options
        self.frames = frames
        self.out = out
        self.pool = pool
        self.plan = plan
        self.tally = tally
        self.counters = counters
        self.metrics = MetricsPoller([s.spec.metrics_url for s in pool.joined])
        self.dispatcher = Dispatcher(pool.joined, self._on_result, self._on_reject)
        self.dispatcher.ask = Ask.of(options.include, options.layer)
        self.open: Dict[int, OpenBlock] = {}
        self.commits: List[asyncio.Task] = []
        self.commit_lock = asyncio.Lock()
        self.changed = asyncio.Event()               # a block was answered, committed or dropped

    async def run(self) -> None:
        """Send every block and commit it; raises the run's error (InterruptedRun on Ctrl-C or
        SIGTERM), leaving the blocks not committed for --resume."""
        options = self.options
        tty = sys.stdout.isatty() if options.tty is None else options.tty
        progress = Progress(self.counters, self.metrics, tty=tty, interval=options.log_interval)
        started = time.monotonic()
        try:
            with _sigterm_cancels(asyncio.current_task()):
                progress.start()
                await self._send_all()
        except asyncio.CancelledError:
            raise InterruptedRun(f"interrupted; continue with --resume --out {options.out}")
        finally:
            self.tally.send_seconds = time.monotonic() - started
            progress.stop()

    async def _send_all(self) -> None:
        """Produce blocks until the input ends, then wait for every open block, or fail."""
        dispatcher = self.dispatcher
        dispatcher.start()
        self.pool.feed(dispatcher, self.metrics)
        producer = asyncio.ensure_future(self._produce())
        failed = asyncio.ensure_future(dispatcher.failed.wait())
        watchdog = asyncio.ensure_future(self._watch_silence())
        try:
            await asyncio.wait({producer, failed}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                producer.result()  # an input or output error raises here
                while self.open and not dispatcher.failed.is_set():
                    self.changed.clear()
                    waiter = asyncio.ensure_future(self.changed.wait())
                    await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
            if dispatcher.failed.is_set():
                raise dispatcher.error
        finally:
            for task in (producer, failed, watchdog):
                task.cancel()
            await dispatcher.close()
            await asyncio.gather(*self.commits, return_exceptions=True)

    async def _produce(self) -> None:
        """Open the input's blocks one by one as the queue runs low; skip what is done."""
        options = self.options
        blocks = blocks_of(self.frames, options.schedule.window, options.models)
        while True:
            block = await asyncio.to_thread(next, blocks, None)
            if block is None:
                break
            models = self.plan.models_to_compute(block)
            if not models:
                continue
            await self._ensure_servers()
            await self._wait_for_room()
            self._open_block(block, models)
        self.counters.prep_done = True
        if options.resume:
            self.plan.log_outcome(servers_needed=bool(self.pool.joined))
        self.changed.set()

    async def _watch_silence(self) -> None:
        """Warn while sequences wait and no answer has come for `silence_warning` seconds."""
        limit = self.options.silence_warning
        if not limit:
            return
        answered, since, warned = -1, time.monotonic(), 0
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            count = sum(self.tally.received.values()) + len(self.tally.rejected)
            waiting = sum(state.remaining for state in self.open.values())
            if count != answered or not waiting:
                answered, since, warned = count, now, 0
                continue
            if now - since >= limit * (warned + 1):
                warned += 1
                servers = ", ".join(s.spec.url for s in self.pool.joined) or "none joined"
                log.warning("no answer from any server for %.0f s while %d sequences wait "
                            "(servers: %s); a frozen server holds its requests until --timeout "
                            "(%g s) before they are retried elsewhere", now - since, waiting,
                            servers, self.options.transport.timeout)

    async def _ensure_servers(self) -> None:
        """A --resume run contacts the servers when its first block needs computing."""
        if self.pool.joined:
            return
        await resume.connect(self.pool, self.out)
        self.pool.feed(self.dispatcher, self.metrics)

    async def _wait_for_room(self) -> None:
        """Back-pressure: open a block only when the queue runs low, and hold few in memory."""
        while self.open and (len(self.open) >= MAX_OPEN_BLOCKS
                             or self.dispatcher.queue.qsize()
                             >= sum(s.in_flight for s in self.pool.joined)):
            self.changed.clear()
            await self.changed.wait()

    def _open_block(self, block: Block, models: Tuple[str, ...]) -> None:
        """Queue the block's requests for `models`, interleaved, and hold rows for the answers."""
        hidden, max_batch = self.pool.hidden, self.pool.max_batch
        self.open[block.number] = OpenBlock(
            block, models, remaining=block.size * len(models),
            embeddings={m: np.empty((block.size, hidden[m]), np.float32) for m in models},
            extras=BlockRows.of(block.size, models, hidden, self.options.include,
                                self.options.with_sequence))
        per_model = []
        for model in models:
            items = block.items[model]
            self.tally.sent[model] += len(items)
            per_model.append(cut_requests(model, block.number, items,
                                          self.options.schedule.token_budget, max_batch[model],
                                          LETTERS_PER_TOKEN[model]))
        self.dispatcher.submit(interleave(per_model))

    # ---------------------------------------------------------------- the dispatcher's callbacks

    def _on_result(self, request: Request, embeddings: np.ndarray) -> None:
        state = self.open[request.block]
        first = state.block.first_index
        rows = [item.index - first for item in request.items]
        if isinstance(embeddings, Answer):  # asked beyond the mean (representations.py)
            if state.extras is not None:
                state.extras.store(request.model, rows, embeddings)
            embeddings = embeddings.mean
        state.embeddings[request.model][rows] = embeddings
        n = len(request.items)
        self.tally.received[request.model] += n
        self.tally.letters[request.model] += request.letters
        self.counters.sequences_done[request.model] += n
        self.counters.tokens_done += request.tokens
        self._answered(state, n)

    def _on_reject(self, request: Request, item: Item, message: str) -> None:
        log.error("model %s rejected frame %s (record %s): %s",
                  request.model, item.frame_id, record_of(item.frame_id), message)
        state = self.open[request.block]
        state.rejected += 1
        self.tally.rejected.append(Rejection(request.model, item.frame_id, message))
        self._answered(state, 1)

    def _answered(self, state: OpenBlock, n: int) -> None:
        state.remaining -= n
        if state.remaining == 0:
            if state.rejected:  # a block is all or nothing: it stays unfinished
                del self.open[state.block.number]
            else:
                self.commits.append(asyncio.ensure_future(self._commit(state)))
        self.changed.set()

    async def _commit(self, state: OpenBlock) -> None:
        """Write the block's parts and its manifest line; a failure ends the run."""
        block = state.block
        tables = {}
        for model in state.models:
            lengths = [len(item.text) for item in block.items[model]]
            tables[model] = (state.embeddings[model], lengths)
        try:
            if state.extras is not None:  # parts with bos, per-token rows, sequences
                tables = await asyncio.to_thread(state.extras.tables, block, tables)
            async with self.commit_lock:
                await asyncio.to_thread(self.out.commit, block.number, block.first_index,
                                        block.frame_ids, tables, self.options.models)
        except OSError as e:  # e.g. a full disk: end the run, the block stays unfinished
            self.dispatcher.fail(OutputWriteError.resumable(
                f"writing block {block.number}", self.out.path, e))
            return
        except Exception as e:  # a bug: end the run with it
            self.dispatcher.fail(e)
            return
        del self.open[block.number]
        self.changed.set()


@contextlib.contextmanager
def _sigterm_cancels(task: asyncio.Task):
    """SIGTERM cancels `task` inside the block, as Ctrl-C does (where signals can be handled)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
        pass
    try:
        yield
    finally:
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
