"""ORPO training throughput on one GPU at Mistral-7B layer shapes: tokens/s, TFLOP/s, MFU, memory (issue 8).

model.py at Mistral-7B's layer shapes (dim 4096, 32 heads, 8 KV heads, FFN 14336, vocab 32000), with fewer
layers so that one GPU holds it with its AdamW state (--layers). The step is train.py's: float32 master
weights, bfloat16 autocast, train.train_step (forward, eq. 3, eq. 6, backward, grad clipping, fused AdamW) on
padding-free packed batches (shared-prompt layout by default). One run measures every kernel in --kernels
(flash-attn's varlen, torch's varlen attention, SDPA; "auto" = what train.py would pick) in every packing
layout in --layouts (shared prompt: two varlen calls per layer; unshared: the prompt computed twice), one
table row each, on the same batches, so the rows compare kernels and layouts on identical work.

Batches: real HH-RLHF pairs (../shared/data, Llama-2 tokenizer) when present, else synthetic pairs with
HH-RLHF-like lengths; pairs are packed until --max-tokens tokens per step.

Reported:
  tokens/s     tokens computed per second (the shared prompt counted once) and pair tokens/s (prompt counted
               with both answers, as padding-free trainers without prompt sharing would compute them)
  TFLOP/s, MFU model FLOPs per step / step time / peak: model.step_flops, the count of train.py's MFU,
               with the non-embedding parameters (torchtitan's exclude_embedding): 6 x params x tokens plus
               attention, 12 x d_attn x (query, key) pairs allowed by the mask, per layer (QK^T and AV,
               forward and backward). Recomputation (activation checkpointing, the chunked lm_head's
               backward) is not counted. Peak: dense bf16 tensor-core FLOP/s by device name (e.g. H100/H200 989 TFLOP/s),
               or --peak-tflops.
  memory       torch.cuda.max_memory_allocated over the timed steps
Checks, per kernel: the loss is finite; its per-token log-probs and logits equal the SDPA path's within bf16
tolerance, in both layouts. Kernels not available here (no flash-attn package, torch too old) are reported
as skipped, not timed.

    python benchmarks/gpu.py                 # auto kernel, both layouts, 8 layers, 16k tokens per step
    python benchmarks/gpu.py --kernels flash,varlen,sdpa --layouts shared,unshared
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
from step import load_pairs, matmul_params  # noqa: E402  (benchmarks/step.py: the pairs, the FLOP count's params)

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
    p.add_argument("--kernels", default="auto",
                   help="comma list of attention kernels to time: auto (flash-attn > torch varlen > SDPA), flash, "
                        "varlen, sdpa")
    p.add_argument("--layouts", default="shared,unshared",
                   help="comma list: shared (prompt computed once) and/or unshared (prompt packed with each answer)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by device name)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=2048, help="max prompt+response tokens of a pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)   # dev only: tiny shapes on the CPU
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# FLOPs: train.py's MFU count, reused (model.step_flops) with the non-embedding parameters (step.matmul_params)

def step_flops(config, n_matmul_params: int, batch) -> float:
    import model as model_lib
    return model_lib.step_flops(n_matmul_params, config.n_layers, config.n_heads * config.head_dim, [batch])


# -----------------------------------------------------------------------------
# batches

def make_batches(args, n_steps: int):
    """Random pairs grouped into n_steps steps of at most --max-tokens tokens as the UNSHARED layout counts
    them, so that the same pairs fit in either layout: every row trains on identical pairs, step by step.
    Returns the groups (lists of TokenizedPair), their pair tokens (prompt counted with each answer) and
    where the pairs came from."""
    import data as data_lib
    pairs, source = load_pairs(args.max_length, args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    cost = lambda pr: 2 * len(pr[0]) + len(pr[1]) + len(pr[2])
    groups, cur, used, k = [], [], 0, 0
    while len(groups) < n_steps:
        pr = pairs[order[k % len(order)]]
        k += 1
        if cost(pr) > args.max_tokens:
            continue
        if used + cost(pr) > args.max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(pr)
        used += cost(pr)
    to_pair = lambda pr: data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr))
    return [[to_pair(pr) for pr in g] for g in groups], [sum(map(cost, g)) for g in groups], source


# -----------------------------------------------------------------------------
# fast path == SDPA path

@torch.no_grad()
def check_against_sdpa(model, small_batches, backend: str, autocast) -> bool:
    """Per-token log-probs and lm_head logits of a kernel vs SDPA with an explicit mask, bf16, each layout."""
    ok, previous = True, model.attention
    for layout, b in small_batches:
        out = {}
        for name in (backend, "sdpa"):
            model.attention = name           # the kernel of the packed forward (model.Transformer(attention=...))
            try:
                with autocast:
                    h = model.packed_hidden(b.input_ids, b.position_ids, b.seg_lens)
                    rows = b.tgt_index[:256]
                    out[name] = (model.token_logps(h, b.tgt_index, b.tgt_ids).float(),
                                 model.lm_head(h[rows]).float())
            finally:
                model.attention = previous
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
# one row: a kernel x a layout

def resolve_kernel(name: str, device, window) -> tuple[str | None, str]:
    """The backend model.py would run for --kernels entry `name` here, or (None, why it cannot run)."""
    import model as model_lib
    try:
        return model_lib.pick_attention(name, device, torch.bfloat16, window), ""
    except model_lib.ModelConfigError as e:
        return None, str(e)


def time_row(model, optimizer, backend: str, batches, args, device, autocast) -> dict:
    """--warmup untimed then --steps timed optimizer steps with one kernel on one layout's batches."""
    import train
    previous, model.attention = model.attention, backend
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    times, losses = [], []
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i, batch in enumerate(batches):
            sync(device)
            t = time.perf_counter()
            m = train.train_step(model, [batch], args.lam, device, autocast, optimizer, scheduler, grad_clip=1.0)
            sync(device)
            dt = time.perf_counter() - t
            losses.append(m["loss"])
            if i >= args.warmup:
                times.append(dt)
    finally:
        model.attention = previous
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(times=times, losses=losses, mem=mem, timed=batches[args.warmup:])


def print_table(name, config, n_params, n_matmul, peak, rows, pair_tokens):
    print(f"\n| GPU | layers | params | attention | layout | tokens/step | step (median) | tokens/s | pair tokens/s | "
          f"TFLOP/s | MFU | peak memory |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (backend, layout), r in rows.items():
        if r is None:
            print(f"| {name} | {config.n_layers} | {n_params / 1e9:.2f}B | {backend} | {layout} | out of memory |"
                  + " |" * 6)
            continue
        total_s = sum(r["times"])
        tokens = sum(b.num_tokens for b in r["timed"])
        tflops = sum(step_flops(config, n_matmul, b) for b in r["timed"]) / total_s / 1e12
        print(f"| {name} | {config.n_layers} | {n_params / 1e9:.2f}B | {backend} | {layout} | "
              f"{tokens / len(r['timed']):,.0f} | {1000 * statistics.median(r['times']):,.0f} ms | "
              f"{tokens / total_s:,.0f} | {sum(pair_tokens) / total_s:,.0f} | {tflops:,.1f} | "
              f"{f'{100 * tflops / peak:.1f}%' if peak else '-'} | {r['mem']:.1f} GiB |")
    print(f"\nMFU = model FLOPs (6 x {n_matmul / 1e9:.2f}B matmul params x tokens + attention) / time / "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown peak'}. pair tokens/s: the same pairs in every row, "
          f"the prompt counted with each answer.")


# -----------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "use benchmarks/step.py on the CPU.")
        return 2
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    kernels = [x.strip() for x in args.kernels.split(",") if x.strip()]
    bad = [x for x in layouts if x not in ("shared", "unshared")] + \
          [x for x in kernels if x not in ("auto", "flash", "varlen", "sdpa")]
    if bad or not layouts or not kernels:
        print(f"unknown or empty --kernels / --layouts entry: {', '.join(bad) or 'none given'}")
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
    name = "cpu (smoke)" if args.smoke_cpu else torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    backends = {}
    for k in kernels:
        backend, why = resolve_kernel(k, device, config.sliding_window)
        if backend is None:
            print(f"kernel {k}: skipped, {why}")
        elif backend not in backends.values():
            backends[k] = backend
    if not backends:
        print("none of --kernels can run here")
        return 2

    t0 = time.time()
    try:
        with torch.device(device):
            model = model_lib.Transformer(config)            # float32 master weights, random init on the GPU
        model.activation_checkpointing = args.activation_checkpointing
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        n_matmul = matmul_params(model)
        optimizer = train.build_optimizer(model, 1e-5, 0.0)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        groups, pair_tokens, source = make_batches(args, args.warmup + args.steps)
        packed = {layout: [data_lib.pack_pairs(g, shared_prompt=layout == "shared", prompt_loss=True).to(device)
                           for g in groups] for layout in layouts}
        print(f"device {name} | peak {f'{peak:.0f} TFLOP/s bf16 dense' if peak else 'unknown (use --peak-tflops)'} | "
              f"kernels {', '.join(f'{k}={b}' for k, b in backends.items())} | torch {torch.__version__}")
        print(f"model: Mistral-7B layer shapes, {config.n_layers} layers, {n_params / 1e9:.2f}B params "
              f"(fp32 master, bf16 autocast), built in {time.time() - t0:.0f}s | data: {source} | "
              f"{len(groups)} steps of the same pairs per row, <= {args.max_tokens} tokens/step unshared")

        # correctness first, on a few pairs in each layout (SDPA's dense mask is quadratic in memory)
        small = [(lay, data_lib.pack_pairs(groups[0][:8], shared_prompt=lay == "shared").to(device))
                 for lay in ("shared", "unshared")]
        checked = {b: b == "sdpa" or check_against_sdpa(model, small, b, autocast) for b in backends.values()}
        if args.smoke_cpu and "sdpa" in backends.values():   # the CPU has no other kernel: exercise the code
            checked["sdpa"] = check_against_sdpa(model, small, "sdpa", autocast)

        rows = {}
        for backend in backends.values():
            for layout in layouts:
                t = time.time()
                try:   # one row out of memory (SDPA on long segments) must not cost the other rows
                    rows[backend, layout] = time_row(model, optimizer, backend, packed[layout], args, device, autocast)
                except torch.cuda.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    rows[backend, layout] = None
                    print(f"row {backend} / {layout}: out of GPU memory at {args.max_tokens} tokens per step")
                    continue
                print(f"timed {backend} / {layout}: {len(rows[backend, layout]['times'])} steps in "
                      f"{time.time() - t:.0f}s (incl. warmup and any compilation)")
    except torch.cuda.OutOfMemoryError:
        print(f"out of GPU memory with {args.layers} layers and {args.max_tokens} tokens per step; "
              "try fewer --layers, fewer --max-tokens or --activation-checkpointing.")
        return 2

    print_table(name, config, n_params, n_matmul, peak, rows, pair_tokens[args.warmup:])
    finite = all(math.isfinite(x) for r in rows.values() if r for x in r["losses"])
    losses = " | ".join(f"{b}/{lay} {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" for (b, lay), r in rows.items() if r)
    print(f"losses (the weights carry on from row to row; speed does not depend on them): {losses}")
    verdicts = ", ".join(f"{b} {'OK' if ok else 'FAIL'}" for b, ok in checked.items())
    print(f"loss finite: {'OK' if finite else 'FAIL'} | kernel == SDPA: {verdicts}")
    return 0 if finite and all(checked.values()) else 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
