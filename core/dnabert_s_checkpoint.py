"""DNABERT-S checkpoints: a HF DNABERT-S (or DNABERT-2-117M) folder into a DnabertS, random models,
and folders written in the published layouts."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Mapping, Union

import torch

from .checkpoint_io import SAFETENSORS_FILE, TORCH_FILE, load_strict, read_hf_tensors, write_hf_tensors
from .dnabert_s import LAYOUTS, DnabertS, DnabertSConfig
from .dnabert_s_tokenizer import TOKENIZER_FILE, DnabertTokenizer
from .errors import CheckpointError

PathLike = Union[str, Path]
CONFIG_FILE = "config.json"


def map_published_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DNABERT-S keys as they are; DNABERT-2-117M keys lose their `bert.` prefix; MLM head `cls.*` dropped."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("cls."):
            continue
        name = key[len("bert."):] if key.startswith("bert.") else key
        mapped[f"{key} (duplicate of {name})" if name in mapped else name] = tensor  # reported as unexpected
    return mapped


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
    raw, file = read_hf_tensors(root)
    state = map_published_keys(raw)
    has_pooler = any(k.startswith("pooler.") for k in state)  # DNABERT-2-117M has none; it is never used
    model = load_strict(lambda: DnabertS(config, add_pooling_layer=has_pooler), state,
                        f"{file} does not match DNABERT-S with its config.json (hidden {config.hidden_size}, "
                        f"{config.num_hidden_layers} layers, vocab {config.vocab_size})")
    return model, tokenizer


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
    write_hf_tensors(state, out_dir, safetensors)
    return out_dir
