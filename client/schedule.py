"""Bucketing: length-sort inside a bounded window of frames, cut requests by a token budget.

The frame stream is cut into blocks of `window` consecutive frames (block k holds frames
k*window .. (k+1)*window - 1, a pure function of the input and the chunk size, so a resumed
run finds the same blocks). Inside a block each model's sequences are sorted by length and
cut greedily into requests of at most `token_budget` estimated tokens and at most
`max_batch_size` sequences. A block is the unit the sink commits and a resumed run skips.

The cost of a sequence is its letters (divided by the caller's letters-per-token estimate)
plus the two tokens every tokenizer adds (BOS/CLS + EOS/SEP): exact for ESM-2 (one token per
residue), an estimate for a BPE tokenizer such as DNABERT-S's (~4 bp per token). This module
knows tokens, not models.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

from embed_core.alphabets import ADDED_TOKENS_PER_SEQUENCE


def token_cost(sequence: str, letters_per_token: float = 1.0) -> int:
    """Estimated tokens of one sequence: its letters / letters_per_token, plus the two specials."""
    return math.ceil(len(sequence) / letters_per_token) + ADDED_TOKENS_PER_SEQUENCE


@dataclass(frozen=True)
class ScheduleConfig:
    """How sequences become requests."""

    window: int = 8192          # frames per block (sort window and commit unit)
    # Estimated model tokens per request (see token_cost). 65,536 keeps an H200 fed (perf/RESULTS.md:
    # the end-to-end runs); the server packs several requests per forward up to its own budget.
    token_budget: int = 65536

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1 frame, got {self.window}")
        if self.token_budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.token_budget}")


@dataclass(frozen=True)
class Item:
    """One sequence to embed: its frame's position in the run, the frame's id, the text sent."""

    index: int
    frame_id: str
    text: str


@dataclass
class Request:
    """Sequences of one block for one model, sent as one inference call."""

    model: str
    block: int
    items: List[Item]

    @property
    def tokens(self) -> int:
        """Estimated tokens at one letter per token: token_cost summed over the items."""
        return self.letters + ADDED_TOKENS_PER_SEQUENCE * len(self.items)

    @property
    def letters(self) -> int:
        return sum(len(item.text) for item in self.items)

    def split(self) -> List["Request"]:
        """One request per sequence (to find which one the server rejects)."""
        return [Request(self.model, self.block, [item]) for item in self.items]


def cut_requests(model: str, block: int, items: Sequence[Item], token_budget: int,
                 max_batch_size: int, letters_per_token: float = 1.0) -> List[Request]:
    """Length-sorted requests of <= token_budget tokens and <= max_batch_size sequences.

    A sequence longer than the budget alone still gets its own request.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    ordered = sorted(items, key=lambda item: (len(item.text), item.index))
    requests: List[Request] = []
    current: List[Item] = []
    tokens = 0
    for item in ordered:
        cost = token_cost(item.text, letters_per_token)
        if current and (tokens + cost > token_budget or len(current) >= max_batch_size):
            requests.append(Request(model, block, current))
            current, tokens = [], 0
        current.append(item)
        tokens += cost
    if current:
        requests.append(Request(model, block, current))
    return requests


def interleave(per_model: Sequence[Sequence[Request]]) -> List[Request]:
    """Alternate the models' requests so every model has work queued at all times."""
    merged = itertools.zip_longest(*per_model)
    return [request for group in merged for request in group if request is not None]


@dataclass
class Block:
    """The frames of one window: their ids in order and, per model, the items to send."""

    number: int
    first_index: int
    frame_ids: List[str] = field(default_factory=list)
    items: Dict[str, List[Item]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.frame_ids)


def blocks_of(frames: Iterable[Tuple[str, Dict[str, str]]], window: int,
              models: Sequence[str]) -> Iterator[Block]:
    """Group (frame id, {model: text}) pairs into consecutive blocks of `window` frames."""
    block = None
    for index, (frame_id, texts) in enumerate(frames):
        if block is None or block.size == window:
            if block is not None:
                yield block
            block = Block(index // window, index, items={m: [] for m in models})
        block.frame_ids.append(frame_id)
        for model in models:
            block.items[model].append(Item(index, frame_id, texts[model]))
    if block is not None:
        yield block
