"""ESM-2 in plain PyTorch: its config, one layer definition, the packed forward and the padded reference.

Module and parameter names are those of transformers' `EsmModel` (without `esm.`), so a HF state
dict loads as is (esm2_checkpoint.py reads and writes checkpoints; esm2_tokenizer.py holds the
alphabet). The math follows fair-esm's `esm/model/esm2.py` (docs/models.md): token-dropout
rescale, pre-LN layers, rotary embeddings computed in float32, exact GELU, a final LayerNorm.

How a layer's element-wise steps run (our Triton kernels or PyTorch, compiled or not) and which
attention backend serves it come from the execution plan (plan.py), handed in by `prepare`.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8
from .attention import PackedAttention
from .compiling import compile_function
from .esm2_steps import LayerSteps, add_norm_torch, first_norm, layer_steps
from .packing import positions_in_sequence, sequence_index
from .plan import ExecutionPlan
from .representations import representation_layer

# Fraction of tokens replaced by <mask> in every ESM training run (15% selected x 80% masked).
MASK_RATIO_TRAIN = 0.15 * 0.8


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Esm2Config:
    """ESM-2 hyperparameters, named as in HF `config.json` (defaults: `esm2_t36_3B_UR50D`)."""

    hidden_size: int = 2560
    num_hidden_layers: int = 36
    num_attention_heads: int = 40
    intermediate_size: int = 10240
    vocab_size: int = 33
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True
    mask_token_id: int = 32
    pad_token_id: int = 1
    position_embedding_type: str = "rotary"
    emb_layer_norm_before: bool = False
    max_position_embeddings: int = 1026  # kept for config.json; rotary itself has no limit
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.position_embedding_type != "rotary":
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not supported: "
                             "only ESM-2's rotary embeddings are (absolute positions are ESM-1b/ESM-1v)")
        if self.emb_layer_norm_before:
            raise ValueError("emb_layer_norm_before=True is not supported: it is ESM-1b's layout, "
                             "ESM-2 has no layer norm before the encoder")
        if self.vocab_size != 33 or self.mask_token_id != 32 or self.pad_token_id != 1:
            raise ValueError(f"vocab_size={self.vocab_size!r}, mask_token_id={self.mask_token_id!r}, "
                             f"pad_token_id={self.pad_token_id!r}: Esm2Tokenizer has the 33-token ESM "
                             "alphabet (vocab_size 33, <mask> 32, <pad> 1)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} is odd: rotary embeddings need an even one")
        if not isinstance(self.token_dropout, bool):
            raise ValueError(f"token_dropout must be true or false, got {self.token_dropout!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # transformers' EsmConfig defaults, for keys a config.json leaves out: the file must mean
    # here what it means to transformers (e.g. no position_embedding_type = absolute).
    _HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "token_dropout": False,
                    "position_embedding_type": "absolute", "emb_layer_norm_before": False,
                    "max_position_embeddings": 1026, "rope_theta": 10000.0}

    @classmethod
    def from_hf_json(cls, config: Mapping[str, Any]) -> "Esm2Config":
        """From a HF ESM `config.json` dict; options ESM-2 embedding cannot honour raise ValueError."""
        if config.get("model_type", "esm") != "esm":
            raise ValueError(f"model_type={config['model_type']!r}, expected 'esm'")
        for flag in ("is_folding_model", "is_decoder", "add_cross_attention"):
            if config.get(flag):
                raise ValueError(f"{flag}=true is not supported (an ESM-2 encoder is expected)")
        if config.get("rope_scaling"):
            raise ValueError(f"rope_scaling={config['rope_scaling']!r} is not supported")
        missing = [k for k in ("vocab_size", "mask_token_id", "pad_token_id") if config.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)} (transformers has no default for them)")
        values = {f.name: config.get(f.name, cls._HF_DEFAULTS.get(f.name)) for f in fields(cls)}
        values["emb_layer_norm_before"] = bool(values["emb_layer_norm_before"])  # HF: null = false
        return cls(**values)

    def to_hf_json(self) -> Dict[str, Any]:
        """The `config.json` dict of a published ESM-2 checkpoint with these hyperparameters."""
        return {"architectures": ["EsmForMaskedLM"], "model_type": "esm", **asdict(self),
                "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "initializer_range": 0.02, "classifier_dropout": None, "is_folding_model": False,
                "esmfold_config": None, "vocab_list": None, "use_cache": True, "torch_dtype": "float32"}

    @classmethod
    def from_fair_esm(cls, cfg: Union[Mapping[str, Any], argparse.Namespace]) -> "Esm2Config":
        """From a fair-esm ESM-2 checkpoint's `cfg["model"]` (fairseq names) or `ESM2(...)` arguments."""
        cfg = vars(cfg) if isinstance(cfg, argparse.Namespace) else dict(cfg)
        names = {"layers": ("encoder_layers", "num_layers"), "dim": ("encoder_embed_dim", "embed_dim"),
                 "heads": ("encoder_attention_heads", "attention_heads")}
        found = {key: next((cfg[n] for n in options if n in cfg), None) for key, options in names.items()}
        missing = [options[0] for key, options in names.items() if found[key] is None]
        if missing:
            raise ValueError(f"fair-esm cfg lacks {', '.join(missing)} (has: {', '.join(sorted(cfg))})")
        # fair-esm's ESM2 builds its FFN as 4 x embed_dim; fairseq's cfg names it when present.
        ffn = cfg.get("encoder_ffn_embed_dim", 4 * found["dim"])
        # fair-esm LayerNorms are torch.nn.LayerNorm (or apex FusedLayerNorm), both eps 1e-5.
        return cls(hidden_size=found["dim"], num_hidden_layers=found["layers"],
                   num_attention_heads=found["heads"], intermediate_size=ffn,
                   token_dropout=bool(cfg.get("token_dropout", True)), layer_norm_eps=1e-5)


# --------------------------------------------------------------------------------------------
# Rotary embeddings


def rotate_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim] rotated by tables [..., 1, head_dim/2] as one concatenation in float32,
    cast once: the form torch.compile fuses into one kernel and ONNX tracing keeps length-free."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF/fair-esm's x * cos + rotate_half(x) * sin, rotate_half((x1, x2)) = (-x2, x1); float32 math,
    result in x's dtype.

    Eager, written per half into one output (no concatenation, one rounding). Traced (ONNX) or
    compiled it takes `rotate_fused`: out= on slices would freeze the traced length and breaks
    Dynamo's graph.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return rotate_fused(x, cos, sin)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    torch.addcmul(x1 * cos, x2, sin, value=-1, out=out[..., :half])  # x1 cos - x2 sin
    torch.addcmul(x2 * cos, x1, sin, out=out[..., half:])            # x2 cos + x1 sin
    return out


class RotaryEmbedding(nn.Module):
    """cos/sin tables for token positions; `inv_freq` stays float32 whatever the model's dtype."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: HF EsmModel saves it

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round inv_freq to 3 digits: angles off by radians at
        # position ~1000. Follow the device move only.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [*] -> cos, sin [*, 1, head_dim/2] float32 (1: heads; HF repeats them twice)."""
        angles = (positions.float()[..., None] * self.inv_freq)[..., None, :]  # [*, 1, head_dim/2]
        return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------
# The element-wise steps a plan chooses: PyTorch or our Triton kernels


def rotate_qkv_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv [*, 3, heads, head_dim] -> the same with q and k rotated (a new tensor)."""
    q, k, v = qkv.unbind(-3)
    return torch.stack((apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v), dim=-3)


def rotate_qkv_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_qkv_torch in place, q and k in one launch of kernels_rotary (packed [T, 3, heads, d])."""
    from .kernels_rotary import rotary_qk
    rotary_qk(qkv[:, 0], qkv[:, 1], cos, sin, inplace=True)
    return qkv


# add + LayerNorm (add_norm_torch, add_norm_triton) and the fp8 plans' steps: esm2_steps.py.


# --------------------------------------------------------------------------------------------
# One layer


def layer_head(rotate: Callable, h, qkv_w, qkv_b, cos, sin, heads: int) -> torch.Tensor:
    """The normalised stream h [*, hidden] -> q, k, v [*, 3, heads, head_dim], q and k rotated.
    (fp8.linear is F.linear for a tensor weight; e4m3 GEMM for an fp8.Fp8Weight, h then Fp8Rows.)"""
    qkv = fp8.linear(h, qkv_w, qkv_b).unflatten(-1, (3, heads, -1))   # one GEMM for q, k and v
    return rotate(qkv, cos, sin)


def layer_tail(steps: LayerSteps, x, context, out_w, out_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b,
               next_w, next_b, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention output + residual, LayerNorm, feed-forward (fc1, exact GELU, fc2) + residual, then
    the next LayerNorm (the next layer's first, or the final one) -> (stream, its norm), both
    [*, hidden] (the norm as fp8.Fp8Rows where the plan's next GEMM is fp8). `steps`: the plan's
    element-wise steps (esm2_steps.layer_steps); native: add_norm, F.gelu, as is, add_norm."""
    x, h = steps.norm_mid(x, fp8.linear(steps.out_in(context), out_w, out_b), ln_w, ln_b, eps)
    y = fp8.linear(steps.act(fp8.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)
    return steps.norm_next(x, y, next_w, next_b, eps)


class _Container(nn.Module):
    """A named group of submodules (only for HF parameter names); it has no forward."""

    def __init__(container, **modules: nn.Module):  # noqa: N805 (HF has a submodule named "self")
        super().__init__()
        for name, module in modules.items():
            container.add_module(name, module)


class Esm2Layer(nn.Module):
    """One pre-LN transformer layer (HF names: attention.{self,output,LayerNorm}, intermediate, output)."""

    def __init__(self, config: Esm2Config):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.attention = _Container(
            self=_Container(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=_Container(dense=nn.Linear(h, h)),
            LayerNorm=nn.LayerNorm(h, eps=eps))
        self.intermediate = _Container(dense=nn.Linear(h, config.intermediate_size))
        self.output = _Container(dense=nn.Linear(config.intermediate_size, h))
        self.LayerNorm = nn.LayerNorm(h, eps=eps)
        self._qkv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # fused_qkv()'s tensors
        self.fp8_weights: dict = {}   # name (qkv, out, fc1, fc2) -> fp8.Fp8Weight, made by ESM2.prepare
        self.smoothing: list = []     # fp8-smooth: the scales applied per (LayerNorm, next linears) pair

    def linears(self) -> dict:
        """The layer's GEMM weights by name (q/k/v fused)."""
        return {"qkv": self.fused_qkv()[0], "out": self.attention.output.dense.weight,
                "fc1": self.intermediate.dense.weight, "fc2": self.output.dense.weight}

    def norm_pairs(self) -> list:
        """(LayerNorm, the weights its output feeds): pre-LN, that output goes nowhere else."""
        return [(self.attention.LayerNorm, [self.fused_qkv()[0]]), (self.LayerNorm, [self.intermediate.dense.weight])]

    def set_smoothing(self, on: bool) -> None:
        """fp8-smooth's scales applied (on) or undone (off), exactly (fp8.smooth)."""
        if self.smoothing:   # (norm_pairs builds the fused q/k/v: not on a plan without smoothing)
            for (norm, weights), scales in zip(self.norm_pairs(), self.smoothing):
                fp8.smooth(norm.weight, norm.bias, weights, scales, undo=True)
            self.smoothing = []
        if on:
            for norm, weights in self.norm_pairs():
                scales = fp8.smoothing_scales(norm.weight, norm.bias, weights)
                fp8.smooth(norm.weight, norm.bias, weights, scales)
                self.smoothing.append(scales)

    def fused_qkv(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The q, k, v projections as one [3 * hidden, hidden] weight and [3 * hidden] bias.

        Built on first use; the three Linear layers' parameters then become views into them (no
        second copy of the weights, the state dict unchanged). A later move to another device or
        dtype copies each parameter on its own; the views no longer match and this rebuilds.
        """
        proj = self.attention.self
        linears = (proj.query, proj.key, proj.value)
        fused = self._qkv
        if fused is None or any(lin.weight.data_ptr() != fused[0][i].data_ptr() or
                                lin.bias.data_ptr() != fused[1][i].data_ptr() for i, lin in enumerate(linears)):
            # Ordinary tensors even when first called under inference_mode (the parameters hold them).
            with torch.inference_mode(False), torch.no_grad():
                weight = torch.cat([lin.weight for lin in linears])
                bias = torch.cat([lin.bias for lin in linears])
                for lin, w, b in zip(linears, weight.chunk(3), bias.chunk(3)):
                    lin.weight.data, lin.bias.data = w, b
            fused = self._qkv = (weight.view(3, -1, weight.shape[1]), bias.view(3, -1))
        return fused[0].flatten(0, 1), fused[1].flatten()

    def forward(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor], torch.Tensor], head: Callable, tail: Callable,
                next_norm: nn.LayerNorm, fp8_weights: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream [*, hidden] (packed [T, H] or padded [B, L, H]); h: this layer's
        first LayerNorm of it. Returns the new stream and `next_norm` of it. `fp8_weights`: the
        GEMMs take self.fp8_weights where it has them (the fp8 plans; packed only).

        `attend` maps q, k, v [*, 3, heads, head_dim] to [*, heads, head_dim]; `head` and `tail`
        are `layer_head` and `layer_tail` with the plan's element-wise steps bound (maybe compiled).
        """
        weight, bias = self.fused_qkv()
        w = self.fp8_weights if fp8_weights else {}
        qkv = head(h, w.get("qkv", weight), bias, cos, sin, self.num_heads)   # [*, 3, heads, head_dim]
        context = attend(qkv).flatten(-2)                               # [*, hidden]
        out, fc1, fc2 = self.attention.output.dense, self.intermediate.dense, self.output.dense
        return tail(x, context, w.get("out", out.weight), out.bias, self.LayerNorm.weight, self.LayerNorm.bias,
                    w.get("fc1", fc1.weight), fc1.bias, w.get("fc2", fc2.weight), fc2.bias,
                    next_norm.weight, next_norm.bias, self.LayerNorm.eps)


# --------------------------------------------------------------------------------------------
# The encoder


class ESM2(nn.Module):
    """The ESM-2 encoder; its state dict is HF `EsmModel`'s without `esm.`, contact head and pooler."""

    pool_skip_first = 1  # mean over residues: BOS and EOS excluded
    pool_skip_last = 1
    # What the execution plan may choose for this model (plan.choose_plan reads these).
    ATTENTION_BACKENDS = ("flash", "triton", "padded")   # flex pads the stream; ESM-2 runs it unpadded
    HAS_ALIBI = False
    COMPILE_WITH_KERNELS = False   # with our kernels, eager measured faster than compiled (perf/RESULTS.md)
    PRE_LAYER_NORM = True          # a LayerNorm's output feeds only the next linears (fp8-smooth folds into them)
    FFN_LINEARS = ("fc1", "fc2")   # what fp8-ffn puts in e4m3 (Esm2Layer.linears names)

    def __init__(self, config: Esm2Config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.embeddings = _Container(word_embeddings=nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id))
        self.rotary_embeddings = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.encoder = _Container(
            layer=nn.ModuleList(Esm2Layer(config) for _ in range(config.num_hidden_layers)),
            emb_layer_norm_after=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.prepare(ExecutionPlan())

    def kernels_fit(self) -> bool:
        """Whether kernels_rotary and kernels_attention take this model's head size."""
        from . import kernels_attention, kernels_rotary
        return kernels_rotary.supports(self.config.head_dim) and kernels_attention.supports(self.config.head_dim)

    def prepare(self, plan: ExecutionPlan) -> None:
        """Follow `plan` (plan.choose_plan) from now on: its attention, kernels, compilation and
        linears (fp8 plans: e4m3 weights made here from the current ones, per output channel;
        fp8-smooth rescales LayerNorms and weights in place first, the next plan undoes it)."""
        self.plan = plan
        rotate = rotate_qkv_triton if plan.kernels else rotate_qkv_torch
        self._add_norm = first_norm(plan)
        self._head = functools.partial(layer_head, rotate)
        self._tail = functools.partial(layer_tail, layer_steps(plan, last=False))
        self._tail_last = functools.partial(layer_tail, layer_steps(plan, last=True))
        if plan.compiled:
            self._head, self._tail = compile_function(self._head), compile_function(self._tail)
            self._tail_last = compile_function(self._tail_last)
        for block in self.encoder.layer:
            block.fp8_weights = {}   # the previous plan's go first (memory)
            block.set_smoothing(plan.linears in fp8.SMOOTHED)
            block.fp8_weights = fp8.plan_weights(block, plan.linears, self.FFN_LINEARS)

    def _embed(self, input_ids: torch.Tensor, mask_ratio: torch.Tensor) -> torch.Tensor:
        """Token embeddings with ESM's token-dropout rescale; mask_ratio is per token ([*] float32).

        <mask> rows are zeroed and every row scaled by (1 - 0.12) / (1 - observed mask ratio
        of its sequence), i.e. x 0.88 without <mask>, as HF `EsmEmbeddings` and fair-esm do.
        """
        x = self.embeddings.word_embeddings(input_ids)          # [*, hidden]
        if not self.config.token_dropout:
            return x
        x = x.masked_fill((input_ids == self.config.mask_token_id)[..., None], 0.0)
        return (x.float() * (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio)[..., None]).to(x.dtype)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable,
                add_norm: Callable, head: Callable, tail: Callable, layer: Optional[int] = None,
                tail_last: Optional[Callable] = None, fp8_weights: bool = False) -> torch.Tensor:
        """The layers over the embedded stream x [*, hidden] -> the representation at `layer`
        (fair-esm's repr_layers: 0 = the embeddings, k = the stream after k layers; the last,
        the default, has the final LayerNorm applied). `tail_last`: the last layer's tail (default
        `tail`); `fp8_weights`: the layers' GEMMs take their fp8 weights (Esm2Layer.forward)."""
        layers = self.encoder.layer
        stop = representation_layer(layer, len(layers))
        if stop == 0:
            return x
        first = layers[0].attention.LayerNorm
        x, h = add_norm(x, None, first.weight, first.bias, first.eps)
        next_norms = [layer.attention.LayerNorm for layer in layers[1:]] + [self.encoder.emb_layer_norm_after]
        for i, (block, next_norm) in enumerate(zip(layers[:stop], next_norms[:stop])):
            this_tail = tail_last if tail_last is not None and i == len(layers) - 1 else tail
            x, h = block(x, h, cos, sin, attend, head, this_tail, next_norm, fp8_weights)
        return h if stop == len(layers) else x                  # emb_layer_norm_after of the stream at the end

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       layer: Optional[int] = None) -> torch.Tensor:
        """input_ids [T] int64 (sequences back to back), cu_seqlens [B+1] int32 -> [T, hidden] at
        `layer` (default the last; see _layers)."""
        total = input_ids.shape[0]
        seq = sequence_index(cu_seqlens, total)                 # [T] sequence of each token
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()    # [B]
        is_mask = (input_ids == self.config.mask_token_id).float()
        n_masked = torch.zeros_like(lengths).index_add_(0, seq, is_mask)  # [B]
        x = self._embed(input_ids, (n_masked / lengths)[seq])   # [T, hidden]

        positions = positions_in_sequence(cu_seqlens, total, seq)  # [T] 0 at each BOS
        cos, sin = self.rotary_embeddings(positions)  # [T, 1, head_dim/2] float32 each
        # Layout built once, used by every layer. ESM scales q (before the rotary; same thing).
        attend = PackedAttention(cu_seqlens, max_seqlen, total, x.dtype, scale=self.config.head_dim ** -0.5,
                                 backend=self.plan.attention)
        return self._layers(x, cos, sin, attend.attend_qkv, self._add_norm, self._head, self._tail, layer,
                            self._tail_last, self.plan.linears != "native")

    forward = forward_packed

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       layer: Optional[int] = None) -> torch.Tensor:
        """Reference path, always PyTorch eager: input_ids [B, L], attention_mask [B, L] bool
        (True = token) -> [B, L, hidden] at `layer` (default the last)."""
        mask = attention_mask.bool()
        n_masked = ((input_ids == self.config.mask_token_id) & mask).sum(-1).float()  # [B]
        ratio = n_masked / mask.sum(-1).float()                 # [B]
        x = self._embed(input_ids, ratio[:, None].expand(input_ids.shape))  # [B, L, hidden]
        x = x * mask[..., None].to(x.dtype)                     # padding rows zero, as HF

        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)   # [B, L] position within each sequence
        cos, sin = self.rotary_embeddings(positions)  # [B, L, 1, head_dim/2] float32 each
        scale = self.config.head_dim ** -0.5
        key_mask = mask[:, None, None, :]                       # [B, 1, 1, L]

        def attend(qkv):                                        # [B, L, 3, heads, head_dim]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)      # each [B, heads, L, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)
            return out.transpose(1, 2)                          # [B, L, heads, head_dim]

        head = functools.partial(layer_head, rotate_qkv_torch)
        tail = functools.partial(layer_tail, layer_steps(ExecutionPlan(), last=False))
        return self._layers(x, cos, sin, attend, add_norm_torch, head, tail, layer)   # [B, L, hidden]
