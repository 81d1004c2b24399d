"""model.attend's kernels against the SDPA reference, on the CPU where CI runs.

flash-attn and torch's varlen attention are CUDA-only, so the varlen tests swap in a reference kernel
written from flash-attn's documented semantics (per-sequence softmax over cu_seqlens ranges, causal mask
aligned to the bottom-right corner when the query and key lengths differ, window_size=(left, right) keeping
keys i + Lk - Lq - left .. i + Lk - Lq + right). They check everything of ours around the kernel call: the
two-call decomposition of the shared-prompt layout, cu_seqlens, max lengths, the window translation, GQA,
and scattering the outputs back, in the forward and the backward. What they cannot check is the CUDA
kernels themselves; test_gpu_backends_match_sdpa does, when a GPU is present.

flex_attention runs for real on the CPU (forward only: torch has no CPU backward for it)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import model as M
from test_model import family_models, pack, random_pairs


@pytest.fixture(autouse=True)
def _flat_sdpa_reference(monkeypatch):
    """The reference for every test here: SDPA with the one (N, N) mask of the attention rule, pinned by
    test_model.test_shared_mask_rule. (The SDPA grid path shares _split_indices with the varlen path, so it
    could not catch a bug there.)"""
    monkeypatch.setattr(M, "_sdpa_layout", M._flat_layout)
    previous = M.set_attention_backend("sdpa")
    yield
    M.set_attention_backend(previous)


# --- a reference varlen kernel, and the three call signatures we must speak ------------------------

def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, gqa_ok):
    """flash-attn's varlen semantics, one sequence at a time. Also asserts what the real kernels need."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert int(cu_q[-1]) == len(q) and int(cu_k[-1]) == len(k)
    if k.shape[1] != q.shape[1]:
        assert gqa_ok, "this kernel version needs equal head counts"
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    left, right = window
    if causal:
        right = 0
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        Lq, Lk = len(qs), len(ks)
        assert 0 < Lq <= max_q and 0 < Lk <= max_k, "max_seqlen smaller than a sequence: the kernel would cut it"
        row = torch.arange(Lq)[:, None] + (Lk - Lq)            # bottom-right alignment
        col = torch.arange(Lk)[None, :]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        if right >= 0:
            allowed &= col <= row + right
        if left >= 0:
            allowed &= col >= row - left
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=allowed)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1)):
    return reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                            window_size, gqa_ok=True)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    """torch 2.10 / 2.11: a causal flag, no window, no GQA."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, (-1, -1),
                            gqa_ok=False)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """torch >= 2.12: window_size (-1, 0) is causal, (W, 0) causal with a window; GQA behind a flag."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False, window_size,
                            gqa_ok=enable_gqa)


KERNELS = {
    "flash-attn": ("flash", flash_attn_varlen_func),
    "torch-2.10": ("varlen", varlen_attn_2_10),
    "torch-2.12": ("varlen", varlen_attn_2_12),
}


@pytest.fixture
def fake_kernel(monkeypatch):
    """Route the 'flash' / 'varlen' backend to a reference kernel, as if on a GPU."""
    def install(kernel):
        backend, fn = KERNELS[kernel]
        monkeypatch.setattr(M, "_flash_varlen", lambda: fn)
        monkeypatch.setattr(M, "_torch_varlen", lambda: (fn, set(inspect.signature(fn).parameters)))
        monkeypatch.setattr(M, "pick_attention", lambda requested, device, dtype, window: backend)
        return backend
    return install


def hidden_and_grads(model, x, pos, seg):
    """Final hidden states of a packed batch and the gradient of a fixed function of them."""
    model.zero_grad()
    h = model.packed_hidden(x, pos, seg)
    (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "phi"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_varlen_path_equals_sdpa(fake_kernel, kernel, family, shared):
    if kernel == "torch-2.10" and family == "mistral":
        pytest.skip("torch < 2.12 varlen has no window; _pick_backend never sends a window there")
    model = family_models()[family].double()     # float64: any difference is a bug, not rounding
    # lengths from 1 token up, and one pair whose prompt is longer than Mistral's window of 4
    pairs = random_pairs(5, seed=7) + [([5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15])]
    x, pos, seg = pack(pairs, shared=shared)
    ref_h, ref_g = hidden_and_grads(model, x, pos, seg)
    backend = fake_kernel(kernel)
    assert M.packed_layout(seg, pos, model.config.sliding_window, torch.bfloat16).backend == backend
    h, g = hidden_and_grads(model, x, pos, seg)
    torch.testing.assert_close(h, ref_h, atol=1e-10, rtol=1e-10)
    assert g.keys() == ref_g.keys()
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-9, rtol=1e-9, msg=name)


def test_shared_layout_makes_two_calls_with_bottom_right_keys(fake_kernel, monkeypatch):
    """The second call's queries are the rejected tokens, its keys [prompt | rejected], with the right lengths."""
    calls = []

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, kw))
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    KERNELS["spy"] = ("flash", spy)
    try:
        fake_kernel("spy")
        model = family_models()["mistral"]
        x, pos, seg = pack([([1, 2, 3], [4, 5], [6, 7, 8, 9]), ([1], [2, 3, 4], [5])], shared=True)
        with torch.no_grad():
            model.packed_hidden(x, pos, seg)
    finally:
        del KERNELS["spy"]
    first, second = calls[:2]                                   # layer 0's two calls
    assert first == ([0, 5, 9], [0, 5, 9], 5, 5, dict(causal=True, window_size=(3, 0)))    # p+c = 5, 4
    assert second == ([0, 4, 5], [0, 7, 9], 4, 7, dict(causal=True, window_size=(3, 0)))   # r = 4, 1; p+r = 7, 2
    assert len(calls) == 2 * model.config.n_layers


def test_packed_hidden_picks_the_kernel_for_the_autocast_dtype(monkeypatch):
    """float32 master weights under bf16 autocast compute attention in bf16: the fast kernels must be chosen."""
    seen = []
    real = M.pick_attention
    monkeypatch.setattr(M, "pick_attention", lambda requested, device, dtype, window:
                        seen.append(dtype) or real(requested, device, dtype, window))
    model = family_models()["llama"]
    x, pos, seg = pack(random_pairs(2), shared=True)
    with torch.no_grad():
        model.packed_hidden(x, pos, seg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.packed_hidden(x, pos, seg)
    assert seen == [torch.float32, torch.bfloat16]


# --- flex_attention ----------------------------------------------------------------------------

flex = pytest.mark.skipif(M._flex("cpu") is None, reason="torch.nn.attention.flex_attention not in this torch")


@flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "phi"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_flex_equals_sdpa(family, shared):
    model = family_models()[family]
    x, pos, seg = pack(random_pairs(5, seed=3) + [([5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15])], shared=shared)
    with torch.no_grad():
        ref = model.packed_hidden(x, pos, seg)
        M.set_attention_backend("flex")
        got = model.packed_hidden(x, pos, seg)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@flex
def test_flex_block_mask_skips_other_segments_and_chosen_x_rejected_tiles():
    """Tiles are 128 x 128. Pair 0 = prompt 128 | chosen 256 | rejected 256, pair 1 = 128 | 128 | 128."""
    seg = torch.tensor([[128, 256, 256], [128, 128, 128]])
    pos = torch.cat([torch.arange(384), torch.arange(128, 384), torch.arange(256), torch.arange(128, 256)])
    layout = M._flex_layout(seg, pos, None)
    tiles = layout.block_mask.to_dense()[0, 0].bool()             # (8, 8): query tile x key tile
    # tile index: pair 0 prompt 0, chosen 1-2, rejected 3-4; pair 1 prompt 5, chosen 6, rejected 7
    expect = torch.zeros(8, 8, dtype=torch.bool)
    for q_tile, keys in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3], 4: [0, 3, 4],
                         5: [5], 6: [5, 6], 7: [5, 7]}.items():
        expect[q_tile, keys] = True
    assert torch.equal(tiles, expect)


@flex
def test_flex_refuses_to_train_on_the_cpu():
    model = family_models()["llama"]
    x, pos, seg = pack(random_pairs(2), shared=True)
    M.set_attention_backend("flex")
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        model.packed_hidden(x, pos, seg)


# --- the real kernels, where there is a GPU ---------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn / torch varlen / compiled flex need a CUDA GPU")
@pytest.mark.parametrize("backend", ["flash", "varlen", "flex"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gpu_backends_match_sdpa(backend, family):
    if backend == "flash" and M._flash_varlen() is None:
        pytest.skip("flash-attn not installed")
    if backend == "varlen" and (M._torch_varlen() is None or
                                (family == "mistral" and "window_size" not in M._torch_varlen()[1])):
        pytest.skip("torch.nn.attention.varlen not available (or without a window before torch 2.12)")
    model = family_models()[family].cuda().to(torch.bfloat16)
    long = lambda n, start: [(start + 7 * i) % 90 for i in range(n)]       # a pair longer than a 128-row tile
    pairs = random_pairs(6, seed=2) + [(long(300, 1), long(200, 2), long(250, 3))]
    out = {}
    for shared in (True, False):
        x, pos, seg = pack(pairs, shared=shared)
        for name in ("sdpa", backend):
            M.set_attention_backend(name)
            model.zero_grad()
            h = model.packed_hidden(x.cuda(), pos.cuda(), seg)
            h.float().square().mean().backward()
            out[shared, name] = (h.float(), model.layers[0].attn.wq.weight.grad.float())
        torch.testing.assert_close(out[shared, backend][0], out[shared, "sdpa"][0], atol=3e-2, rtol=3e-2)
        g, ref = out[shared, backend][1], out[shared, "sdpa"][1]
        assert float((g - ref).norm() / ref.norm()) < 3e-2
