"""ESM-2 in plain PyTorch: config, encoder, tokenizer, loaders and random checkpoints.

The module and parameter names are those of transformers' `EsmModel` (without `esm.`), so a
HF state dict loads as is; fair-esm `.pt` names are mapped through one explicit table. The
math follows fair-esm `esm/model/esm2.py`: token-dropout rescale, pre-LN layers, rotary
embeddings (computed in float32), exact GELU, final `emb_layer_norm_after`.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedAttention
from .compiling import compile_function
from .errors import CheckpointError, InvalidSequenceError
from .packing import positions_in_sequence, sequence_index
from .triton_support import require_runnable

# Fraction of tokens replaced by <mask> in every ESM training run (15% selected x 80% masked).
MASK_RATIO_TRAIN = 0.15 * 0.8


# --------------------------------------------------------------------------------------------
# Config


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
# Model


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., heads, head_dim] by tables [..., 1, head_dim/2]; float32 math, result in x's dtype.

    HF/fair-esm's x * cos + rotate_half(x) * sin, rotate_half((x1, x2)) = (-x2, x1), written per
    half: no concatenation and no cast round trip (bf16 inputs are upcast inside the fp32 ops, the
    store rounds once). On an H200 this is 1.4x faster than roll+mul+add, 2x+ than the HF form.
    Traced for ONNX, the out=-on-slices form would freeze the example's length into the graph,
    so export takes the concatenating form.
    """
    if torch.jit.is_tracing():
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
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.attention = _Container(
            self=_Container(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=_Container(dense=nn.Linear(h, h)),
            LayerNorm=nn.LayerNorm(h, eps=eps))
        self.intermediate = _Container(dense=nn.Linear(h, config.intermediate_size))
        self.output = _Container(dense=nn.Linear(config.intermediate_size, h))
        self.LayerNorm = nn.LayerNorm(h, eps=eps)
        self._qkv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # fused_qkv()'s tensors

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                head: Optional[Callable] = None, tail: Optional[Callable] = None) -> torch.Tensor:
        """x [*, hidden] (packed [T, H] or padded [B, L, H]); `attend` maps q, k, v [*, heads, head_dim].

        `head` and `tail` default to `layer_head`/`layer_tail`; the fast path passes compiled versions.
        """
        proj, norm = self.attention.self, self.attention.LayerNorm
        q, k, v = (head or layer_head)(x, norm.weight, norm.bias, proj.query.weight, proj.query.bias,
                                       proj.key.weight, proj.key.bias, proj.value.weight, proj.value.bias,
                                       cos, sin, norm.eps, self.num_heads)
        return (tail or layer_tail)(x, attend(q, k, v), self.attention.output.dense.weight,
                                    self.attention.output.dense.bias, self.LayerNorm.weight, self.LayerNorm.bias,
                                    self.intermediate.dense.weight, self.intermediate.dense.bias,
                                    self.output.dense.weight, self.output.dense.bias, self.LayerNorm.eps)

    def forward_add_norm(self, x: torch.Tensor, h: torch.Tensor, rotate: Callable, attend: PackedAttention,
                         add_norm: Callable,
                         next_norm: nn.LayerNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same layer with each residual add fused into the LayerNorm after it (ESM2.elementwise_impl "triton").

        Takes x (the residual stream, packed [T, hidden]) and h = this layer's first LayerNorm of x;
        returns the new stream and `next_norm` of it (the next layer's first LayerNorm, or the final
        one). q, k, v come from one GEMM (fused_qkv) and go to `attend.attend_qkv` as they are.
        `rotate(q, k)` applies the rotary; `add_norm(x, y, weight, bias, eps)` -> (x + y, LN(x + y)).
        """
        weight, bias = self.fused_qkv()
        qkv = F.linear(h, weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))  # one GEMM
        q, k = qkv[:, 0], qkv[:, 1]
        rotated_q, rotated_k = rotate(q, k)
        if rotated_q is not q:                                   # an out-of-place rotary: back into qkv
            q.copy_(rotated_q)
            k.copy_(rotated_k)
        out = self.attention.output.dense
        x, h = add_norm(x, F.linear(attend.attend_qkv(qkv).flatten(-2), out.weight, out.bias),
                        self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        fc1, fc2 = self.intermediate.dense, self.output.dense
        mlp = feed_forward(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return add_norm(x, mlp, next_norm.weight, next_norm.bias, next_norm.eps)


# The layer as two pure functions around attention, weights as arguments, so that one
# compiled graph of each serves all layers (CUDA fast path: Inductor fuses the LayerNorms,
# rotary, bias, residual and GELU element-wise work that eager runs as separate passes).

def rotate_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` written for torch.compile: one concatenation of the two rotated halves in
    float32, cast once. Inductor turns it into a single kernel (read x, write the result); the
    out=-on-slices form of `apply_rotary` is a Dynamo graph break (and would be 4 kernels)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def project_qkv(h, q_w, q_b, k_w, k_b, v_w, v_b, heads: int):
    """The normalised stream h [*, hidden] -> q, k, v [*, heads, head_dim] (before the rotary)."""
    return tuple(F.linear(h, w, b).unflatten(-1, (heads, -1)) for w, b in ((q_w, q_b), (k_w, k_b), (v_w, v_b)))


def feed_forward(h, fc1_w, fc1_b, fc2_w, fc2_b):
    """fc1, exact (erf) GELU, fc2 (before the residual add)."""
    return F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


def _layer_head(rotary, x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps: float, heads: int):
    h = F.layer_norm(x, ln_w.shape, ln_w, ln_b, eps)
    q, k, v = project_qkv(h, q_w, q_b, k_w, k_b, v_w, v_b, heads)
    return rotary(q, cos, sin), rotary(k, cos, sin), v


def layer_head(x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps: float, heads: int):
    """Pre-LN, q/k/v projections, rotary on q and k -> q, k, v [*, heads, head_dim] (eager form)."""
    return _layer_head(apply_rotary, x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps, heads)


def layer_head_fusable(x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps: float, heads: int):
    """`layer_head` with `rotate_fused`: the form enable_compile() compiles. One graph, no break:
    LayerNorm, the three GEMMs and a single fused kernel for the rotary of q and k (and their
    bias adds where Inductor splits them off the GEMM), versus 12 kernels per layer eager."""
    return _layer_head(rotate_fused, x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps, heads)


def _no_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x


def layer_head_norotary(x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps: float, heads: int):
    """`layer_head` without the rotary (q, k come back unrotated): the graph compiled for
    rotary_impl "triton", whose kernel (kernels_rotary.py) then rotates q and k in one launch."""
    return _layer_head(_no_rotary, x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps, heads)


def triton_rotary_head(head_without_rotary: Callable) -> Callable:
    """A layer head: `head_without_rotary` (compiled or eager), then the Triton rotary of q and k
    in place (one launch per layer; outside any compiled graph, so Dynamo never sees it)."""
    from .kernels_rotary import rotary_qk

    def head(x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps: float, heads: int):
        q, k, v = head_without_rotary(x, ln_w, ln_b, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin, eps, heads)
        q, k = rotary_qk(q, k, cos, sin, inplace=True)
        return q, k, v

    return head


def layer_tail(x, context, out_w, out_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps: float):
    """Attention output + residual, pre-LN, fc1, exact (erf) GELU, fc2, residual -> [*, hidden]."""
    x = x + F.linear(context.flatten(-2), out_w, out_b)         # [*, hidden]
    h = F.layer_norm(x, ln_w.shape, ln_w, ln_b, eps)           # ln_w.shape: static when traced
    return x + feed_forward(h, fc1_w, fc1_b, fc2_w, fc2_b)


class ESM2(nn.Module):
    """The ESM-2 encoder; its state dict is HF `EsmModel`'s without `esm.`, contact head and pooler."""

    pool_skip_first = 1  # mean over residues: BOS and EOS excluded
    pool_skip_last = 1
    ROTARY_IMPLS = ("torch", "triton")
    ELEMENTWISE_IMPLS = ("torch", "triton")
    # With the Triton rotary, eager ran 98,777 tokens/s and compiled 96,657 (ESM-2 3B, H200,
    # perf/RESULTS.md 2026-11-28): Inductor's LayerNorms were slower than ATen's. The runtime's
    # default (compile=None) then stays eager: faster, and no compile warm-up.
    compile_with_kernels = False
    rotary_impl = "torch"
    """Rotary of forward_packed: "torch" (apply_rotary eager, rotate_fused inside the compiled
    head) or "triton" (the head without rotary, then kernels_rotary's one launch for q and k;
    needs the triton package and CUDA, or TRITON_INTERPRET=1 for tests). The runtime sets it
    from RuntimeConfig.kernels ("auto": triton on CUDA)."""
    attention_backend = "auto"
    """PackedAttention backend of forward_packed: "auto" (flash varlen on CUDA in bf16/fp16, padded
    SDPA elsewhere), "flash", "padded" or "triton" (kernels_attention's varlen kernel with its bias
    term compiled out). The runtime sets "triton" with our kernels."""
    elementwise_impl = "torch"
    """Residual adds and LayerNorms of the eager forward_packed: "torch" (ATen, two passes) or
    "triton" (kernels_elementwise: each add fused into the LayerNorm after it; same needs as the
    Triton rotary). A compiled model ignores it: Inductor fuses its own. Set by the runtime with
    rotary_impl."""

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
        self._layer_head, self._layer_tail = layer_head, layer_tail  # enable_compile() swaps these
        self._compiled = False
        self._triton_heads: Dict[bool, Callable] = {}   # compiled? -> head with the Triton rotary

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

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids [T] int64 (sequences back to back), cu_seqlens [B+1] int32 -> last layer [T, hidden]."""
        total = input_ids.shape[0]
        seq = sequence_index(cu_seqlens, total)                 # [T] sequence of each token
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()    # [B]
        is_mask = (input_ids == self.config.mask_token_id).float()
        n_masked = torch.zeros_like(lengths).index_add_(0, seq, is_mask)  # [B]
        x = self._embed(input_ids, (n_masked / lengths)[seq])   # [T, hidden]

        positions = positions_in_sequence(cu_seqlens, total, seq)  # [T] 0 at each BOS
        cos, sin = self.rotary_embeddings(positions)  # [T, 1, head_dim/2] float32 each
        scale = self.config.head_dim ** -0.5                    # ESM scales q (before rotary; same thing)

        # Layout built once, used by every layer (attention_backend: our varlen kernel or flash on
        # CUDA, padded SDPA elsewhere).
        if self.attention_backend == "flex":   # flex pads the stream; ESM-2 runs it unpadded
            raise ValueError("ESM-2 does not take the flex attention backend (auto, flash, padded, triton)")
        attend = PackedAttention(cu_seqlens, max_seqlen, total, x.dtype, scale=scale,
                                 head_dim=self.config.head_dim, backend=self.attention_backend)

        if self._fused_norms(input_ids.device):
            return self._forward_add_norm(x, cos, sin, attend)
        head = self._layer_head if self.rotary_impl == "torch" else self._rotary_head(input_ids.device)
        for layer in self.encoder.layer:
            x = layer(x, cos, sin, attend, head, self._layer_tail)
        return self.encoder.emb_layer_norm_after(x)             # [T, hidden]

    def _fused_norms(self, device: torch.device) -> bool:
        """Whether forward_packed takes the fused add + LayerNorm path (elementwise_impl "triton", eager);
        checks both kernel switches' values first."""
        for name, choices in (("rotary_impl", self.ROTARY_IMPLS), ("elementwise_impl", self.ELEMENTWISE_IMPLS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r} (one of {', '.join(choices)})")
        if self.elementwise_impl == "torch" or self._compiled:
            return False
        require_runnable(device, "elementwise_impl 'triton'")
        return True

    def _forward_add_norm(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          attend: PackedAttention) -> torch.Tensor:
        """forward_packed's layers with kernels_elementwise's add + LayerNorm: 2 passes per layer, not 4."""
        from .kernels_elementwise import add_layer_norm
        if self.rotary_impl == "triton":
            from .kernels_rotary import rotary_qk

            def rotate(q, k):
                return rotary_qk(q, k, cos, sin, inplace=True)
        else:
            def rotate(q, k):
                return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        layers = self.encoder.layer
        first = layers[0].attention.LayerNorm
        x, h = add_layer_norm(x, None, first.weight, first.bias, first.eps)
        next_norms = [layer.attention.LayerNorm for layer in layers[1:]] + [self.encoder.emb_layer_norm_after]
        for layer, next_norm in zip(layers, next_norms):
            x, h = layer.forward_add_norm(x, h, rotate, attend, add_layer_norm, next_norm)
        return h                                                # emb_layer_norm_after of the stream

    def _rotary_head(self, device: torch.device) -> Callable:
        """The layer head for rotary_impl "triton" (built once per compiled state)."""
        require_runnable(device, "rotary_impl 'triton'")
        if self._compiled not in self._triton_heads:
            inner = compile_function(layer_head_norotary) if self._compiled else layer_head_norotary
            self._triton_heads[self._compiled] = triton_rotary_head(inner)
        return self._triton_heads[self._compiled]

    forward = forward_packed

    def supports_triton_kernels(self) -> bool:
        """Whether kernels_rotary and kernels_attention take this model's head_dim (the runtime
        asks before choosing)."""
        from . import kernels_attention, kernels_rotary
        return kernels_rotary.supports(self.config.head_dim) and kernels_attention.supports(self.config.head_dim)

    def enable_compile(self) -> None:
        """Run each layer's element-wise work through torch.compile (CUDA fast path)."""
        self._layer_head = compile_function(layer_head_fusable)
        self._layer_tail = compile_function(layer_tail)
        self._compiled = True

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reference path: input_ids [B, L], attention_mask [B, L] bool (True = token) -> [B, L, hidden]."""
        mask = attention_mask.bool()
        n_masked = ((input_ids == self.config.mask_token_id) & mask).sum(-1).float()  # [B]
        ratio = n_masked / mask.sum(-1).float()                 # [B]
        x = self._embed(input_ids, ratio[:, None].expand(input_ids.shape))  # [B, L, hidden]
        x = x * mask[..., None].to(x.dtype)                     # padding rows zero, as HF

        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)   # [B, L] position within each sequence
        cos, sin = self.rotary_embeddings(positions)  # [B, L, 1, head_dim/2] float32 each
        scale = self.config.head_dim ** -0.5
        key_mask = mask[:, None, None, :]                       # [B, 1, 1, L]

        def attend(q, k, v):                                    # [B, L, heads, head_dim] each
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # [B, heads, L, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)
            return out.transpose(1, 2)                          # [B, L, heads, head_dim]

        for layer in self.encoder.layer:
            x = layer(x, cos, sin, attend)
        return self.encoder.emb_layer_norm_after(x)             # [B, L, hidden]


def random_esm2(config: Esm2Config, seed: int = 0) -> ESM2:
    """An ESM2 with reproducible random weights (normal std 0.02; LayerNorm weights near 1).

    Biases and LayerNorm shifts are non-zero too, so a mis-mapped tensor changes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    model = ESM2(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "LayerNorm" in name or "layer_norm" in name:
                param.copy_((1.0 if name.endswith(".weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer


class Esm2Tokenizer:
    """The fair-esm ESM-1b/ESM-2 alphabet (33 tokens); adds <cls> and <eos>, rejects unknown letters."""

    TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>",
              "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M",
              "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
    RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"  # accepted letters ('.', '-' are gaps: not residues)
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


# --------------------------------------------------------------------------------------------
# Checkpoint names
#
# Native names are ESM2's (= HF EsmModel's without "esm."). fair-esm names after the prefix
# "encoder.sentence_encoder." or "encoder." (fair-esm pretrained.py strips the same two).

_FAIR_ESM_NAMES = (  # (native, fair-esm); {n} = layer index
    ("embeddings.word_embeddings.", "embed_tokens."),
    ("encoder.layer.{n}.attention.self.query.", "layers.{n}.self_attn.q_proj."),
    ("encoder.layer.{n}.attention.self.key.", "layers.{n}.self_attn.k_proj."),
    ("encoder.layer.{n}.attention.self.value.", "layers.{n}.self_attn.v_proj."),
    ("encoder.layer.{n}.attention.output.dense.", "layers.{n}.self_attn.out_proj."),
    ("encoder.layer.{n}.attention.LayerNorm.", "layers.{n}.self_attn_layer_norm."),
    ("encoder.layer.{n}.intermediate.dense.", "layers.{n}.fc1."),
    ("encoder.layer.{n}.output.dense.", "layers.{n}.fc2."),
    ("encoder.layer.{n}.LayerNorm.", "layers.{n}.final_layer_norm."),
    ("encoder.emb_layer_norm_after.", "emb_layer_norm_after."),
)
_INV_FREQ = "rotary_embeddings.inv_freq"
_FAIR_INV_FREQ = re.compile(r"^layers\.\d+\.self_attn\.rot_emb\.inv_freq$")
_FAIR_IGNORED = re.compile(r"^(lm_head|contact_head)\.")
# HF: per-layer inv_freq of transformers < 5 and the literal "*" key transformers 5 writes.
_HF_INV_FREQ = re.compile(
    r"^(rotary_embeddings|encoder\.layer\.(\d+|\*)\.attention\.self\.rotary_embeddings)\.inv_freq$")
_HF_LEGACY_LN = re.compile(r"LayerNorm\.(gamma|beta)$")
# Heads embedding ignores, and the unused absolute-position leftovers of published checkpoints.
_HF_IGNORED = re.compile(
    r"^(contact_head\.|pooler\.|embeddings\.position_ids$|embeddings\.position_embeddings\.weight$)")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + r"(?P<n>\d+)".join(re.escape(part) for part in template.split("{n}")))


_TO_NATIVE = [(_pattern(fair), native) for native, fair in _FAIR_ESM_NAMES]
_TO_FAIR = [(_pattern(native), fair) for native, fair in _FAIR_ESM_NAMES]


def _rename(name: str, table) -> Optional[str]:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.replace("{n}", match.groupdict().get("n") or "") + name[match.end():]
    return None


def _fair_to_native(name: str) -> Optional[str]:
    return _rename(name, _TO_NATIVE)


def _native_to_fair(name: str) -> str:
    fair = _rename(name, _TO_FAIR)
    assert fair is not None, name
    return fair


# --------------------------------------------------------------------------------------------
# Loading


def load_esm2(path: Union[str, Path], allow_pickle: bool = False) -> Tuple[ESM2, Esm2Tokenizer]:
    """(ESM2 in eval mode, float32 on CPU, tokenizer) from a HF directory or a fair-esm `.pt` file.

    Strict: every missing, unexpected or mis-shaped tensor is named in one CheckpointError.
    `.pt` files are read with `torch.load(weights_only=True)`, allowing `argparse.Namespace`
    (fair-esm keeps its cfg in one); `allow_pickle=True` lifts that, for a file you trust.
    """
    path = Path(path)
    if path.is_dir():
        config, tensors, layout = _read_hf(path)
    elif path.is_file():
        config, tensors, layout = _read_fair_esm(path, allow_pickle)
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    return _build(config, tensors, layout, path), Esm2Tokenizer()


def _read_hf(path: Path):
    """(config, {native name: tensor}, layout) from a HF ESM directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (a HF ESM-2 directory needs one)")
    try:
        config = Esm2Config.from_hf_json(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    _check_vocab(path / "vocab.txt")
    raw = _read_hf_weights(path)
    prefixed = any(name.startswith("esm.") for name in raw)
    layout = _Layout("HF EsmForMaskedLM (esm.*)" if prefixed else "HF EsmModel",
                     prefix="esm." if prefixed else "")
    for name, tensor in raw.items():
        if prefixed and name.startswith("lm_head."):
            continue
        if prefixed and not name.startswith("esm."):
            layout.unexpected.append(name)
            continue
        native = name[len(layout.prefix):]
        if _HF_IGNORED.match(native):
            continue
        if _HF_INV_FREQ.match(native):
            layout.inv_freq[name] = tensor
            continue
        # transformers >= 5 saves LayerNorm.weight/bias as the legacy LayerNorm.gamma/beta.
        native = _HF_LEGACY_LN.sub(lambda m: {"gamma": "LayerNorm.weight", "beta": "LayerNorm.bias"}[m[1]], native)
        layout.add(native, name, tensor)
    return config, layout.tensors, layout


def _check_vocab(vocab_file: Path) -> None:
    if vocab_file.is_file():
        tokens = tuple(vocab_file.read_text().split())
        if tokens != Esm2Tokenizer.TOKENS:
            raise CheckpointError(f"{vocab_file}: the vocabulary is not the 33-token ESM alphabet: {tokens}")


def _read_hf_weights(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of model.safetensors / pytorch_model.bin, sharded (*.index.json) or not."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        single, index = path / name, path / f"{name}.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / shard for shard in sorted(set(weight_map.values()))]
        else:
            continue
        tensors: Dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(_read_tensor_file(file))
        return tensors
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (or a sharded *.index.json)")


def _read_tensor_file(file: Path) -> Dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file), device="cpu")
        state = _torch_load(file, allow_pickle=False)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated file: name it
        raise CheckpointError(f"{file}: cannot read tensors: {e}") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def _torch_load(file: Path, allow_pickle: bool) -> Any:
    """torch.load on CPU, weights only (plus argparse.Namespace) unless allow_pickle; mmap if possible."""
    if allow_pickle:
        return torch.load(str(file), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise  # legacy (non-zip) files cannot be memory-mapped: read them whole
                return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: holds pickled objects other than tensors and argparse.Namespace, which "
            f"torch.load(weights_only=True) refuses ({str(e).splitlines()[0]}). Pass allow_pickle=True "
            "only for a file you trust, or re-save it as {'model': state_dict, 'cfg': {'model': {...}}}."
        ) from None


def _read_fair_esm(path: Path, allow_pickle: bool):
    """(config, {native name: tensor}, layout) from a fair-esm ESM-2 `.pt` file."""
    try:
        data = _torch_load(path, allow_pickle)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read a fair-esm checkpoint: {e}") from e
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise CheckpointError(f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)")
    if data.get("cfg") is None:
        arch = getattr(data.get("args"), "arch", None)
        raise CheckpointError(f"{path}: a fair-esm checkpoint without 'cfg' (args.arch={arch!r}): that is "
                              "ESM-1/ESM-1b/ESM-1v's layout; only ESM-2 is supported")
    cfg = data["cfg"]
    model_cfg = cfg.get("model", cfg) if isinstance(cfg, Mapping) else cfg
    try:
        config = Esm2Config.from_fair_esm(model_cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cfg: {e}") from None
    prefix = "encoder.sentence_encoder." if any(k.startswith("encoder.sentence_encoder.") for k in data["model"]) \
        else "encoder."
    layout = _Layout("fair-esm ESM-2", prefix=prefix, to_checkpoint=_native_to_fair)
    for name, tensor in data["model"].items():
        short = re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", name)
        if _FAIR_IGNORED.match(short):
            continue
        if _FAIR_INV_FREQ.match(short):
            layout.inv_freq[name] = tensor
            continue
        native = _fair_to_native(short)
        if native is None:
            layout.unexpected.append(name)
        else:
            layout.add(native, name, tensor)
    return config, layout.tensors, layout


class _Layout:
    """What one checkpoint file holds, in native names, plus what did not map."""

    def __init__(self, kind: str, prefix: str, to_checkpoint: Callable[[str], str] = lambda n: n):
        self.kind, self.prefix, self._to_checkpoint = kind, prefix, to_checkpoint
        self.tensors: Dict[str, torch.Tensor] = {}
        self.source: Dict[str, str] = {}        # native -> checkpoint name
        self.unexpected: list = []
        self.inv_freq: Dict[str, torch.Tensor] = {}

    def add(self, native: str, name: str, tensor: torch.Tensor) -> None:
        if native in self.tensors:  # e.g. both LayerNorm.weight and LayerNorm.gamma
            self.unexpected.append(name)
            return
        self.tensors[native] = tensor
        self.source[native] = name

    def checkpoint_name(self, native: str) -> str:
        return self.source.get(native) or self.prefix + self._to_checkpoint(native)


def _build(config: Esm2Config, tensors: Dict[str, torch.Tensor], layout: _Layout, path: Path) -> ESM2:
    """ESM2 from native-named tensors after a strict diff; float32, CPU, eval, no grad."""
    with torch.device("meta"):
        model = ESM2(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != _INV_FREQ}
    missing = [layout.checkpoint_name(n) for n in expected if n not in tensors]
    unexpected = list(layout.unexpected) + [layout.checkpoint_name(n) for n in tensors if n not in expected]
    wrong = [f"{layout.checkpoint_name(n)}: checkpoint {list(t.shape)}, model {list(expected[n])}"
             for n, t in tensors.items() if n in expected and tuple(t.shape) != expected[n]]
    inv_freq, inv_problem = _rotary_inv_freq(config, layout.inv_freq)
    if missing or unexpected or wrong or inv_problem:
        lines = ([f"  missing: {n}" for n in missing] + [f"  unexpected: {n}" for n in unexpected]
                 + [f"  wrong shape: {w}" for w in wrong] + ([f"  {inv_problem}"] if inv_problem else []))
        raise CheckpointError(
            f"{path} ({layout.kind}) does not match ESM-2 with hidden_size {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, intermediate_size "
            f"{config.intermediate_size}:\n" + "\n".join(lines))
    state = {name: t.to(torch.float32) for name, t in tensors.items()}
    state[_INV_FREQ] = inv_freq
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _rotary_inv_freq(config: Esm2Config, stored: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, str]:
    """The checkpoint's inv_freq (all copies equal, close to 1/theta^(2i/d)) or the computed one."""
    computed = RotaryEmbedding(config.head_dim, config.rope_theta).inv_freq
    if not stored:
        return computed, ""  # a buffer, not a weight: safe to recompute
    first_name, first = next(iter(stored.items()))
    for name, tensor in stored.items():
        if tuple(tensor.shape) != tuple(computed.shape):
            return computed, f"wrong shape: {name}: checkpoint {list(tensor.shape)}, model {list(computed.shape)}"
        if not torch.equal(tensor, first):
            return computed, f"rotary inv_freq differs between {first_name} and {name}"
    # Kept as stored (fp16-saved copies round by ~5e-4); far off means another rope_theta/head size.
    if not torch.allclose(first.float(), computed, rtol=2e-3, atol=0):
        return computed, f"{first_name} is not 1/{config.rope_theta:g}^(2i/{config.head_dim})"
    return first.to(torch.float32), ""


# --------------------------------------------------------------------------------------------
# Writing (random demo/test checkpoints in the published layouts)


def write_hf_checkpoint(model: ESM2, out_dir: Union[str, Path], safetensors: bool = True) -> Path:
    """A HF `EsmForMaskedLM` directory as published (config.json, weights, vocab.txt).

    Encoder keys are `esm.`-prefixed; per-layer rotary inv_freq, position_ids and the unused
    absolute position embedding of the published files are included, and so are `lm_head.*`
    (decoder tied to the word embeddings) and `esm.contact_head.*`, so the layout is complete.
    """
    config = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    h = config.hidden_size
    state = {f"esm.{name}": t.detach().to("cpu", torch.float32).contiguous().clone()
             for name, t in model.state_dict().items() if name != _INV_FREQ}
    inv_freq = model.rotary_embeddings.inv_freq.detach().cpu().float()
    for n in range(config.num_hidden_layers):
        state[f"esm.encoder.layer.{n}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    state["esm.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    state["esm.embeddings.position_embeddings.weight"] = torch.zeros(config.max_position_embeddings, h)
    state["esm.contact_head.regression.weight"] = torch.zeros(1, config.num_hidden_layers * config.num_attention_heads)
    state["esm.contact_head.regression.bias"] = torch.zeros(1)
    state["lm_head.dense.weight"] = 0.02 * torch.randn(h, h, generator=generator)
    state["lm_head.dense.bias"] = torch.zeros(h)
    state["lm_head.layer_norm.weight"] = torch.ones(h)
    state["lm_head.layer_norm.bias"] = torch.zeros(h)
    state["lm_head.decoder.weight"] = state["esm.embeddings.word_embeddings.weight"].clone()
    state["lm_head.bias"] = torch.zeros(config.vocab_size)
    if safetensors:
        from safetensors.torch import save_file
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, out_dir / "pytorch_model.bin")
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2, sort_keys=True) + "\n")
    (out_dir / "vocab.txt").write_text("\n".join(Esm2Tokenizer.TOKENS) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "<cls>", "eos_token": "<eos>", "mask_token": "<mask>", "pad_token": "<pad>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer"}, indent=2) + "\n")
    return out_dir


def write_fair_esm_checkpoint(model: ESM2, path: Union[str, Path]) -> Path:
    """A fair-esm ESM-2 `.pt` as published: {"model": encoder.sentence_encoder.* / encoder.lm_head.*,
    "cfg": {"model": Namespace(encoder_layers, ...)}}; fair-esm's own loader reads it."""
    config = model.config
    if config.intermediate_size != 4 * config.hidden_size:
        raise ValueError(f"fair-esm's ESM2 has intermediate size 4 x hidden ({4 * config.hidden_size}), "
                         f"this model {config.intermediate_size}")
    if not np.isclose(config.rope_theta, 10000.0) or config.layer_norm_eps != 1e-5:
        raise ValueError("fair-esm's ESM2 has rope_theta 10000 and layer_norm_eps 1e-5")
    generator = torch.Generator().manual_seed(0)
    h = config.hidden_size
    prefix = "encoder.sentence_encoder."
    state = {prefix + _native_to_fair(name): t.detach().to("cpu", torch.float32).contiguous().clone()
             for name, t in model.state_dict().items() if name != _INV_FREQ}
    inv_freq = model.rotary_embeddings.inv_freq.detach().cpu().float()
    for n in range(config.num_hidden_layers):
        state[f"{prefix}layers.{n}.self_attn.rot_emb.inv_freq"] = inv_freq.clone()
    state["encoder.lm_head.weight"] = state[prefix + "embed_tokens.weight"].clone()  # tied in fair-esm
    state["encoder.lm_head.bias"] = torch.zeros(config.vocab_size)
    state["encoder.lm_head.dense.weight"] = 0.02 * torch.randn(h, h, generator=generator)
    state["encoder.lm_head.dense.bias"] = torch.zeros(h)
    state["encoder.lm_head.layer_norm.weight"] = torch.ones(h)
    state["encoder.lm_head.layer_norm.bias"] = torch.zeros(h)
    cfg = argparse.Namespace(encoder_layers=config.num_hidden_layers, encoder_embed_dim=h,
                             encoder_ffn_embed_dim=config.intermediate_size,
                             encoder_attention_heads=config.num_attention_heads,
                             token_dropout=config.token_dropout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    return path
