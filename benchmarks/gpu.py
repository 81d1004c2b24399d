"""ORPO training throughput on one GPU at Mistral-7B layer shapes: tokens/s, TFLOP/s, MFU, memory (issue 8).

model.py at Mistral-7B's layer shapes (dim 4096, 32 heads, 8 KV heads, FFN 14336, vocab 32000), with fewer
layers so that one GPU holds it with its AdamW state (--layers). The step is train.py's: float32 master
weights, bfloat16 autocast, train.train_step on padding-free packed batches (shared-prompt layout by
default), grad clipping, fused AdamW. Attention: flash-attn's varlen kernels when installed, else torch's
varlen attention (torch >= 2.10), else SDPA with a mask (model.set_attention_backend, --attention).

Batches: real HH-RLHF pairs (../shared/data, Llama-2 tokenizer) when present, else synthetic pairs with
HH-RLHF-like lengths; pairs are packed until --max-tokens tokens per step.

Reported:
  tokens/s     tokens computed per second (the shared prompt counted once) and pair tokens/s (prompt counted
               with both answers, as padding-free trainers without prompt sharing would compute them)
  TFLOP/s, MFU model FLOPs per step / step time / peak: 6 x (parameters in matmuls: everything except the
               input embedding) x tokens, with the lm_head counted on the M target rows, plus attention:
               12 x d_attn x (query, key) pairs allowed by the mask, per layer (QK^T and AV, forward and
               backward). Recomputation (activation checkpointing, the chunked lm_head's backward) is not
               counted. Peak: dense bf16 tensor-core FLOP/s by device name (e.g. H100/H200 989 TFLOP/s),
               or --peak-tflops.
  memory       torch.cuda.max_memory_allocated over the timed steps
Checks: the loss is finite; the fast path's per-token log-probs and logits equal the SDPA path's within
bf16 tolerance, in both layouts (shared prompt: two varlen calls; unshared: one).

    python benchmarks/gpu.py                 # 8 layers, 16k tokens per step, 3 warmup + 10 timed steps
    python benchmarks/gpu.py --layers 16 --max-tokens 32768 --activation-checkpointing
"""
import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# dense bf16 tensor-core peak in TFLOP/s, matched as a substring of torch.cuda.get_device_name() (first match wins)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
               "RTX 3090": 71.0, "V100": 125.0, "MI300X": 1307.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (Mistral-7B has 32; 8 fit one 80 GB GPU with AdamW)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per step (pairs are packed up to this)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "varlen", "sdpa"],
                   help="attention kernel for the timed steps (auto: flash-attn > torch varlen > SDPA)")
    p.add_argument("--no-shared-prompt", dest="shared_prompt", action="store_false",
                   help="pack prompt|chosen and prompt|rejected separately (the prompt computed twice)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by device name)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=2048, help="max prompt+response tokens of a pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)   # dev only: tiny shapes on the CPU
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# FLOPs

def attention_pairs(seg_lens: torch.Tensor) -> float:
    """(query, key) pairs the mask allows, summed over segments: [prompt|chosen] is causal, rejected
    queries see the prompt and the earlier rejected tokens. The unshared layout is c = r = 0."""
    p, c, r = (x.double() for x in seg_lens.unbind(1))
    main = p + c
    return float((main * (main + 1) / 2 + r * p + r * (r + 1) / 2).sum())


def step_flops(config, n_matmul_params: int, batch) -> float:
    """Model FLOPs of one forward + backward: 6 per parameter per token (lm_head on the M target rows only)
    plus attention (2 matmuls x 2 FLOPs x d_attn per allowed pair, x3 for forward + backward)."""
    lm_head = config.vocab_size * config.embed_dim
    trunk = n_matmul_params - lm_head
    M = batch.tgt_index.numel()
    d_attn = config.n_heads * config.head_dim
    return 6 * trunk * batch.num_tokens + 6 * lm_head * M + 12 * config.n_layers * d_attn * attention_pairs(batch.seg_lens)


# -----------------------------------------------------------------------------
# batches

def make_batches(args, n_steps: int):
    """Pack random pairs into batches of at most --max-tokens tokens (shared or unshared count)."""
    import data as data_lib
    from step import load_pairs
    pairs, source = load_pairs(args.max_length, args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    cost = lambda pr: len(pr[0]) + len(pr[1]) + len(pr[2]) + (0 if args.shared_prompt else len(pr[0]))
    batches, cur, used, k = [], [], 0, 0
    while len(batches) < n_steps:
        pr = pairs[order[k % len(order)]]
        k += 1
        if cost(pr) > args.max_tokens:
            continue
        if used + cost(pr) > args.max_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(pr)
        used += cost(pr)
    packed = [data_lib.pack_pairs([data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr)) for pr in b],
                                  shared_prompt=args.shared_prompt, prompt_loss=True) for b in batches]
    pair_tokens = [sum(2 * len(p) + len(c) + len(r) for p, c, r in b) for b in batches]
    return packed, pair_tokens, source


# -----------------------------------------------------------------------------
# fast path == SDPA path

@torch.no_grad()
def check_against_sdpa(model, pairs_batches, backend: str, autocast) -> bool:
    """Per-token log-probs and lm_head logits of the fast kernel vs SDPA with an explicit mask, bf16."""
    import model as model_lib
    ok = True
    for layout, b in pairs_batches:
        out = {}
        for name in (backend, "sdpa"):
            previous = model_lib.set_attention_backend(name)
            try:
                with autocast:
                    h = model.packed_hidden(b.input_ids, b.position_ids, b.seg_lens)
                    rows = b.tgt_index[:256]
                    out[name] = (model.token_logps(h, b.tgt_index, b.tgt_ids).float(),
                                 model.lm_head(h[rows]).float())
            finally:
                model_lib.set_attention_backend(previous)
        (lp_f, lg_f), (lp_s, lg_s) = out[backend], out["sdpa"]
        lp_err = (lp_f - lp_s).abs()
        rel = float((lg_f - lg_s).norm() / lg_s.norm())
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%); two kernels that accumulate in
        # different orders drift by a few roundings per layer, so a 2% relative logits error is generous
        # for agreement and far below what a wrong mask produces (tens of percent, or NaN)
        good = rel < 2e-2 and float(lp_err.mean()) < 2e-2 and math.isfinite(rel)
        ok &= good
        print(f"check {backend} vs sdpa ({layout}, {b.num_tokens} tokens): logits relative error {rel:.2e}, "
              f"log-prob |diff| mean {float(lp_err.mean()):.2e} max {float(lp_err.max()):.2e} -> {'OK' if good else 'FAIL'}")
    return ok


# -----------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "use benchmarks/step.py on the CPU.")
        return 2
    import data as data_lib
    import model as model_lib
    import train

    device = torch.device("cpu" if args.smoke_cpu else "cuda")
    torch.manual_seed(args.seed)
    if args.smoke_cpu:   # tiny shapes, same code path (no fast kernel on the CPU)
        config = model_lib.ModelConfig(family="mistral", vocab_size=32000, dim=64, n_layers=2, n_heads=4,
                                       n_kv_heads=2, ffn_dim=128, max_seq_len=4096)
        args.max_tokens, args.steps, args.warmup = min(args.max_tokens, 2048), min(args.steps, 2), min(args.warmup, 1)
    else:
        config = model_lib.ModelConfig(family="mistral", vocab_size=32000, dim=4096, n_layers=args.layers, n_heads=32,
                                       n_kv_heads=8, ffn_dim=14336, max_seq_len=32768, rope_theta=10000.0,
                                       sliding_window=None)
    previous = model_lib.set_attention_backend(args.attention)
    compute_dtype = torch.bfloat16
    backend = model_lib._pick_backend(device, compute_dtype, config.sliding_window)
    model_lib.set_attention_backend(previous)
    name = "cpu (smoke)" if args.smoke_cpu else torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    t0 = time.time()
    try:
        with torch.device(device):
            model = model_lib.Transformer(config)            # float32 master weights, random init on the GPU
        model.activation_checkpointing = args.activation_checkpointing
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        n_matmul = n_params - model.tok_embeddings.weight.numel() * (not config.tie_embeddings)
        opt_args = argparse.Namespace(lr=1e-5, beta1=0.9, beta2=0.95, weight_decay=0.0)
        optimizer = train.build_optimizer(opt_args, model, device)
        autocast = torch.autocast(device.type, dtype=compute_dtype)
        batches, pair_tokens, source = make_batches(args, args.warmup + args.steps)
        print(f"device {name} | peak {f'{peak:.0f} TFLOP/s bf16 dense' if peak else 'unknown (use --peak-tflops)'} | "
              f"attention {backend} | torch {torch.__version__}")
        print(f"model: Mistral-7B layer shapes, {config.n_layers} layers, {n_params / 1e9:.2f}B params "
              f"(fp32 master, bf16 autocast), built in {time.time() - t0:.0f}s | data: {source} | "
              f"{'shared-prompt' if args.shared_prompt else 'unshared'} packing, <= {args.max_tokens} tokens/step")

        # correctness first, on a small batch of each layout (SDPA's dense mask is quadratic in memory)
        small = make_small_pairs(batches)
        if backend == "sdpa" and not args.smoke_cpu:
            print("check skipped: no flash-attn / torch varlen kernel on this device, SDPA is the path timed")
            checked = True
        else:   # (smoke-cpu compares SDPA with itself: it only exercises the code)
            checked = check_against_sdpa(model, [
                ("shared", data_lib.pack_pairs(small, shared_prompt=True).to(device)),
                ("unshared", data_lib.pack_pairs(small, shared_prompt=False).to(device))], backend, autocast)

        # timed steps
        previous = model_lib.set_attention_backend(args.attention)
        times, losses = [], []
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        for i, batch in enumerate(batches):
            sync(device)
            t = time.perf_counter()
            sums = train.train_step(model, [batch], args.lam, device, 1, autocast)
            train.clip_grad_norm(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            dt = time.perf_counter() - t
            loss = train.finish_metrics(sums, args.lam)["loss"]
            losses.append(loss)
            if i >= args.warmup:
                times.append((dt, batch, pair_tokens[i]))
        model_lib.set_attention_backend(previous)
    except torch.cuda.OutOfMemoryError:
        print(f"out of GPU memory with {args.layers} layers and {args.max_tokens} tokens per step; "
              "try fewer --layers, fewer --max-tokens or --activation-checkpointing.")
        return 2

    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    step_s = [dt for dt, _, _ in times]
    total_s = sum(step_s)
    tokens = sum(b.num_tokens for _, b, _ in times)
    flops = sum(step_flops(config, n_matmul, b) for _, b, _ in times)
    tflops = flops / total_s / 1e12
    finite = all(math.isfinite(l) for l in losses)
    print(f"\n| GPU | layers | params | attention | layout | tokens/step | step (median) | tokens/s | pair tokens/s | "
          f"TFLOP/s | MFU | peak memory |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {name} | {config.n_layers} | {n_params / 1e9:.2f}B | {backend} | "
          f"{'shared prompt' if args.shared_prompt else 'unshared'} | {tokens / len(times):,.0f} | "
          f"{1000 * statistics.median(step_s):,.0f} ms | {tokens / total_s:,.0f} | "
          f"{sum(pt for _, _, pt in times) / total_s:,.0f} | {tflops:,.1f} | "
          f"{f'{100 * tflops / peak:.1f}%' if peak else '-'} | {mem:.1f} GiB |")
    print(f"\nMFU = model FLOPs (6 x {n_matmul / 1e9:.2f}B matmul params x tokens + attention) / time / "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown peak'}; losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"loss finite: {'OK' if finite else 'FAIL'} | fast path == SDPA: {'OK' if checked else 'FAIL'}")
    return 0 if finite and checked else 1


def make_small_pairs(batches, n=8):
    """The first n pairs of the first batch, back as TokenizedPairs (for the SDPA comparison)."""
    import data as data_lib
    return data_lib.unpack_batch(batches[0])[:n]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
