"""DNABERT-S (the DNABERT-2-117M / MosaicBERT architecture) in plain PyTorch: config, one layer, the forwards.

Math (docs/models.md): word embedding + token-type row 0, LayerNorm; post-LN layers of ALiBi
attention (no position embeddings) and a GLU MLP (exact GELU on the first half of
`gated_layers` times the second half, then `wo`); no final norm. The embedding is the mean of
the last layer over all tokens, [CLS] and [SEP] included. Module and attribute names reproduce
the published state-dict keys exactly (dnabert_s_checkpoint.py reads and writes them;
dnabert_s_tokenizer.py holds the BPE tokenizer). Which attention backend runs and whether the
layer is compiled come from the execution plan (plan.py), handed in by `prepare`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8
from .attention import PackedAttention, alibi_bias
from .compiling import compile_function
from .plan import ExecutionPlan
from .representations import representation_layer

LAYOUTS = ("dnabert_s", "dnabert2")   # published key layouts: DNABERT-S (no prefix), DNABERT-2-117M (bert.)


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
    """Output projection and its post-LN (applied in layer_tail)."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class DnabertAttention(nn.Module):
    """Holds `self` (Wqkv) and `output`, the names of the published keys."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.self = DnabertSelfAttention(config)
        self.output = DnabertSelfOutput(config)


class DnabertGluMlp(nn.Module):
    """GLU MLP weights: gelu_erf(first half) * second half of `gated_layers` (no bias), `wo`, post-LN (layer_tail)."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class DnabertLayer(nn.Module):
    """One post-LN encoder layer."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.attention = DnabertAttention(config)
        self.mlp = DnabertGluMlp(config)
        self.fp8_weights: dict = {}   # name -> fp8.Fp8Weight under an fp8 plan (DnabertS.prepare)

    def linears(self) -> dict:
        """The layer's GEMM weights by name (the GLU's gate and value in one)."""
        return {"Wqkv": self.attention.self.Wqkv.weight, "dense": self.attention.output.dense.weight,
                "glu": self.mlp.gated_layers.weight, "wo": self.mlp.wo.weight}


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
    all layers): output projection + residual + post-LN, then GLU MLP + residual + post-LN."""
    inter = wo_w.shape[1]                        # weight shapes, not x's: static when traced (ONNX)
    h = F.layer_norm(F.linear(context, dense_w, dense_b) + x, ln1_w.shape, ln1_w, ln1_b, eps)   # [*, H]
    g = F.linear(h, glu_w)                                                                       # [*, 2I]
    a = F.gelu(g[..., :inter]) * g[..., inter:]                                                  # [*, I]
    return F.layer_norm(F.linear(a, wo_w, wo_b) + h, ln2_w.shape, ln2_w, ln2_b, eps)            # [*, H]


# ---- the fp8 plans: layer_tail's math in steps, each GEMM input made e4m3 by the step producing it


def add_norm(y, x, w, b, eps: float) -> torch.Tensor:
    """The post-LN after a residual add."""
    return F.layer_norm(y + x, w.shape, w, b, eps)


def add_norm_fp8(y, x, w, b, eps: float) -> tuple:
    """add_norm and its rows in e4m3 (compiled: one Inductor kernel, rows of hidden size)."""
    h = add_norm(y, x, w, b, eps)
    return h, fp8.quantize_rows(h)


def glu_fp8_torch(g: torch.Tensor) -> fp8.Fp8Rows:
    inter = g.shape[-1] // 2
    return fp8.quantize_rows(F.gelu(g[..., :inter].float()) * g[..., inter:].float())


class Fp8TailSteps(NamedTuple):
    out_in: Callable      # attention output -> the dense projection's input (fp8: quantized)
    norm_mid: Callable    # add + post-LN -> (h, h in e4m3): the GLU GEMM's input
    glu: Callable         # GLU GEMM output [*, 2I] -> wo's input in e4m3 (kernels_quant, or PyTorch)
    norm_next: Callable   # add + post-LN -> the stream, or (stream, its e4m3 rows: the next q/k/v input)


def layer_tail_fp8(steps: Fp8TailSteps, context, x, dense_w, dense_b, ln1_w, ln1_b, glu_w, wo_w, wo_b,
                   ln2_w, ln2_b, eps: float):
    """layer_tail under an fp8 plan: the same math, e4m3 GEMMs where the weights are fp8.Fp8Weight.
    (A single compiled layer_tail with the quantization inside measured slower: Inductor's GLU +
    row amax + cast kernel took 4x its bf16 GLU's time, perf/RESULTS.md.)"""
    h, hq = steps.norm_mid(fp8.linear(steps.out_in(context), dense_w, dense_b), x, ln1_w, ln1_b, eps)
    a = steps.glu(fp8.linear(hq, glu_w))
    return steps.norm_next(fp8.linear(a, wo_w, wo_b), h, ln2_w, ln2_b, eps)


def fp8_tail(plan: ExecutionPlan, last: bool) -> Callable:
    """layer_tail_fp8 with the plan's steps bound (the last layer's output stays in the dtype)."""
    from . import kernels_quant
    every = plan.linears in fp8.EVERY_LINEAR
    compiled = compile_function if plan.compiled else (lambda fn: fn)
    out_in = ((kernels_quant.quantize_rows if plan.kernels else fp8.quantize_rows) if every
              else (lambda t: t))
    norm_q = compiled(add_norm_fp8)
    steps = Fp8TailSteps(out_in, norm_q, kernels_quant.glu_quantize_rows if plan.kernels else glu_fp8_torch,
                         norm_q if every and not last else compiled(add_norm))
    return functools.partial(layer_tail_fp8, steps)




class DnabertS(nn.Module):
    """The DNABERT-S encoder: packed (production) and padded (reference, export) forwards."""

    pool_skip_first = 0  # the embedding averages [CLS] ...
    pool_skip_last = 0   # ... and [SEP] too
    # What the execution plan may choose for this model (plan.choose_plan reads these).
    ATTENTION_BACKENDS = ("padded", "flex", "triton")    # ALiBi: no flash
    HAS_ALIBI = True
    COMPILE_WITH_KERNELS = True
    PRE_LAYER_NORM = False        # post-LN: its LayerNorm output is the residual stream (no fp8-smooth)
    FFN_LINEARS = ("glu", "wo")   # what fp8-ffn puts in e4m3 (DnabertLayer.linears names)

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
        self.prepare(ExecutionPlan())

    def kernels_fit(self) -> bool:
        """Whether kernels_attention takes this model's head size."""
        from . import kernels_attention
        return kernels_attention.supports(self.config.head_dim)

    def prepare(self, plan: ExecutionPlan) -> None:
        """Follow `plan` (plan.choose_plan) from now on: its attention backend, compilation and
        linears (fp8 plans: e4m3 weights made here from the current ones, per output channel)."""
        self.plan = plan
        if plan.linears == "native":
            self._layer_tail = self._layer_tail_last = compile_function(layer_tail) if plan.compiled else layer_tail
        else:
            self._layer_tail, self._layer_tail_last = fp8_tail(plan, last=False), fp8_tail(plan, last=True)
        for block in self.encoder.layer:
            block.fp8_weights = {}   # the previous plan's go first (memory)
            block.fp8_weights = fp8.plan_weights(block, plan.linears, self.FFN_LINEARS)

    def alibi_slopes_tensor(self, device: torch.device) -> torch.Tensor:
        """[heads] float32 slopes on `device` (cached per device)."""
        device = torch.device(device)
        if device not in self._slopes_on:
            self._slopes_on[device] = torch.tensor(self._slopes, dtype=torch.float32, device=device)
        return self._slopes_on[device]

    def _layers(self, x: torch.Tensor, attend, tail, layer: Optional[int] = None, tail_last=None,
                fp8_weights: bool = False) -> torch.Tensor:
        """The layers over the embedded stream x [*, H] up to `layer` (0 = the embeddings, default
        the last); `attend` maps [*, 3, heads, d] -> [*, H], `tail` is layer_tail (compiled or not;
        under the fp8 plan layer_tail_fp8, which returns the stream and its e4m3 rows), `tail_last` the last layer's
        (default `tail`); `fp8_weights`: the GEMMs take each block's fp8_weights (packed only)."""
        heads, head_dim, eps = self.config.num_attention_heads, self.config.head_dim, self.config.layer_norm_eps
        layers = self.encoder.layer
        stop = representation_layer(layer, len(layers))
        qkv_in = x                                   # the q/k/v GEMM's input: x, or its e4m3 rows
        for i, block in enumerate(layers[:stop]):
            w = block.fp8_weights if fp8_weights else {}
            proj = block.attention.self.Wqkv
            qkv = fp8.linear(qkv_in, w.get("Wqkv", proj.weight), proj.bias).unflatten(-1, (3, heads, head_dim))
            context = attend(qkv)                                                 # [*, H]
            out, mlp = block.attention.output, block.mlp
            this_tail = tail_last if tail_last is not None and i == len(layers) - 1 else tail
            x = this_tail(context, x, w.get("dense", out.dense.weight), out.dense.bias, out.LayerNorm.weight,
                          out.LayerNorm.bias, w.get("glu", mlp.gated_layers.weight), w.get("wo", mlp.wo.weight),
                          mlp.wo.bias, mlp.layernorm.weight, mlp.layernorm.bias, eps)
            x, qkv_in = x if isinstance(x, tuple) else (x, x)
        return x

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       layer: Optional[int] = None) -> torch.Tensor:
        """input_ids [T] packed, cu_seqlens [B+1] int32 -> hidden state [T, hidden] at `layer` (default the last).

        With the "flex" backend the whole forward runs on the stream padded to a multiple of
        FlexAttention's block (pad tokens are their own sequence: they change no real token), and
        the pad rows are dropped at the end.
        """
        total = input_ids.numel()
        # Layout, masks and the ALiBi bias (or FlexAttention's block mask) are built once and
        # shared by all layers.
        attend = PackedAttention(cu_seqlens, max_seqlen, total, self.embeddings.word_embeddings.weight.dtype,
                                 alibi_slopes=self.alibi_slopes_tensor(input_ids.device),
                                 head_dim=self.config.head_dim, backend=self.plan.attention,
                                 compile_flex=True if self.plan.compiled else None)
        if attend.padded_total != total:
            input_ids = torch.cat((input_ids, input_ids.new_zeros(attend.padded_total - total)))
        def attend_packed(qkv):                     # [T, 3, heads, d] -> [T, H]
            return attend.attend_qkv(qkv).reshape(qkv.shape[0], -1)

        return self._layers(self.embeddings(input_ids), attend_packed, self._layer_tail, layer,
                            self._layer_tail_last, self.plan.linears != "native")[:total]

    forward = forward_packed

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       layer: Optional[int] = None) -> torch.Tensor:
        """Reference path, always PyTorch eager: input_ids [B, L], attention_mask [B, L] bool ->
        [B, L, hidden], pads set to 0 as the original. No data-dependent indexing, so it traces
        and exports (ONNX) as is."""
        length = input_ids.shape[1]
        x = self.embeddings(input_ids)                                       # [B, L, H]
        bias = alibi_bias(self.alibi_slopes_tensor(input_ids.device), length, x.dtype)   # [heads, L, L]
        mask = attention_mask.bool()
        bias = bias[None].masked_fill(~mask[:, None, None, :], float("-inf"))   # [B, heads, L, L]

        def attend(qkv):                                                     # [B, L, 3, heads, d]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # each [B, heads, L, d]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(-2)

        return self._layers(x, attend, layer_tail, layer).masked_fill(~mask[..., None], 0.0)
