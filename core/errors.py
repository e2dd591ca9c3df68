"""The model core's one exception hierarchy; the edges (Triton, CLIs) map it to codes."""


class EmbedCoreError(Exception):
    """Base class of every error the model core raises on purpose."""


class CheckpointError(EmbedCoreError):
    """A checkpoint is missing, malformed, or does not match the architecture."""


class InvalidSequenceError(EmbedCoreError, ValueError):
    """One input sequence cannot be embedded (bad letters, empty, too long).

    `index` is the position of the sequence in the call's input list (None when the
    caller validates a single sequence and adds its own context).
    """

    def __init__(self, reason: str, index: "int | None" = None):
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"sequence {index}: {reason}")

    def at(self, index: int) -> "InvalidSequenceError":
        """The same error, naming the sequence's index in the caller's list."""
        return InvalidSequenceError(self.reason, index)


class SequenceTooLargeError(EmbedCoreError):
    """A single sequence does not fit on the device even alone (after OOM split-and-retry)."""
