"""DNABERT-S's tokenizer: the checkpoint's own BPE `tokenizer.json` behind IUPAC validation and
upper-casing, plus a trainer for demo tokenizers structured like the published one."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .alphabets import IUPAC_NUCLEOTIDES as IUPAC_LETTERS
from .errors import CheckpointError, InvalidSequenceError

PathLike = Union[str, Path]
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # ids 0..4 in the published vocab
TOKENIZER_FILE = "tokenizer.json"

_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[np.frombuffer((IUPAC_LETTERS + IUPAC_LETTERS.lower()).encode("ascii"), dtype=np.uint8)] = True


def check_dna(sequence: str) -> str:
    """The upper-cased sequence; InvalidSequenceError naming the first non-IUPAC letter and its 1-based position."""
    if not isinstance(sequence, str):
        raise InvalidSequenceError(f"expected a DNA string, got {type(sequence).__name__}")
    if not sequence:
        raise InvalidSequenceError("empty sequence")
    if sequence.isascii():
        ok = _ALLOWED[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]
        first = -1 if ok.all() else int(np.argmin(ok))
    else:
        first = next(i for i, c in enumerate(sequence) if not (c.isascii() and _ALLOWED[ord(c)]))
    if first >= 0:
        raise InvalidSequenceError(f"invalid letter {sequence[first]!r} at position {first + 1} "
                                   f"(DNABERT-S accepts the IUPAC nucleotide codes {IUPAC_LETTERS})")
    return sequence.upper()


def check_dna_batch(sequences: Sequence[str]) -> list[str]:
    """`check_dna` for many sequences in one pass over their joined letters (a server's request:
    per-sequence numpy calls cost more than the check itself); errors carry the sequence's index."""
    sequences = list(sequences)
    if all(isinstance(s, str) and s for s in sequences):
        joined = "".join(sequences)
        if joined.isascii():
            if _ALLOWED[np.frombuffer(joined.encode("ascii"), dtype=np.uint8)].all():
                return [s.upper() for s in sequences]
    for i, sequence in enumerate(sequences):   # something is wrong: find it, with its message
        try:
            check_dna(sequence)
        except InvalidSequenceError as exc:
            raise exc.at(i) from None
    raise AssertionError("check_dna_batch: a batch failed the joined check but no sequence failed alone")


class DnabertTokenizer:
    """The checkpoint's own BPE `tokenizer.json` (via `tokenizers`) behind IUPAC validation and upper-casing."""

    def __init__(self, tokenizer, source: str = "tokenizer.json"):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[:4] + tuple("ACGT")}
        absent = [t for t, i in ids.items() if i is None]
        if absent:
            raise CheckpointError(f"{source}: no token {', '.join(absent)} in the vocabulary")
        self.unk_token_id, self.cls_token_id = ids["[UNK]"], ids["[CLS]"]
        self.sep_token_id, self.pad_token_id = ids["[SEP]"], ids["[PAD]"]
        self.vocab_size = tokenizer.get_vocab_size()
        probe = tokenizer.encode("ACGT").ids
        if (len(probe) < 3 or probe[0] != self.cls_token_id or probe[-1] != self.sep_token_id
                or self.unk_token_id in probe[1:-1]):
            raise CheckpointError(f"{source}: 'ACGT' tokenizes to {probe}; expected [CLS] ... [SEP] "
                                  "without [UNK] (post-processor or vocabulary is not DNABERT's)")

    @classmethod
    def from_file(cls, path: PathLike) -> "DnabertTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for missing or malformed files
            raise CheckpointError(f"{path}: cannot read the tokenizer: {exc}") from exc
        return cls(tokenizer, str(path))

    def encode(self, sequence: str) -> np.ndarray:
        """[CLS] + BPE ids + [SEP] as int64; non-ACGT IUPAC letters each become [UNK]."""
        return np.asarray(self._tokenizer.encode(check_dna(sequence)).ids, dtype=np.int64)

    def encode_batch(self, sequences: Sequence[str]) -> list[np.ndarray]:
        """`encode` for many sequences at once (Rust-parallel); errors carry the sequence's index."""
        checked = check_dna_batch(sequences)
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(checked)]


def random_dna(count: int, length: int, seed: int = 0) -> list[str]:
    """`count` uniform random ACGT strings of `length` bp (deterministic)."""
    codes = np.random.default_rng(seed).integers(0, 4, size=(count, length), dtype=np.uint8)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[codes]
    return [row.tobytes().decode("ascii") for row in letters]


def train_demo_tokenizer(out_path: PathLike, vocab_size: int = 4096, seed: int = 0,
                         sequences: Optional[Iterable[str]] = None) -> Path:
    """Trains a BPE tokenizer.json structured like the published one; returns its path.

    Same structure: BPE with unk [UNK]; [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4 then A C G T;
    Whitespace pre-tokenizer; no normalizer; TemplateProcessing "[CLS] $A [SEP]". Trained on
    `sequences` or on random DNA from `seed` (deterministic).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 4:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 4}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list("ACGT"), show_progress=False)
    if sequences is None:
        sequences = random_dna(count=max(50, vocab_size // 8), length=1000, seed=seed)
    tokenizer.train_from_iterator(sequences, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return out_path
