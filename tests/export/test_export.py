"""embed-export: validation before writing, the repository it writes, demo, hub ids offline."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_export.cli import build_parser, main

MODELS = ("esm2", "dnabert_s")


def tree(root: Path) -> dict:
    """{relative path: md5} of every file under root (links followed)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------ broken checkpoints


def _drop(state: dict, pattern: str) -> str:
    key = next(k for k in state if re.search(pattern, k))
    del state[key]
    return key


def _shrink(state: dict, pattern: str) -> str:
    key = next(k for k in state if re.search(pattern, k) and state[k].dim() == 2)
    state[key] = state[key][:-1].clone()
    return key


def break_dnabert_s(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    file = dst / "pytorch_model.bin"
    state = torch.load(file, weights_only=True)
    name = (_drop if how == "missing" else _shrink)(state, r"encoder\.layer\.1\..*Wqkv\.weight")
    torch.save(state, file)
    return name


def break_esm2_hf(src: Path, dst: Path, how: str) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    state = load_file(str(file))
    name = (_drop if how == "missing" else _shrink)(state, r"layer\.1\.attention\.self\.key\.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    return name


def break_esm2_fair(src: Path, dst: Path, how: str) -> str:
    checkpoint = torch.load(src, weights_only=False)  # our own demo file
    name = (_drop if how == "missing" else _shrink)(checkpoint["model"], r"layers\.1\..*k_proj\.weight")
    torch.save(checkpoint, dst)
    return name


BREAKERS = {
    "dnabert_s": ("dnabert_s", "--dnabert-s", break_dnabert_s),
    "esm2-hf": ("esm2", "--esm2", break_esm2_hf),
    "esm2-fair": ("esm2_fair.pt", "--esm2", break_esm2_fair),
}


@pytest.mark.parametrize("how", ["missing", "mis-shaped"])
@pytest.mark.parametrize("layout", sorted(BREAKERS))
def test_rejects_broken_checkpoint_naming_the_tensor(demo_checkpoints, tmp_path, capsys, layout, how):
    source, flag, breaker = BREAKERS[layout]
    bad = tmp_path / ("bad.pt" if source.endswith(".pt") else "bad")
    tensor = breaker(demo_checkpoints / source, bad, how)
    # A good checkpoint of the other model too: nothing at all may be written.
    other = ["--dnabert-s", str(demo_checkpoints / "dnabert_s")] if flag == "--esm2" else \
        ["--esm2", str(demo_checkpoints / "esm2")]
    out = tmp_path / "repo"
    code = main([flag, str(bad), *other, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert tensor.split(".", 1)[1] in err, err      # the tensor is named (prefix mapping aside)
    assert ("missing" if how == "missing" else "shape") in err  # the core says "mis-shaped"/"wrong shape"
    assert not out.exists() and not leftovers(tmp_path, "repo")


def test_rejects_missing_source_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--esm2", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    assert not out.exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "repo"
    assert main(["--esm2", "facebook/esm2_t6_8M_UR50D", "--out", str(out), "--cache-dir", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "facebook/esm2_t6_8M_UR50D" in err and "Offline?" in err and "hf download" in err
    assert not out.exists()


def test_requires_a_model_and_refuses_a_non_empty_out(demo_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:               # a usage error, as argparse's own: exit 2
        main(["--out", str(tmp_path / "repo")])
    assert usage.value.code == 2 and "give --esm2 and/or --dnabert-s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--dnabert-s", str(demo_checkpoints / "dnabert_s"), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ what it writes


def test_export_writes_checkpoints_and_exact_dims(demo_checkpoints, tmp_path):
    out = tmp_path / "repo"
    assert main(["--esm2", str(demo_checkpoints / "esm2_fair.pt"),
                 "--dnabert-s", str(demo_checkpoints / "dnabert_s"), "--out", str(out)]) == 0
    from embed_core import load_model

    for model, checkpoint in (("esm2", "checkpoint.pt"), ("dnabert_s", "checkpoint")):
        hidden = load_model(model, out / model / checkpoint)[0].hidden_size
        for config in ("config.pbtxt", "configs/cpu.pbtxt"):
            text = (out / model / config).read_text()
            assert re.search(r'name:\s*"EMBEDDING".*?dims:\s*\[\s*%d\s*\]' % hidden, text, re.S), text
            assert f'string_value: "{checkpoint}"' in text
        assert (out / model / "1" / "model.py").is_file()
    # the copies are exact
    assert tree(out / "dnabert_s" / "checkpoint") == tree(demo_checkpoints / "dnabert_s")
    assert (out / "esm2" / "checkpoint.pt").read_bytes() == (demo_checkpoints / "esm2_fair.pt").read_bytes()


def test_link_symlinks_the_checkpoint(demo_checkpoints, tmp_path):
    out = tmp_path / "repo"
    assert main(["--dnabert-s", str(demo_checkpoints / "dnabert_s"), "--out", str(out), "--link"]) == 0
    link = out / "dnabert_s" / "checkpoint"
    assert link.is_symlink() and link.resolve() == (demo_checkpoints / "dnabert_s").resolve()
    assert not (out / "esm2").exists()


@pytest.mark.server
def test_demo_repository_is_what_the_server_serves(embed_server, tmp_path):
    """`embed-export demo` writes exactly the session server's repository, which serves it."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert tree(out) == tree(embed_server.repository)
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed")
    from embed_core import RuntimeConfig, load_embedder

    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        for model, sequences in (("esm2", ["MKTAYIAKQRQISFVK", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTY"]),
                                 ("dnabert_s", ["ACGTTGCANNGATCC", "ACGT" * 40])):
            tensor = grpcclient.InferInput("SEQUENCE", [len(sequences), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[s.encode()] for s in sequences], dtype=object))
            served = client.infer(model, [tensor]).as_numpy("EMBEDDING")
            local = load_embedder(model, out / model / "checkpoint", RuntimeConfig(device="cpu", dtype="float32"))
            np.testing.assert_allclose(served, local.embed(sequences), atol=1e-5)
    finally:
        client.close()


def test_demo_fair_esm_layout(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--esm2-format", "fair-esm"]) == 0
    assert (out / "esm2" / "checkpoint.pt").is_file()
    assert 'string_value: "checkpoint.pt"' in (out / "esm2" / "config.pbtxt").read_text()


def test_help_shows_every_option():
    text = build_parser().format_help()
    for option in ("--esm2", "--dnabert-s", "--out", "--link", "--force", "{demo,onnx,check-fp8}"):
        assert option in text
