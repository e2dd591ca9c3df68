"""embed_core: DNABERT-S and ESM-2 in plain PyTorch, packing, the per-device runtime, loaders."""
from .errors import CheckpointError, EmbedCoreError, InvalidSequenceError, SequenceTooLargeError
from .models import DEFAULT_MAX_LENGTH, MODEL_KINDS, load_embedder, load_model
from .packing import PackedBatch, mean_pool_packed, pack
from .runtime import EmbedStats, Embedder, RuntimeConfig, choose_dtype, token_budget_for

__all__ = [
    "CheckpointError", "EmbedCoreError", "InvalidSequenceError", "SequenceTooLargeError",
    "DEFAULT_MAX_LENGTH", "MODEL_KINDS", "load_embedder", "load_model",
    "PackedBatch", "mean_pool_packed", "pack",
    "EmbedStats", "Embedder", "RuntimeConfig", "choose_dtype", "token_budget_for",
]
