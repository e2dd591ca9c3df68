"""Triton Python model: DNABERT-S embeddings (mean of the last layer over all tokens, [CLS]/[SEP] included).

The adapter is shared by both models (embed_core.triton_model); the math is the model core's.
"""
import triton_python_backend_utils as pb_utils

# embed_core must be installed where the python3 first on tritonserver's PATH looks.
from embed_core.triton_model import triton_model_class

TritonPythonModel = triton_model_class(pb_utils, kind="dnabert_s")
