"""model.attend's kernels against the SDPA reference, on the CPU where CI runs.

flash-attn and torch's varlen attention are CUDA-only, so the varlen tests swap in a reference kernel
written from flash-attn's documented semantics (per-sequence softmax over cu_seqlens ranges, causal mask
aligned to the bottom-right corner when the query and key lengths differ, window_size=(left, right) keeping
keys i + Lk - Lq - left .. i + Lk - Lq + right). They check everything of ours around the kernel call: the
two-call decomposition of the shared-prompt layout, cu_seqlens, max lengths, the window translation, GQA,
and scattering the outputs back, in the forward and the backward. What they cannot check is the CUDA
kernels themselves; test_gpu_backends_match_sdpa does, when a GPU is present."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import model as M
from test_model import family_models, pack, random_pairs


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
        monkeypatch.setattr(M, "_varlen_kernels", lambda: (fn, fn, set(inspect.signature(fn).parameters)))
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
        pytest.skip("torch < 2.12 varlen has no window; pick_attention never sends a window there")
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


def test_the_kernel_is_chosen_per_model_and_checked_by_name():
    """Transformer(attention=...) / model.attention picks the packed forward's kernel; pick_attention rejects
    an unknown name and a kernel that cannot run here, and "auto" (or None) falls back to SDPA on the CPU."""
    cpu = torch.device("cpu")
    assert M.pick_attention("auto", cpu, torch.bfloat16, None) == M.pick_attention(None, cpu, torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="'flex' is not one of"):
        M.pick_attention("flex", cpu, torch.float32, None)
    model = family_models()["llama"]
    assert model.attention == "auto"
    x, pos, seg = pack(random_pairs(2), shared=True)
    model.attention = "flash"
    with pytest.raises(M.ModelConfigError, match=r"attention 'flash' \(--attention flash\) needs flash-attn"):
        model.packed_hidden(x, pos, seg)
    model = M.Transformer(model.config, attention="varlen")
    with pytest.raises(M.ModelConfigError, match="attention 'varlen' .* needs"):
        model.packed_hidden(x, pos, seg)


# --- the real kernels, where there is a GPU ---------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn and torch varlen need a CUDA GPU")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gpu_backends_match_sdpa(backend, family):
    flash, varlen, params = M._varlen_kernels()
    if backend == "flash" and flash is None:
        pytest.skip("flash-attn not installed")
    if backend == "varlen" and (varlen is None or (family == "mistral" and "window_size" not in params)):
        pytest.skip("torch.nn.attention.varlen not available (or without a window before torch 2.12)")
    model = family_models()[family].cuda().to(torch.bfloat16)
    long = lambda n, start: [(start + 7 * i) % 90 for i in range(n)]       # a pair longer than a 128-row tile
    pairs = random_pairs(6, seed=2) + [(long(300, 1), long(200, 2), long(250, 3))]
    out = {}
    for shared in (True, False):
        x, pos, seg = pack(pairs, shared=shared)
        for name in ("sdpa", backend):
            model.attention = name
            model.zero_grad()
            h = model.packed_hidden(x.cuda(), pos.cuda(), seg)
            h.float().square().mean().backward()
            out[shared, name] = (h.float(), model.layers[0].attn.wq.weight.grad.float())
        torch.testing.assert_close(out[shared, backend][0], out[shared, "sdpa"][0], atol=3e-2, rtol=3e-2)
        g, ref = out[shared, backend][1], out[shared, "sdpa"][1]
        assert float((g - ref).norm() / ref.norm()) < 3e-2


@pytest.mark.parametrize("lengths", [[(4, 5), (6, 6), (3, 5)], [(1, 1), (40, 47), (2, 9)]], ids=["grid", "one-by-one"])
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_path_equals_the_reference_kernel(lengths, window):
    """model.py's CPU path for a varlen call, both ways it runs one (similar lengths: one padded grid; mixed ones:
    one call per segment), against the reference kernel above: bottom-right causal, the window, GQA."""
    g = torch.Generator().manual_seed(0)
    n_q, n_k = zip(*lengths)
    cu_q, cu_k = ([0, *torch.tensor(n).cumsum(0).tolist()] for n in (n_q, n_k))
    q = torch.randn(cu_q[-1], 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(cu_k[-1], 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = M._sdpa_call(M.Layout("sdpa", window), q, k, v, cu_q, cu_k, max(n_q), max(n_k))
    i32 = lambda cu: torch.tensor(cu, dtype=torch.int32)
    ref = reference_varlen(q, k, v, i32(cu_q), i32(cu_k), max(n_q), max(n_k), True,
                           (window - 1 if window else -1, 0), gqa_ok=True)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    grid = len(lengths) * max(n_q) * max(n_k) <= 2 * sum(a * b for a, b in lengths)
    assert grid == (lengths[0] == (4, 5))          # the two cases take the two ways
