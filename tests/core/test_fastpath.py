"""The execution plans' fast paths, checked on CPU: DNABERT-S FlexAttention (block mask, ALiBi score_mod,
padded stream) against the padded SDPA path, our Triton kernels (under TRITON_INTERPRET=1) and the
compiled ESM-2 layer against eager, and how plan.choose_plan decides.

The quick tests run everywhere (no compilation). The compiled ones take tens of seconds of
Inductor work on CPU, so they run only with EMBED_SLOW_TESTS=1 or on a machine with CUDA
(where they also run on the GPU, the path production takes).
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embed_core import attention
from embed_core import esm2 as esm2_module
from embed_core.dnabert_s import DnabertSConfig
from embed_core.dnabert_s_checkpoint import random_dnabert_s
from embed_core.esm2 import Esm2Config
from embed_core.esm2_checkpoint import random_esm2
from embed_core.packing import pack, sequence_index
from embed_core.plan import ExecutionPlan

SLOW = os.environ.get("EMBED_SLOW_TESTS") == "1" or torch.cuda.is_available()
slow = pytest.mark.skipif(not SLOW, reason="compiles with Inductor (tens of seconds on CPU): "
                                           "set EMBED_SLOW_TESTS=1 to run (always run where CUDA is present)")
needs_flex = pytest.mark.skipif(not attention.flex_available(), reason="torch has no flex_attention")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# head_dim 16: the smallest that Inductor's CUDA flex_attention and our attention kernel take.
DNA = DnabertSConfig(vocab_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=96)
ESM = Esm2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def planned(model, **plan):
    """`model` following an ExecutionPlan with these fields (the rest: the portable defaults)."""
    model.prepare(ExecutionPlan(**plan))
    return model


def packed_batch(lengths, vocab: int, seed: int, low: int = 5):
    rng = np.random.default_rng(seed)
    return pack([rng.integers(low, vocab, size=int(n)) for n in lengths])


# Lengths with a sequence exactly on a block edge (128 + 128), one longer than a block, many short
# ones in a block, and totals that need padding (and one that does not: 128 + 128 + 256).
PACKS = [[128, 128, 256], [5], [3, 7, 90, 2, 200, 31], [130, 1, 1, 127, 64, 64, 9]]


# --------------------------------------------------------------------------- flex: quick


@needs_flex
@pytest.mark.parametrize("block", [32, attention.FLEX_BLOCK])
@pytest.mark.parametrize("lengths", PACKS + [[17] * 40, [300, 2, 400]])
def test_document_block_mask_equals_create_block_mask(lengths, block):
    from torch.nn.attention.flex_attention import create_block_mask

    batch = packed_batch(lengths, 10, seed=0)
    total = int(batch.cu_seqlens[-1])
    padded = -(-total // block) * block
    doc = torch.full((padded,), len(lengths), dtype=torch.int32)
    doc[:total] = sequence_index(batch.cu_seqlens, total).int()

    def same_document(b, h, q, kv):
        return doc[q] == doc[kv]

    ours = attention.document_block_mask(doc, same_document, block)
    ref = create_block_mask(same_document, None, None, padded, padded, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, num).flatten(), getattr(ref, num).flatten()), num
        for row, count in enumerate(getattr(ref, num).flatten().tolist()):  # the entries the kernel reads
            assert torch.equal(getattr(ours, idx)[0, 0, row, :count], getattr(ref, idx)[0, 0, row, :count])


@needs_flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_eager_equals_padded_dnabert_s():
    """The math of the flex path (padding to the block, pad tokens as their own document, ALiBi
    from packed indices) without compiling: flex_attention's eager reference on CPU."""
    model = random_dnabert_s(DNA, seed=3)
    with torch.inference_mode():
        for i, lengths in enumerate(PACKS):
            batch = packed_batch(lengths, DNA.vocab_size, seed=i)
            ref = planned(model, attention="padded").forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            out = planned(model, attention="flex").forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            assert out.shape == ref.shape == (sum(lengths), DNA.hidden_size)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_packed_attention_backends_and_flex_refuses_a_custom_scale():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25])
    assert attention.PackedAttention(cu, 5, 8, torch.float32, alibi_slopes=slopes, head_dim=4).backend == "padded"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.PackedAttention(cu, 5, 8, torch.float32, backend="auto")   # the plan resolves "auto"
    if attention.flex_available():
        plan = attention.PackedAttention(cu, 5, 8, torch.float32, alibi_slopes=slopes, scale=0.1, head_dim=4,
                                         backend="flex", compile_flex=False)
        assert plan.padded_total == attention.FLEX_BLOCK
        with pytest.raises(ValueError, match="default scale"):
            plan.attend_qkv(torch.zeros(plan.padded_total, 3, 2, 4))


# --------------------------------------------------------------------------- esm-2: quick




def test_rotate_fused_equals_apply_rotary():
    g = torch.Generator().manual_seed(1)
    cos, sin = random_esm2(ESM).rotary_embeddings(torch.arange(37))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 4, 16, generator=g).to(dtype)
        out, ref = esm2_module.rotate_fused(x, cos, sin), esm2_module.apply_rotary(x, cos, sin)
        assert out.dtype == ref.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2   # bf16: both round once from float32
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def test_compiled_esm2_layer_has_no_graph_break():
    """The regression behind "compiled = eager speed": apply_rotary's out= on slices split the
    head into 3 graphs with the rotary left eager. The compiled forms must trace as one graph."""
    import torch._dynamo

    import functools

    model = random_esm2(ESM)
    layer, total = model.encoder.layer[0], 50
    cos, sin = model.rotary_embeddings(torch.arange(total))
    x = torch.randn(total, ESM.hidden_size, generator=torch.Generator().manual_seed(0))
    head_fn = functools.partial(esm2_module.layer_head, esm2_module.rotate_qkv_torch)
    tail_fn = functools.partial(esm2_module.layer_tail, esm2_module.layer_steps(ExecutionPlan(), last=False))
    with torch.inference_mode():
        weight, bias = layer.fused_qkv()
        head = torch._dynamo.explain(head_fn)(x, weight, bias, cos, sin, ESM.num_attention_heads)
        context = head_fn(x, weight, bias, cos, sin, ESM.num_attention_heads)[:, 0].flatten(-2)
        out, norm = layer.attention.output.dense, layer.LayerNorm
        tail = torch._dynamo.explain(tail_fn)(
            x, context, out.weight, out.bias, norm.weight, norm.bias, layer.intermediate.dense.weight,
            layer.intermediate.dense.bias, layer.output.dense.weight, layer.output.dense.bias,
            norm.weight, norm.bias, norm.eps)
    assert (head.graph_count, head.graph_break_count) == (1, 0), head.break_reasons
    assert (tail.graph_count, tail.graph_break_count) == (1, 0), tail.break_reasons


# --------------------------------------------------------------------------- esm-2: Triton rotary (opt-in)


def _triton_kernels_or_skip(name: str, device: str):
    """embed_core.kernels_<name>, or a visible skip: our kernels need the (optional) triton package,
    and on CPU its interpreter (TRITON_INTERPRET=1 set before a kernel is first built)."""
    pytest.importorskip("triton", reason="triton is not installed (optional; CI has none)")
    module = importlib.import_module(f"embed_core.kernels_{name}")
    if not module.available(device):
        pytest.skip(f"the Triton {name} kernel cannot run on {device}: set TRITON_INTERPRET=1 to test on CPU")
    return module


# --------------------------------------------------------------------------- esm-2: Triton add + LayerNorm


@pytest.mark.parametrize("device", DEVICES)
def test_esm2_all_triton_kernels_equal_torch_path(device):
    """What the runtime runs with kernels on: our rotary, add + LayerNorm, one q/k/v GEMM and our
    varlen attention kernel (its bias term compiled out), against the plain path."""
    _triton_kernels_or_skip("elementwise", device)
    model = random_esm2(ESM, seed=4).to(device)
    batch = packed_batch([40, 7, 100, 1, 64], 24, seed=23, low=4).to(device)
    with torch.inference_mode():
        ref = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
        for plan in (dict(kernels=True, attention="padded"), dict(kernels=True, attention="triton")):
            out = planned(model, **plan).forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_esm2_fused_qkv_shares_the_parameters_and_follows_moves():
    model = random_esm2(ESM, seed=5)
    layer = model.encoder.layer[0]
    proj = layer.attention.self
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        weight, bias = layer.fused_qkv()
    assert weight.shape == (3 * ESM.hidden_size, ESM.hidden_size) and bias.shape == (3 * ESM.hidden_size,)
    assert proj.key.weight.data_ptr() == weight[ESM.hidden_size:].data_ptr()     # views: no second copy
    assert not proj.key.weight.is_inference() and proj.key.weight.requires_grad
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.fused_qkv()[0] is not None and layer.fused_qkv()[0].data_ptr() == weight.data_ptr()
    model.to(torch.float64)                              # copies each parameter: the fused tensors follow
    weight64, _ = layer.fused_qkv()
    assert weight64.dtype == torch.float64
    torch.testing.assert_close(weight64, weight.double())
    assert proj.value.weight.data_ptr() == weight64[2 * ESM.hidden_size:].data_ptr()


def test_esm2_refuses_the_flex_backend():
    from embed_core import RuntimeConfig, choose_plan
    with pytest.raises(ValueError, match="does not take the flex"):
        choose_plan(RuntimeConfig(device="cpu", attention="flex"), random_esm2(ESM))


# --------------------------------------------------------------------------- dnabert-s: Triton attention


@pytest.mark.parametrize("device", DEVICES)
def test_dnabert_s_triton_attention_equals_padded(device):
    """attention "triton" through the whole packed forward, fp32, against the padded SDPA path."""
    _triton_kernels_or_skip("attention", device)
    config = DnabertSConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96)
    model = random_dnabert_s(config, seed=6).to(device)
    with torch.inference_mode():
        for i, lengths in enumerate(PACKS):
            batch = packed_batch(lengths, config.vocab_size, seed=30 + i).to(device)
            ref = planned(model, attention="padded").forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            out = planned(model, attention="triton").forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_triton_attention_backend_refused_without_the_kernel(monkeypatch):
    from embed_core import RuntimeConfig, choose_plan, triton_support
    monkeypatch.setattr(triton_support, "can_run_on", lambda device: False)   # as on CPU without the interpreter
    with pytest.raises(ValueError, match="triton attention path needs"):
        choose_plan(RuntimeConfig(device="cpu", attention="triton"), random_dnabert_s(DNA))


# --------------------------------------------------------------------------- runtime: kernels policy


@pytest.mark.parametrize("device", DEVICES)
def test_dnabert_s_all_triton_kernels_equal_torch_path(device):
    """The runtime's kernels="triton" (the attention kernel) through Embedder, fp32, against
    kernels="torch" with padded attention: < 1e-5, rows in input order."""
    _triton_kernels_or_skip("attention", device)
    from embed_core import Embedder, RuntimeConfig
    config = DnabertSConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128)
    rng = np.random.default_rng(3)
    arrays = [rng.integers(5, 64, size=int(n)) for n in (40, 3, 130, 64, 1, 77)]
    outs = {}
    for kernels in ("torch", "triton"):
        model = random_dnabert_s(config, seed=8)
        embedder = Embedder(model, None, RuntimeConfig(device=device, dtype="float32", kernels=kernels,
                                                       compile=False))
        assert embedder.plan.kernels == (kernels == "triton") and model.plan is embedder.plan
        assert embedder.plan.attention == ("triton" if kernels == "triton" else "padded")
        outs[kernels] = embedder.embed_tokens(arrays)
        embedder.close()
    np.testing.assert_allclose(outs["triton"], outs["torch"], rtol=0, atol=1e-5)


def test_kernels_policy_on_cpu_without_the_interpreter():
    """kernels="auto" on CPU: the torch path; kernels="triton" where they cannot run: a clear error."""
    from embed_core import Embedder, RuntimeConfig
    model = random_dnabert_s(DnabertSConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=128))
    embedder = Embedder(model, None, RuntimeConfig(device="cpu", compile=False))
    assert embedder.plan == ExecutionPlan() and model.plan == ExecutionPlan()   # the portable path
    embedder.close()
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="kernels='triton' requested but"):
            Embedder(model, None, RuntimeConfig(device="cpu", kernels="triton", compile=False))
    narrow = random_dnabert_s(DnabertSConfig(vocab_size=64, hidden_size=48, num_hidden_layers=1,
                                             num_attention_heads=6, intermediate_size=96))
    assert not narrow.kernels_fit()   # head_dim 8: the attention kernel's tiles do not fit
    assert random_dnabert_s(DNA).kernels_fit()


def test_auto_kernels_failing_at_warmup_fall_back_to_torch(caplog, monkeypatch):
    """kernels="auto" picked our kernels (as on CUDA) but they cannot run (as on a GPU host lacking
    a C compiler for Triton's launcher): warm-up says so and the model serves on the torch path,
    same embeddings. kernels="triton" would have refused at load instead."""
    from embed_core import Embedder, RuntimeConfig, kernels_attention

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernels_attention, "alibi_varlen_attention", no_compiler)
    rng = np.random.default_rng(4)
    arrays = [rng.integers(5, 64, size=int(n)) for n in (40, 3, 77)]
    reference = Embedder(random_dnabert_s(DNA, seed=9), None, RuntimeConfig(device="cpu", dtype="float32"))
    expected = reference.embed_tokens(arrays)
    model = random_dnabert_s(DNA, seed=9)
    embedder = Embedder(model, None, RuntimeConfig(device="cpu", dtype="float32"))
    embedder.plan = ExecutionPlan(kernels=True, attention="triton")   # what "auto" chooses on CUDA
    model.prepare(embedder.plan)
    with caplog.at_level("WARNING", logger="embed_core.runtime"):
        embedder.warmup()
    assert "Triton kernels failed at warm-up" in caplog.text
    assert embedder.plan == ExecutionPlan() and model.plan == ExecutionPlan()
    assert embedder.stats.sequences == 0
    np.testing.assert_allclose(embedder.embed_tokens(arrays), expected, rtol=0, atol=1e-6)
    for e in (reference, embedder):
        e.close()


# --------------------------------------------------------------------------- compiled (slow)


@slow
@needs_flex
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_flex_equals_padded_dnabert_s(device):
    """A compiled plan with "flex": compiled flex_attention (block-sparse kernel reading our block
    mask) and compiled layer tail, against the eager padded path, fp32: < 1e-5."""
    eager = planned(random_dnabert_s(DNA, seed=5).to(device), attention="padded")
    fast = planned(random_dnabert_s(DNA, seed=5).to(device), attention="flex", compiled=True)
    with torch.inference_mode():
        for i, lengths in enumerate(PACKS):
            batch = packed_batch(lengths, DNA.vocab_size, seed=10 + i).to(device)
            ref = eager.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            out = fast.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_esm2_equals_eager(device):
    eager = random_esm2(ESM, seed=2).to(device)
    fast = planned(random_esm2(ESM, seed=2).to(device), compiled=True)
    with torch.inference_mode():
        for i, lengths in enumerate(([40, 7, 100], [3, 3], [120, 55, 61, 9])):
            batch = packed_batch(lengths, 24, seed=20 + i, low=4).to(device)
            ref = eager.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            out = fast.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@slow
@needs_flex
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 flex vs padded needs CUDA (the production path)")
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_bf16_fast_attention_close_to_padded_on_cuda(backend):
    if backend == "triton":
        _triton_kernels_or_skip("attention", "cuda")
    model = random_dnabert_s(DNA, seed=7).to("cuda", torch.bfloat16)
    batch = packed_batch([55, 135, 90, 100, 77] * 30, DNA.vocab_size, seed=30).to("cuda")
    with torch.inference_mode():
        planned(model, attention="padded", compiled=True)
        ref = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen).float()
        planned(model, attention=backend, compiled=True)
        out = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen).float()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.999, cos.min()


# --------------------------------------------------------------------------- the plan itself


def test_choose_plan_resolves_every_auto_once():
    """On CPU, RuntimeConfig's defaults give the portable plan for both models; explicit choices
    are checked against what the model can take, at load rather than at the first forward."""
    from embed_core import RuntimeConfig, choose_plan
    esm, dna = random_esm2(ESM), random_dnabert_s(DNA)
    for model in (esm, dna):
        assert choose_plan(RuntimeConfig(device="cpu"), model) == ExecutionPlan()
        assert choose_plan(RuntimeConfig(device="cpu", compile=True, kernels="torch"), model).compiled
    assert choose_plan(RuntimeConfig(device="cpu", dtype="bfloat16"), dna).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not take the flash"):
        choose_plan(RuntimeConfig(device="cpu", attention="flash"), dna)        # ALiBi: no flash
    with pytest.raises(ValueError, match="flash varlen path needs CUDA"):
        choose_plan(RuntimeConfig(device="cpu", attention="flash"), esm)
    assert ExecutionPlan().describe() == ("device cpu, dtype float32, attention padded, our kernels off, "
                                          "compiled off")
