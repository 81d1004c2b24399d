"""
A decoder-only Transformer in one file: Llama, Mistral, OPT and Phi (the families differ by ModelConfig's behaviour
flags), Hugging Face safetensors in and out, and a padding-free packed forward for ORPO training.

A packed batch (data.PackedBatch) is N tokens in one stream of S segments, seg_lens[s] = (shared_len, chosen_len,
rejected_len). A token attends to earlier tokens of its own segment, a rejected token never to a chosen one, and
rejected positions restart at the end of the prompt: the prompt is computed once for both answers, and every answer
token sees what it would in its own [prompt | answer]. No transformers at run time (tests: logits to 1e-4, fp32).
"""

from __future__ import annotations

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
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class ModelConfigError(ValueError):
    """A config.json (or ModelConfig) we cannot build a model from."""


class CheckpointError(ValueError):
    """A checkpoint we cannot find, download or load."""


# ----------------------------------------------------------------------------- 1. Config

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
    norm: str = "rmsnorm"            # rmsnorm (llama, mistral) | layernorm (opt, phi)
    norm_eps: float = 1e-5
    norm_affine: bool = True         # OPT's layer_norm_elementwise_affine
    pre_norm: bool = True            # False: post-LN, norm after each residual add (OPT-350m)
    final_norm: bool = True          # a norm after the last block (OPT post-LN has none)
    parallel_residual: bool = False  # Phi: x + attn(ln(x)) + mlp(ln(x)), one norm per block
    attn_bias: bool = False          # q, k, v and output projections
    mlp_bias: bool = False
    lm_head_bias: bool = False       # Phi
    mlp_kind: str = "swiglu"         # swiglu: w2(silu(w1 x) * w3 x); gelu | gelu_tanh (Phi) | relu: w2(act(w1 x))
    positions: str = "rope"          # rope | learned (OPT; table indexed with position + 2)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0     # Phi rotates only the first 40% of each head's dims
    rope_scaling: dict | None = None # None = plain RoPE, else HF's keys, e.g. {"rope_type": "linear", "factor": 2.0}
    embed_dim: int | None = None     # OPT's word_embed_proj_dim: != dim adds project_in / project_out
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` positions only
    tie_embeddings: bool = False     # lm_head.weight is tok_embeddings.weight
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ModelConfigError(f"model family {self.family!r} is not supported; use one of {sorted(_FAMILIES)}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ModelConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.head_dim = self.dim // self.n_heads if self.head_dim is None else self.head_dim
        self.embed_dim = self.dim if self.embed_dim is None else self.embed_dim
        if self.embed_dim != self.dim and self.family != "opt":
            raise ModelConfigError(f"embed_dim {self.embed_dim} != dim {self.dim} (project_in/out) exists only in "
                                   f"OPT checkpoints, not in family {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("mlp_kind", tuple(_ACTIVATIONS)),
                              ("positions", ("rope", "learned"))):
            if getattr(self, name) not in allowed:
                raise ModelConfigError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.rotary_dim % 2:
            raise ModelConfigError(f"rotary dims {self.rotary_dim} (head_dim * rotary_fraction) must be even")
        s = self.rope_scaling
        keys = _ROPE_SCALING_KEYS.get(s.get("rope_type")) if isinstance(s, dict) else None
        if s is not None and (keys is None or set(s) != {"rope_type", *keys}):
            raise ModelConfigError(f"ModelConfig.rope_scaling={s!r}: want None or a dict of a rope_type and exactly "
                                   f"the keys that type takes: {_ROPE_SCALING_KEYS}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction) if self.positions == "rope" else 0


_FAMILIES = ("llama", "mistral", "opt", "phi")
_ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
                "relu": F.relu}
# The rope scaling types we implement, and the keys each reads (transformers' names); not "dynamic" (NTK), whose
# frequencies depend on the longest sequence seen at run time.
_ROPE_SCALING_KEYS = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


# The families the paper trains (Table 1), by Hub repo id, plus a tiny random Llama for the CPU demo.
PRESETS: dict[str, str | ModelConfig] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1", "llama2-7b": "meta-llama/Llama-2-7b-hf", "phi-2": "microsoft/phi-2",
    "opt-125m": "facebook/opt-125m", "opt-350m": "facebook/opt-350m", "opt-1.3b": "facebook/opt-1.3b",
    "tiny": ModelConfig(family="llama", vocab_size=512, dim=96, n_layers=3, n_heads=6, n_kv_heads=2,
                        ffn_dim=256, max_seq_len=1024, norm_eps=1e-5, tie_embeddings=True),
}


# ----------------------------------------------------------------------------- 2. The model

class RMSNorm(nn.RMSNorm):
    def forward(self, x):
        # normalise in float32 (bf16 sums of squares lose precision), scale in the input dtype, as Llama does
        return self.weight * F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)


def make_norm(c: ModelConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(c.dim, eps=c.norm_eps)
    return nn.LayerNorm(c.dim, eps=c.norm_eps, elementwise_affine=c.norm_affine, bias=c.norm_affine)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """(rotary_dim / 2,) float32 speeds theta^(-2i / rotary_dim), scaled, in transformers' float32 op order."""
    d = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":           # every frequency slowed by the factor = positions divided by it
        return inv_freq / s["factor"]
    # "llama3" (Llama 3.1+) slows only the dims whose wavelength is long against the pretraining context L: under
    # L / high_freq_factor they turn many times within L and are kept, over L / low_freq_factor slowed by `factor`.
    L, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - low) / (high - low)                           # 0 at L / low, 1 at L / high
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return torch.where(wavelen < L / high, inv_freq,
                       torch.where(wavelen > L / low, inv_freq / s["factor"], blended))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (*P, H, hd): rotate each head's first 2 * half dims, HF's "rotate half" pairing (i, i + half); Phi keeps the
    rest. cos, sin (*P, half)."""
    half = cos.shape[-1]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)   # broadcast over heads
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attn_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.attn_bias)

    def forward(self, x, rope, layout: Layout, cache: list | None = None):
        lead = x.shape[:-1]                                                   # (N,) packed or (B, T)
        q = self.wq(x).view(*lead, self.n_heads, self.head_dim)
        k = self.wk(x).view(*lead, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(*lead, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:   # generation: this block's keys and values so far, [(B, Tk, Hkv, hd)] * 2
            cache[:] = [torch.cat([cached, new], 1) for cached, new in zip(cache, (k, v))] if cache else [k, v]
            k, v = cache
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
        return self.w2(h if self.w3 is None else h * self.w3(x))


class Block(nn.Module):
    """One decoder layer. Only static config flags branch here, so torch.compile traces it without graph breaks."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.parallel_residual, self.pre_norm = c.parallel_residual, c.pre_norm
        self.attn_norm = make_norm(c)
        self.attn = Attention(c)
        self.mlp_norm = None if c.parallel_residual else make_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, rope, layout: Layout, cache: list | None = None):
        if self.parallel_residual:   # Phi: attention and MLP read the same normed input
            h = self.attn_norm(x)
            return x + self.attn(h, rope, layout, cache) + self.mlp(h)
        if self.pre_norm:            # Llama, Mistral, most OPTs
            x = x + self.attn(self.attn_norm(x), rope, layout, cache)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope, layout, cache))              # OPT-350m: post-LN
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attention: str | None = "auto"):
        super().__init__()
        c = self.config = config
        self.attention = attention   # the packed forward's kernel, see pick_attention (None = "auto")
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.embed_dim)
        self.pos_embeddings = nn.Embedding(c.max_seq_len + 2, c.dim) if c.positions == "learned" else None
        self.project_in = nn.Linear(c.embed_dim, c.dim, bias=False) if c.embed_dim != c.dim else nn.Identity()
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = make_norm(c) if c.final_norm else nn.Identity()
        self.project_out = nn.Linear(c.dim, c.embed_dim, bias=False) if c.embed_dim != c.dim else nn.Identity()
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=c.lm_head_bias)
        self.activation_checkpointing = False  # True: recompute each block in backward (memory for compute)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self):
        """Re-point lm_head at the embedding (needed again after to_empty / assign-loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self):
        """N(0, 0.02), zero biases, unit norms; wo and w2 (into the residual stream) / sqrt(2 n_layers), as GPT-2."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                deep = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layers) if deep else 0.02)

    def _trunk(self, input_ids, position_ids, layout: Layout, caches=None) -> torch.Tensor:
        """Tokens (*P,) with positions (*P,) -> final hidden (*P, embed_dim), before lm_head."""
        c = self.config
        x = self.project_in(self.tok_embeddings(input_ids))
        if self.pos_embeddings is not None:
            # a learned table has max_seq_len rows to index (an index past it is a CUDA device assert)
            if int(position_ids.max()) >= c.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} is past the {c.max_seq_len} learned positions "
                                 f"of this {c.family} model: sequences may be at most {c.max_seq_len} tokens long")
            x = x + self.pos_embeddings(position_ids + 2)   # OPT reserves the table's first two rows
        angles = position_ids.float()[..., None] * rope_inv_freq(c, position_ids.device)   # (*P, rotary_dim / 2)
        rope = (angles.cos(), angles.sin()) if c.positions == "rope" else None   # once for all blocks, fp32 as HF
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block, cache in zip(self.layers, caches or [None] * len(self.layers)):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layout, cache, use_reentrant=False)
            else:
                x = block(x, rope, layout, cache)
        return self.project_out(self.norm(x))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """An ordinary batch of equal-length causal sequences: (B, T) -> logits (B, T, V)."""
        B, T = input_ids.shape
        i, w = torch.arange(T, device=input_ids.device), self.config.sliding_window
        mask = (i[:, None] >= i) & (i[:, None] - i < (w or T))          # causal, and within Mistral's window
        return self.lm_head(self._trunk(input_ids, i.expand(B, T), Layout("sdpa", w, mask)))

    def packed_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      seg_lens: torch.Tensor) -> torch.Tensor:
        """The padding-free forward: (N,), (N,), (S, 3) -> final hidden states (N, embed_dim)."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape or int(seg_lens.sum()) != len(input_ids):
            raise ValueError(f"packed batch mismatch: input_ids {tuple(input_ids.shape)}, position_ids "
                             f"{tuple(position_ids.shape)}, seg_lens summing to {int(seg_lens.sum())}")
        # the kernel follows attention's compute dtype: bf16 under bf16 autocast, even with float32 weights
        on = input_ids.device.type
        dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else self.tok_embeddings.weight.dtype
        layout = packed_layout(seg_lens.cpu(), position_ids, self.config.sliding_window, dtype, self.attention)
        return self._trunk(input_ids, position_ids, layout)

    def token_logps(self, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
        """log p(targets[m] | row index[m] of hidden) in float32, (M,), differentiable w.r.t. hidden and lm_head."""
        h = hidden.index_select(0, index)                                     # (M, D)
        return ChunkedTokenLogps.apply(h, self.lm_head.weight, self.lm_head.bias, targets, chunk_size)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, eos_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """The new tokens of each prompt, sampled with a KV cache (temperature 0: greedy), up to and including the EOS
        that ends the row: eos_id, a token or a list; None = config.eos_token_id; [] = never stop early. Prompts are
        left-padded, pad keys masked out, positions counted over real tokens: each row computes what it would alone."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs a non-empty list of non-empty prompts")
        check_sampling(temperature, top_p)
        c, device = self.config, self.tok_embeddings.weight.device
        eos = c.eos_token_id if eos_id is None else eos_id
        eos = torch.tensor([] if eos is None else eos, dtype=torch.long, device=device).view(-1)   # (E,)
        T0 = max(len(p) for p in prompts)
        T_max = T0 + max_new_tokens
        if c.positions == "learned" and T_max > c.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {T_max} exceeds the model's {c.max_seq_len} positions")
        ids = torch.tensor([[0] * (T0 - len(p)) + list(p) + [0] * max_new_tokens for p in prompts], device=device)
        slot = torch.arange(T_max, device=device)
        real = slot >= T0 - torch.tensor([len(p) for p in prompts], device=device)[:, None]   # (B, T_max) not padding
        pos = (real.cumsum(1) - 1).clamp(min=0)                             # (B, T_max)
        caches, start = [[] for _ in self.layers], 0
        for end in range(T0, T_max):   # the first pass reads the whole (padded) prompt, the others one token
            q, k = slot[start:end, None], slot[None, :end]
            mask = (real[:, None, :end] & (k <= q)) | (k == q)                 # (B, Tq, Tk); pad rows see themselves
            if c.sliding_window is not None:
                mask &= pos[:, start:end, None] - pos[:, None, :end] < c.sliding_window
            hidden = self._trunk(ids[:, start:end], pos[:, start:end], Layout("sdpa", mask=mask[:, None]), caches)
            ids[:, end], start = sample_next(self.lm_head(hidden[:, -1]), temperature, top_p, generator), end
            if torch.isin(ids[:, T0:end + 1], eos).any(1).all():
                break
        new, eos = ids[:, T0:start + 1].tolist(), set(eos.tolist())         # nothing when max_new_tokens = 0
        return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in new]

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
        """A preset, local HF directory or Hub repo id -> the model; a weightless preset (tiny) is randomly initialised
        from `seed` as train.py does (random_init_tensors), else from the global RNG."""
        config, ckpt = resolve_model(name_or_path)
        if ckpt is None:
            model = cls(config)
            if seed is not None:
                model.load_state_dict(dict(random_init_tensors(config, seed)))
            return model.to(device=device, dtype=dtype)
        with torch.device("meta"):          # no memory, no init: the checkpoint provides every value
            model = cls(config)
        for name, tensor in iter_hf_tensors(ckpt, config):   # assign (not copy) each: one copy of the weights
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor.to(device=device, dtype=dtype)))
        model.tie_weights()
        return model

    def matmul_params(self) -> int:
        """The parameters MFU counts, as torchtitan (get_num_params(exclude_embedding=True)): not the input embedding
        (nor OPT's learned positions), a lookup; but a tied matrix is also the lm_head's matmul: counted once."""
        lookups = [p for n, p in self.named_parameters() if "embeddings" in n and p is not self.lm_head.weight]
        return sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in lookups)

    def save_pretrained(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """config.json + safetensors (sharded above max_shard_bytes) that transformers loads."""
        return save_hf_state_dict(dict(self.named_parameters()), self.config, out_dir, max_shard_bytes)


# FLOPs, for MFU (train.py's log line and the benchmarks)
# dense bf16 tensor-core peak, FLOP/s, by substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "MI300": 1307e12}


def attention_pairs(seg_lens: torch.Tensor) -> float:
    """(query, key) pairs the attention mask allows, summed over the segments (p, c, r) of a packed batch:
    [prompt|chosen] is causal, (p + c)(p + c + 1) / 2, and each rejected query sees the prompt and the
    rejected tokens up to itself, r * p + r(r + 1) / 2. The unshared layout is c = r = 0 per sequence."""
    p, c, r = (x.double() for x in seg_lens.unbind(1))
    return float(((p + c) * (p + c + 1) / 2 + r * p + r * (r + 1) / 2).sum())


def step_flops(n_params: int, n_layers: int, d_attn: int, micro_batches) -> float:
    """Model FLOPs of one optimizer step on this rank: 6 per matmul parameter (Transformer.matmul_params) per
    token (forward + backward) plus attention, QK^T and AV at 2 * d_attn FLOPs each per allowed (query, key) pair
    per layer forward, x3 with backward: 12 * n_layers * d_attn per pair."""
    return sum(6 * n_params * b.num_tokens + 12 * n_layers * d_attn * attention_pairs(b.seg_lens)
               for b in micro_batches)


def check_sampling(temperature: float, top_p: float) -> None:
    """The one check of the sampling settings (generate() and eval_rm.py's flag checks call it)."""
    if not (0.0 < top_p <= 1.0) or not temperature >= 0:
        raise ValueError(f"sampling needs 0 < top_p <= 1 and temperature >= 0, got {top_p=}, {temperature=}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token once the tokens more likely than it reach top_p (the first is kept, as top_p > 0)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(h W^T + b)[target] in float32, over chunks of rows. Plain autograd would save every chunk's (C, V)
    float32 logits and log-softmax for backward: the full (M, V) again (V = 32k, M = 16k targets: 2 GiB per copy).
    Here forward keeps h and one logsumexp per row; backward recomputes each chunk's logits and uses the closed form
    d logp[t] / d logits = onehot(t) - softmax(logits), so at most one chunk of logits exists at a time."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        out, lse = [], []
        for hc, tc in zip(h.split(chunk_size), targets.split(chunk_size)):
            logits = F.linear(hc, weight, bias).float()                      # (C, V)
            lse.append(torch.logsumexp(logits, dim=-1))
            out.append(logits.gather(1, tc[:, None]).squeeze(1) - lse[-1])
        ctx.save_for_backward(h, weight, bias, targets, torch.cat(lse))
        ctx.chunk_size = chunk_size
        # backward runs outside autocast: remember it, so the recomputed logits match the forward's
        ctx.amp_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse = ctx.saved_tensors
        grad_h, n = [], ctx.chunk_size
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)   # float32 even for bf16
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        amp = torch.autocast(h.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None)
        for hc, tc, lc, g in zip(h.split(n), targets.split(n), lse.split(n), grad_out.float().split(n)):
            with amp:
                logits = F.linear(hc, weight, bias).float()                  # recomputed, (C, V)
            grad_logits = logits.sub_(lc[:, None]).exp_().mul_(-g[:, None])   # -g * softmax, in place
            grad_logits.scatter_add_(1, tc[:, None], g[:, None])             # + g * onehot(target)
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            grad_w.addmm_(grad_logits.t(), hc.float())
            with amp:
                grad_h.append((grad_logits.to(weight.dtype) @ weight).to(h.dtype))
        return torch.cat(grad_h), grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype), None, None


# ----------------------------------------------------------------------------- 3. Attention

KERNELS = ("auto", "sdpa", "flash", "varlen")


@functools.cache
def _varlen_kernels():
    """(flash_attn_varlen_func, torch's varlen_attn (torch >= 2.10), its keywords); None: not installed (or broken)."""
    try:
        from flash_attn import flash_attn_varlen_func as flash
    except Exception:
        flash = None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return flash, None, set()
    return flash, varlen_attn, set(inspect.signature(varlen_attn).parameters)


def pick_attention(requested: str | None, device: torch.device, dtype: torch.dtype,
                   window: int | None = None) -> str:
    """The kernel for `requested` here: "auto" (or None) flash-attn, else torch varlen, else SDPA; a named one, or a
    ModelConfigError (one line, with the remedy) when it cannot run on this device and dtype."""
    requested = requested or "auto"
    if requested not in KERNELS:
        raise ValueError(f"attention kernel {requested!r} is not one of {KERNELS}")
    # the varlen kernels are CUDA-only and half-precision-only; fp32 or CPU tensors take the SDPA path
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    flash, varlen, params = _varlen_kernels()
    flash_ok = fast_ok and flash is not None
    varlen_ok = fast_ok and varlen is not None and (window is None or "window_size" in params)
    if requested == "flash" and not flash_ok:
        raise ModelConfigError("attention 'flash' (--attention flash) needs flash-attn installed (pip install -r "
                               "requirements-gpu.txt) and fp16/bf16 CUDA tensors; use auto or sdpa")
    if requested == "varlen" and not varlen_ok:
        raise ModelConfigError("attention 'varlen' (--attention varlen) needs torch.nn.attention.varlen on fp16/bf16 "
                               "CUDA tensors (and torch >= 2.12 for a sliding window); use auto or sdpa")
    return requested if requested != "auto" else "flash" if flash_ok else "varlen" if varlen_ok else "sdpa"


@dataclass
class Layout:
    """Everything attention needs besides q, k, v, built once per forward for all blocks. A packed batch: `calls`,
    each (q_index, kv_index, cu_q, cu_k, max_q, max_k) (see _varlen_layout), run by the `backend` kernel (SDPA: see
    _sdpa_call). A batched one (forward, generate): one SDPA call under a bool `mask` (True = attend)."""
    backend: str
    window: int | None = None
    mask: torch.Tensor | None = None
    calls: tuple = ()
    unperm_index: torch.Tensor | None = None   # (N,) row of cat(call outputs) holding each packed row


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, for every layout. k, v may have fewer (GQA) heads than q.
    Packed: (N, H, hd), (N, Hkv, hd) -> (N, H, hd). Batched: (B, T, H, hd), (B, Tk, Hkv, hd) -> (B, T, H, hd)."""
    if layout.calls:                                      # packed: the layout's calls, then the rows back in order
        outs = []
        for q_index, kv_index, *lens in layout.calls:     # index None: all N rows, in order
            qc = q if q_index is None else q[q_index]
            kc, vc = (k, v) if kv_index is None else (k[kv_index], v[kv_index])
            outs.append((_sdpa_call if layout.backend == "sdpa" else _varlen_call)(layout, qc, kc, vc, *lens))
        return outs[0] if layout.unperm_index is None else torch.cat(outs).index_select(0, layout.unperm_index)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # batched
                                          attn_mask=layout.mask, enable_gqa=k.shape[-2] != q.shape[-2]).transpose(1, 2)


def _sdpa_call(L: Layout, q, k, v, cu_q, cu_k, max_q, max_k):
    """A varlen call on SDPA (the CPU and float32 path): its segments padded to one (S, max_q, max_k) grid under one
    mask (bottom-right causal as the varlen kernels: query i of n_q sits at key i + n_k - n_q; the window), or one by
    one where padding would more than double the work; never one (N, N) mask over the batch, all masked-out work and
    quadratic in the batch. Sizes are Python ints: torch.compile traces it without data-dependent shapes."""
    spans = list(zip(cu_q, cu_q[1:], cu_k, cu_k[1:]))                       # queries a:b, keys c:d
    if len(spans) > 1 and len(spans) * max_q * max_k > 2 * sum((b - a) * (d - c) for a, b, c, d in spans):
        return torch.cat([_sdpa_call(L, q, k, v, [a, b], [c, d], b - a, d - c) for a, b, c, d in spans])
    a, b, c, d = (torch.tensor(x, device=q.device)[:, None] for x in zip(*spans))   # (S, 1) each
    rows, cols = torch.arange(max_q, device=q.device), torch.arange(max_k, device=q.device)
    key_of = (rows + (d - c) - (b - a))[..., None]                          # (S, Tq, 1) each query's own key
    mask = (cols <= key_of) & (key_of - cols < (L.window or max_k)) & (cols < (d - c)[..., None])
    mask = torch.where((rows < b - a)[..., None], mask, cols == 0)          # (S, Tq, Tk); a padding row sees one key
    iq, ik = (a + rows).clamp(max=len(q) - 1), (c + cols).clamp(max=len(k) - 1)
    qg, kg, vg = (t.transpose(1, 2) for t in (q[iq], k[ik], v[ik]))        # (S, H, T, hd)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask[:, None], enable_gqa=kg.shape[1] != qg.shape[1])
    real = torch.cat([torch.arange(s[1] - s[0], device=q.device) + i * max_q for i, s in enumerate(spans)])
    return o.transpose(1, 2).flatten(0, 1).index_select(0, real)           # (n_q in all, H, hd), in packed order


def _varlen_call(L: Layout, q, k, v, cu_q, cu_k, max_q, max_k):
    # Both kernels take window_size=(left, right): query i sees keys i-left .. i+right (bottom-right
    # aligned). Our window w keeps keys with pos_i - pos_j < w, i.e. pos_i - pos_j <= w - 1: left = w - 1.
    left = L.window - 1 if L.window else -1
    flash, varlen_attn, params = _varlen_kernels()
    if L.backend == "flash":
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(left, 0))
    # torch >= 2.12: window_size, (-1, 0) = causal; torch 2.10 / 2.11: a flag, no window (pick_attention checked)
    kw = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:   # no GQA in torch 2.10 / 2.11: repeat the kv heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def packed_layout(seg_lens: torch.Tensor, position_ids: torch.Tensor, window: int | None,
                  dtype: torch.dtype, requested: str | None = "auto") -> Layout:
    """The attention layout of a packed batch, once per forward (not per block); seg_lens (S, 3) on CPU."""
    device = position_ids.device
    if window is not None and int((seg_lens[:, 0] + seg_lens[:, 1:].amax(1)).max()) <= window:
        window = None   # no sequence reaches the window: plain causal (torch 2.10 / 2.11's varlen has no window)
    return _varlen_layout(seg_lens, window, pick_attention(requested, device, dtype, window), device)


def _token_tags(seg_lens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) segment of each packed token, and (N,) its branch: 0 shared prompt, 1 chosen, 2 rejected."""
    seg_id = torch.repeat_interleave(torch.arange(len(seg_lens)), seg_lens.sum(1)).to(device)
    branch = torch.repeat_interleave(torch.arange(3).repeat(len(seg_lens)), seg_lens.flatten()).to(device)
    return seg_id, branch


def _varlen_layout(seg_lens: torch.Tensor, window: int | None, backend: str, device) -> Layout:
    """Unshared: one causal call over all segments. Shared: two. [prompt|chosen] is an ordinary causal sequence;
    rejected queries attend to [prompt|rejected] keys, causal aligned at the bottom-right (query r_k sits at key
    p + k), as the varlen kernels do when query and key lengths differ. Positions run 0..p+c-1 and p..p+r-1 (the
    contract), so index distance inside each call is position distance, and window_size is the window."""
    p, c, r = seg_lens.unbind(1)
    def cu(lens):   # (S + 1,) starts; Python ints for the SDPA path (its grid sizes: no host sync, nothing to trace)
        starts = F.pad(torch.cumsum(lens, 0), (1, 0))
        return starts.tolist() if backend == "sdpa" else starts.to(device=device, dtype=torch.int32)
    cu_main, max_main = cu((p + c)[p + c > 0]), int((p + c).max())
    if not (r > 0).any():    # unshared: no gathers needed
        return Layout(backend, window, calls=((None, None, cu_main, cu_main, max_main, max_main),))
    seg_id, branch = _token_tags(seg_lens, "cpu")
    main_index = torch.where(branch != 2)[0]                                  # (N1,) [prompt|chosen] rows
    rej_index = torch.where(branch == 2)[0]                                   # (N2,) rejected rows
    kv_index = torch.where((branch != 1) & (r > 0)[seg_id])[0]                # (N3,) [prompt|rejected] rows
    unperm = torch.argsort(torch.cat([main_index, rej_index]))               # inverse of the permutation
    main_index, rej_index, kv_index, unperm = (t.to(device) for t in (main_index, rej_index, kv_index, unperm))
    kv_lens = (p + r)[r > 0]
    return Layout(backend, window, unperm_index=unperm, calls=(
        (main_index, main_index, cu_main, cu_main, max_main, max_main),
        (rej_index, kv_index, cu(r[r > 0]), cu(kv_lens), int(r.max()), int(kv_lens.max()))))


# ----------------------------------------------------------------------------- 4. Hugging Face

_REQUIRED = object()   # a config.json key without a default
# (our field, config.json key, default when absent): read by config_from_hf, written by config_to_hf
_HF_COMMON = (("vocab_size", "vocab_size", _REQUIRED), ("dim", "hidden_size", _REQUIRED),
              ("n_layers", "num_hidden_layers", _REQUIRED), ("n_heads", "num_attention_heads", _REQUIRED),
              ("max_seq_len", "max_position_embeddings", 2048), ("bos_token_id", "bos_token_id", None),
              ("eos_token_id", "eos_token_id", None), ("pad_token_id", "pad_token_id", None))
_HF_LLAMA = (("n_kv_heads", "num_key_value_heads", None), ("head_dim", "head_dim", None),
             ("ffn_dim", "intermediate_size", _REQUIRED), ("norm_eps", "rms_norm_eps", 1e-6),
             ("tie_embeddings", "tie_word_embeddings", False))
_HF_FIELDS = {
    "llama": _HF_LLAMA + (("attn_bias", "attention_bias", False), ("mlp_bias", "mlp_bias", False)),
    "mistral": _HF_LLAMA + (("sliding_window", "sliding_window", None),),
    "phi": (("n_kv_heads", "num_key_value_heads", None), ("ffn_dim", "intermediate_size", _REQUIRED),
            ("norm_eps", "layer_norm_eps", 1e-5), ("tie_embeddings", "tie_word_embeddings", False)),
    "opt": (("ffn_dim", "ffn_dim", _REQUIRED), ("embed_dim", "word_embed_proj_dim", None),
            ("pre_norm", "do_layer_norm_before", True), ("norm_affine", "layer_norm_elementwise_affine", True),
            ("mlp_bias", "enable_bias", True), ("attn_bias", "enable_bias", True),
            ("tie_embeddings", "tie_word_embeddings", True)),
}
# HF activation names -> our mlp_kind: Llama's and Mistral's gated MLP, Phi's and OPT's ungated fc2(act(fc1 x))
_GATED_ACT = {"silu": "swiglu", "swish": "swiglu"}
_UNGATED_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu"}
# per family: HF architecture, activation key, its default, the activations allowed, the flags the family fixes
_HF_FAMILY = {
    "llama": ("LlamaForCausalLM", "hidden_act", "silu", _GATED_ACT, dict(norm="rmsnorm")),
    "mistral": ("MistralForCausalLM", "hidden_act", "silu", _GATED_ACT, dict(norm="rmsnorm")),
    "phi": ("PhiForCausalLM", "hidden_act", "gelu_new", _UNGATED_ACT,
            dict(norm="layernorm", parallel_residual=True, attn_bias=True, mlp_bias=True, lm_head_bias=True)),
    "opt": ("OPTForCausalLM", "activation_function", "relu", _UNGATED_ACT,
            dict(norm="layernorm", norm_eps=1e-5, positions="learned")),
}


def config_from_hf(hf: dict) -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig, from the old layout (top-level rope_theta, rope_scaling,
    partial_rotary_factor, often no head_dim) or transformers 5's rope_parameters."""
    family = hf.get("model_type")
    if family not in _FAMILIES:
        raise ModelConfigError(f"config.json has model_type {family!r}; supported: {sorted(_FAMILIES)}")
    if family == "phi" and hf.get("qk_layernorm"):
        raise ModelConfigError("phi config.json has qk_layernorm=true, which is not supported")
    fields = _HF_COMMON + _HF_FIELDS[family]
    if missing := [key for _, key, default in fields if default is _REQUIRED and hf.get(key) is None]:
        raise ModelConfigError(f"config.json (model_type {family!r}) has no {missing[0]!r}")
    kw = {ours: _typed(key, hf.get(key, default), ModelConfig.__annotations__[ours]) for ours, key, default in fields}
    _, act_key, act_default, acts, fixed = _HF_FAMILY[family]
    act = _typed(act_key, hf.get(act_key) or act_default, "str")
    if act not in acts:
        ungated_silu = " (an ungated SiLU MLP is not supported)" if act in _GATED_ACT else ""
        raise ModelConfigError(f"{family} config.json {act_key}={act!r} is not supported; use one of "
                               f"{sorted(acts)}{ungated_silu}")
    kw.update(fixed, mlp_kind=acts[act])
    if family == "opt":   # post-LN OPT has no final norm, and a pre-LN one may have dropped it
        kw["final_norm"] = kw["pre_norm"] and not hf.get("_remove_final_layer_norm", False)
    else:
        kw.update(_read_rope(hf, 0.5 if family == "phi" else 1.0))
    return ModelConfig(family=family, **kw)


def _typed(key: str, value, types: str):
    """A config.json value checked against types such as "int | None"; a float field takes an int too, as a float."""
    kinds, got = types.split(" | "), type(value).__name__      # (a bool is not an int here, as in JSON)
    if not (got in kinds or value is None and "None" in kinds or got == "int" and "float" in kinds
            or got == "list" and "list[int]" in kinds and all(type(t) is int for t in value)):
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                 "dict": "an object", "None": "null", "list[int]": "a list of integers"}
        raise ModelConfigError(f"config.json {key}={value!r}: must be {' or '.join(words[k] for k in kinds)}")
    return float(value) if got == "int" and kinds[0] == "float" else value


def _read_rope(hf: dict, default_fraction: float) -> dict:
    """theta, rotary fraction and scaling from either config layout."""
    params = _typed("rope_parameters", hf.get("rope_parameters") or {}, "dict")           # transformers 5
    scaling = dict(_typed("rope_scaling", hf.get("rope_scaling") or params, "dict"))    # the old layout: separate
    rope_type = _typed("rope_type", scaling.pop("rope_type", scaling.pop("type", "default")), "str")  # or "type"
    keys = _ROPE_SCALING_KEYS.get(rope_type, ())
    if rope_type != "default" and not keys:
        raise ModelConfigError(f"config.json asks for rope scaling type {rope_type!r}; implemented: "
                               f"{['default', *_ROPE_SCALING_KEYS]}")
    if rope_type == "llama3":   # as transformers: a top-level value wins, then the dict's, then the model's max
        key = "original_max_position_embeddings"
        scaling[key] = hf.get(key) or scaling.get(key) or hf.get("max_position_embeddings", 2048)
    if missing := [k for k in keys if scaling.get(k) is None]:
        raise ModelConfigError(f"config.json rope scaling type {rope_type!r} has no {missing}")
    scaling = {k: _typed(k, scaling[k], "int" if k.startswith("original") else "float") for k in keys}
    return dict(rope_theta=_typed("rope_theta", params.get("rope_theta", hf.get("rope_theta") or 10000.0), "float"),
                rotary_fraction=_typed("partial_rotary_factor", params.get(
                    "partial_rotary_factor", hf.get("partial_rotary_factor") or default_fraction), "float"),
                rope_scaling={"rope_type": rope_type, **scaling} if keys else None)


def config_to_hf(c: ModelConfig) -> dict:
    """ModelConfig -> a config.json dict that transformers 5 AutoModelForCausalLM loads."""
    arch, act_key, *_ = _HF_FAMILY[c.family]
    hf = {"architectures": [arch], "model_type": c.family,
          **{key: getattr(c, ours) for ours, key, _ in _HF_COMMON + _HF_FIELDS[c.family]},
          act_key: {"swiglu": "silu", "gelu_tanh": "gelu_new"}.get(c.mlp_kind, c.mlp_kind)}
    if c.family == "opt":
        hf["_remove_final_layer_norm"] = c.pre_norm and not c.final_norm
        return hf
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}  # named as HF names them
    if c.family == "phi":
        if c.head_dim * c.n_heads != c.dim:
            raise ModelConfigError("phi requires head_dim * n_heads == dim")
        hf["qk_layernorm"], rope["partial_rotary_factor"] = False, c.rotary_fraction
    hf["rope_parameters"] = rope
    return hf


# Our module names -> HF's, per family: (prefix of the base model, its top-level modules, the modules of layer i)
_QKV = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj"}
_LLAMA_NAMES = ("model.", {"tok_embeddings": "embed_tokens", "norm": "norm"},
                {**_QKV, "attn.wo": "self_attn.o_proj", "attn_norm": "input_layernorm",
                 "mlp_norm": "post_attention_layernorm", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
                 "mlp.w2": "mlp.down_proj"})
_HF_NAMES = {
    "llama": _LLAMA_NAMES, "mistral": _LLAMA_NAMES,
    "phi": ("model.", {"tok_embeddings": "embed_tokens", "norm": "final_layernorm"},
            {**_QKV, "attn.wo": "self_attn.dense", "attn_norm": "input_layernorm", "mlp.w1": "mlp.fc1",
             "mlp.w2": "mlp.fc2"}),
    "opt": ("model.decoder.", {"tok_embeddings": "embed_tokens", "pos_embeddings": "embed_positions",
                               "project_in": "project_in", "project_out": "project_out", "norm": "final_layer_norm"},
            {**_QKV, "attn.wo": "self_attn.out_proj", "attn_norm": "self_attn_layer_norm",
             "mlp_norm": "final_layer_norm", "mlp.w1": "fc1", "mlp.w2": "fc2"}),
}


def hf_name(name: str, family: str) -> str:
    """Our parameter name -> HF's: layers.3.attn.wq.weight -> model.layers.3.self_attn.q_proj.weight (llama)."""
    prefix, top, layer = _HF_NAMES[family]
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    hf = "lm_head" if module == "lm_head" else prefix + (f"layers.{m[1]}.{layer[m[2]]}" if m else top[module])
    return f"{hf}.{leaf}"


_ALLOW = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "tokenizer.model", "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json"]


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """Preset name -> Hub id; an existing directory is used as it is; anything else is a Hub repo id,
    downloaded (config, tokenizer and safetensors only, never pickled .bin) into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint directory {path} has no config.json")
        return path
    repo_id = PRESETS.get(str(name_or_path), str(name_or_path))
    if isinstance(repo_id, ModelConfig):
        raise CheckpointError(f"preset {name_or_path!r} is a random-init config, not a checkpoint on disk or the Hub")
    looks_like_path = str(name_or_path).startswith((".", "/", "~"))
    if repo_id == str(name_or_path) and (looks_like_path or (path.parent != Path(".") and path.parent.is_dir())):
        why = "it is a path" if looks_like_path else f"its folder {path.parent}/ exists here"   # "out/finall"
        raise CheckpointError(f"{name_or_path!r}: no such directory ({why}, so it is not looked up on the Hub)")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{name_or_path!r} is neither a directory, a preset ({', '.join(PRESETS)}) "
                              f"nor a Hub repo id (owner/name)")
    local = hub_download(repo_id)
    if any(local.glob("*.safetensors")):
        return local
    if (ref := _safetensors_pr(repo_id)) is None:
        raise CheckpointError(f"Hub repo {repo_id} has no *.safetensors weights (pickled ones are not loaded, for "
                              f"safety), nor a safetensors pull request by the Hub's conversion bot: convert it first")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {repo_id} has no safetensors on main; using the Hub bot's conversion PR {ref} (as transformers)")
    return hub_download(repo_id, ref)


def hub_download(repo_id: str, revision: str | None = None, *, repo_type: str = "model", allow=_ALLOW,
                 error=CheckpointError) -> Path:
    """snapshot_download of the files we read (a model's _ALLOW, a dataset's parquet files, a tokenizer's files);
    each failure of the Hub client is one sentence, raised as `error` (data.py's: DataError)."""
    from huggingface_hub import errors, snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow))
    except errors.GatedRepoError:
        why = "is gated: accept its license on huggingface.co, then log in (`hf auth login` or HF_TOKEN)"
    except errors.RepositoryNotFoundError:
        why = "does not exist or is private (a private repo needs HF_TOKEN)"
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:
        why = (f"is not in the local Hugging Face cache and the Hub is not reachable (offline, or HF_HUB_OFFLINE=1): "
               f"{type(e).__name__}")
    kind = "dataset" if repo_type == "dataset" else "repo"
    raise error(f"Hub {kind} {repo_id}{f' at {revision}' if revision else ''} {why}")


def _safetensors_pr(repo_id: str) -> str | None:
    """refs/pr/N of the Hub bot's (SFconvertbot) open safetensors conversion PR, as transformers finds it, or None; only
    the bot's and on top of main, so it adds only the converted files (facebook/opt-*). Offline: one in the cache."""
    import huggingface_hub as hub
    if not hub.constants.HF_HUB_OFFLINE:
        try:
            api = hub.HfApi()
            main = api.list_repo_commits(repo_id)[0].commit_id
            for pr in hub.get_repo_discussions(repo_id, author="SFconvertbot", discussion_type="pull_request",
                                               discussion_status="open"):
                if pr.title == "Adding `safetensors` variant of this model" and pr.author == "SFconvertbot":
                    commits = api.list_repo_commits(repo_id, revision=pr.git_reference)
                    if len(commits) > 1 and commits[1].commit_id == main:
                        return pr.git_reference
            return None
        except Exception:   # unreachable Hub, rate limits: the HTTP client's errors are not all OSErrors
            pass
    # the cache's layout: models--owner--name/refs/refs/pr/N holds the commit of snapshots/<commit>/
    cached = Path(hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return next((f"refs/pr/{ref.name}" for ref in sorted((cached / "refs" / "refs" / "pr").glob("*"))
                 if any((cached / "snapshots" / ref.read_text().strip()).glob("*.safetensors"))), None)


def weightless_preset(name: str) -> ModelConfig | None:
    """The ModelConfig of a weightless preset such as "tiny" (random init), None for anything else."""
    preset = PRESETS.get(str(name))
    return preset if isinstance(preset, ModelConfig) and not Path(str(name)).is_dir() else None


def resolve_model(name: str) -> tuple[ModelConfig, Path | None]:
    """(ModelConfig, checkpoint dir) of a preset, local HF dir or Hub id; None for a weightless preset (tiny)."""
    if (preset := weightless_preset(name)) is not None:
        return preset, None
    ckpt_dir = resolve_checkpoint(name)     # clear errors: unknown name, offline and not cached
    return load_config(ckpt_dir), ckpt_dir


def random_init_tensors(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The random init of a weightless preset from `seed`, as (name, tensor) pairs: every rank builds the same full
    model on the CPU, so all start from identical weights; the global RNG is left as it was. For small presets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = Transformer(config)
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
        return config_from_hf(hf)
    except ModelConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None


def expected_params(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes (a tied lm_head appears once, as tok_embeddings.weight)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Transformer(config).named_parameters()}


def _checkpoint_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if not index.is_file():
        if files := sorted(ckpt_dir.glob("*.safetensors")):
            return files
        raise CheckpointError(f"{ckpt_dir} has no *.safetensors files")
    try:
        files = [ckpt_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    if missing := [f.name for f in files if not f.is_file()]:
        raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not in {ckpt_dir} "
                              f"({', '.join(missing[:3])}): an interrupted download?")
    return files


def iter_hf_tensors(ckpt_dir: str | Path, config: ModelConfig,
                    extra: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) from a (sharded) HF safetensors checkpoint, one at a time, all checked from the headers first
    (CheckpointError names the first few missing, unexpected or misshaped). `extra`: HF keys beyond the causal LM's
    that must be there too (a reward model's "score.weight"), yielded by that key."""
    ckpt_dir, expected = Path(ckpt_dir), expected_params(config)
    to_ours = {**{hf_name(n, config.family): n for n in expected}, **{key: key for key in extra}}
    plan, unexpected = {}, []         # plan: our name -> (file, key, shape in the file)
    for file in _checkpoint_files(ckpt_dir):
        try:
            with safe_open(file, framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}): a truncated download?") from None
        for key, shape in shapes.items():
            # some checkpoints (old OPT exports) omit the base model's "model." prefix
            hf_key = key if key in to_ours or "model." + key not in to_ours else "model." + key
            if config.tie_embeddings and hf_key == "lm_head.weight":
                # a tied copy of the embedding: dropped (as HF does), unless the checkpoint has it only under this name
                plan.setdefault("tok_embeddings.weight", (file, key, shape))
            elif hf_key in to_ours:
                plan[to_ours[hf_key]] = (file, key, shape)   # (the embedding itself wins over a tied head)
            elif not hf_key.endswith("rotary_emb.inv_freq"):   # a constant that old Llama exports saved
                unexpected.append(key)
    problems = {"missing": [hf for hf, ours in to_ours.items() if ours not in plan], "unexpected": unexpected,
                "wrong shape": [f"{key} {shape} (expected {expected[ours]})" for ours, (_, key, shape) in plan.items()
                                if shape != expected.get(ours, shape)]}
    if any(problems.values()):
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit its config ({config.family}): " + "; ".join(
            f"{what} {len(names)}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in problems.items() if names))
    for file in dict.fromkeys(file for file, _, _ in plan.values()):
        with safe_open(file, framework="pt") as f:
            yield from ((ours, f.get_tensor(key)) for ours, (in_file, key, _) in plan.items() if in_file == file)


def save_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                       max_shard_bytes: int = 2 * 1024**3, extra: dict[str, torch.Tensor] | None = None,
                       hf_config: dict | None = None) -> Path:
    """Write config.json and HF-named safetensors, sharded above max_shard_bytes; a tied lm_head is not written, as
    HF does. `extra`: more tensors by HF name (a reward model's score.weight); `hf_config`: keys for config.json."""
    (out_dir := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    expected, ours = expected_params(config), dict(state_dict)
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)   # the embedding itself
    if unknown := [n for n in ours if n not in expected]:
        raise CheckpointError(f"state dict has {unknown[0]!r}, which a {config.family} model with this config "
                              f"does not have")
    if missing := [n for n in expected if n not in ours]:
        raise CheckpointError(f"state dict is missing {len(missing)} parameter(s), e.g. {missing[:4]}")
    tensors = {**{hf_name(n, config.family): t for n, t in ours.items()}, **(extra or {})}
    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    for old in [*out_dir.glob("*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)   # stale shards from an earlier save would be loaded too
    # in order, a new shard when the next tensor would pass max_shard_bytes; named as transformers names them
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, out_dir / fname, metadata={"format": "pt"})
    if split.is_sharded:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    hf = {**config_to_hf(config), **(hf_config or {})}
    hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    return out_dir
