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
    tail_fn = functools.partial(esm2_module.layer_tail, esm2_module.add_norm_torch)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 4, 16), (5, 3, 64), (1, 1, 16), (2, 9, 6, 16)])
def test_triton_rotary_equals_apply_rotary(device, dtype, shape):
    kernels_rotary = _triton_kernels_or_skip("rotary", device)
    g = torch.Generator().manual_seed(4)
    positions = torch.arange(int(np.prod(shape[:-2]))).reshape(shape[:-2]) % 23
    cos, sin = esm2_module.RotaryEmbedding(shape[-1]).to(device)(positions.to(device))
    q = torch.randn(shape, generator=g).to(device, dtype)
    k = torch.randn(shape, generator=g).to(device, dtype)
    ref_q, ref_k = esm2_module.apply_rotary(q, cos, sin), esm2_module.apply_rotary(k, cos, sin)
    out_q, out_k = kernels_rotary.rotary_qk(q, k, cos, sin)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16: 1 ulp
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, **tol)
    q2, k2 = q.clone(), k.clone()
    in_q, in_k = kernels_rotary.rotary_qk(q2, k2, cos, sin, inplace=True)
    assert in_q is q2 and in_k is k2
    assert torch.equal(q2, out_q) and torch.equal(k2, out_k)
    # Strided views (q, k as slices of one fused projection), rotated in place.
    qkv = torch.randn(*shape[:-2], 3, *shape[-2:], generator=g).to(device, dtype)
    q3, k3 = qkv.select(-3, 0), qkv.select(-3, 1)
    ref_q3, ref_k3 = esm2_module.apply_rotary(q3, cos, sin), esm2_module.apply_rotary(k3, cos, sin)
    v_before = qkv.select(-3, 2).clone()
    kernels_rotary.rotary_qk(q3, k3, cos, sin, inplace=True)
    torch.testing.assert_close(q3, ref_q3, **tol)
    torch.testing.assert_close(k3, ref_k3, **tol)
    assert torch.equal(qkv.select(-3, 2), v_before)




# --------------------------------------------------------------------------- esm-2: Triton add + LayerNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "half"])
@pytest.mark.parametrize("shape", [(37, 64), (5, 2560), (1, 20), (3, 7, 48)])
def test_triton_add_layer_norm_equals_add_then_layer_norm(device, precision, shape):
    kernels_elementwise = _triton_kernels_or_skip("elementwise", device)
    # half: bf16 on CUDA (production); fp16 under the CPU interpreter, whose float -> bf16 cast
    # truncates where CUDA rounds to nearest
    dtype = {"fp32": torch.float32, "half": torch.bfloat16 if device == "cuda" else torch.float16}[precision]
    g = torch.Generator().manual_seed(5)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)
    y = torch.randn(shape, generator=g).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    bias = (0.1 * torch.randn(n, generator=g)).to(device, dtype)
    total, normed = kernels_elementwise.add_layer_norm(x, y, weight, bias, 1e-5)
    ref_total = x + y                                  # rounded in dtype, then normalised in fp32
    ref = F.layer_norm(ref_total.float(), (n,), weight.float(), bias.float(), 1e-5).to(dtype)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    assert torch.equal(total, ref_total)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)  # half: 1 ulp
    torch.testing.assert_close(normed, ref, **tol)
    same, alone = kernels_elementwise.add_layer_norm(x, None, weight, bias, 1e-5)   # no add: LN(x)
    assert same is x
    torch.testing.assert_close(alone, F.layer_norm(x.float(), (n,), weight.float(), bias.float(), 1e-5).to(dtype), **tol)
    strided = torch.randn(shape[0], 2 * n, generator=g).to(device, dtype)[:, ::2]   # a non-unit last stride
    torch.testing.assert_close(kernels_elementwise.add_layer_norm(strided, None, weight, bias, 1e-5)[1],
                               F.layer_norm(strided.float(), (n,), weight.float(), bias.float(), 1e-5).to(dtype), **tol)


def test_triton_add_layer_norm_refuses_mismatched_shapes():
    from embed_core import kernels_elementwise
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="do not match rows of 8"):
        kernels_elementwise.add_layer_norm(x, x, torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="does not match x"):
        kernels_elementwise.add_layer_norm(x, torch.zeros(3, 8, dtype=torch.float64), torch.ones(8), torch.zeros(8), 1e-5)


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


def naive_alibi_attention(qkv: torch.Tensor, lengths, slopes: torch.Tensor, scale: float) -> torch.Tensor:
    """Per sequence, float64, the formula itself: softmax(q k^T * scale - slope_h * |i - j|) v."""
    out, start = [], 0
    for n in lengths:
        q, k, v = (qkv[start:start + n, i].double().transpose(0, 1) for i in range(3))   # [heads, n, d]
        pos = torch.arange(n, device=qkv.device)
        bias = -slopes.double()[:, None, None] * (pos[None, :] - pos[:, None]).abs()
        out.append((torch.softmax(q @ k.transpose(1, 2) * scale + bias, -1) @ v).transpose(0, 1))
        start += n
    return torch.cat(out)


# Block edges of the kernel (64), a single token, sequences spanning 1-4 key steps.
KERNEL_PACKS = [[64, 64, 1], [1], [3, 70, 130, 65, 200, 2], [17] * 9, [5, 450]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "half"])
@pytest.mark.parametrize("lengths", KERNEL_PACKS)
def test_triton_alibi_attention_equals_naive(device, precision, lengths):
    kernels_attention = _triton_kernels_or_skip("attention", device)
    # half: bf16 on CUDA (production); fp16 under the CPU interpreter, whose bf16 dot is broken
    # (triton 3.6: garbage for bf16 operands, right for fp16).
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16 if device == "cuda" else torch.float16
    heads, head_dim = 4, 16
    g = torch.Generator().manual_seed(sum(lengths))
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g).to(device, dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    slopes = torch.tensor([0.5, 0.25, 0.0625, 0.0], device=device)   # the last head: no bias
    ref = naive_alibi_attention(qkv, lengths, slopes, head_dim ** -0.5)
    out = kernels_attention.alibi_varlen_attention(qkv, cu, max(lengths), slopes, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == (sum(lengths), heads, head_dim)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error < (1e-6 if dtype == torch.float32 else 1e-2), error
    # No bias (ESM-2): the kernel without its bias term equals zero slopes.
    plain = kernels_attention.alibi_varlen_attention(qkv, cu, max(lengths), None, head_dim ** -0.5)
    ref = naive_alibi_attention(qkv, lengths, torch.zeros_like(slopes), head_dim ** -0.5)
    error = ((plain.double() - ref).norm() / ref.norm()).item()
    assert error < (1e-6 if dtype == torch.float32 else 1e-2), error


def test_triton_alibi_attention_refuses_head_dims_its_tiles_cannot_hold():
    from embed_core import kernels_attention
    for head_dim in (8, 24):
        with pytest.raises(ValueError, match="power-of-2 head_dim >= 16"):
            kernels_attention.check_head_dim(head_dim)


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


def test_triton_attention_backend_refused_without_the_kernel():
    from embed_core import RuntimeConfig, choose_plan, kernels_attention
    if kernels_attention.available("cpu"):
        pytest.skip("the kernel can run here (TRITON_INTERPRET=1): nothing to refuse")
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


def test_auto_kernels_failing_at_warmup_fall_back_to_torch(caplog):
    """kernels="auto" picked our kernels (as on CUDA) but they cannot run (here: no interpreter,
    as with a GPU host lacking a C compiler): warm-up says so and the model serves on the torch
    path, same embeddings. kernels="triton" would have refused at load instead."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels can run here (TRITON_INTERPRET=1): nothing fails")
    from embed_core import Embedder, RuntimeConfig
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
