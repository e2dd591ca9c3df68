"""embed_core: DNABERT-S and ESM-2 in plain PyTorch, packing, the per-device runtime, loaders.

The names below load lazily, so `embed_core.alphabets` (shared with the torch-free client)
imports without torch.
"""
import importlib

_EXPORTS = {
    "alphabets": ("MODEL_KINDS",),
    "errors": ("CheckpointError", "EmbedCoreError", "InvalidSequenceError", "SequenceTooLargeError"),
    "models": ("DEFAULT_MAX_LENGTH", "load_embedder", "load_model"),
    "packing": ("PackedBatch", "mean_pool_packed", "pack"),
    "plan": ("ExecutionPlan", "choose_dtype", "choose_plan"),
    "runtime": ("EmbedStats", "Embedder", "RuntimeConfig", "token_budget_for"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'embed_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
