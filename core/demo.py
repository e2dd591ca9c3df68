"""Small random checkpoints in the exact published layouts, for the demo, the tests and CI.

`write_demo_checkpoints(out_dir)` writes
  out_dir/dnabert_s/     HF DNABERT-S folder (config.json, trained BPE tokenizer.json, weights);
  out_dir/esm2/          HF ESM-2 folder as published (EsmForMaskedLM: esm.* + lm_head.*);
  out_dir/esm2_fair.pt   fair-esm ESM-2 .pt with the same weights as out_dir/esm2/.
Weights are random (fixed seeds), so embeddings mean nothing; the layouts and the math are real.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Union

# Small enough that loading and embedding take well under a second on a CPU.
DEMO_DNABERT_S = dict(vocab_size=512, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                      intermediate_size=192)
DEMO_ESM2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256)  # fair-esm's ESM2 fixes the FFN at 4 x hidden
DEMO_SEED = 0


def write_demo_checkpoints(out_dir: Union[str, Path]) -> dict:
    """Writes both demo models under `out_dir`; returns {"dnabert_s", "esm2", "esm2_fair"} -> path."""
    from .dnabert_s import DnabertSConfig
    from .dnabert_s_checkpoint import random_dnabert_s
    from .dnabert_s_checkpoint import write_hf_checkpoint as write_dnabert_s
    from .dnabert_s_tokenizer import train_demo_tokenizer
    from .esm2 import Esm2Config
    from .esm2_checkpoint import random_esm2, write_fair_esm_checkpoint
    from .esm2_checkpoint import write_hf_checkpoint as write_esm2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with tempfile.TemporaryDirectory(prefix="demo-tokenizer-") as tmp:
        tokenizer_json = train_demo_tokenizer(Path(tmp) / "tokenizer.json",
                                              vocab_size=DEMO_DNABERT_S["vocab_size"], seed=DEMO_SEED)
        dnabert = random_dnabert_s(DnabertSConfig(**DEMO_DNABERT_S), seed=DEMO_SEED)
        paths["dnabert_s"] = write_dnabert_s(dnabert, tokenizer_json, out / "dnabert_s")
    esm = random_esm2(Esm2Config(**DEMO_ESM2), seed=DEMO_SEED)
    paths["esm2"] = write_esm2(esm, out / "esm2")
    paths["esm2_fair"] = write_fair_esm_checkpoint(esm, out / "esm2_fair.pt")
    return paths
