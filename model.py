"""
A decoder-only Transformer in one file: Llama, Mistral, OPT and Phi, loading and saving
Hugging Face safetensors checkpoints, with a padding-free packed forward for ORPO training.

Reading order:
  1. ModelConfig  - one dataclass; the differences between the four families are behaviour flags.
  2. Attention    - ONE function, `attend`, that dispatches to flash-attn / torch varlen / flex / SDPA,
                    plus the "layout" (masks, index tensors) it reads, built once per forward.
  3. Transformer  - embeddings, blocks, final norm, lm_head; packed_hidden, token_logps, generate.
  4. Checkpoints  - Hub download, per-family name maps, strict loading, sharded saving.

The packed batch (data.PackedBatch): N tokens in one flat stream, S segments,
seg_lens[s] = (shared_len, chosen_len, rejected_len). A token attends to earlier tokens of its own
segment, and a rejected token never sees a chosen one (the prompt is computed once and shared by
both answers). Rejected positions restart at the end of the prompt, so every chosen and
rejected token sees exactly what it would see in its own [prompt | answer] sequence.

No transformers at run time: the tests check logits against transformers to 1e-4 in float32.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelConfigError(ValueError):
    """A config.json (or ModelConfig) we cannot build a model from."""


class CheckpointError(ValueError):
    """A checkpoint we cannot find, download or load."""


# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class ModelConfig:
    family: str = "llama"            # llama | mistral | opt | phi (the HF model_type we read and write)
    vocab_size: int = 32000
    dim: int = 4096                  # hidden size of the residual stream
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None    # < n_heads: grouped-query attention (GQA); None = n_heads
    head_dim: int | None = None      # None = dim // n_heads
    ffn_dim: int = 11008             # MLP hidden width
    max_seq_len: int = 4096          # max_position_embeddings (size of OPT's learned position table)
    # normalisation
    norm: str = "rmsnorm"            # rmsnorm (llama, mistral) | layernorm (opt, phi)
    norm_eps: float = 1e-5
    norm_affine: bool = True         # OPT's layer_norm_elementwise_affine
    pre_norm: bool = True            # False: post-LN, norm after each residual add (OPT-350m)
    final_norm: bool = True          # a norm after the last block (OPT post-LN has none)
    parallel_residual: bool = False  # Phi: x + attn(ln(x)) + mlp(ln(x)), one norm per block
    # biases
    attn_bias: bool = False          # q, k, v and output projections
    mlp_bias: bool = False
    lm_head_bias: bool = False       # Phi
    # MLP
    mlp_kind: str = "swiglu"         # swiglu: w2(silu(w1 x) * w3 x); gelu | gelu_tanh (Phi) | relu: w2(act(w1 x))
    # positions
    positions: str = "rope"          # rope | learned (OPT; table indexed with position + 2)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0     # Phi rotates only the first 40% of each head's dims
    rope_scaling: dict | None = None # None = plain RoPE; else HF's scaling keys (see _ROPE_SCALING_KEYS), e.g.
                                     # {"rope_type": "linear", "factor": 2.0}
    learned_pos_offset: int = 2      # OPT reserves the first two rows of its position table
    embed_dim: int | None = None     # OPT's word_embed_proj_dim: != dim adds project_in / project_out
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` positions only
    tie_embeddings: bool = False     # lm_head.weight is tok_embeddings.weight
    init_std: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ModelConfigError(f"model family {self.family!r} is not supported; use one of {sorted(_FAMILIES)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ModelConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.embed_dim is None:
            self.embed_dim = self.dim
        if self.embed_dim != self.dim and self.family != "opt":
            raise ModelConfigError(f"embed_dim {self.embed_dim} != dim {self.dim} (project_in/out) exists only in "
                                   f"OPT checkpoints, not in family {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name, value, allowed in (("norm", self.norm, ("rmsnorm", "layernorm")),
                                     ("mlp_kind", self.mlp_kind, tuple(_ACTIVATIONS)),
                                     ("positions", self.positions, ("rope", "learned"))):
            if value not in allowed:
                raise ModelConfigError(f"ModelConfig.{name}={value!r} is not one of {allowed}")
        if self.rotary_dim % 2:
            raise ModelConfigError(f"rotary dims {self.rotary_dim} (head_dim * rotary_fraction) must be even")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction) if self.positions == "rope" else 0

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """A Hugging Face config.json (as a dict) -> ModelConfig. Reads both the old layout (top-level
        rope_theta / rope_scaling / partial_rotary_factor, often no head_dim) and transformers 5's rope_parameters."""
        family = hf.get("model_type")
        if family not in _FAMILIES:
            raise ModelConfigError(f"config.json has model_type {family!r}; supported: {sorted(_FAMILIES)}")
        return _FROM_HF[family](hf)

    def to_hf(self) -> dict:
        """ModelConfig -> a config.json dict that transformers 5 AutoModelForCausalLM loads."""
        return _TO_HF[self.family](self)


_ACTIVATIONS = {
    "swiglu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
_HF_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise ModelConfigError(f"config.json (model_type {hf.get('model_type')!r}) has no {key!r}")
    return hf[key]


# The rope scaling types we implement, and the keys each one reads (as transformers names them).
# "dynamic" (NTK) is not here: its frequencies depend on the longest sequence seen at run time.
_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: dict):
    rope_type = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if rope_type not in _ROPE_SCALING_KEYS:
        raise ModelConfigError(f"ModelConfig.rope_scaling={scaling!r}: want None or a dict whose rope_type is one of "
                               f"{sorted(_ROPE_SCALING_KEYS)}")
    want = {"rope_type", *_ROPE_SCALING_KEYS[rope_type]}
    if set(scaling) != want:
        raise ModelConfigError(f"ModelConfig.rope_scaling={scaling!r}: {rope_type!r} takes exactly the keys "
                               f"{sorted(want)}")


def _read_rope(hf: dict, default_fraction: float) -> dict:
    """theta, rotary fraction and scaling from either config layout."""
    params = dict(hf.get("rope_parameters") or {})     # transformers 5
    scaling = hf.get("rope_scaling") or params          # old layout keeps scaling separate
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))   # older configs say "type"
    if rope_type != "default" and rope_type not in _ROPE_SCALING_KEYS:
        raise ModelConfigError(f"config.json asks for rope scaling type {rope_type!r}; implemented: "
                               f"{['default', *_ROPE_SCALING_KEYS]}")
    rope_scaling = None
    if rope_type != "default":
        scaling = dict(scaling)
        if rope_type == "llama3":   # as transformers: a top-level value wins, then the dict's, then the model's max
            scaling["original_max_position_embeddings"] = (hf.get("original_max_position_embeddings")
                                                           or scaling.get("original_max_position_embeddings")
                                                           or hf.get("max_position_embeddings", 2048))
        keys = _ROPE_SCALING_KEYS[rope_type]
        missing = [k for k in keys if scaling.get(k) is None]
        if missing:
            raise ModelConfigError(f"config.json rope scaling type {rope_type!r} has no {missing}")
        rope_scaling = {"rope_type": rope_type,   # lengths are ints, factors floats
                        **{k: (int if k.startswith("original") else float)(scaling[k]) for k in keys}}
    return dict(
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta") or 10000.0)),
        rotary_fraction=float(params.get("partial_rotary_factor",
                                         hf.get("partial_rotary_factor") or default_fraction)),
        rope_scaling=rope_scaling,
    )


def _act(hf: dict, key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in _HF_ACT:
        raise ModelConfigError(f"config.json {key}={act!r} is not supported; use one of {sorted(_HF_ACT)}")
    return _HF_ACT[act]


def _common_from_hf(hf: dict) -> dict:
    return dict(vocab_size=_need(hf, "vocab_size"), dim=_need(hf, "hidden_size"),
                n_layers=_need(hf, "num_hidden_layers"), n_heads=_need(hf, "num_attention_heads"),
                max_seq_len=hf.get("max_position_embeddings", 2048),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"))


def _llama_from_hf(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    act = _act(hf, "hidden_act", "silu")
    if act != "swiglu":
        raise ModelConfigError(f"{family} config.json hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) "
                               f"is supported")
    window = hf.get("sliding_window") if family == "mistral" else None
    return ModelConfig(family=family, **_common_from_hf(hf), n_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), ffn_dim=_need(hf, "intermediate_size"),
                       norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                       attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                       mlp_kind="swiglu", sliding_window=window,
                       tie_embeddings=hf.get("tie_word_embeddings", False), **_read_rope(hf, 1.0))


def _phi_from_hf(hf: dict) -> ModelConfig:
    if hf.get("qk_layernorm"):
        raise ModelConfigError("phi config.json has qk_layernorm=true, which is not supported")
    if _act(hf, "hidden_act", "gelu_new") == "swiglu":   # Phi's MLP has no gate: fc2(silu(fc1 x)) is not SwiGLU
        raise ModelConfigError(f"phi config.json hidden_act={hf.get('hidden_act')!r} (an ungated SiLU MLP) "
                               f"is not supported")
    return ModelConfig(family="phi", **_common_from_hf(hf), n_kv_heads=hf.get("num_key_value_heads"),
                       ffn_dim=_need(hf, "intermediate_size"), norm="layernorm",
                       norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=True,
                       attn_bias=True, mlp_bias=True, lm_head_bias=True, mlp_kind=_act(hf, "hidden_act", "gelu_new"),
                       tie_embeddings=hf.get("tie_word_embeddings", False), **_read_rope(hf, 0.5))


def _opt_from_hf(hf: dict) -> ModelConfig:
    pre = hf.get("do_layer_norm_before", True)
    act = _act(hf, "activation_function", "relu")
    if act == "swiglu":
        raise ModelConfigError(f"opt config.json activation_function={hf.get('activation_function')!r} "
                               f"is not supported")
    return ModelConfig(family="opt", **_common_from_hf(hf), ffn_dim=_need(hf, "ffn_dim"), norm="layernorm",
                       norm_eps=1e-5, norm_affine=hf.get("layer_norm_elementwise_affine", True), pre_norm=pre,
                       final_norm=pre and not hf.get("_remove_final_layer_norm", False),
                       attn_bias=hf.get("enable_bias", True), mlp_bias=hf.get("enable_bias", True),
                       mlp_kind=act, positions="learned", embed_dim=hf.get("word_embed_proj_dim"),
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _common_to_hf(c: ModelConfig, arch: str) -> dict:
    return {"architectures": [arch], "model_type": c.family, "vocab_size": c.vocab_size, "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}


def _rope_to_hf(c: ModelConfig, with_fraction: bool) -> dict:
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope.update(c.rope_scaling)     # rope_type and its keys, named as transformers names them
    if with_fraction:
        rope["partial_rotary_factor"] = c.rotary_fraction
    return {"rope_parameters": rope}


def _llama_to_hf(c: ModelConfig) -> dict:
    arch = "MistralForCausalLM" if c.family == "mistral" else "LlamaForCausalLM"
    d = _common_to_hf(c, arch)
    d.update(num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_dim,
             hidden_act="silu", rms_norm_eps=c.norm_eps, **_rope_to_hf(c, False))
    if c.family == "mistral":
        d["sliding_window"] = c.sliding_window
    else:
        d.update(attention_bias=c.attn_bias, mlp_bias=c.mlp_bias)
    return d


def _phi_to_hf(c: ModelConfig) -> dict:
    if c.head_dim * c.n_heads != c.dim:
        raise ModelConfigError("phi requires head_dim * n_heads == dim")
    d = _common_to_hf(c, "PhiForCausalLM")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.mlp_kind]
    d.update(num_key_value_heads=c.n_kv_heads, intermediate_size=c.ffn_dim, hidden_act=act,
             layer_norm_eps=c.norm_eps, qk_layernorm=False, **_rope_to_hf(c, True))
    return d


def _opt_to_hf(c: ModelConfig) -> dict:
    d = _common_to_hf(c, "OPTForCausalLM")
    d.update(ffn_dim=c.ffn_dim, word_embed_proj_dim=c.embed_dim, do_layer_norm_before=c.pre_norm,
             _remove_final_layer_norm=c.pre_norm and not c.final_norm, enable_bias=c.attn_bias,
             layer_norm_elementwise_affine=c.norm_affine,
             activation_function=c.mlp_kind.replace("gelu_tanh", "gelu_new"))
    return d


_FAMILIES = ("llama", "mistral", "opt", "phi")
_FROM_HF = {"llama": _llama_from_hf, "mistral": _llama_from_hf, "phi": _phi_from_hf, "opt": _opt_from_hf}
_TO_HF = {"llama": _llama_to_hf, "mistral": _llama_to_hf, "phi": _phi_to_hf, "opt": _opt_to_hf}

# The families the paper trains (Table 1), by Hub repo id, plus a tiny random Llama for the CPU demo.
PRESETS: dict[str, str | ModelConfig] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "phi-2": "microsoft/phi-2",
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "tiny": ModelConfig(family="llama", vocab_size=512, dim=96, n_layers=3, n_heads=6, n_kv_heads=2,
                        ffn_dim=256, max_seq_len=1024, norm_eps=1e-5, tie_embeddings=True),
}


# -----------------------------------------------------------------------------
# 2. Attention: one function, four kernels, and the layout they read


_BACKENDS = ("auto", "sdpa", "flash", "varlen", "flex")
_backend = os.environ.get("ORPO_ATTENTION", "auto")


def set_attention_backend(name: str) -> str:
    """Force a kernel: "auto" (flash-attn > torch varlen > SDPA), "sdpa", "flash", "varlen" or "flex".
    Returns the previous choice (tests restore it). The env var ORPO_ATTENTION sets the initial one.
    "flex" is opt-in: it has not yet been measured faster than the varlen kernels on a GPU."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {_BACKENDS}")
    previous, _backend = _backend, name
    return previous


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch / CUDA
        return None


@functools.cache
def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10) and the keyword names this version takes."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flex(device_type: str):
    """(flex_attention, create_block_mask) for this device, or None before torch 2.5. On CUDA the kernel is
    torch.compile'd (eager flex materialises every score); on the CPU it stays eager, forward only."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if device_type == "cuda":
        # dynamic: every packed batch has another length N; one compiled kernel serves them all
        return torch.compile(flex_attention, dynamic=True), functools.partial(create_block_mask, _compile=True)
    return flex_attention, create_block_mask


def pick_attention(requested: str | None, device: torch.device, dtype: torch.dtype, window: int | None) -> str:
    """The kernel that runs for `requested` ("auto" or a name; None = the module default) on this device and
    dtype; RuntimeError when a named kernel cannot run here."""
    _backend = globals()["_backend"] if requested is None else requested
    # flash kernels are CUDA-only and half-precision-only; fp32 or CPU tensors take the SDPA path
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    tv = _torch_varlen()
    varlen_ok = fast_ok and tv is not None and (window is None or "window_size" in tv[1])
    if _backend == "flash" and not (fast_ok and _flash_varlen()):
        raise RuntimeError("attention backend 'flash' needs flash-attn installed and fp16/bf16 CUDA tensors")
    if _backend == "varlen" and not varlen_ok:
        raise RuntimeError("attention backend 'varlen' needs torch.nn.attention.varlen on fp16/bf16 CUDA tensors "
                           "(and torch >= 2.12 for a sliding window)")
    if _backend == "flex":
        if _flex(device.type) is None:
            raise RuntimeError("attention backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if device.type != "cuda" and torch.is_grad_enabled():
            raise RuntimeError("attention backend 'flex' has no backward on the CPU (torch's flex_attention "
                               "trains on CUDA only); use 'sdpa' to train on the CPU, or run under torch.no_grad()")
    if _backend != "auto":
        return _backend
    if fast_ok and _flash_varlen():
        return "flash"
    return "varlen" if varlen_ok else "sdpa"


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype attention will see: autocast's when autocast is on for the weight's device (float32 master
    weights under bf16 autocast compute in bf16, and must get the bf16 kernels), else the weight's own."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


@dataclass
class Layout:
    """Everything attention needs besides q, k, v; built once per forward, shared by all blocks.

    backend "dense": q (B, T, H, hd) with a (B, 1, T, Tk) bool mask or plain causal (forward, generate).
    backend "sdpa":  packed q (N, H, hd); one SDPA call per entry of `calls` (see _sdpa_layout), each on a
                     padded (G, L) grid gathered from the packed rows, outputs scattered back by ungrid_index.
    backend "flash" / "varlen": cu_seqlens; for the shared-prompt layout two calls (see _varlen_packed).
    backend "flex":  one flex_attention call over the whole packed stream with a BlockMask (see _flex_layout).
    """
    backend: str
    window: int | None = None
    mask: torch.Tensor | None = None
    is_causal: bool = False
    # sdpa: per call (q_index (G*Lq,) | None, kv_index (G*Lk,) | None, mask (G, 1, Lq, Lk) | None, (G, Lq, Lk));
    # None index = all N rows in order; None mask = plain causal (is_causal: the kernel skips masked blocks)
    calls: tuple = ()
    ungrid_index: torch.Tensor | None = None   # (N,) row of cat(call outputs) holding each packed row
    # flash / varlen: call 1 over [prompt | chosen] of every segment
    main_index: torch.Tensor | None = None     # (N1,) packed rows of [prompt|chosen]; None = all rows
    cu_main: torch.Tensor | None = None
    max_main: int = 0
    # call 2: queries = rejected tokens, keys = [prompt | rejected]
    rej_index: torch.Tensor | None = None      # (N2,)
    rej_kv_index: torch.Tensor | None = None   # (N3,)
    cu_rej_q: torch.Tensor | None = None
    cu_rej_k: torch.Tensor | None = None
    max_rej_q: int = 0
    max_rej_k: int = 0
    unperm_index: torch.Tensor | None = None   # (N,) row of cat(call 1, call 2) holding each packed row
    # flex: which 128 x 128 tiles of the (N, N) score matrix to compute, and the rule inside partial tiles
    block_mask: object = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, for every layout. k, v may have fewer (GQA) heads than q.
    Packed: (N, H, hd), (N, Hkv, hd) -> (N, H, hd). Dense: (B, T, H, hd), (B, Tk, Hkv, hd) -> (B, T, H, hd)."""
    gqa = k.shape[-2] != q.shape[-2]
    if layout.backend == "dense":
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=layout.mask, is_causal=layout.is_causal, enable_gqa=gqa)
        return o.transpose(1, 2)                                            # (B, T, H, hd)
    if layout.backend == "sdpa":
        outs = []
        for q_index, kv_index, mask, (G, Lq, Lk) in layout.calls:
            qg = _to_grid(q, q_index, G, Lq)                                # (G, H, Lq, hd)
            kg, vg = _to_grid(k, kv_index, G, Lk), _to_grid(v, kv_index, G, Lk)  # (G, Hkv, Lk, hd)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)                      # (G, H, Lq, hd)
            outs.append(o.transpose(1, 2).reshape(G * Lq, *q.shape[1:]))   # (G*Lq, H, hd)
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        return o if layout.ungrid_index is None else o.index_select(0, layout.ungrid_index)
    if layout.backend == "flex":
        flex_attention, _ = _flex(q.device.type)
        qf, kf, vf = (t.transpose(0, 1)[None] for t in (q, k, v))                  # (1, H, N, hd)
        return flex_attention(qf, kf, vf, block_mask=layout.block_mask, enable_gqa=gqa)[0].transpose(0, 1)
    return _varlen_packed(q, k, v, layout)


def _to_grid(t: torch.Tensor, index: torch.Tensor | None, G: int, L: int) -> torch.Tensor:
    """Packed (N, H, hd) -> (G, H, L, hd): the rows named by index (G*L,), or all N rows as one grid row."""
    if index is not None:
        t = t.index_select(0, index)
    return t.view(G, L, *t.shape[1:]).transpose(1, 2)


def _varlen_packed(q, k, v, layout: Layout) -> torch.Tensor:
    """flash-attn / torch varlen. The unshared layout is one causal call over all segments. The shared
    layout needs two: [prompt|chosen] is an ordinary causal sequence; rejected queries attend to
    [prompt|rejected] keys, causal aligned at the bottom-right (query r_k sits at key p + k), which the
    varlen kernels implement whenever the query and key lengths differ."""
    if layout.main_index is None:
        return _varlen_call(layout.backend, q, k, v, layout.cu_main, layout.cu_main,
                            layout.max_main, layout.max_main, layout.window)
    mi = layout.main_index
    o1 = _varlen_call(layout.backend, q[mi], k[mi], v[mi], layout.cu_main, layout.cu_main,
                      layout.max_main, layout.max_main, layout.window)
    ri, rk = layout.rej_index, layout.rej_kv_index
    o2 = _varlen_call(layout.backend, q[ri], k[rk], v[rk], layout.cu_rej_q, layout.cu_rej_k,
                      layout.max_rej_q, layout.max_rej_k, layout.window)
    return torch.cat([o1, o2]).index_select(0, layout.unperm_index)


def _varlen_call(backend, q, k, v, cu_q, cu_k, max_q, max_k, window):
    # Both kernels take window_size=(left, right): query i sees keys i-left .. i+right (bottom-right
    # aligned). Our window w keeps keys with pos_i - pos_j < w, i.e. pos_i - pos_j <= w - 1: left = w - 1.
    left = window - 1 if window else -1
    if backend == "flash":
        return _flash_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(left, 0))
    varlen_attn, params = _torch_varlen()
    kw = {}
    if "window_size" in params:   # torch >= 2.12: (-1, 0) means causal
        kw["window_size"] = (left, 0)
    else:                         # torch 2.10 / 2.11: a flag (no window; pick_attention checked)
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def packed_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None,
                  dtype: torch.dtype, requested: str | None = None) -> Layout:
    """The attention layout of a packed batch, computed once per forward (not per block).
    seg_lens (S, 3) on CPU: (shared, chosen, rejected) lengths per segment."""
    device = position_ids.device
    backend = pick_attention(requested, device, dtype, window)
    if backend == "sdpa":
        return _sdpa_layout(seg_lens, position_ids, window)
    if backend == "flex":
        return _flex_layout(seg_lens, position_ids, window)
    return _varlen_layout(seg_lens, window, backend, device)


def _sdpa_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> Layout:
    """Two ways to run a packed batch through SDPA; take the one that computes fewer attention scores:
      flat:  one (N, N) mask over the whole stream: N^2 scores, no gathers;
      grids: the varlen decomposition on padded grids (_grid_layout). Grid A, SA rows of LA = max(p + c):
             SA * LA^2 scores, half that when it runs as plain is_causal (no window inside LA), as the
             CPU kernel then skips the blocks above the diagonal. Grid B: SB * max(r) * max(p + r)."""
    p, c, r = seg_lens.unbind(1)
    N, m, has_r = int(seg_lens.sum()), p + c, r > 0
    LA = int(m.max())
    grid_cost = int((m > 0).sum()) * LA * LA // (2 if window is None or LA <= window else 1)
    grid_cost += int(has_r.sum()) * int(r.max()) * int(((p + r) * has_r).max())
    if N * N <= grid_cost:
        return _flat_layout(seg_lens, position_ids, window)
    return _grid_layout(seg_lens, position_ids, window)


def _token_tags(seg_lens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) segment of each packed token, and (N,) its branch: 0 shared prompt, 1 chosen, 2 rejected."""
    S = len(seg_lens)
    seg_id = torch.repeat_interleave(torch.arange(S), seg_lens.sum(1)).to(device)
    branch = torch.repeat_interleave(torch.arange(3).repeat(S), seg_lens.flatten()).to(device)
    return seg_id, branch


def _visible(seg_id, branch, position_ids, window, q, k):
    """The attention rule of a packed batch, for query rows q and key rows k (any broadcastable shapes):
    same segment, causal in packed order, a rejected token never sees a chosen one, and Mistral's window
    in position space. The flat SDPA mask and the flex mask_mod both evaluate exactly this."""
    visible = (seg_id[q] == seg_id[k]) & (q >= k) & ((branch[k] == 0) | (branch[k] == branch[q]))
    if window is not None:
        visible = visible & ((position_ids[q] - position_ids[k]) < window)
    return visible


def _flat_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> Layout:
    """One SDPA call over all N rows, with the attention rule as one (1, 1, N, N) bool mask."""
    seg_id, branch = _token_tags(seg_lens, position_ids.device)
    order = torch.arange(len(seg_id), device=position_ids.device)
    mask = _visible(seg_id, branch, position_ids, window, order[:, None], order[None, :])        # (N, N)
    return Layout("sdpa", window, calls=((None, None, mask[None, None], (1, len(order), len(order))),))


def _flex_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> Layout:
    """flex_attention over the whole stream: the same rule as _flat_layout, as a mask_mod. create_block_mask
    evaluates it once per forward and keeps, per 128-row query tile, the key tiles that have any visible
    pair, so the kernel skips other segments and, in the shared layout, the chosen x rejected tiles."""
    device = position_ids.device
    seg_id, branch = _token_tags(seg_lens, device)

    def mask_mod(b, h, q, k):
        return _visible(seg_id, branch, position_ids, window, q, k)

    N = len(seg_id)
    _, create_block_mask = _flex(device.type)
    return Layout("flex", window, block_mask=create_block_mask(mask_mod, None, None, N, N, device=device))


def _grid_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> Layout:
    """Grid A: (S, max p+c) [prompt|chosen] rows, causal. Grid B (shared layout only): (S_r, max r) rejected
    queries against (S_r, max p+r) [prompt|rejected] keys, causal aligned bottom-right (query k sees key p+k)."""
    device = position_ids.device
    main_index, main_lens, rej_index, rej_lens, kv_index, kv_lens = _split_indices(seg_lens)
    qa, qa_valid, cells_a = _pad(main_index, main_lens, device)                    # (SA*LA,), (SA, LA), (N1,)
    (SA, LA) = qa_valid.shape
    # right padding never shows in a valid causal row, so grid A needs a mask only where the window binds
    mask_a = None if window is None or LA <= window else _grid_mask(qa, qa_valid, qa, qa_valid, 0,
                                                                    position_ids, window)
    calls = [(qa, qa, mask_a, (SA, LA, LA))]
    ungrid = torch.empty(int(seg_lens.sum()), dtype=torch.long)
    ungrid[main_index] = cells_a
    if len(rej_lens):
        qb, qb_valid, cells_b = _pad(rej_index, rej_lens, device)                  # (SB*LBq,), (SB, LBq)
        kb, kb_valid, _ = _pad(kv_index, kv_lens, device)                          # (SB*LBk,), (SB, LBk)
        shift = (kv_lens - rej_lens).to(device)                                    # = p: bottom-right alignment
        calls.append((qb, kb, _grid_mask(qb, qb_valid, kb, kb_valid, shift, position_ids, window),
                      (*qb_valid.shape, kb_valid.shape[1])))
        ungrid[rej_index] = len(qa) + cells_b
    return Layout("sdpa", window, calls=tuple(calls), ungrid_index=ungrid.to(device))


def _grid_mask(q_rows, q_valid, k_rows, k_valid, shift, position_ids, window) -> torch.Tensor:
    """(G, 1, Lq, Lk) bool: key j of a grid row is visible to query i iff j <= i + shift (per row; 0 = plain
    causal, k_len - q_len = bottom-right aligned) and within the window in position space."""
    (G, Lq), Lk = q_valid.shape, k_valid.shape[1]
    i, j = torch.arange(Lq, device=q_rows.device)[:, None], torch.arange(Lk, device=q_rows.device)[None, :]
    mask = k_valid[:, None, :] & (j <= i + torch.as_tensor(shift).view(-1, 1, 1))  # (G, Lq, Lk)
    if window is not None:
        mask &= (position_ids[q_rows].view(G, Lq, 1) - position_ids[k_rows].view(G, 1, Lk)) < window
    mask |= ~q_valid[:, :, None]                                   # padding rows: never all-masked (NaN)
    return mask[:, None]


def _pad(rows: torch.Tensor, lens: torch.Tensor, device):
    """Ragged packed rows (sum(lens),) -> a padded (G, L) grid of them, flattened (G*L,) (padding cells show
    row 0), the (G, L) valid mask (both on device), and the grid cell of each ragged row. G = len(lens)."""
    G, L = len(lens), int(lens.max())
    cells = _ranges(torch.arange(G) * L, lens)                                     # (sum(lens),)
    grid = torch.zeros(G * L, dtype=torch.long)
    grid[cells] = rows
    valid = torch.zeros(G * L, dtype=torch.bool)
    valid[cells] = True
    return grid.to(device), valid.view(G, L).to(device), cells


def _ranges(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """cat([arange(s, s + l) for s, l in zip(starts, lens)]) without a Python loop."""
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
    offsets = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens)[seg]
    return starts[seg] + offsets


def _cu(lens: torch.Tensor, device) -> torch.Tensor:
    return F.pad(torch.cumsum(lens, 0), (1, 0)).to(device=device, dtype=torch.int32)


def _split_indices(seg_lens: torch.Tensor):
    """The two-call decomposition of a packed batch, as CPU index tensors into the N packed rows:
    main_index (N1,) the [prompt|chosen] rows, in segments of main_lens; rej_index (N2,) the rejected rows,
    in segments of rej_lens; kv_index (N3,) the [prompt|rejected] rows, in segments of kv_lens. Segments with
    an empty part are left out of that part's lens (rej_lens is empty in the unshared layout)."""
    p, c, r = seg_lens.unbind(1)
    starts = torch.cumsum(p + c + r, 0) - (p + c + r)
    has_r = r > 0
    main_index = _ranges(starts, p + c)
    rej_index = _ranges((starts + p + c)[has_r], r[has_r])
    # keys of call 2: the prompt rows, then the rejected rows, of each segment that has a rejected part
    kv_lens = (p + r)[has_r]
    kv = _ranges(torch.zeros_like(kv_lens), kv_lens)                          # offset inside [prompt|rejected]
    kv_seg = torch.repeat_interleave(torch.arange(len(kv_lens)), kv_lens)
    kv_index = starts[has_r][kv_seg] + kv + torch.where(kv >= p[has_r][kv_seg], c[has_r][kv_seg], 0)
    return main_index, (p + c)[(p + c) > 0], rej_index, r[has_r], kv_index, kv_lens


def _varlen_layout(seg_lens: torch.Tensor, window: int | None, backend: str, device) -> Layout:
    # Assumes position_ids run 0..p+c-1 over [prompt|chosen] and p..p+r-1 over rejected (the contract),
    # so index distance inside each call equals position distance and window_size implements the window.
    main_index, main_lens, rej_index, rej_lens, kv_index, kv_lens = _split_indices(seg_lens)
    layout = Layout(backend, window, cu_main=_cu(main_lens, device), max_main=int(main_lens.max()))
    if len(rej_lens) == 0:    # unshared layout: every segment is one causal sequence, no gathers needed
        return layout
    perm = torch.cat([main_index, rej_index])
    unperm = torch.empty_like(perm)
    unperm[perm] = torch.arange(len(perm))
    layout.main_index, layout.rej_index, layout.rej_kv_index, layout.unperm_index = (
        t.to(device) for t in (main_index, rej_index, kv_index, unperm))
    layout.cu_rej_q, layout.cu_rej_k = _cu(rej_lens, device), _cu(kv_lens, device)
    layout.max_rej_q, layout.max_rej_k = int(rej_lens.max()), int(kv_lens.max())
    return layout


def dense_causal_layout(T: int, window: int | None, device) -> Layout:
    """An ordinary (B, T) batch: plain causal, plus the sliding window when the sequence exceeds it."""
    if window is None or T <= window:
        return Layout("dense", window, is_causal=True)
    i = torch.arange(T, device=device)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return Layout("dense", window, mask=mask)


# -----------------------------------------------------------------------------
# 3. The model


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """(rotary_dim / 2,) float32 rotation speeds theta^(-2i / rotary_dim), after rope scaling. The same
    float32 operations, in the same order, as transformers' rope init functions (equal on CPU; tested)."""
    d = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":           # every frequency slowed by the factor = positions divided by it
        return inv_freq / s["factor"]
    # "llama3" (Llama 3.1+): slow down only the dims whose wavelength is long compared with the pretraining
    # context L. Wavelengths under L / high_freq_factor turn many times within L and are kept; those over
    # L / low_freq_factor are slowed by `factor` (as linear does); in between, a linear blend in L / wavelength.
    L = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - low) / (high - low)                           # 0 at L / low, 1 at L / high
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return torch.where(wavelen < L / high, inv_freq,
                       torch.where(wavelen > L / low, inv_freq / s["factor"], blended))


def rope_cos_sin(config: ModelConfig, position_ids: torch.Tensor):
    """Rotary tables for the given positions, (*P, rotary_dim / 2) each, float32 (as HF computes them)."""
    inv_freq = rope_inv_freq(config, position_ids.device)                    # (half,)
    angles = position_ids.float()[..., None] * inv_freq                       # (*P, half)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head, HF's "rotate half" pairing (i, i + half).
    x (*P, H, hd); cos, sin (*P, half). Phi leaves the remaining dims untouched."""
    half = cos.shape[-1]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)   # broadcast over heads
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 (bf16 sums of squares lose precision), scale in the input dtype, as Llama does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(c: ModelConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(c.dim, c.norm_eps)
    return nn.LayerNorm(c.dim, eps=c.norm_eps, elementwise_affine=c.norm_affine, bias=c.norm_affine)


class KVCache:
    """Keys and values of one block for generation: (B, T_max, Hkv, hd), filled left to right."""

    def __init__(self, B: int, T_max: int, n_kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(B, T_max, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k, v):
        T = k.shape[1]
        self.k[:, self.length:self.length + T] = k
        self.v[:, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :self.length], self.v[:, :self.length]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attn_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.attn_bias)

    def forward(self, x, rope, layout: Layout, cache: KVCache | None = None):
        lead = x.shape[:-1]                                                   # (N,) packed or (B, T)
        q = self.wq(x).view(*lead, self.n_heads, self.head_dim)
        k = self.wk(x).view(*lead, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(*lead, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)                                         # (B, Tk, Hkv, hd)
        return self.wo(attend(q, k, v, layout).reshape(*lead, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.act = _ACTIVATIONS[c.mlp_kind]
        self.w1 = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)                # gate (SwiGLU) or fc1
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=c.mlp_bias)                # down or fc2
        self.w3 = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias) if c.mlp_kind == "swiglu" else None  # up

    def forward(self, x):
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


class Block(nn.Module):
    """One decoder layer. Only static config flags branch here (no data-dependent control flow),
    so torch.compile traces it without graph breaks; masks and indices come in through `layout`."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.parallel_residual, self.pre_norm = c.parallel_residual, c.pre_norm
        self.attn_norm = make_norm(c)
        self.attn = Attention(c)
        self.mlp_norm = None if c.parallel_residual else make_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, rope, layout: Layout, cache: KVCache | None = None):
        if self.parallel_residual:   # Phi: attention and MLP read the same normed input
            h = self.attn_norm(x)
            return x + self.attn(h, rope, layout, cache) + self.mlp(h)
        if self.pre_norm:            # Llama, Mistral, most OPTs
            x = x + self.attn(self.attn_norm(x), rope, layout, cache)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope, layout, cache))              # OPT-350m: post-LN
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attention: str | None = None):
        super().__init__()
        c = self.config = config
        self.attention = attention   # kernel of the packed forward: "auto", a name, None = module default
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.embed_dim)
        self.pos_embeddings = (nn.Embedding(c.max_seq_len + c.learned_pos_offset, c.dim)
                               if c.positions == "learned" else None)
        self.project_in = nn.Linear(c.embed_dim, c.dim, bias=False) if c.embed_dim != c.dim else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = make_norm(c) if c.final_norm else None
        self.project_out = nn.Linear(c.dim, c.embed_dim, bias=False) if c.embed_dim != c.dim else None
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=c.lm_head_bias)
        self.activation_checkpointing = False  # True: recompute each block in backward (memory for compute)
        self.tie_weights()
        self.init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def tie_weights(self):
        """Re-point lm_head at the embedding (needed again after to_empty / assign-loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self):
        """Random init: N(0, 0.02) for matrices and embeddings, zero biases, unit norms; the projections
        that write into the residual stream (wo, w2) scaled by 1/sqrt(2 n_layers) as in GPT-2, so the
        residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    # --- the trunk, shared by every entry point -------------------------------------------------

    def _trunk(self, input_ids, position_ids, layout: Layout, caches=None) -> torch.Tensor:
        """Tokens (*P,) with positions (*P,) -> final hidden (*P, embed_dim), before lm_head."""
        c = self.config
        x = self.tok_embeddings(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embeddings is not None:
            # a learned table has max_seq_len rows to index (an index past it is a CUDA device assert)
            if int(position_ids.max()) >= c.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} is past the {c.max_seq_len} learned positions "
                                 f"of this {c.family} model: sequences may be at most {c.max_seq_len} tokens long")
            x = x + self.pos_embeddings(position_ids + c.learned_pos_offset)
        rope = rope_cos_sin(c, position_ids) if c.positions == "rope" else None  # once, for all blocks
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layout, cache, use_reentrant=False)
            else:
                x = block(x, rope, layout, cache)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """An ordinary batch of equal-length causal sequences: (B, T) -> logits (B, T, V)."""
        B, T = input_ids.shape
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        layout = dense_causal_layout(T, self.config.sliding_window, input_ids.device)
        return self.lm_head(self._trunk(input_ids, position_ids, layout))

    def packed_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      seg_lens: torch.Tensor) -> torch.Tensor:
        """The padding-free forward: (N,), (N,), (S, 3) -> final hidden states (N, embed_dim)."""
        N = input_ids.shape[0]
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape or int(seg_lens.sum()) != N:
            raise ValueError(f"packed batch mismatch: input_ids {tuple(input_ids.shape)}, position_ids "
                             f"{tuple(position_ids.shape)}, seg_lens summing to {int(seg_lens.sum())}")
        layout = packed_layout(seg_lens.cpu(), position_ids, self.config.sliding_window,
                               compute_dtype(self.tok_embeddings.weight), self.attention)
        return self._trunk(input_ids, position_ids, layout)

    def token_logps(self, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
        """log p(targets[m] | row index[m] of hidden) in float32, (M,), differentiable w.r.t. hidden and lm_head."""
        h = hidden.index_select(0, index)                                     # (M, D)
        return ChunkedTokenLogps.apply(h, self.lm_head.weight, self.lm_head.bias, targets, chunk_size)

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Sample continuations with a KV cache, all prompts at once. Returns the new tokens of each
        prompt (up to and including eos_id). temperature 0 = greedy.

        Prompts of different lengths are left-padded: pad keys are masked out, and each row's positions
        count only its real tokens, so every row computes exactly what it would compute alone."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs a non-empty list of non-empty prompts")
        check_sampling(temperature, top_p)
        c, device = self.config, self.tok_embeddings.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        T_max = T0 + max_new_tokens
        if c.positions == "learned" and T_max > c.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {T_max} exceeds the model's {c.max_seq_len} positions")
        ids = torch.zeros(B, T0, dtype=torch.long, device=device)
        key_valid = torch.zeros(B, T_max, dtype=torch.bool, device=device)   # real (non-pad) cache slots
        for b, p in enumerate(prompts):
            ids[b, T0 - len(p):] = torch.tensor(p, device=device)
            key_valid[b, T0 - len(p):T0] = True
        key_pos = torch.zeros(B, T_max, dtype=torch.long, device=device)
        key_pos[:, :T0] = (key_valid[:, :T0].cumsum(1) - 1).clamp(min=0)
        caches = [KVCache(B, T_max, c.n_kv_heads, c.head_dim, self.tok_embeddings.weight.dtype, device)
                  for _ in self.layers]
        # prefill: the whole (padded) prompt in one pass
        i = torch.arange(T0, device=device)
        mask = key_valid[:, None, :T0] & (i[:, None] >= i[None, :])          # (B, T0, T0)
        mask = self._windowed(mask, key_pos[:, :T0, None], key_pos[:, None, :T0])
        mask |= torch.eye(T0, dtype=torch.bool, device=device)               # pad rows attend to themselves
        hidden = self._trunk(ids, key_pos[:, :T0], Layout("dense", mask=mask[:, None]), caches)
        logits = self.lm_head(hidden[:, -1])                                  # (B, V)
        out, done = [[] for _ in range(B)], [False] * B
        pos = key_pos[:, T0 - 1] + 1                                          # (B,) next position per row
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, generator)          # (B,)
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            t = T0 + step
            key_valid[:, t], key_pos[:, t] = True, pos
            mask = self._windowed(key_valid[:, None, :t + 1], pos[:, None, None], key_pos[:, None, :t + 1])
            hidden = self._trunk(tok[:, None], pos[:, None], Layout("dense", mask=mask[:, None]), caches)
            logits = self.lm_head(hidden[:, -1])
            pos = pos + 1
        return out

    def _windowed(self, mask, pos_q, pos_k):
        w = self.config.sliding_window
        return mask if w is None else mask & (pos_q - pos_k < w)

    # --- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Transformer":
        """A preset name, local HF directory or Hub repo id -> model with its weights, in `dtype` on `device`.
        The "tiny" preset (a ModelConfig, not a checkpoint) gives a randomly initialised model."""
        preset = PRESETS.get(str(name_or_path))
        if isinstance(preset, ModelConfig) and not Path(name_or_path).is_dir():
            return cls(preset).to(device=device, dtype=dtype)
        ckpt = resolve_checkpoint(name_or_path)
        config = load_config(ckpt)
        with torch.device("meta"):          # no memory, no init: the checkpoint provides every value
            model = cls(config)
        for name, tensor in iter_hf_tensors(ckpt, config):
            module_name, _, leaf = name.rpartition(".")
            # assign (not copy) the freshly read tensor: one copy of the weights, never two
            param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=True)
            setattr(model.get_submodule(module_name), leaf, param)
        model.tie_weights()
        left = [n for n, p in model.named_parameters() if p.is_meta]
        assert not left, f"parameters left unloaded: {left[:3]}"   # iter_hf_tensors validated; cannot happen
        return model

    def save_pretrained(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """config.json + safetensors (sharded above max_shard_bytes) that transformers loads."""
        return save_hf_state_dict(dict(self.named_parameters()), self.config, out_dir, max_shard_bytes)


def check_sampling(temperature: float, top_p: float) -> None:
    """The one check of the sampling settings (generate() and eval_rm.py's flag checks call it)."""
    if not (0.0 < top_p <= 1.0) or not temperature >= 0:
        raise ValueError(f"sampling needs 0 < top_p <= 1 and temperature >= 0, got top_p={top_p}, "
                         f"temperature={temperature}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the tokens strictly more likely than it already reach top_p (the first is
        # always kept, as top_p > 0)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(h W^T + b)[target] in float32, computed over chunks of rows.

    Why a custom Function: with plain autograd every chunk's (chunk, V) float32 logits and log-softmax
    output would be saved for backward, so memory would again be the full (M, V) float32 tensor (a 7B
    model with V = 32k and M = 16k targets: 2 GiB per copy). Here forward keeps only h and one
    logsumexp per row; backward recomputes each chunk's logits and uses the closed form
    d logp[t] / d logits = onehot(t) - softmax(logits), so at most one chunk of logits exists at a time.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        M = h.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=h.device)
        lse = torch.empty(M, dtype=torch.float32, device=h.device)
        for s in range(0, M, chunk_size):
            e = s + chunk_size
            logits = F.linear(h[s:e], weight, bias).float()                  # (C, V)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            out[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        # backward runs outside autocast: remember it, so the recomputed logits match the forward's
        dev = h.device.type
        ctx.amp_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        amp = torch.autocast(h.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None)
        for s in range(0, h.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            hc, g = h[s:e], grad_out[s:e].float()
            with amp:
                logits = F.linear(hc, weight, bias).float()                  # recomputed, (C, V)
            grad_logits = logits.sub_(lse[s:e, None]).exp_().mul_(-g[:, None])  # -g * softmax, in place
            grad_logits.scatter_add_(1, targets[s:e, None], g[:, None])      # + g * onehot(target)
            if need_b:
                grad_b += grad_logits.sum(0)
            if need_w:   # accumulate over chunks in float32 even for bf16 weights
                grad_w.addmm_(grad_logits.t(), hc.float())
            if need_h:
                with amp:
                    grad_h[s:e] = (grad_logits.to(weight.dtype) @ weight).to(h.dtype)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


# -----------------------------------------------------------------------------
# 4. Checkpoints: Hub download, name maps, strict loading, saving


_ALLOW = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",   # GPT-2-style BPE (OPT)
          "*.safetensors", "model.safetensors.index.json"]


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """Preset name -> Hub id; an existing directory is used as it is; anything else is a Hub repo id,
    downloaded (config, tokenizer and safetensors only, never pickled .bin) into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint directory {path} has no config.json")
        return path
    preset = PRESETS.get(str(name_or_path), str(name_or_path))
    if isinstance(preset, ModelConfig):
        raise CheckpointError(f"preset {name_or_path!r} is a random-init config, not a checkpoint "
                              f"on disk or on the Hub")
    repo_id = preset
    looks_like_path = str(name_or_path).startswith((".", "/", "~"))
    if repo_id == str(name_or_path) and (looks_like_path or (path.parent != Path(".") and path.parent.is_dir())):
        # "out/finall" is a mistyped path, not the Hub repo "finall" of a user named "out"
        why = "it is a path" if looks_like_path else f"its folder {path.parent}/ exists here"
        raise CheckpointError(f"{name_or_path!r}: no such directory ({why}, so it is not looked up on the Hub)")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{name_or_path!r} is neither a directory, a preset ({', '.join(PRESETS)}) "
                              f"nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_ALLOW))
    except GatedRepoError:
        raise CheckpointError(f"Hub repo {repo_id} is gated: accept its license on huggingface.co, then log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hub repo {repo_id} does not exist or is private "
                              f"(a private repo needs HF_TOKEN)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot get {repo_id}: it is not in the local Hugging Face cache and the Hub is not "
                              f"reachable (offline, or HF_HUB_OFFLINE=1): {type(e).__name__}") from None
    if not any(local.glob("*.safetensors")):
        ref = _safetensors_pr(repo_id)
        if ref is None:
            raise CheckpointError(f"Hub repo {repo_id} has no *.safetensors weights (only pickled files, which are not "
                                  f"loaded for safety), nor a safetensors pull request by the Hub's conversion bot; "
                                  f"convert it to safetensors first")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {repo_id} has no safetensors on main; using those of {ref}, the Hub bot's conversion "
                  f"pull request on top of main (as transformers does)")
        try:
            local = Path(snapshot_download(repo_id, revision=ref, allow_patterns=_ALLOW))
        except Exception as e:   # the network failed between the two downloads (any client error)
            raise CheckpointError(f"cannot get {repo_id} at {ref}: {type(e).__name__}: {e}") from None
    return local


_CONVERSION_PR = "Adding `safetensors` variant of this model"


def _safetensors_pr(repo_id: str) -> str | None:
    """The git reference (refs/pr/N) of the open safetensors conversion pull request that the Hub's bot
    (SFconvertbot) made of repo_id, if that PR sits directly on top of main; else None. Repos older than
    safetensors (facebook/opt-*) often have safetensors weights only there; transformers loads them from the
    same PR. Only the bot's PR is trusted, and only when its parent is the current main, so that it can add
    nothing but the converted files."""
    import huggingface_hub
    from huggingface_hub import HfApi, get_repo_discussions
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return _cached_conversion_pr(repo_id)
    try:
        api = HfApi()
        main = api.list_repo_commits(repo_id)[0].commit_id
        for pr in get_repo_discussions(repo_id, author="SFconvertbot", discussion_type="pull_request",
                                       discussion_status="open"):
            if pr.title == _CONVERSION_PR and pr.author == "SFconvertbot":   # the filter, checked again
                commits = api.list_repo_commits(repo_id, revision=pr.git_reference)
                if len(commits) > 1 and commits[1].commit_id == main:
                    return pr.git_reference
    except Exception:   # unreachable Hub, rate limits: the HTTP client's errors are not all OSErrors
        return _cached_conversion_pr(repo_id)
    return None


def _cached_conversion_pr(repo_id: str) -> str | None:
    """Offline: a refs/pr/N revision of repo_id with safetensors in the local HF cache (it was checked by
    _safetensors_pr when it was downloaded), or None."""
    from huggingface_hub import constants, scan_cache_dir
    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except Exception:   # no cache yet, or a corrupted one
        return None
    for repo in repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for rev in repo.revisions:
                prs = sorted(r for r in rev.refs if r.startswith("refs/pr/"))
                if prs and any(f.file_name.endswith(".safetensors") for f in rev.files):
                    return prs[0]
    return None


def resolve_model(name: str) -> tuple[ModelConfig, Path | None]:
    """(ModelConfig, checkpoint dir) of a preset, local HF dir or Hub id; a weightless preset (tiny) has no
    checkpoint dir (None): it is randomly initialised (random_init_tensors)."""
    preset = PRESETS.get(str(name))
    if isinstance(preset, ModelConfig) and not Path(str(name)).is_dir():
        return preset, None
    ckpt_dir = resolve_checkpoint(name)     # clear errors: unknown name, offline and not cached
    return load_config(ckpt_dir), ckpt_dir


def random_init_tensors(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The random init of a weightless preset from `seed`, as (name, tensor) pairs: every rank (and a
    one-process run) builds the same full model on the CPU, so all start from identical weights. The global
    RNG is left as it was. Only sensible for small presets."""
    cpu_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    full = Transformer(config)
    torch.set_rng_state(cpu_rng)
    yield from full.state_dict().items()


def load_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object of config keys")
    try:
        return ModelConfig.from_hf(hf)
    except ModelConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None


# Our module names -> HF module names, per family ({i} is the layer index).
_LLAMA_NAMES = {
    "tok_embeddings": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "layers.{i}.attn.wq": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.wk": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.wv": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.wo": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.mlp.w1": "model.layers.{i}.mlp.gate_proj", "layers.{i}.mlp.w3": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.w2": "model.layers.{i}.mlp.down_proj",
}
_HF_NAMES = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "phi": {
        "tok_embeddings": "model.embed_tokens", "norm": "model.final_layernorm", "lm_head": "lm_head",
        "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm",
        "layers.{i}.attn.wq": "model.layers.{i}.self_attn.q_proj",
        "layers.{i}.attn.wk": "model.layers.{i}.self_attn.k_proj",
        "layers.{i}.attn.wv": "model.layers.{i}.self_attn.v_proj",
        "layers.{i}.attn.wo": "model.layers.{i}.self_attn.dense",
        "layers.{i}.mlp.w1": "model.layers.{i}.mlp.fc1", "layers.{i}.mlp.w2": "model.layers.{i}.mlp.fc2",
    },
    "opt": {
        "tok_embeddings": "model.decoder.embed_tokens", "pos_embeddings": "model.decoder.embed_positions",
        "project_in": "model.decoder.project_in", "project_out": "model.decoder.project_out",
        "norm": "model.decoder.final_layer_norm", "lm_head": "lm_head",
        "layers.{i}.attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
        "layers.{i}.mlp_norm": "model.decoder.layers.{i}.final_layer_norm",
        "layers.{i}.attn.wq": "model.decoder.layers.{i}.self_attn.q_proj",
        "layers.{i}.attn.wk": "model.decoder.layers.{i}.self_attn.k_proj",
        "layers.{i}.attn.wv": "model.decoder.layers.{i}.self_attn.v_proj",
        "layers.{i}.attn.wo": "model.decoder.layers.{i}.self_attn.out_proj",
        "layers.{i}.mlp.w1": "model.decoder.layers.{i}.fc1", "layers.{i}.mlp.w2": "model.decoder.layers.{i}.fc2",
    },
}


def hf_name(name: str, family: str) -> str:
    """Our parameter name -> the HF checkpoint name,
    e.g. layers.3.attn.wq.weight -> model.layers.3.self_attn.q_proj.weight (llama)."""
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    key = f"layers.{{i}}.{m[2]}" if m else module
    return _HF_NAMES[family][key].format(i=m[1] if m else "") + "." + leaf


def expected_params(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes (a tied lm_head appears once, as tok_embeddings.weight)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Transformer(config).named_parameters()}


def _checkpoint_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = [ckpt_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not in {ckpt_dir} "
                                  f"({', '.join(missing[:3])}): an interrupted download?")
        return files
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt_dir} has no *.safetensors files")
    return files


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """safe_open, with an unreadable file (truncated, not safetensors) reported as a CheckpointError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): a truncated download?") from None


def _ignored(hf_key: str, config: ModelConfig) -> bool:
    # old Llama exports saved the rotary inverse frequencies (a constant, not a weight); a tied
    # checkpoint may carry a duplicate lm_head.weight (HF drops it the same way; iter_hf_tensors loads
    # it as the embedding when the embedding itself is absent)
    return hf_key.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and hf_key == "lm_head.weight")


def iter_hf_tensors(ckpt_dir: str | Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our parameter name, tensor) from a (possibly sharded) HF safetensors checkpoint, one
    tensor at a time. Everything is validated from the safetensors headers before the first tensor
    is read: a missing, unexpected or wrongly shaped tensor raises CheckpointError naming the first few."""
    ckpt_dir = Path(ckpt_dir)
    expected = expected_params(config)
    to_ours = {hf_name(n, config.family): n for n in expected}
    plan, unexpected, bad_shape = [], [], []           # plan: (file, hf key, our name)
    tied_head = None                                   # (file, shape) of a tied checkpoint's lm_head.weight
    for file in _checkpoint_files(ckpt_dir):
        with _open_safetensors(file) as f:
            for key in f.keys():
                # some checkpoints (old OPT exports) omit the base model's "model." prefix
                hf_key = key if key in to_ours or "model." + key not in to_ours else "model." + key
                if config.tie_embeddings and hf_key == "lm_head.weight":
                    tied_head = (file, tuple(f.get_slice(key).get_shape()))
                if hf_key not in to_ours:
                    if not _ignored(hf_key, config):
                        unexpected.append(key)
                    continue
                ours = to_ours[hf_key]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[ours]:
                    bad_shape.append(f"{key} {shape} (expected {expected[ours]})")
                plan.append((file, key, ours))
    loaded = {ours for _, _, ours in plan}
    if tied_head and "tok_embeddings.weight" not in loaded:
        # a conversion that kept one name per shared tensor may have kept the tied matrix as lm_head.weight
        file, shape = tied_head
        if shape != expected["tok_embeddings.weight"]:
            bad_shape.append(f"lm_head.weight {shape} (expected {expected['tok_embeddings.weight']})")
        plan.append((file, "lm_head.weight", "tok_embeddings.weight"))
        loaded.add("tok_embeddings.weight")
    missing = [hf for hf, ours in to_ours.items() if ours not in loaded]
    problems = [f"{what} {len(names)}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
                if names]
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit its config ({config.family}): "
                              + "; ".join(problems))
    for file in dict.fromkeys(p[0] for p in plan):
        with _open_safetensors(file) as f:
            for _, key, ours in (p for p in plan if p[0] == file):
                yield ours, f.get_tensor(key)


def plain_name(name: str) -> str:
    """A parameter name without what wrappers (torch.compile, activation checkpointing, DDP) insert into it."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def save_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                       max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json and HF-named safetensors; more than one file (plus model.safetensors.index.json)
    when the weights exceed max_shard_bytes. A tied lm_head is not written, as HF does."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_params(config)
    tensors = {}
    for name, t in state_dict.items():
        name = plain_name(name)
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        if name not in expected:
            raise CheckpointError(f"state dict has {name!r}, which a {config.family} model with this config "
                                  f"does not have")
        tensors[hf_name(name, config.family)] = t.detach().contiguous()
    missing = [n for n in expected if hf_name(n, config.family) not in tensors]
    if missing:
        raise CheckpointError(f"state dict is missing {len(missing)} parameter(s), e.g. {missing[:4]}")
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in list(out_dir.glob("*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)   # stale shards from an earlier save would be loaded too
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = config.to_hf()
    hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    return out_dir
