"""DNABERT-S (the DNABERT-2-117M / MosaicBERT architecture) in plain PyTorch.

Config, encoder, tokenizer and loader for the published checkpoint (`zhihan1996/DNABERT-S`,
and `zhihan1996/DNABERT-2-117M`), plus small random checkpoints in the same layout for demos
and tests. Math (reference/dnabert_s.md, section 3): word embedding + token-type row 0, LayerNorm;
12 post-LN layers of ALiBi attention (no position embeddings) and a GLU MLP
(exact GELU on the first half of `gated_layers` times the second half, then `wo`); no final norm.
The embedding is the mean of the last layer over all tokens, [CLS] and [SEP] included.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import FLEX_BLOCK, PackedAttention, alibi_bias
from .compiling import compile_function
from .errors import CheckpointError, InvalidSequenceError

PathLike = Union[str, Path]

IUPAC_LETTERS = "ACGTUNRYKMSWBDHV"
"""DNABERT-S input alphabet: the IUPAC nucleotide codes; all but ACGT tokenize to [UNK]."""

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # ids 0..4 in the published vocab
CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"
SAFETENSORS_FILE, TORCH_FILE = "model.safetensors", "pytorch_model.bin"
LAYOUTS = ("dnabert_s", "dnabert2")


def alibi_slopes(n_heads: int) -> list[float]:
    """MosaicBERT's ALiBi slopes: the power-of-2 rule, extended by every other slope of 2c heads."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start ** (k + 1) for k in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DnabertSConfig:
    """The architecture's numbers, named as in the checkpoint's config.json; defaults = DNABERT-S."""

    vocab_size: int = 4096
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512  # not a length limit (ALiBi); kept for config.json
    alibi_starting_size: int = 512      # the original's ALiBi pre-allocation; kept for config.json
    initializer_range: float = 0.02     # training only; kept for config.json

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, data: Mapping) -> "DnabertSConfig":
        """From a parsed config.json: architecture keys required, everything else ignored."""
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, layout: str = "dnabert_s") -> dict:
        """config.json contents with the published key set (values from this config)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return {
            "_name_or_path": "virnuc-embed/random-dnabert-s",
            "alibi_starting_size": self.alibi_starting_size,
            "architectures": ["BertModel" if layout == "dnabert_s" else "BertForMaskedLM"],
            "attention_probs_dropout_prob": 0.0,
            "auto_map": {
                "AutoConfig": "configuration_bert.BertConfig",
                "AutoModel": "bert_layers.BertModel",
                "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
                "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
            },
            "classifier_dropout": None,
            "gradient_checkpointing": False,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "bert",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
            "transformers_version": "4.28.0",
            "type_vocab_size": self.type_vocab_size,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


# --------------------------------------------------------------------------- model
# Module and attribute names reproduce the published state-dict keys exactly.


class DnabertEmbeddings(nn.Module):
    """Word embedding + token-type row 0, then LayerNorm (no position embeddings: ALiBi)."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class DnabertSelfAttention(nn.Module):
    """The fused QKV projection; columns are q | k | v, each heads x head_dim."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)


class DnabertSelfOutput(nn.Module):
    """Output projection, residual, post-LN."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(context) + residual)


class DnabertAttention(nn.Module):
    """Holds `self` (Wqkv) and `output`, the names of the published keys."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.self = DnabertSelfAttention(config)
        self.output = DnabertSelfOutput(config)


class DnabertGluMlp(nn.Module):
    """GLU MLP: gelu_erf(first half) * second half of `gated_layers` (no bias), `wo`, residual, post-LN."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gated_layers(x)                                        # [..., 2I]
        gated, linear = g[..., : self.intermediate_size], g[..., self.intermediate_size:]
        return self.layernorm(self.wo(F.gelu(gated) * linear) + x)


class DnabertLayer(nn.Module):
    """One post-LN encoder layer."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.attention = DnabertAttention(config)
        self.mlp = DnabertGluMlp(config)


class DnabertEncoder(nn.Module):
    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.layer = nn.ModuleList(DnabertLayer(config) for _ in range(config.num_hidden_layers))


class DnabertPooler(nn.Module):
    """Present in the DNABERT-S checkpoint (untrained there); never used for the embedding."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


def layer_tail(context: torch.Tensor, x: torch.Tensor, dense_w, dense_b, ln1_w, ln1_b, glu_w, wo_w, wo_b,
               ln2_w, ln2_b, eps: float) -> torch.Tensor:
    """Everything of a layer after attention, as one pure function (so one compiled graph serves
    all layers): output projection + residual + post-LN, then GLU MLP + residual + post-LN.
    The same math as DnabertSelfOutput and DnabertGluMlp. (A hand-written Triton kernel fusing
    the GLU GEMM with GELU x gate ran at 450 TFLOP/s against cuBLAS's 685 and lost overall:
    perf/RESULTS.md, 2026-11-28.)"""
    hidden, inter = x.shape[-1], wo_w.shape[1]
    h = F.layer_norm(F.linear(context, dense_w, dense_b) + x, (hidden,), ln1_w, ln1_b, eps)   # [T, H]
    g = F.linear(h, glu_w)                                                                     # [T, 2I]
    a = F.gelu(g[..., :inter]) * g[..., inter:]                                                # [T, I]
    return F.layer_norm(F.linear(a, wo_w, wo_b) + h, (hidden,), ln2_w, ln2_b, eps)            # [T, H]


class DnabertS(nn.Module):
    """The DNABERT-S encoder: packed (production) and padded (reference, export) forwards."""

    pool_skip_first = 0  # the embedding averages [CLS] ...
    pool_skip_last = 0   # ... and [SEP] too

    def __init__(self, config: DnabertSConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.embeddings = DnabertEmbeddings(config)
        self.encoder = DnabertEncoder(config)
        self.pooler = DnabertPooler(config) if add_pooling_layer else None
        # A plain list, not a buffer: `.to(bfloat16)` must not round the slopes (2^-0.5 ...).
        self._slopes = alibi_slopes(config.num_attention_heads)
        self._slopes_on: dict[torch.device, torch.Tensor] = {}
        self._layer_tail = layer_tail  # eager; enable_compile() swaps in the compiled one
        self._compiled = False
        # Attention of forward_packed: "auto" (attention.py's choice), "padded" or "flex".
        self.attention_backend = "auto"
        # FlexAttention's sparse block in tokens (128; 64 or 32 opt-in, see attention.FLEX_BLOCKS).
        self.flex_block = FLEX_BLOCK

    def alibi_slopes_tensor(self, device: torch.device) -> torch.Tensor:
        """[heads] float32 slopes on `device` (cached per device)."""
        device = torch.device(device)
        if device not in self._slopes_on:
            self._slopes_on[device] = torch.tensor(self._slopes, dtype=torch.float32, device=device)
        return self._slopes_on[device]

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        return self.forward_packed(input_ids, cu_seqlens, max_seqlen)

    def supports_triton_kernels(self) -> bool:
        """Whether kernels_attention takes this model's head_dim (the runtime asks first)."""
        from . import kernels_attention
        return kernels_attention.supports(self.config.head_dim)

    def enable_compile(self) -> None:
        """Run each layer's element-wise tail (and, with the "flex" attention backend, the
        attention) through torch.compile (CUDA fast path)."""
        self._layer_tail = compile_function(layer_tail)
        self._compiled = True

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids [T] packed, cu_seqlens [B+1] int32 -> last hidden state [T, hidden].

        `attention_backend` picks the attention ("auto", "padded" or "flex", see attention.py).
        With "flex" the whole forward runs on the stream padded to a multiple of `flex_block` (128) tokens
        (pad tokens are their own sequence: they change no real token) and the pad rows are
        dropped at the end.
        """
        heads, head_dim = self.config.num_attention_heads, self.config.head_dim
        total = input_ids.numel()
        # Layout, masks and the ALiBi bias (or FlexAttention's block mask) are built once and
        # shared by all layers.
        attend = PackedAttention(cu_seqlens, max_seqlen, total, self.embeddings.word_embeddings.weight.dtype,
                                 alibi_slopes=self.alibi_slopes_tensor(input_ids.device), head_dim=head_dim,
                                 backend=self.attention_backend,
                                 compile_flex=True if self._compiled else None, flex_block=self.flex_block)
        if attend.padded_total != total:
            input_ids = torch.cat((input_ids, input_ids.new_zeros(attend.padded_total - total)))
        x = self.embeddings(input_ids)                                       # [T, H]
        eps = self.config.layer_norm_eps
        for layer in self.encoder.layer:
            qkv = layer.attention.self.Wqkv(x).view(-1, 3, heads, head_dim)  # [T, 3, heads, d]
            context = attend.attend_qkv(qkv).reshape(x.shape)                # [T, H]
            out, mlp = layer.attention.output, layer.mlp
            x = self._layer_tail(context, x, out.dense.weight, out.dense.bias, out.LayerNorm.weight,
                                 out.LayerNorm.bias, mlp.gated_layers.weight, mlp.wo.weight, mlp.wo.bias,
                                 mlp.layernorm.weight, mlp.layernorm.bias, eps)
        return x[:total]

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] bool -> [B, L, hidden], pads set to 0 as the original.

        No data-dependent indexing, so it traces and exports (ONNX) as is.
        """
        batch, length = input_ids.shape
        heads, head_dim = self.config.num_attention_heads, self.config.head_dim
        x = self.embeddings(input_ids)                                       # [B, L, H]
        bias = alibi_bias(self.alibi_slopes_tensor(input_ids.device), length, x.dtype)   # [heads, L, L]
        mask = attention_mask.bool()
        bias = bias[None].masked_fill(~mask[:, None, None, :], float("-inf"))   # [B, heads, L, L]
        for layer in self.encoder.layer:
            qkv = layer.attention.self.Wqkv(x).view(batch, length, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # each [B, heads, L, d]
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, L, d]
            context = context.transpose(1, 2).reshape(x.shape)               # [B, L, H]
            x = layer.mlp(layer.attention.output(context, x))
        return x.masked_fill(~mask[..., None], 0.0)


# --------------------------------------------------------------------------- tokenizer

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


# --------------------------------------------------------------------------- loader


def _read_state_dict(root: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of model.safetensors (preferred) or pytorch_model.bin in `root`."""
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        file = root / name
        if not file.is_file():
            continue
        try:
            if name == SAFETENSORS_FILE:
                from safetensors.torch import load_file
                state = load_file(str(file))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt, truncated, or a pickle with non-tensor objects
            raise CheckpointError(f"{file}: cannot be read: {exc}") from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a flat state dict of tensors")
        return dict(state), file
    raise CheckpointError(f"{root}: no {SAFETENSORS_FILE} or {TORCH_FILE}")


def map_published_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DNABERT-S keys as they are; DNABERT-2-117M keys lose their `bert.` prefix; MLM head `cls.*` dropped."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("cls."):
            continue
        name = key[len("bert."):] if key.startswith("bert.") else key
        mapped[f"{key} (duplicate of {name})" if name in mapped else name] = tensor  # reported as unexpected
    return mapped


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming every missing, unexpected and mis-shaped tensor, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label}: {', '.join(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if problems:
        raise CheckpointError(f"{source} does not match DNABERT-S with its config.json "
                              f"(hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
                              f"vocab {model.config.vocab_size}): " + "; ".join(problems))


def load_dnabert_s(path: PathLike) -> tuple[DnabertS, DnabertTokenizer]:
    """A HF DNABERT-S (or DNABERT-2-117M) folder -> (encoder in eval mode, fp32, CPU; tokenizer)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory (expected {CONFIG_FILE}, {TOKENIZER_FILE} and "
                              f"{SAFETENSORS_FILE} or {TORCH_FILE})")
    try:
        config = DnabertSConfig.from_json(json.loads((root / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{root / CONFIG_FILE}: {exc}") from exc
    tokenizer = DnabertTokenizer.from_file(root / TOKENIZER_FILE)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{root / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but "
                              f"config.json vocab_size is {config.vocab_size}")
    state, file = _read_state_dict(root)
    state = map_published_keys(state)
    has_pooler = any(k.startswith("pooler.") for k in state)  # DNABERT-2-117M has none; it is never used
    with torch.device("meta"):
        model = DnabertS(config, add_pooling_layer=has_pooler)
    check_state_dict(model, state, str(file))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- random checkpoints


def random_dnabert_s(config: DnabertSConfig, seed: int = 0, add_pooling_layer: bool = True) -> DnabertS:
    """A deterministic random DnabertS (CPU, fp32, eval).

    Weights are N(0, 1/fan_in) and LayerNorms perturbed around identity, so attention is far
    from uniform and parity tests see every part of the math.
    """
    with torch.device("meta"):
        model = DnabertS(config, add_pooling_layer=add_pooling_layer)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model.eval()


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


def published_state_dict(model: DnabertS, layout: str = "dnabert_s") -> dict[str, torch.Tensor]:
    """The model's tensors under the published key names of `layout` (CPU, fp32).

    "dnabert_s": no prefix, with pooler. "dnabert2": `bert.` prefix, no pooler, plus the MLM head
    `cls.predictions.*` (deterministic random; decoder weight tied to the word embeddings).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if layout == "dnabert_s":
        if model.pooler is None:
            raise ValueError("the DNABERT-S layout includes pooler.*; build the model with add_pooling_layer=True")
        return state
    out = {f"bert.{k}": v for k, v in state.items() if not k.startswith("pooler.")}
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    out["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.02
    out["cls.predictions.transform.dense.bias"] = torch.zeros(hidden)
    out["cls.predictions.transform.LayerNorm.weight"] = torch.ones(hidden)
    out["cls.predictions.transform.LayerNorm.bias"] = torch.zeros(hidden)
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]  # tied, as published
    out["cls.predictions.decoder.bias"] = torch.zeros(vocab)
    return out


def write_hf_checkpoint(model: DnabertS, tokenizer_json_path: PathLike, out_dir: PathLike,
                        layout: str = "dnabert_s", safetensors: bool = False) -> Path:
    """Writes a HF folder in the published layout: config.json, tokenizer files, weights; returns it."""
    state = published_state_dict(model, layout)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.config.to_json(layout), indent=2) + "\n")
    shutil.copyfile(tokenizer_json_path, out_dir / TOKENIZER_FILE)
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "pad_token": "[PAD]", "mask_token": "[MASK]"}
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **specials}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials))
    if safetensors:
        from safetensors.torch import save_file
        # safetensors refuses shared storage: the tied decoder weight becomes a copy.
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out_dir / SAFETENSORS_FILE),
                  metadata={"format": "pt"})
    else:
        torch.save(state, out_dir / TORCH_FILE)
    return out_dir


__all__ = [
    "IUPAC_LETTERS", "DnabertSConfig", "DnabertS", "DnabertTokenizer", "alibi_slopes", "check_dna",
    "load_dnabert_s", "map_published_keys", "check_state_dict", "random_dnabert_s", "random_dna",
    "train_demo_tokenizer", "published_state_dict", "write_hf_checkpoint",
]
