"""Assemble a servable model repository: our model folders plus a checkpoint for each.

Used by the tests and by embed-export. Each model folder of `src` is copied with its
`config.pbtxt`, `configs/` and `1/model.py`; the checkpoint goes beside them as
`<model>/checkpoint` (a HF directory) or `<model>/checkpoint<suffix>` (a file such as a
fair-esm `.pt`, with the config parameter `checkpoint` pointed at it).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

PathLike = Union[str, Path]
CONFIG_FILES = ("config.pbtxt", "configs/cpu.pbtxt")


def source_repository() -> Path:
    """Our model_repository/: beside the packages (a source checkout), else ./model_repository.

    A wheel does not carry model_repository/ (it is not a package), so an installed copy
    falls back to the current directory.
    """
    candidates = (Path(__file__).resolve().parent.parent / "model_repository", Path.cwd() / "model_repository")
    for candidate in candidates:
        if (candidate / "esm2" / "config.pbtxt").exists():
            return candidate
    raise FileNotFoundError(
        "model_repository/ (with esm2/, dnabert_s/) not found beside the embed_server package or in "
        "the current directory; run from the source checkout or pass its path"
    )


def set_parameter(pbtxt: str, key: str, value: str) -> str:
    """`pbtxt` with the string_value of parameter `key` replaced (the key must be there)."""
    pattern = re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*)"[^"]*"')
    text, n = pattern.subn(lambda m: m.group(1) + '"' + value.replace('"', '\\"') + '"', pbtxt)
    if n != 1:
        raise ValueError(f"parameter {key!r} found {n} times in the model config")
    return text


def _output_dims_pattern(output: str) -> re.Pattern:
    return re.compile(r'(name:\s*"' + re.escape(output) + r'"[^}]*?dims:\s*\[)([^\]]*)(\])', re.S)


def output_dims(pbtxt: str, output: str) -> int:
    """The (single) dims value of output `output` in `pbtxt` (-1: any size)."""
    found = _output_dims_pattern(output).search(pbtxt)
    if found is None:
        raise ValueError(f"output {output!r} with dims not found in the model config")
    return int(found.group(2).strip())


def set_output_dims(pbtxt: str, output: str, dims: int) -> str:
    """`pbtxt` with output `output`'s `dims: [ -1 ]` (or a fixed value) set to [dims]."""
    pattern = _output_dims_pattern(output)
    text, n = pattern.subn(lambda m: f"{m.group(1)} {int(dims)} {m.group(3)}", pbtxt)
    if n != 1:
        raise ValueError(f"output {output!r} with dims found {n} times in the model config")
    return text


_INSTANCE_COUNT = re.compile(r"(instance_group\s*\[\s*\{[^}]*?count:\s*)(\d+)")


def instance_count(pbtxt: str) -> int:
    """The count of `pbtxt`'s (first) instance_group; 1, Triton's default, where none is written."""
    found = _INSTANCE_COUNT.search(pbtxt)
    return int(found.group(2)) if found else 1


def set_instance_count(pbtxt: str, count: int) -> str:
    """`pbtxt` with its (single) instance_group's count set to `count`."""
    text, n = _INSTANCE_COUNT.subn(lambda m: f"{m.group(1)}{int(count)}", pbtxt)
    if n != 1:
        raise ValueError(f"one instance_group with a count expected in the model config, found {n}")
    return text


def parameter_keys(pbtxt: str) -> list:
    """The keys of a model config's `parameters`, in file order."""
    return re.findall(r'key:\s*"([^"]*)"', pbtxt)


def check_parameters(parameters: Mapping[str, Mapping[str, str]], models, src: Optional[PathLike] = None) -> None:
    """Raises ValueError unless every {model: {key: value}} names one of `models` and a parameter
    that model's configs already have (a typo would otherwise leave the default in force, silently).

    `checkpoint` is refused: assemble_repository points it at the checkpoint it places.
    """
    src = Path(src) if src is not None else source_repository()
    for model, values in parameters.items():
        if model not in models:
            raise ValueError(f"parameters for model {model!r}, which is not among the models assembled "
                             f"({', '.join(models)})")
        if "checkpoint" in values:
            raise ValueError(f"model {model}: parameter 'checkpoint' is set by assemble_repository "
                             "(pass the checkpoint itself)")
        for config in CONFIG_FILES:
            path = src / model / config
            if not path.exists():
                continue
            known = parameter_keys(path.read_text())
            for key in values:
                if key not in known:
                    raise ValueError(f"model {model} has no config parameter {key!r} (in {config}; "
                                     f"it has: {', '.join(known)})")


def _place(src: Path, dst: Path, symlink: bool) -> None:
    if symlink:
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def assemble_repository(
    out: PathLike,
    checkpoints: Mapping[str, PathLike],
    src: Optional[PathLike] = None,
    embedding_dims: Optional[Mapping[str, int]] = None,
    symlink: bool = False,
    overwrite: bool = False,
    cpu_instances: Optional[int] = None,
    gpu_instances: Union[None, int, Mapping[str, int]] = None,
    parameters: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> Path:
    """Write `out/<model>/` for each model in `checkpoints` ({model: checkpoint path}).

    embedding_dims ({model: hidden size}) writes the exact EMBEDDING dims into the configs
    instead of -1; symlink links the checkpoints instead of copying them (for large ones;
    a link does not survive a container mount of `out` alone); cpu_instances sets the
    instance count of configs/cpu.pbtxt; gpu_instances that of config.pbtxt, i.e. instances
    per GPU, for every model (an int) or per model ({model: count}; others keep theirs);
    parameters ({model: {key: value}}) sets config parameters the configs already have, in
    both files (ValueError naming the model and key otherwise, raised before anything is
    written).
    """
    src = Path(src) if src is not None else source_repository()
    parameters = parameters or {}
    check_parameters(parameters, list(checkpoints), src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for model, checkpoint in checkpoints.items():
        checkpoint = Path(checkpoint)
        if not (src / model / "config.pbtxt").exists():
            raise FileNotFoundError(f"no model {model!r} in {src}")
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint for {model}: {checkpoint} does not exist")
        target = out / model
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
            shutil.rmtree(target)
        shutil.copytree(src / model, target, ignore=shutil.ignore_patterns("__pycache__", "checkpoint*"))
        name = "checkpoint" if checkpoint.is_dir() else "checkpoint" + "".join(checkpoint.suffixes)
        _place(checkpoint, target / name, symlink)
        for config in CONFIG_FILES:
            path = target / config
            if not path.exists():
                continue
            text = set_parameter(path.read_text(), "checkpoint", name)
            if embedding_dims and model in embedding_dims:
                for output in ("EMBEDDING", "BOS"):   # TOKEN_EMBEDDINGS keeps [-1, -1]: its length varies
                    text = set_output_dims(text, output, embedding_dims[model])
            if cpu_instances is not None and config == "configs/cpu.pbtxt":
                text = set_instance_count(text, cpu_instances)
            count = gpu_instances.get(model) if isinstance(gpu_instances, Mapping) else gpu_instances
            if count is not None and config == "config.pbtxt":
                text = set_instance_count(text, count)
            for key, value in parameters.get(model, {}).items():
                text = set_parameter(text, key, str(value))
            path.write_text(text)
    return out
