"""VirNucPro's prep, bit-compatible with the original tool: chunking and six-frame translation.

The rules are those of `Li-Jing-1997/VirNucPro` (commit 0f93f27, `units.py`:
`split_fasta_chunk`, `translate_dna`, `identify_seq`), quirks included, checked against
the golden files in `fixtures/virnucpro/` by the tests:

- chunking: n = ceil(L / c) chunks; chunk k (1-based) starts at (k-1)*c minus the sum of
  the shifts before it, the shifts being the original's `[upper]*need + [lower]*rest + [0]`
  list cut by `zip` (so the last chunk is often shorter than c); L <= c gives one chunk;
  chunk ids `<id>_chunk_<k>`; the chunk keeps the input's letter case.
- translation, on the upper-cased chunk: frames 0-2 of the sequence (F1-F3) and of its
  reverse complement (R1-R3; only ACGT are complemented, other letters kept); codons
  `range(f, L-2, 3)`; a codon with any letter outside ACGT is dropped (no X); a frame
  with a stop codon is discarded; the frame's nucleotide slice is `seq[k-1 : k + 3*aa_len]`
  for frame number k = 1..3 of the strand, i.e. 3*aa_len + 1 bases (the original's
  off-by-one), clipped at the chunk's end.

One quirk is not passed on silently: a frame with no codon left (a chunk under 5 bp, or
codons that all hold N) has no stop, so the original keeps it with an empty protein,
which fair-esm turns into a NaN embedding. `frames_for_chunks` reproduces it exactly;
`prepare` drops those frames by default and counts them (`PrepStats.empty_frames`).

Translation is vectorised: a batch of chunks is joined into one buffer per strand (the
reverse complement of the joined forward buffer holds every chunk's reverse complement);
every position's codon is looked up once in a 125-entry table (base-5 codes; anything
outside ACGT is code 4 and translates to "dropped"). A frame's codons are every third
position, so stops and kept residues per frame come from prefix sums over the three
residue classes. Python only loops over the frames that are kept, to slice their
protein and nucleotide out of the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

# The standard genetic code (NCBI table 1), the 64 codons in TCAG order; equals the
# original's hard-coded `codon_table`.
_BASES = "TCAG"
_AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
CODON_TABLE = {
    a + b + c: _AMINO_ACIDS[16 * i + 4 * j + k]
    for i, a in enumerate(_BASES)
    for j, b in enumerate(_BASES)
    for k, c in enumerate(_BASES)
}
FRAME_SUFFIXES = ("F1", "F2", "F3", "R1", "R2", "R3")
DEFAULT_BATCH_CHUNKS = 4096

_COMPLEMENT = bytes.maketrans(b"ACGT", b"TGCA")  # on the upper-cased sequence, as the original


def _tables() -> Tuple[bytes, bytes, Tuple[int, ...]]:
    """Translation tables for bytes.translate, and the stop codons' indices.

    Letters map to base codes A0 C1 G2 T3, anything else 4; a codon's index is
    25*c0 + 5*c1 + c2 (at most 124, one byte); the codon table maps an index to its amino
    acid, and any index with a code 4 to byte 0: the original drops such codons (no X).
    """
    code = bytearray([4]) * 256
    for value, letter in enumerate(b"ACGT"):
        code[letter] = value
    table = bytearray(256)
    stops = []
    for codon, amino_acid in CODON_TABLE.items():
        index = 25 * code[ord(codon[0])] + 5 * code[ord(codon[1])] + code[ord(codon[2])]
        table[index] = ord(amino_acid)
        if amino_acid == "*":
            stops.append(index)
    return bytes(code), bytes(table), tuple(stops)


_CODE, _AMINO_ACID, _STOP_CODONS = _tables()


class Frame(NamedTuple):
    """One frame record: id `<chunk_id>F1..R3`, its protein, and its nucleotide slice (upper case)."""

    frame_id: str
    protein: str
    nucleotide: str


@dataclass
class PrepStats:
    """Counters of one `prepare` run; every frame not emitted is counted in one of them."""

    records: int = 0
    bases: int = 0
    chunks: int = 0
    frames: int = 0  # frame records emitted
    residues: int = 0  # amino acids in the emitted frames
    frames_with_stop: int = 0  # discarded: the frame has a stop codon (original rule)
    empty_frames: int = 0  # open frames with no codon left (dropped unless keep_empty)
    chunks_without_frames: int = 0  # chunks that emitted no frame record

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def record_of(frame_id: str) -> str:
    """The input record id of a frame id `<record>_chunk_<k><F1..R3>` (a plain-mode id, which
    has no chunk, is its own record: plain.py)."""
    head = frame_id[:-2]
    return head.rsplit("_chunk_", 1)[0] if "_chunk_" in head else frame_id


def chunk_starts(length: int, chunk_size: int) -> List[int]:
    """0-based start of each chunk of a sequence of `length`, by the original's arithmetic."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if length <= chunk_size:
        return [0] if length else []
    n = -(-length // chunk_size)
    repeat = n * chunk_size - length  # total overlap
    lower = repeat // n  # the original's int(repeat / n)
    need = repeat - lower * (n - 1)  # may exceed n - 1: then zip cuts the list short
    shifts = [lower + 1] * need + [lower] * (n - 1 - need) + [0]
    starts, move = [], 0
    for a, shift in zip(range(0, length, chunk_size), shifts):
        starts.append(a - move if a > 1 else a)
        move += shift
    return starts


def chunk_record(record_id: str, sequence: str, chunk_size: int) -> List[Tuple[str, str]]:
    """The original's chunks of one sequence: [(chunk_id, chunk_sequence)], case kept.

    Each chunk is `sequence[start : start + chunk_size]`, so it ends at the sequence's
    end at the latest: the last one is often shorter than chunk_size.
    """
    if len(sequence) <= chunk_size and chunk_size >= 1:
        return [(f"{record_id}_chunk_1", sequence)] if sequence else []
    return [
        (f"{record_id}_chunk_{k}", sequence[start : start + chunk_size])
        for k, start in enumerate(chunk_starts(len(sequence), chunk_size), 1)
    ]


def frames_for_chunk(chunk_id: str, sequence: str) -> List[Frame]:
    """The original's frame records for one chunk, in order F1, F2, F3, R1, R2, R3."""
    return frames_for_chunks([(chunk_id, sequence)])


def frames_for_chunks(chunks: Sequence[Tuple[str, str]]) -> List[Frame]:
    """The original's frame records for many chunks at once (vectorised), in input order."""
    return _translate(chunks)[0]


def _translate(chunks: Sequence[Tuple[str, str]]) -> Tuple[List[Frame], List[int], np.ndarray]:
    """Frames of a batch of chunks, the chunk index of each frame, and per chunk how many
    frames had a stop ([n] int64)."""
    n = len(chunks)
    if n == 0:
        return [], [], np.zeros(0, dtype=np.int64)
    ids = [chunk_id for chunk_id, _ in chunks]
    forward = "".join([seq for _, seq in chunks]).encode("latin-1").upper()  # length-preserving
    reverse = forward.translate(_COMPLEMENT)[::-1]  # chunk i at [total - s_i - L_i, total - s_i)
    total = len(forward)
    lengths = np.fromiter((len(seq) for _, seq in chunks), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])

    # Both strands are read the same way: frame f of a chunk based at `base` has codons at
    # base+f, base+f+3, ... (the original's range(f, L-2, 3)), m = max(0, (L-f)//3) of them.
    has_stop = np.zeros((n, 6), dtype=bool)
    strands = []
    for strand, (buffer, base) in enumerate(((forward, starts), (reverse, total - starts - lengths))):
        codons = _codons(buffer)
        order = slice(None) if strand == 0 else slice(None, None, -1)  # bases ascending
        _mark_stops(codons, base[order], lengths[order], has_stop[order, 3 * strand : 3 * strand + 3])
        strands.append((buffer, codons.tobytes(), base.tolist()))
    stops_per_chunk = has_stop.sum(axis=1)

    open_chunk, open_frame = np.nonzero(~has_stop)  # row-major: chunk order, then F1..R3
    chunk_of = open_chunk.tolist()
    length_of = lengths.tolist()
    frames = []
    for i, fr in zip(chunk_of, open_frame.tolist()):
        buffer, codon_bytes, bases = strands[fr // 3]
        offset = fr % 3  # the original's num - 1
        length = length_of[i]
        first = bases[i] + offset
        count = max(0, (length - offset) // 3)
        protein = codon_bytes[first : first + 3 * count : 3].translate(_AMINO_ACID).replace(b"\0", b"")
        end = min(offset + 1 + 3 * len(protein), length)  # 3*aa_len + 1 bases, clipped at the end
        nucleotide = buffer[first : bases[i] + end] if end > offset else b""
        frames.append(Frame(ids[i] + FRAME_SUFFIXES[fr], protein.decode("ascii"), nucleotide.decode("latin-1")))
    return frames, chunk_of, stops_per_chunk


def _codons(buffer: bytes) -> np.ndarray:
    """The codon index (25*c0 + 5*c1 + c2) starting at every position ([len] uint8)."""
    total = len(buffer)
    code = np.empty(total + 2, dtype=np.uint8)
    code[:total] = np.frombuffer(buffer.translate(_CODE), dtype=np.uint8)
    code[total:] = 4  # past the end: no codon
    codon = code[:-2] * np.uint8(25)
    codon += code[1:-1] * np.uint8(5)
    codon += code[2:]
    return codon


def _mark_stops(codons: np.ndarray, base: np.ndarray, lengths: np.ndarray, has_stop: np.ndarray) -> None:
    """Set has_stop[chunk, f] where frame f of a chunk (bases ascending) reads a stop codon."""
    stop = codons == _STOP_CODONS[0]
    for index in _STOP_CODONS[1:]:
        stop |= codons == index
    position = np.flatnonzero(stop)
    chunk = np.searchsorted(base, position, side="right") - 1
    local = position - base[chunk]
    inside = local <= lengths[chunk] - 3  # a codon of this chunk, not one across its end
    has_stop[chunk[inside], local[inside] % 3] = True


def prepare(
    records: Iterable[Tuple[str, str]],
    chunk_size: int,
    *,
    stats: Optional[PrepStats] = None,
    keep_empty: bool = False,
    batch_chunks: int = DEFAULT_BATCH_CHUNKS,
) -> Iterator[Frame]:
    """Stream the frame records of (id, sequence) records, in input order, batch by batch.

    Chunks are translated `batch_chunks` at a time; `stats`, when given, is updated batch
    by batch. Frames with an empty protein are dropped and counted unless `keep_empty`
    (the original keeps them; see the module docstring).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if batch_chunks < 1:
        raise ValueError(f"batch_chunks must be >= 1, got {batch_chunks}")
    stats = PrepStats() if stats is None else stats
    batch: List[Tuple[str, str]] = []
    for record_id, sequence in records:
        stats.records += 1
        stats.bases += len(sequence)
        if len(sequence) <= chunk_size:
            if sequence:
                batch.append((f"{record_id}_chunk_1", sequence))
        else:
            batch.extend(chunk_record(record_id, sequence, chunk_size))
        if len(batch) >= batch_chunks:
            yield from _emit(batch, stats, keep_empty)
            batch = []
    if batch:
        yield from _emit(batch, stats, keep_empty)


def _emit(batch: List[Tuple[str, str]], stats: PrepStats, keep_empty: bool) -> List[Frame]:
    frames, chunk_of, stops_per_chunk = _translate(batch)
    stats.chunks += len(batch)
    stats.frames_with_stop += int(stops_per_chunk.sum())
    empty = [i for i, frame in enumerate(frames) if not frame.protein]
    stats.empty_frames += len(empty)
    if empty and not keep_empty:
        drop = set(empty)
        frames = [frame for i, frame in enumerate(frames) if i not in drop]
        chunk_of = [c for i, c in enumerate(chunk_of) if i not in drop]
    stats.chunks_without_frames += len(batch) - len(set(chunk_of))
    stats.frames += len(frames)
    stats.residues += sum(len(frame.protein) for frame in frames)
    return frames
