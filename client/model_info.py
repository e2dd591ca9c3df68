"""What the client reads from a Triton model's config (`ModelInfo`: input and output names,
batch bound, width, instances), kept apart from the gRPC calls that fetch it so that its rules
stand on their own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import ServerError


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs from a model's config: names, batch bound, output width."""

    name: str
    max_batch_size: int
    hidden: Optional[int]  # None when the config says dims [-1]: learnt from a probe
    input_name: str
    output_name: str
    instances: int
    max_length: Optional[int] = None  # config parameter max_length (letters); None: "auto"
    outputs: Tuple[str, ...] = ()     # every output the model has (BOS, TOKEN_EMBEDDINGS, ...)
    dtype: str = "auto"               # config parameter dtype: the plan it serves (bfloat16, fp8, ...)

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelInfo":
        """Read a `get_model_config(as_json=True)["config"]` dict (int64 fields are strings)."""
        inputs = [i for i in config.get("input", []) if i.get("data_type") == "TYPE_STRING"]
        outputs = [o for o in config.get("output", []) if o.get("data_type") == "TYPE_FP32"]
        if any(o.get("name") == "EMBEDDING" for o in outputs):  # the mean beside BOS, per-token
            outputs = [o for o in outputs if o.get("name") == "EMBEDDING"]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ServerError(
                f"model {name!r}: expected one TYPE_STRING input and one TYPE_FP32 output, "
                f"config has inputs {config.get('input')} and outputs {config.get('output')}")
        dims = [int(d) for d in outputs[0].get("dims", [])]
        if len(dims) != 1 or dims[0] == 0 or dims[0] < -1:
            raise ServerError(f"model {name!r}: output dims {dims}, expected [hidden]")
        max_batch = int(config.get("max_batch_size", 0))
        if max_batch < 1:
            raise ServerError(f"model {name!r}: max_batch_size {max_batch}, expected > 0")
        instances = 0
        for group in config.get("instance_group", []):
            count = int(group.get("count", 1))
            instances += count * max(1, len(group.get("gpus", [])))
        params = config.get("parameters", {})
        length = params.get("max_length", {}).get("string_value", "")
        return cls(name, max_batch, dims[0] if dims[0] > 0 else None, inputs[0]["name"],
                   outputs[0]["name"], max(1, instances),
                   int(length) if length.strip().isdigit() else None,
                   tuple(o.get("name", "") for o in config.get("output", [])),
                   params.get("dtype", {}).get("string_value", "auto").strip() or "auto")
