"""The client's one exception hierarchy; the CLI maps it once to exit codes."""

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple


class ClientError(Exception):
    """Base class of every error embed-client raises on purpose."""


@dataclass(frozen=True)
class InputProblem:
    """One problem in an input file: the file, the record id, the 1-based line, what is wrong."""

    file: str
    record: Optional[str]
    line: Optional[int]
    problem: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        who = "" if self.record is None else f" record {self.record!r}:"
        return f"{where}:{who} {self.problem}"


class InputError(ClientError):
    """An input file that cannot be used as it is.

    Built for one problem as `InputError(file, record, line, problem)`, or for many with
    `InputError.from_problems`, which lists the first few and counts the rest. The fields
    `file`, `record`, `line`, `problem` describe the first problem; `problems` holds the
    listed ones and `total` how many were found.
    """

    def __init__(self, file: str, record: Optional[str], line: Optional[int], problem: str):
        self._init((InputProblem(str(file), record, line, problem),), 1)

    @classmethod
    def from_problems(cls, problems: Iterable[InputProblem], total: Optional[int] = None) -> "InputError":
        """One error for several problems (all in `problems`, or the first of `total`)."""
        problems = tuple(problems)
        if not problems:
            raise ValueError("InputError needs at least one problem")
        error = cls.__new__(cls)
        error._init(problems, len(problems) if total is None else max(total, len(problems)))
        return error

    def _init(self, problems: Tuple[InputProblem, ...], total: int) -> None:
        first = problems[0]
        self.file, self.record, self.line, self.problem = first.file, first.record, first.line, first.problem
        self.problems = problems
        self.total = total
        if total == 1:
            message = str(first)
        else:
            lines = [f"{total} problems in {first.file}:"] + [f"  {p}" for p in problems]
            if total > len(problems):
                lines.append(f"  ... and {total - len(problems)} more")
            message = "\n".join(lines)
        Exception.__init__(self, message)

    def __reduce__(self):
        return (_rebuild_input_error, (type(self), self.problems, self.total))


def _rebuild_input_error(cls, problems, total):
    return cls.from_problems(problems, total)


class ServerError(ClientError):
    """A server answered in a way the client cannot recover from (not a connection issue)."""


class ServerUnavailableError(ServerError):
    """No server could be reached (or every server stayed down past the retries)."""


class OutputError(ClientError):
    """The output directory cannot be used (exists without --resume, or does not match)."""


class OutputWriteError(ClientError):
    """Writing into the output directory failed (e.g. a full disk); the run can be resumed."""

    @classmethod
    def resumable(cls, what: str, out, error: OSError) -> "OutputWriteError":
        """`what` in the output directory `out` failed with `error`; the message says how to go on."""
        return cls(f"{what} in {out} failed: {error}; once fixed, continue with --resume --out {out}")


class OutputNotWritable(OutputWriteError):
    """The output directory cannot be created or written (permissions, a read-only file system,
    a file in the way) before anything was written: nothing to resume."""

    @classmethod
    def at(cls, out, where, reason: str, resume: bool = False) -> "OutputNotWritable":
        """`out` cannot be written because `where` (itself or a folder above it) `reason`."""
        detail = reason if str(where) == str(out) else f"{where} {reason}"
        hint = ("fix its permissions, then continue with --resume" if resume
                else "choose another --out or fix its permissions")
        return cls(f"the output directory {out} cannot be written ({detail}); {hint}")


class OptionError(ClientError):
    """An option the servers cannot honour (e.g. a --repr-layer the model has not): a usage error."""


class ClassifierError(ClientError):
    """The classifier weights cannot be read or do not fit the embeddings."""


class IncompleteError(ClientError):
    """The run ended with fewer sequences out than in (rejected sequences or a count mismatch)."""


class InterruptedRun(ClientError):
    """The run was interrupted (Ctrl-C / SIGTERM); its output directory can be resumed."""
