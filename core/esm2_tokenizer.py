"""ESM-2's alphabet as a tokenizer: the 33 tokens of fair-esm's ESM-1b/ESM-2 alphabet, <cls> and <eos> added."""
from __future__ import annotations

import numpy as np

from .alphabets import ESM_RESIDUES
from .errors import InvalidSequenceError


class Esm2Tokenizer:
    """The fair-esm ESM-1b/ESM-2 alphabet (33 tokens); adds <cls> and <eos>, rejects unknown letters."""

    TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>",
              "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M",
              "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
    RESIDUES = ESM_RESIDUES  # accepted letters ('.', '-' are gaps: not residues)
    cls_id, pad_id, eos_id, unk_id, mask_id = 0, 1, 2, 3, 32

    def __init__(self):
        lut = np.full(256, -1, dtype=np.int64)  # byte -> token id, -1 = not accepted
        for letter in self.RESIDUES:
            lut[ord(letter)] = lut[ord(letter.lower())] = self.TOKENS.index(letter)
        self._lut = lut

    def __len__(self) -> int:
        return len(self.TOKENS)

    def encode(self, sequence: str) -> np.ndarray:
        """[<cls>, residues..., <eos>] int64; lower case accepted; InvalidSequenceError otherwise."""
        if not sequence:
            raise InvalidSequenceError("empty sequence")
        try:
            raw = np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            raise InvalidSequenceError(self._bad_letter(sequence[e.start], e.start)) from None
        ids = np.empty(raw.size + 2, dtype=np.int64)
        ids[0], ids[-1] = self.cls_id, self.eos_id
        ids[1:-1] = self._lut[raw]
        if ids[1:-1].min() < 0:
            where = int(np.flatnonzero(ids[1:-1] < 0)[0])
            raise InvalidSequenceError(self._bad_letter(sequence[where], where))
        return ids

    def _bad_letter(self, letter: str, index: int) -> str:
        return (f"invalid letter {letter!r} at position {index + 1}: "
                f"ESM-2 accepts {self.RESIDUES} (any case)")
