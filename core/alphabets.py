"""Names and alphabets that the model core and the client share; no dependencies (the client has no torch).

Importing this module does not import torch: `embed_core/__init__.py` loads its torch-backed
names lazily, on first use.
"""

MODEL_KINDS = ("esm2", "dnabert_s")
"""The models we serve, in the order outputs list them (Triton model names)."""

IUPAC_NUCLEOTIDES = "ACGTUNRYKMSWBDHV"
"""DNABERT-S's input alphabet: the IUPAC nucleotide codes (all but ACGT tokenize to [UNK])."""

ESM_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
"""ESM-2's accepted residue letters (its 33-token alphabet less specials and the gaps '.', '-')."""

ADDED_TOKENS_PER_SEQUENCE = 2
"""Special tokens both tokenizers add to every sequence: ESM-2 <cls> + <eos>, DNABERT-S [CLS] + [SEP]."""

DEFAULT_MAX_LENGTH = {"esm2": 1022, "dnabert_s": 10_000}
"""Longest accepted sequence in letters when RuntimeConfig.max_length is None: ESM-2 as fair-esm
(1022 residues + BOS/EOS = 1024 tokens); DNABERT-S 10,000 bp. The client's limit when no server
reports one."""

INCLUDE_CHOICES = ("mean", "per_token", "bos")
"""What a request may ask per sequence (parameter include), in the order outputs list them."""

FP8_GATE_METRIC = "embed_fp8_gate_min_cosine"
"""A GAUGE set once at load by an fp8 plan's instance (labels: the metric labels + plan): the
gate's smallest per-sequence cosine against fp32; clients report it in summary.json."""
