"""ESM-2 checkpoints: reading a HF folder or a fair-esm `.pt` into an ESM2, and writing both layouts.

Native names are ESM2's (= HF EsmModel's without "esm."); fair-esm names are mapped through one
explicit table. Loading is strict (checkpoint_io.load_strict): every missing, unexpected or
mis-shaped tensor is named. Hyperparameters come from the checkpoint's own config, never its name.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .checkpoint_io import load_strict, read_hf_tensors, torch_load, write_hf_tensors
from .errors import CheckpointError
from .esm2 import ESM2, Esm2Config, RotaryEmbedding
from .esm2_tokenizer import Esm2Tokenizer

# --------------------------------------------------------------------------------------------
# Names
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
        config, layout = _read_hf(path)
    elif path.is_file():
        config, layout = _read_fair_esm(path, allow_pickle)
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    inv_freq, inv_problem = _rotary_inv_freq(config, layout.inv_freq)
    model = load_strict(
        lambda: ESM2(config), {**layout.tensors, _INV_FREQ: inv_freq},
        f"{path} ({layout.kind}) does not match ESM-2 with hidden_size {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, intermediate_size "
        f"{config.intermediate_size}",
        checkpoint_name=layout.checkpoint_name, unexpected=layout.unexpected,
        extra_problems=[inv_problem] if inv_problem else [])
    return model, Esm2Tokenizer()


def _read_hf(path: Path):
    """(config, layout with native-named tensors) from a HF ESM directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (a HF ESM-2 directory needs one)")
    try:
        config = Esm2Config.from_hf_json(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    _check_vocab(path / "vocab.txt")
    raw, _file = read_hf_tensors(path)
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
    return config, layout


def _check_vocab(vocab_file: Path) -> None:
    if vocab_file.is_file():
        tokens = tuple(vocab_file.read_text().split())
        if tokens != Esm2Tokenizer.TOKENS:
            raise CheckpointError(f"{vocab_file}: the vocabulary is not the 33-token ESM alphabet: {tokens}")


def _read_fair_esm(path: Path, allow_pickle: bool):
    """(config, layout with native-named tensors) from a fair-esm ESM-2 `.pt` file."""
    try:
        data = torch_load(path, allow_pickle)
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
    return config, layout


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
    write_hf_tensors(state, out_dir, safetensors)
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
