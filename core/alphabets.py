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
