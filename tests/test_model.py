"""model.py: logits parity with transformers (both directions), packed and shared-prompt layouts,
chunked log-probs, generation, loading errors. Tiny random configs; transformers is a test-only reference."""
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import model as M

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- tiny transformers reference models, one per flag combination ----------------------------------

V = 96
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
HF_CONFIGS = {
    "llama-gqa-untied": ("LlamaConfig", dict(BASE, intermediate_size=48, num_key_value_heads=2, rms_norm_eps=1e-5,
                                              tie_word_embeddings=False, attention_bias=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama-tied-headdim": ("LlamaConfig", dict(BASE, intermediate_size=48, num_key_value_heads=4, head_dim=16,
                                                tie_word_embeddings=True, mlp_bias=True,
                                                rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                 "factor": 2.0})),
    # Llama 3.1's rope, shrunk: head_dim 8 at theta 1e4 has wavelengths 2pi * (1, 10, 100, 1000); with a pretraining
    # context of 64 and the real low/high factors (1, 4) the first dim is kept (< 64 / 4), the second blended,
    # the last two slowed by 8 (> 64 / 1). Llama 3.2-style tied embeddings and GQA.
    "llama3-rope": ("LlamaConfig", dict(BASE, max_position_embeddings=256, intermediate_size=48,
                                         num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                          "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64})),
    "mistral-window": ("MistralConfig", dict(BASE, intermediate_size=48, num_key_value_heads=1, sliding_window=5,
                                             tie_word_embeddings=False)),
    "opt-postln-proj": ("OPTConfig", dict(BASE, ffn_dim=40, word_embed_proj_dim=24, do_layer_norm_before=False,
                                          tie_word_embeddings=True, pad_token_id=1)),
    "opt-preln": ("OPTConfig", dict(BASE, ffn_dim=40, do_layer_norm_before=True, tie_word_embeddings=False,
                                    pad_token_id=1)),
    "phi-partial": ("PhiConfig", dict(BASE, intermediate_size=40, partial_rotary_factor=0.5,
                                      tie_word_embeddings=False, hidden_act="gelu_new")),
}


def make_hf(kind):
    cls_name, kw = HF_CONFIGS[kind]
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():   # HF inits biases to 0 and norms to 1: randomise all, so a swapped name cannot pass
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    return hf


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each reference model saved by transformers, with its logits on a fixed batch."""
    out = {}
    for kind in HF_CONFIGS:
        hf = make_hf(kind)
        d = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(d)
        with torch.no_grad():
            out[kind] = (d, hf(ids()).logits)
    return out


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_parity_both_directions(kind, hf_dirs, tmp_path):
    d, ref = hf_dirs[kind]
    ours = M.Transformer.from_pretrained(str(d))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), ref, atol=1e-4, rtol=1e-4)
    # and back: our save_pretrained -> transformers
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, ref, atol=1e-4, rtol=1e-4)
    if M.config_from_hf(json.loads((d / "config.json").read_text())).tie_embeddings:
        assert ours.lm_head.weight is ours.tok_embeddings.weight


def test_old_config_layout(hf_dirs, tmp_path):
    """Real Hub configs predate transformers 5: top-level rope_theta / partial_rotary_factor, no head_dim."""
    d, ref = hf_dirs["phi-partial"]
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("head_dim", None)
    cfg.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = M.load_config(tmp_path)
    assert (c.rotary_fraction, c.rope_theta, c.head_dim) == (0.5, rope["rope_theta"], 8)
    with torch.no_grad():
        torch.testing.assert_close(M.Transformer.from_pretrained(str(tmp_path))(ids()), ref, atol=1e-4, rtol=1e-4)
    old_llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 8, "rope_theta": 1e6,
                 "rope_scaling": {"type": "linear", "factor": 4.0}}
    c = M.config_from_hf(old_llama)
    assert (c.rope_theta, c.rope_scaling, c.head_dim) == (1e6, {"rope_type": "linear", "factor": 4.0}, 4)
    with pytest.raises(M.ModelConfigError, match="yarn"):
        M.config_from_hf(dict(old_llama, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def hf_inv_freq(hf):
    return next(b for n, b in hf.named_buffers() if n.endswith("rotary_emb.inv_freq"))


@pytest.mark.parametrize("kind", [k for k in HF_CONFIGS if not k.startswith("opt")])
def test_rope_inv_freq_equals_transformers(kind, hf_dirs):
    """Default, linear, partial (Phi) and llama3 rope: our frequencies are transformers' own, bit for bit."""
    d, _ = hf_dirs[kind]
    assert torch.equal(M.rope_inv_freq(M.load_config(d)), hf_inv_freq(make_hf(kind)))


def test_llama3_rope(hf_dirs, tmp_path):
    d, ref = hf_dirs["llama3-rope"]
    c = M.load_config(d)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}
    assert (c.rope_theta, c.n_kv_heads, c.tie_embeddings) == (10000.0, 2, True)
    # the tiny config exercises all three regimes: kept, blended, slowed by the factor
    plain, scaled = M.rope_inv_freq(dataclasses.replace(c, rope_scaling=None)), M.rope_inv_freq(c)
    assert scaled[0] == plain[0]
    assert plain[1] / 8 < scaled[1] < plain[1]
    torch.testing.assert_close(scaled[2:], plain[2:] / 8, rtol=0, atol=0)
    # ... and it moves the logits far beyond the parity tolerance (1e-4), so plain rope cannot pass that test
    ours = M.Transformer.from_pretrained(str(d))
    ours.config.rope_scaling = None
    with torch.no_grad():
        assert (ours(ids()) - ref).abs().max() > 1e-3

    # pre-transformers-5 layout (as on the Hub): top-level rope_theta and rope_scaling, "rope_type" or "type"
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for type_key in ("rope_type", "type"):
        old = dict(cfg, rope_theta=rope["rope_theta"], rope_scaling={type_key: "llama3", **scaling})
        assert M.config_from_hf(old) == c
        (tmp_path / "config.json").write_text(json.dumps(old))
        with torch.no_grad():
            torch.testing.assert_close(M.Transformer.from_pretrained(str(tmp_path))(ids()), ref,
                                       atol=1e-4, rtol=1e-4)
    # like transformers: without original_max_position_embeddings, max_position_embeddings is the original
    del old["rope_scaling"]["original_max_position_embeddings"]
    assert M.config_from_hf(old).rope_scaling["original_max_position_embeddings"] == 256

    # types still unsupported fail naming the type and the file; malformed ModelConfigs fail too
    (tmp_path / "config.json").write_text(json.dumps(dict(old, rope_scaling={"type": "dynamic", "factor": 2.0})))
    with pytest.raises(M.ModelConfigError, match=r"config\.json.*'dynamic'") as e:
        M.Transformer.from_pretrained(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(M.ModelConfigError, match="low_freq_factor"):
        M.config_from_hf(dict(old, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(M.ModelConfigError, match="rope_scaling"):
        dataclasses.replace(c, rope_scaling=2.0)
    with pytest.raises(M.ModelConfigError, match="high_freq_factor"):
        dataclasses.replace(c, rope_scaling={"rope_type": "llama3", "factor": 8.0})


# --- packed layouts ------------------------------------------------------------------------------

def family_models():
    """Small random models of every family (our own init), incl. window and OPT learned positions."""
    cfgs = {
        "llama": M.ModelConfig(family="llama", vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
        "mistral": M.ModelConfig(family="mistral", vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_dim=48, sliding_window=4),
        "opt": M.config_from_hf(dict(model_type="opt", **BASE, ffn_dim=40, word_embed_proj_dim=24,
                                          do_layer_norm_before=False)),
        "phi": M.config_from_hf(dict(model_type="phi", **BASE, intermediate_size=40, partial_rotary_factor=0.5)),
    }
    torch.manual_seed(0)
    models = {k: M.Transformer(c) for k, c in cfgs.items()}
    with torch.no_grad():   # larger than the 0.02 init, so attention is far from uniform and mask bugs show
        for m in models.values():
            for name, p in m.named_parameters():
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return models


def pack(seqs_and_splits, shared):
    """[(prompt, chosen, rejected)] token lists -> input_ids, position_ids, seg_lens of either layout."""
    ids_, pos, seg = [], [], []
    for p, c, r in seqs_and_splits:
        if shared:
            ids_ += p + c + r
            pos += list(range(len(p) + len(c))) + list(range(len(p), len(p) + len(r)))
            seg.append((len(p), len(c), len(r)))
        else:
            for a in (c, r):
                ids_ += p + a
                pos += list(range(len(p) + len(a)))
                seg.append((len(p) + len(a), 0, 0))
    return torch.tensor(ids_), torch.tensor(pos), torch.tensor(seg)


def random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    tok = lambda k: torch.randint(0, V, (k,), generator=g).tolist()
    return [(tok(lens(1, 9)), tok(lens(2, 8)), tok(lens(2, 8))) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "phi"])
def test_packed_equals_per_sequence_and_shared_equals_unshared(family):
    model = family_models()[family]
    pairs = random_pairs(3)
    # unshared packed == each sequence alone through forward()
    x, pos, seg = pack(pairs, shared=False)
    with torch.no_grad():
        h = model.packed_hidden(x, pos, seg)
        alone = torch.cat([model(s[None])[0] for s in x.split(seg[:, 0].tolist())])   # (N, V) logits
        torch.testing.assert_close(model.lm_head(h), alone, atol=1e-5, rtol=1e-5)
    # shared [p|c|r]: every chosen and rejected token's hidden state equals the unshared one
    xs, poss, segs = pack(pairs, shared=True)
    with torch.no_grad():
        hs = model.packed_hidden(xs, poss, segs)
    rows_unshared, rows_shared, u, s0 = [], [], 0, 0
    for p, c, r in pairs:
        rows_shared += list(range(s0, s0 + len(p) + len(c)))                     # prompt + chosen
        rows_unshared += list(range(u, u + len(p) + len(c)))
        rows_shared += list(range(s0 + len(p) + len(c), s0 + len(p) + len(c) + len(r)))   # rejected
        rows_unshared += list(range(u + 2 * len(p) + len(c), u + 2 * len(p) + len(c) + len(r)))
        u += 2 * len(p) + len(c) + len(r)
        s0 += len(p) + len(c) + len(r)
    torch.testing.assert_close(hs[rows_shared], h[rows_unshared], atol=1e-5, rtol=1e-5)


def extreme_pairs(seed=0):
    """Segments with very different p / c / r: r = 1, c = 1, prompts longer than Mistral's window of 4."""
    g = torch.Generator().manual_seed(seed)
    tok = lambda k: torch.randint(0, V, (k,), generator=g).tolist()
    return [(tok(p), tok(c), tok(r)) for p, c, r in [(11, 1, 1), (1, 7, 9), (6, 3, 1), (2, 1, 12), (9, 12, 2)]]


@pytest.mark.parametrize("family", ["mistral", "opt"])
def test_shared_equals_unshared_on_extreme_segments(family):
    """On segments with very different p / c / r, the shared rows equal the unshared layout's (prompt + chosen
    from the chosen sequence, rejected from the rejected one)."""
    model = family_models()[family]
    pairs = extreme_pairs()
    x, pos, seg = pack(pairs, shared=True)
    xu, posu, segu = pack(pairs, shared=False)
    with torch.no_grad():
        h1, hu = model.packed_hidden(x, pos, seg), model.packed_hidden(xu, posu, segu)
    rows_s, rows_u, s0, u = [], [], 0, 0
    for p, c, r in pairs:
        rows_s += list(range(s0, s0 + len(p) + len(c) + len(r)))
        rej_u = u + 2 * len(p) + len(c)
        rows_u += list(range(u, u + len(p) + len(c))) + list(range(rej_u, rej_u + len(r)))
        s0, u = s0 + len(p) + len(c) + len(r), u + 2 * len(p) + len(c) + len(r)
    torch.testing.assert_close(h1[rows_s], hu[rows_u], atol=1e-5, rtol=1e-5)


def visible(layout, n):
    """(n, n) 0/1: which keys each packed row attends to, read off attend(): with q = k = 0 every visible key gets the
    same weight, and v = one-hot rows, so row i of the output is nonzero exactly at the keys it sees."""
    zeros, eye = torch.zeros(n, 1, 4), torch.eye(n)[:, None, :]
    return (M.attend(zeros, zeros, eye, layout)[:, 0] > 0).int()


def test_shared_mask_rule():
    """The attention rule itself, on one segment (p=2, c=2, r=2): rejected rows never see chosen columns."""
    seg = torch.tensor([[2, 2, 2]])
    pos = torch.tensor([0, 1, 2, 3, 2, 3])
    m = visible(M.packed_layout(seg, pos, None, torch.float32), 6)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 0, 0, 1, 1]])
    assert torch.equal(m, expected)
    w = visible(M.packed_layout(seg, pos, 2, torch.float32), 6)   # window 2 in position space
    assert w[5].tolist() == [0, 0, 0, 0, 1, 1] and w[4].tolist() == [0, 1, 0, 0, 1, 0]
    assert w[3].tolist() == [0, 0, 1, 1, 0, 0] and w[1].tolist() == [1, 1, 0, 0, 0, 0]
    # a window no sequence reaches is dropped (so torch 2.10 / 2.11's varlen, which has none, still runs it)
    assert M.packed_layout(seg, pos, 4, torch.float32).window is None and visible(M.packed_layout(seg, pos, 4,
                                                                                          torch.float32), 6).equal(m)


def test_varlen_layout_indices():
    """The flash/varlen index tensors (built on CPU; the kernels themselves need CUDA)."""
    seg = torch.tensor([[2, 1, 2], [3, 0, 0], [1, 2, 1]])
    lay = M._varlen_layout(seg, None, "varlen", "cpu")
    (main_index, main_kv_index, cu_main, _, _, _), (rej_index, rej_kv_index, cu_rej_q, cu_rej_k, max_rej_q,
                                                     max_rej_k) = lay.calls
    assert main_index.tolist() == main_kv_index.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert rej_index.tolist() == [3, 4, 11]
    assert rej_kv_index.tolist() == [0, 1, 3, 4, 8, 11]
    assert cu_main.tolist() == [0, 3, 6, 9] and cu_rej_q.tolist() == [0, 2, 3]
    assert cu_rej_k.tolist() == [0, 4, 6] and (max_rej_q, max_rej_k) == (2, 4)
    perm = torch.cat([main_index, rej_index])
    assert torch.equal(perm[lay.unperm_index], torch.arange(12))


def test_shared_layout_same_loss_and_grads():
    """Per-token log-probs and their gradients agree between the layouts (the ORPO loss is built from them)."""
    model = family_models()["opt"]
    pairs = random_pairs(2, seed=5)
    grads = []
    for shared in (False, True):
        x, pos, seg = pack(pairs, shared)
        # predict each answer token from the row before it
        index, tgt, start = [], [], 0
        for (p, c, r), (sl, cl, rl) in zip(pairs if shared else [q for q in pairs for _ in (0, 1)], seg.tolist()):
            if shared:
                index += [start + len(p) - 1] + list(range(start + len(p), start + len(p) + len(c) - 1))
                tgt += c
                index += [start + len(p) - 1] + list(range(start + len(p) + len(c), start + sl + cl + rl - 1))
                tgt += r
            else:
                index += list(range(start + len(p) - 1, start + sl - 1))
                tgt += x[start + len(p):start + sl].tolist()
            start += sl + cl + rl
        model.zero_grad()
        lp = model.token_logps(model.packed_hidden(x, pos, seg), torch.tensor(index), torch.tensor(tgt), chunk_size=7)
        (lp * torch.linspace(0.5, 1.5, len(lp))).sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp0, g0), (lp1, g1) = grads
    # the unshared order is c then r per pair; the shared order also c then r per pair: same token order
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- chunked log-probs ---------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_chunked_token_logps_matches_full(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(20, 16, requires_grad=True)
    index, targets = torch.randint(0, 20, (13,)), torch.randint(0, 50, (13,))
    weights = torch.randn(13)

    full = torch.log_softmax(head(hidden[index]).float(), -1).gather(1, targets[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((full * weights).sum(), [hidden, *head.parameters()])
    chunked = M.ChunkedTokenLogps.apply(hidden[index], head.weight, head.bias, targets, 4)
    grads = torch.autograd.grad((chunked * weights).sum(), [hidden, *head.parameters()])
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# --- generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "opt"])
def test_generate_cache_equals_recompute(family):
    model = family_models()[family].eval()
    with torch.no_grad():
        for p in model.parameters():      # sharper distributions: greedy ties are impossible
            p.mul_(3.0) if p.dim() == 2 else None
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22]]
    got = model.generate(prompts, max_new_tokens=6, temperature=0, eos_id=[])     # [] = never stop early
    for p, new in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(p):]


def test_generate_eos_top_p_and_sampling():
    model = family_models()["llama"].eval()
    g = lambda: torch.Generator().manual_seed(0)
    a = model.generate([[1, 2], [3, 4, 5]], max_new_tokens=5, temperature=1.0, top_p=0.9, eos_id=[], generator=g())
    b = model.generate([[1, 2], [3, 4, 5]], max_new_tokens=5, temperature=1.0, top_p=0.9, eos_id=[], generator=g())
    assert a == b and all(len(x) == 5 for x in a)
    first = model.generate([[1, 2]], max_new_tokens=5, temperature=0, eos_id=[])[0]
    stopped = model.generate([[1, 2]], max_new_tokens=5, temperature=0, eos_id=first[1])[0]
    assert stopped == first[:first.index(first[1]) + 1]
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])     # top_p 0.5 keeps only the argmax
    assert M.sample_next(logits, 1.0, 0.5, g()).tolist() == [0]


def test_generate_stops_at_the_checkpoints_eos_by_default(tmp_path):
    """eos_id=None is config.json's eos_token_id, an int or a list (any of them ends a row, and is kept)."""
    model = family_models()["llama"].eval()
    prompts = [[1, 2], [3, 4, 5]]
    free = model.generate(prompts, max_new_tokens=8, temperature=0, eos_id=[])
    assert all(len(row) == 8 for row in free)
    eos = free[0][2]                                       # a token the first row greedily emits
    cut = lambda row, stops: row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
    model.save_pretrained(tmp_path)
    for value in (eos, [free[1][3], eos]):
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=value)))
        loaded = M.Transformer.from_pretrained(str(tmp_path)).eval()
        stops = value if isinstance(value, list) else [value]
        got = loaded.generate(prompts, max_new_tokens=8, temperature=0)
        assert got == [cut(row, stops) for row in free] and len(got[0]) <= 3 and got[0][-1] in stops
    assert loaded.generate(prompts, max_new_tokens=8, temperature=0, eos_id=[]) == free


# --- checkpoints ---------------------------------------------------------------------------------

def test_sharded_save_and_load(tmp_path):
    model = family_models()["phi"]
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = M.Transformer.from_pretrained(str(tmp_path))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    names = [n for n, _ in M.iter_hf_tensors(tmp_path, model.config)]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_loading_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = family_models()["llama"]
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    good = dict(tensors)
    del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.CheckpointError, match=r"missing 1: model\.layers\.1\.self_attn\.k_proj\.weight"):
        M.Transformer.from_pretrained(str(tmp_path))
    tensors = dict(good, **{name: torch.zeros(3, 32)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.CheckpointError, match=r"wrong shape 1: .*k_proj.weight \(3, 32\)"):
        M.Transformer.from_pretrained(str(tmp_path))
    save_file(dict(good, extra=torch.zeros(1)), tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.CheckpointError, match="unexpected 1: extra"):
        M.Transformer.from_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    with pytest.raises(M.ModelConfigError, match="gpt_neox"):
        M.Transformer.from_pretrained(str(tmp_path))


def test_config_values_of_the_wrong_type_name_the_key(tmp_path):
    """A string, float or bool where config.json needs another type is a ModelConfigError naming key and value."""
    family_models()["llama"].save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for key, value, needle in (("hidden_size", "64", "hidden_size='64': must be an integer"),
                               ("rms_norm_eps", "1e-5", "rms_norm_eps='1e-5': must be a number"),
                               ("num_hidden_layers", 2.5, "num_hidden_layers=2.5: must be an integer"),
                               ("tie_word_embeddings", "false", "tie_word_embeddings='false': must be true or false"),
                               ("num_key_value_heads", True, "num_key_value_heads=True: must be an integer or null"),
                               ("eos_token_id", [2, "3"], "eos_token_id=[2, '3']: must be an integer or a list"),
                               ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"}, "rope_theta='1e4'"),
                               ("hidden_act", ["silu"], "hidden_act=['silu']: must be a string"),
                               ("num_attention_heads", None, "has no 'num_attention_heads'")):
        (tmp_path / "config.json").write_text(json.dumps(dict(good, **{key: value})))
        with pytest.raises(M.ModelConfigError, match=re.escape(needle)) as e:
            M.Transformer.from_pretrained(str(tmp_path))
        assert str(tmp_path / "config.json") in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(dict(good, rms_norm_eps=1, eos_token_id=[2, 3])))
    c = M.load_config(tmp_path)                                # an int where a float is meant is a number
    assert (c.norm_eps, type(c.norm_eps), c.eos_token_id) == (1.0, float, [2, 3])


def test_resolve_checkpoint_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(M.CheckpointError, match="not in the local Hugging Face cache"):
        M.resolve_checkpoint("nobody-here/no-such-model-xyz")
    with pytest.raises(M.CheckpointError, match="no such directory"):
        M.resolve_checkpoint(str(tmp_path / "does-not-exist"))
    with pytest.raises(M.CheckpointError, match="neither a directory"):
        M.resolve_checkpoint("no-such-preset")
    # a mistyped relative path whose folder exists is a path, not the Hub repo "finall" of a user "out"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(M.CheckpointError, match="'out/finall': no such directory"):
        M.resolve_checkpoint("out/finall")
    assert M.PRESETS["mistral-7b"] == "mistralai/Mistral-7B-v0.1"


def test_broken_checkpoints_are_checkpoint_errors(tmp_path):
    """An interrupted download, a truncated shard, a bad index or config: one CheckpointError each."""
    model = family_models()["llama"]
    d = model.save_pretrained(tmp_path / "ok", max_shard_bytes=20_000)      # sharded, with an index
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    cases = {}
    for name in ("missing_shard", "truncated", "bad_index", "config_list"):
        cases[name] = tmp_path / name
        shutil.copytree(d, cases[name])
    (cases["missing_shard"] / shards[0]).unlink()
    shard = cases["truncated"] / shards[0]
    shard.write_bytes(shard.read_bytes()[:100])
    (cases["bad_index"] / "model.safetensors.index.json").write_text("{not json")
    (cases["config_list"] / "config.json").write_text("[1, 2]")
    for name, needle in (("missing_shard", "interrupted download"), ("truncated", "not a readable safetensors"),
                         ("bad_index", "is not a safetensors index"), ("config_list", "not a JSON object")):
        with pytest.raises(M.CheckpointError, match=needle):
            M.Transformer.from_pretrained(str(cases[name]))


def test_tied_checkpoint_that_kept_only_lm_head_loads(tmp_path):
    """Conversions that keep one name per shared tensor may store a tied OPT's embedding as lm_head.weight."""
    from safetensors.torch import load_file, save_file

    model = family_models()["opt"]
    assert model.config.tie_embeddings
    d = model.save_pretrained(tmp_path / "ckpt")
    (f,) = d.glob("*.safetensors")
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors.pop("model.decoder.embed_tokens.weight")
    save_file(tensors, f)
    loaded = M.Transformer.from_pretrained(str(d))
    x = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_learned_positions_past_the_table_are_a_clear_error():
    model = family_models()["opt"]
    n = model.config.max_seq_len
    x = torch.zeros(n + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"past the {n} learned positions"):
        model.packed_hidden(x, torch.arange(n + 1), torch.tensor([[n + 1, 0, 0]]))


def test_generate_rejects_a_zero_top_p_and_phi_rejects_an_ungated_silu():
    model = family_models()["llama"]
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        model.generate([[1, 2]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(M.ModelConfigError, match="ungated SiLU"):
        M.config_from_hf(dict(model_type="phi", **BASE, intermediate_size=40, hidden_act="silu"))


def test_resolve_checkpoint_gated_and_no_safetensors(monkeypatch, tmp_path):
    """The Hub's answers, stubbed (no network in tests): each becomes one clear sentence."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    calls = []

    def gated(repo_id, allow_patterns, revision=None, repo_type=None):
        calls.append(allow_patterns)
        raise GatedRepoError("401", response=SimpleNamespace(headers={}, status_code=401, request=None, url=""))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(M.CheckpointError, match="meta-llama/Llama-2-7b-hf is gated"):
        M.resolve_checkpoint("llama2-7b")
    assert "*.safetensors" in calls[0] and not any("bin" in p for p in calls[0])
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns, revision, repo_type: str(tmp_path))
    with pytest.raises(M.CheckpointError, match="has no \\*.safetensors"):
        M.resolve_checkpoint("someone/pickled-only")


def test_safetensors_from_the_bots_conversion_pr(monkeypatch, tmp_path, capsys):
    """A repo with only pickled weights on main (facebook/opt-*) loads the safetensors of the Hub bot's open
    conversion PR, if that PR sits on top of main; another author's PR, or one on an old main, is not used."""
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants

    main_dir, pr_dir = tmp_path / "main", tmp_path / "pr"
    for d in (main_dir, pr_dir):
        d.mkdir()
        (d / "config.json").write_text("{}")
    (pr_dir / "model.safetensors").write_bytes(b"")
    downloads = []

    def snapshot_download(repo_id, allow_patterns, revision=None, repo_type=None):
        downloads.append(revision)
        return str(pr_dir if revision == "refs/pr/7" else main_dir)

    def discussions(repo_id, author, discussion_type, discussion_status):
        title = "Adding `safetensors` variant of this model"
        return [SimpleNamespace(title=title, git_reference="refs/pr/2", author="mallory"),        # not the bot
                SimpleNamespace(title=title, git_reference="refs/pr/3", author="SFconvertbot"),   # on an old main
                SimpleNamespace(title=title, git_reference="refs/pr/7", author="SFconvertbot")]

    parents = {None: ["main-head"], "refs/pr/2": ["pr2", "main-head"], "refs/pr/3": ["pr3", "old-main"],
               "refs/pr/7": ["pr7", "main-head"]}

    class Api:
        def list_repo_commits(self, repo_id, revision=None):
            return [SimpleNamespace(commit_id=c) for c in parents[revision]]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)    # (conftest sets it for the suite)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_repo_discussions", discussions)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert M.resolve_checkpoint("facebook/opt-125m") == pr_dir
    assert downloads == [None, "refs/pr/7"] and "refs/pr/7" in capsys.readouterr().out
    parents["refs/pr/7"] = ["pr7", "old-main"]           # main moved on: the PR could carry other changes
    with pytest.raises(M.CheckpointError, match="nor a safetensors pull request"):
        M.resolve_checkpoint("facebook/opt-125m")


def test_conversion_pr_offline_from_the_cache_and_after_a_network_error(monkeypatch, tmp_path):
    """Offline, a conversion PR downloaded before is found in the real HF cache layout; a network error that is
    not an OSError (the HTTP client's own) falls back to the cache too, and never escapes as a traceback."""
    import huggingface_hub
    import huggingface_hub.constants

    repo = tmp_path / "models--facebook--opt-125m"
    for ref, commit, files in (("main", "a" * 40, ["config.json"]),
                               ("refs/pr/7", "b" * 40, ["config.json", "model.safetensors"])):
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        for name in files:
            blob = repo / "blobs" / f"{commit[:8]}{name}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_text("{}")
            (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / commit / name).symlink_to(blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert M._safetensors_pr("facebook/opt-125m") == "refs/pr/7"              # offline: from the cache
    assert M.resolve_checkpoint("facebook/opt-125m") == repo / "snapshots" / ("b" * 40)

    class Unreachable:                       # online, but the Hub cannot be reached
        def list_repo_commits(self, *a, **k):
            raise RuntimeError("ConnectError: Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    assert M._safetensors_pr("facebook/opt-125m") == "refs/pr/7"
    (repo / "refs" / "refs" / "pr" / "7").unlink()                  # nothing cached either: the clear error
    assert M._safetensors_pr("facebook/opt-125m") is None


def test_tiny_preset_and_activation_checkpointing():
    torch.manual_seed(0)
    model = M.Transformer.from_pretrained("tiny")
    assert model.config.vocab_size == 512
    x, pos, seg = pack(random_pairs(2), shared=True)
    index, tgt = torch.arange(len(x) - 1), x[1:]
    model.train()
    runs = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        model.token_logps(model.packed_hidden(x, pos, seg), index, tgt).sum().backward()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_block_traces_without_graph_breaks():
    model = family_models()["mistral"]
    x, pos, seg = pack(random_pairs(2), shared=True)
    layout = M.packed_layout(seg, pos, 4, torch.float32)
    h = model.tok_embeddings(x)
    angles = pos.float()[:, None] * M.rope_inv_freq(model.config)
    rope = angles.cos(), angles.sin()
    block = model.layers[0]
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, rope, layout), block(h, rope, layout))


def test_stories260k_generates(tmp_path):
    d = SHARED_DATA / "models" / "stories260K"
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"{d} not present")
    model = M.Transformer.from_pretrained(str(d)).eval()
    tok = pytest.importorskip("tokenizers").Tokenizer.from_file(str(d / "tokenizer.json"))
    new = model.generate([[1]], max_new_tokens=20, temperature=0)[0]
    text = tok.decode(new)
    assert text.startswith("Once upon a time"), text


def test_chunked_logps_backward_recomputes_under_the_forwards_autocast():
    """Under bf16 autocast the backward must recompute the same bf16 logits as the forward, not fp32 ones."""
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = M.ChunkedTokenLogps.apply(h, w, None, t, 7)
        ref = torch.log_softmax(torch.nn.functional.linear(h, w).float(), -1).gather(1, t[:, None]).squeeze(1)
    (gh_ours,) = torch.autograd.grad(ours.sum(), h)
    (gh_ref,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh_ours, gh_ref, rtol=0, atol=0)
