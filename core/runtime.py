"""The per-device runtime: dtype and token budget policy, input checks, packed embedding.

`Embedder(encoder, tokenizer, config)` turns a list of sequences into an [N, hidden] float32
array in input order. It validates every sequence at the edge (`tokenize`), sorts by length,
cuts the sorted stream into packs of at most `token_budget` tokens, runs each pack through the
encoder's `forward_packed` with no padding, mean-pools, and scatters the rows back to input
order. On CUDA out-of-memory a pack is split in halves and retried, down to one sequence; only
a single sequence that cannot fit alone fails (`SequenceTooLargeError`).

Token budget (tokens per forward) when `RuntimeConfig.token_budget` is None, see
`token_budget_for`:

    bytes_per_token = b * (4*H + 4*I + heads*A) + 4*H
    budget = clamp(floor(SAFETY * (free_bytes - RESERVE) / bytes_per_token), MIN, MAX)

with b the bytes of the compute dtype, H the hidden size, I the intermediate (FFN) size,
`heads` the attention heads and A = `ATTENTION_REF_LEN` tokens. In inference mode a layer's
activations are freed when the next layer starts, so the peak does not grow with depth: it is
the MLP of one layer (residual + its norm + the up projection, 2*I for a GLU, + the activation
and gate products + the output: <= 4*H + 4*I values per token for both encoders), plus the
padded attention scratch where a kernel materialises scores or an additive bias
([B, heads, L, L] = heads*L values per token when the pack is length-sorted, so B*L ~ T),
plus the float32 copy of the last hidden state that pooling makes (4*H bytes per token).
The free memory is read once, at load, after the weights are on the device.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import fp8
from .errors import InvalidSequenceError, SequenceTooLargeError
from .packing import PackedBatch, pack
from .plan import ATTENTION_CHOICES, DEVICES_HELP, DTYPES, KERNEL_CHOICES, LINEARS, choose_plan, without_kernels
from .representations import Rows

log = logging.getLogger(__name__)

TOO_LONG_POLICIES = ("error", "truncate")

CPU_TOKEN_BUDGET = 8192      # fixed on CPU: large packs only add cache misses there
MIN_TOKEN_BUDGET = 1024
MAX_TOKEN_BUDGET = 131072    # larger packs measured faster up to here (perf/RESULTS.md); more only holds memory
BUDGET_SAFETY = 0.6          # fraction of the free memory the activations may use
BUDGET_RESERVE = 1 << 30     # bytes kept free for the allocator's fragmentation and cuBLAS workspaces
ATTENTION_REF_LEN = 512      # tokens: the sequence length the attention-scratch term is sized for


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run an encoder: where, in which dtype, how many tokens per forward, which inputs.

    device: "auto" (first CUDA device, else CPU), "cpu", "cuda" or "cuda:N".
    dtype: "auto" (bfloat16 on CUDA compute capability >= 8.0, float32 otherwise) or a name:
        float32, bfloat16, float16, or an fp8 plan (bf16 with e4m3 linears, fp8.py; CUDA compute
        capability >= 8.9 only): "fp8" (every linear), "fp8-smooth" (every linear, the LayerNorms'
        outlier channels moved into the weights first: pre-LN encoders, ESM-2) or "fp8-ffn" (the
        feed-forward's); or "fp8-auto": the gate tries fp8.candidates fastest first at warmup and
        keeps the first that passes (none: Fp8GateError with every figure).
    fp8_min_cosine: the fp8 plans' accuracy gate (fp8_gate.py), run by `warmup()`: the smallest
        per-sequence cosine of pooled embeddings, fp8 against fp32, on bundled sequences, below
        which the plan is refused (ValueError). Ignored by the other dtypes.
    token_budget: tokens per forward; None = from the device's free memory at load.
    max_length: longest accepted sequence in letters; None = the model's default.
    too_long: "error" rejects longer sequences; "truncate" keeps their first max_length letters
        and reports each one in `Embedder.last_truncated`.
    compile: torch.compile the encoder's per-layer element-wise functions; None = on CUDA only, and
        not where the encoder runs our kernels eager (ESM-2). The first forwards then take longer.
    attention: the encoder's packed attention: "triton" (our varlen kernel, kernels_attention.py,
        with DNABERT-S's ALiBi or, for ESM-2, without bias; CUDA), "padded" (SDPA over per-pack
        [B, L] slots; anywhere), "flash" (torch's varlen flash kernel; ESM-2 only: no bias, CUDA),
        "flex" (FlexAttention on the packed stream; DNABERT-S only, CUDA; opt-in: faster than
        padded, slower than ours) or "auto" (= triton where `kernels` allows it, else flash for
        ESM-2 on CUDA and padded elsewhere). plan.choose_plan resolves these at load.
    kernels: our hand-written Triton kernels (core/kernels_*.py: ESM-2's rotary, residual add +
        LayerNorm and attention; DNABERT-S's attention): "auto" (used on CUDA when the triton
        package imports; if they fail at `warmup()`, a warning and the PyTorch path instead),
        "triton" (required: an error at load where they cannot run) or "torch" (never; the
        PyTorch/Inductor path, e.g. to rule the kernels out when something looks wrong).
    """

    device: str = "auto"
    dtype: str = "auto"
    token_budget: Optional[int] = None
    max_length: Optional[int] = None
    too_long: str = "error"
    compile: Optional[bool] = None
    attention: str = "auto"
    kernels: str = "auto"
    fp8_min_cosine: float = fp8.DEFAULT_MIN_COSINE

    def __post_init__(self):
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be {DEVICES_HELP}, got {dev!r}")
        named = sorted(DTYPES) + list(LINEARS[1:]) + [fp8.AUTO]
        if self.dtype != "auto" and self.dtype not in named:
            raise ValueError(f"dtype must be auto or one of {named}, got {self.dtype!r}")
        if not (isinstance(self.fp8_min_cosine, (int, float)) and -1.0 <= self.fp8_min_cosine <= 1.0):
            raise ValueError(f"fp8_min_cosine must be a number in [-1, 1], got {self.fp8_min_cosine!r}")
        if self.token_budget is not None and (not isinstance(self.token_budget, int) or self.token_budget < 1):
            raise ValueError(f"token_budget must be a positive int or None, got {self.token_budget!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {self.max_length!r}")
        if self.too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (auto), got {self.compile!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")


@dataclass
class EmbedStats:
    """Counters since load, as plain ints (model.py exports them as Triton metrics)."""

    sequences: int = 0        # sequences embedded
    tokens: int = 0           # real tokens (specials included) run through the encoder
    forward_passes: int = 0   # forwards that completed
    failures: int = 0         # sequences rejected (bad input) or too large for the device
    oom_retries: int = 0      # packs that ran out of memory and were split
    cancelled: int = 0        # sequences not computed: every request they belong to was cancelled

    def as_dict(self) -> dict:
        return asdict(self)


def encoder_dims(encoder: torch.nn.Module) -> tuple[int, int, int]:
    """(hidden, intermediate, heads) of an encoder, from its HF-named `config` where present."""
    cfg = getattr(encoder, "config", None)
    hidden = int(getattr(encoder, "hidden_size", None) or getattr(cfg, "hidden_size"))
    intermediate = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", 0) or max(1, hidden // 64))
    return hidden, intermediate, heads


def budget_from_memory(free_bytes: int, hidden: int, intermediate: int, heads: int, dtype_bytes: int,
                       safety: float = BUDGET_SAFETY, reserve: int = BUDGET_RESERVE,
                       lo: int = MIN_TOKEN_BUDGET, hi: int = MAX_TOKEN_BUDGET) -> int:
    """The module docstring's formula: tokens per forward that fit in `free_bytes`, clamped to [lo, hi]."""
    per_token = dtype_bytes * (4 * hidden + 4 * intermediate + heads * ATTENTION_REF_LEN) + 4 * hidden
    usable = max(0.0, safety * (free_bytes - reserve))
    tokens = int(usable // per_token) // 64 * 64
    return int(min(hi, max(lo, tokens)))


def token_budget_for(device: torch.device, encoder: torch.nn.Module, dtype: torch.dtype) -> int:
    """Tokens per forward for `encoder` on `device`: a fixed modest budget on CPU, else from free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _total = torch.cuda.mem_get_info(device)
    hidden, intermediate, heads = encoder_dims(encoder)
    return budget_from_memory(free, hidden, intermediate, heads, torch.finfo(dtype).bits // 8)


class Launched:
    """Rows queued on the device (Embedder.launch_tokens): `result()` -> the means [N, hidden]
    float32 numpy, `outputs()` -> every asked output (representations.Rows' names) as numpy."""

    def __init__(self, rows: Rows):
        self.token_offsets = rows.token_offsets
        self._host = {}
        self._done = None
        for name, tensor in rows.tensors().items():
            if tensor.device.type == "cuda":
                # The copy to pinned host memory is queued right behind the forwards, so it does
                # not wait for work queued later (the next batch's forwards).
                self._host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._host[name].copy_(tensor, non_blocking=True)
            else:
                self._host[name] = tensor
        if any(t.device.type == "cuda" for t in rows.tensors().values()):
            self._done = torch.cuda.Event()
            self._done.record()

    def outputs(self) -> dict:
        if self._done is not None:
            self._done.synchronize()
        return {name: tensor.numpy() for name, tensor in self._host.items()}

    def result(self) -> np.ndarray:
        return self.outputs()["mean"]


@dataclass
class _Pack:
    """Sorted positions [lo, hi) of one forward, with its host batch (built ahead of time)."""

    lo: int
    hi: int
    batch: Optional[PackedBatch] = field(default=None)


class Embedder:
    """Sequences -> [N, hidden] float32 embeddings, packed by token budget, in input order."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, config: RuntimeConfig = RuntimeConfig()):
        self.config = config
        self.tokenizer = tokenizer
        self.plan = choose_plan(config, encoder)
        self.device, self.dtype = self.plan.device, self.plan.dtype
        self.encoder = encoder.to(device=self.device, dtype=self.dtype).eval()
        self.encoder.prepare(self.plan)
        self.hidden_size = int(encoder.hidden_size)
        self.num_layers = int(encoder.config.num_hidden_layers)   # representation layers 0..num_layers
        self.skip_first = int(encoder.pool_skip_first)
        self.skip_last = int(encoder.pool_skip_last)
        self.max_length = config.max_length
        if config.token_budget is not None:
            self.token_budget, how = config.token_budget, "configured"
        else:
            self.token_budget, how = token_budget_for(self.device, self.encoder, self.dtype), "auto"
        self.stats = EmbedStats()
        self.fp8_check = None   # fp8 plans: fp8_gate.Fp8Check, set by warmup()
        self.last_truncated: dict[int, tuple[int, int]] = {}
        # Test hook: called with each packed batch just before its forward (an injected
        # allocation failure raises torch.cuda.OutOfMemoryError from here).
        self.before_forward: Optional[Callable[[PackedBatch], None]] = None
        self._pin = self.device.type == "cuda"
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="embed-pack") if self._pin else None
        log.info("%s: %s; token budget %d (%s), max_length %s (%s)", type(encoder).__name__, self.plan.describe(),
                 self.token_budget, how, self.max_length, config.too_long)

    # ---- prep (CPU) -------------------------------------------------------------------------
    def tokenize(self, sequences: Sequence[str]) -> list[np.ndarray]:
        """Checks and encodes every sequence; raises InvalidSequenceError naming the first bad index.

        Sequences longer than max_length letters are rejected, or cut under too_long="truncate";
        `last_truncated` then maps each cut sequence's index to (original, kept) letters.
        """
        limit, truncate = self.max_length, self.config.too_long == "truncate"
        self.last_truncated = truncated = {}
        prepared, too_long = list(sequences), None
        if limit is not None:
            for i, seq in enumerate(prepared):
                if len(seq) > limit:
                    if not truncate:
                        too_long = InvalidSequenceError(f"length {len(seq)} exceeds max_length {limit} letters", i)
                        prepared = prepared[:i]   # an earlier bad letter is reported first
                        break
                    truncated[i] = (len(seq), limit)
                    prepared[i] = seq[:limit]
        try:
            out = self._encode(prepared)
        except InvalidSequenceError:
            self.stats.failures += 1
            raise
        if too_long is not None:
            self.stats.failures += 1
            raise too_long
        if truncated:
            log.warning("truncated %d of %d sequences to %d letters", len(truncated), len(prepared), limit)
        return out

    def _encode(self, sequences: list) -> list[np.ndarray]:
        """The tokenizer over a list; its batch form (parallel, in Rust for DNABERT-S) where it has one."""
        encode_batch = getattr(self.tokenizer, "encode_batch", None)
        if encode_batch is not None:
            return encode_batch(sequences)  # raises with the index in `sequences`
        out = []
        for i, seq in enumerate(sequences):
            try:
                out.append(self.tokenizer.encode(seq))
            except InvalidSequenceError as e:
                raise e.at(i) from None
        return out

    # ---- core (device) ----------------------------------------------------------------------
    def embed(self, sequences: Sequence[str]) -> np.ndarray:
        """tokenize + embed_tokens: [N, hidden] float32 in input order."""
        return self.embed_tokens(self.tokenize(sequences))

    def embed_tokens(self, token_arrays: Sequence[np.ndarray],
                     failures: Optional[dict] = None) -> np.ndarray:
        """Token id arrays (specials included) -> [N, hidden] float32, rows in input order.

        A sequence that does not fit on the device even alone raises SequenceTooLargeError; when
        a `failures` dict is given it is recorded there instead (index -> error), its row is NaN,
        and every other sequence is still embedded.
        """
        return self.launch_tokens(token_arrays, failures).result()

    def launch_tokens(self, token_arrays: Sequence[np.ndarray], failures: Optional[dict] = None,
                      gone: Optional[Callable[[], np.ndarray]] = None, layer: Optional[int] = None,
                      include: Sequence[str] = ("mean",)) -> "Launched":
        """`embed_tokens` without waiting for the device: every forward is queued (out-of-memory
        splits and SequenceTooLargeError happen here, at allocation), then the copy of the rows to
        the host; `.result()` waits for them. On CUDA the device runs while the caller prepares the
        next batch (the Triton models return from execute here and answer from a second thread).

        `gone()`, asked before each forward, marks the inputs (bool [N]) nobody waits for any more
        (their request was cancelled): a pack of only such inputs is skipped, its rows left NaN.
        `layer` and `include` say what to return (representations.py): the representation layer
        (default the last) and, beside the mean, the first token's row and the per-token rows."""
        n = len(token_arrays)
        lengths = np.fromiter((len(t) for t in token_arrays), dtype=np.int64, count=n)
        kept = np.maximum(lengths - self.skip_first - self.skip_last, 0)
        out = Rows(kept, self.hidden_size, self.device, include)
        if n == 0:
            return Launched(out)
        order = np.argsort(lengths, kind="stable")      # sorted position -> input index
        sorted_arrays = [token_arrays[i] for i in order]
        order_dev = torch.from_numpy(order).to(self.device)
        packs = self._cut(lengths[order])
        with torch.inference_mode():
            pending = self._submit(sorted_arrays, packs[0])
            for k, p in enumerate(packs):
                p.batch = pending.result() if self._prefetch else pending
                if k + 1 < len(packs):                 # build the next pack while this one runs
                    pending = self._submit(sorted_arrays, packs[k + 1])
                if gone is not None and gone()[order[p.lo:p.hi]].all():
                    out.fill_nan(order_dev[p.lo:p.hi])
                    self.stats.cancelled += p.hi - p.lo
                    continue
                self._run(p, sorted_arrays, order, order_dev, out, failures, layer)
        return Launched(out)

    def _cut(self, sorted_lengths: np.ndarray) -> list[_Pack]:
        """Greedy cut of the sorted stream into packs of <= token_budget tokens (>= 1 sequence each)."""
        ends = np.cumsum(sorted_lengths)                # ends[i]: tokens up to and including sequence i
        packs, lo, n = [], 0, len(sorted_lengths)
        while lo < n:
            base = int(ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, base + self.token_budget, side="right")))
            packs.append(_Pack(lo, hi))
            lo = hi
        return packs

    def _host_batch(self, arrays: Sequence[np.ndarray]) -> PackedBatch:
        batch = pack(arrays)
        if self._pin:
            batch = PackedBatch(batch.input_ids.pin_memory(), batch.cu_seqlens.pin_memory(), batch.max_seqlen)
        return batch

    def _submit(self, sorted_arrays, p: _Pack):
        arrays = sorted_arrays[p.lo:p.hi]
        if self._prefetch is None:
            return self._host_batch(arrays)
        return self._prefetch.submit(self._host_batch, arrays)

    def _run(self, p: _Pack, sorted_arrays, order: np.ndarray, order_dev: torch.Tensor,
             out: Rows, failures: Optional[dict], layer: Optional[int]) -> None:
        """One forward of a pack into `out`; on OOM, halves retried recursively."""
        batch = p.batch if p.batch is not None else self._host_batch(sorted_arrays[p.lo:p.hi])
        p.batch = None
        try:
            self._forward(batch, out, order_dev[p.lo:p.hi], layer)
            oom = False
        except torch.cuda.OutOfMemoryError:
            oom = True   # handled below, outside the except block, so the failed frame's tensors are freed
        if not oom:
            self.stats.forward_passes += 1
            self.stats.sequences += p.hi - p.lo
            self.stats.tokens += int(batch.cu_seqlens[-1])
            return
        del batch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if p.hi - p.lo == 1:
            index, length = int(order[p.lo]), len(sorted_arrays[p.lo])
            err = SequenceTooLargeError(
                f"sequence {index}: {length} tokens do not fit on {self.device} even alone "
                f"(dtype {str(self.dtype).replace('torch.', '')}); shorten it or lower max_length")
            err.index, err.length = index, length
            self.stats.failures += 1
            log.error("%s", err)
            if failures is None:
                raise err
            failures[index] = err
            out.fill_nan(order_dev[p.lo:p.hi])
            return
        self.stats.oom_retries += 1
        mid = (p.lo + p.hi) // 2
        log.warning("out of memory on a pack of %d sequences; retrying as %d + %d",
                    p.hi - p.lo, mid - p.lo, p.hi - mid)
        for half in (_Pack(p.lo, mid), _Pack(mid, p.hi)):
            self._run(half, sorted_arrays, order, order_dev, out, failures, layer)

    def _forward(self, batch: PackedBatch, out: Rows, index: torch.Tensor, layer: Optional[int]) -> None:
        """One packed batch's forward; its rows (sequences `index` of the input) into `out`."""
        if self.before_forward is not None:
            self.before_forward(batch)
        dev = batch.to(self.device)
        hidden = self.encoder.forward_packed(dev.input_ids, dev.cu_seqlens, dev.max_seqlen, layer)  # [T, H]
        out.store(hidden, dev.cu_seqlens, index, self.skip_first, self.skip_last)

    def warmup(self, lengths: Sequence[int] = (16, 48, 100, 200)) -> None:
        """Runs two small synthetic packs so compilation and kernel selection happen at load, not on the
        first request; the counters stay at zero. Token id 0 is valid in every vocabulary. An fp8
        plan then passes its accuracy gate (fp8_gate.gate: `fp8_check`) or raises Fp8GateError."""
        arrays = [np.zeros(n, dtype=np.int64) for n in lengths]
        try:
            self.embed_tokens(arrays)
        except Exception as err:  # noqa: BLE001 (re-raised unless the kernels were only "auto")
            if not self.plan.kernels or self.config.kernels != "auto" or isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            # kernels="auto" must not cost the model: e.g. Triton cannot build its launcher
            # without a C compiler. Serve on the PyTorch path and say why.
            log.warning("our Triton kernels failed at warm-up (%s: %s); continuing without them "
                        "(set the kernels parameter to torch to skip them, or triton to make this an error)",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.plan = without_kernels(self.plan, self.config, self.encoder)
            self.encoder.prepare(self.plan)
            log.info("%s: %s", type(self.encoder).__name__, self.plan.describe())
            self.embed_tokens(arrays)
        self.embed_tokens(arrays[::2])
        if self.plan.linears != "native":
            # The fp8 plan measured on this checkpoint; Fp8GateError (ValueError) below the threshold.
            # fp8-auto: each candidate in turn, the first that passes stays.
            from .fp8_gate import gate, pick
            self.fp8_check = pick(self) if self.config.dtype == fp8.AUTO else gate(self)
        self.stats = EmbedStats()

    def close(self) -> None:
        """Stops the packing thread (the object stays usable, without prefetch)."""
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True)
            self._prefetch = None
