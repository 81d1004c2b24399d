"""Section 7.3's efficiency claim, measured: one ORPO step against one DPO step on the same pairs and model.

ORPO needs no reference model: one forward (chosen and rejected packed together) and one backward per step.
DPO (the second stage of SFT + DPO) also runs a frozen reference model over the same pairs: a second forward,
no backward, and a second copy of the weights in memory. Both rows here run the project's packed forward on
the same batches of the same pairs (data.py's synthetic set), from the same random init:

  orpo   train.train_step(lam=0.1): the training loop's own step
  dpo    experiments/dpo.py's dpo_step, beta 0.1, the reference a frozen copy of the policy's start

How it is measured (as benchmarks/step.py does):
  * Each row runs in a fresh child process (python benchmarks/orpo_vs_dpo.py --worker ROW), so memory does not
    leak from one row into another; torch.set_num_threads(--threads) there.
  * Forward passes: calls of model.packed_hidden per optimizer step, counted on the models themselves.
  * Time: 2 warmup steps, then the median wall time of --steps steps (and the CPU time, less disturbed by other
    processes on a shared machine).
  * Memory: peak resident set size (VmHWM, reset through /proc/self/clear_refs) during loading and the steps,
    minus the resident size before any model was loaded: weights (the reference's too), gradients, AdamW state,
    activations. Where clear_refs is not writable, ru_maxrss stands in (it then includes the imports).

    python benchmarks/orpo_vs_dpo.py                        # tiny model (3 layers, d = 96), 32 pairs, 20 steps
    python benchmarks/orpo_vs_dpo.py --dim 512 --layers 8    # a larger random model, where memory shows clearly
"""
import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]

ROWS = ("orpo", "dpo")


def status_mb(field):
    """A VmRSS / VmHWM line of /proc/self/status, in MB (Linux)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss():
    """Reset VmHWM (peak RSS) to the current RSS; True when the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def count_forwards(model, counter):
    """Count this model's packed_hidden calls in counter["n"]."""
    inner = model.packed_hidden

    def counted(*args, **kwargs):
        counter["n"] += 1
        return inner(*args, **kwargs)
    model.packed_hidden = counted


def worker(args):
    """One row in this process: load, step, measure; prints one JSON line."""
    import torch
    import data
    import dpo
    import model as model_lib
    import train

    torch.set_num_threads(args.threads)
    tok = data.synthetic_tokenizer()
    pairs = data.build_pairs(data.write_synthetic(Path(args.workdir) / "pairs.parquet", args.pairs, seed=0), tok)
    batches = list(data.PairBatcher(pairs, batch_size=args.pairs, seed=0))             # one batch of all pairs
    tiny = model_lib.PRESETS["tiny"]            # resized: 6 heads at tiny's width, else heads of 64 (2 KV heads)
    config = dataclasses.replace(tiny, dim=args.dim, n_layers=args.layers, embed_dim=None, head_dim=None,
                                 n_heads=tiny.n_heads if args.dim == tiny.dim else args.dim // 64,
                                 ffn_dim=tiny.ffn_dim if args.dim == tiny.dim else args.dim * 8 // 3 // 64 * 64)
    base, reset_ok = status_mb("VmRSS"), reset_peak_rss()
    torch.manual_seed(0)
    policy = model_lib.Transformer(config).train()
    forwards = {"n": 0}
    count_forwards(policy, forwards)
    reference = None
    if args.worker == "dpo":
        reference = model_lib.Transformer(config).eval().requires_grad_(False)
        reference.load_state_dict(policy.state_dict())
        count_forwards(reference, forwards)
    optimizer = train.build_optimizer(policy, 1e-4, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def step():
        if args.worker == "orpo":
            return train.train_step(policy, batches, 0.1, torch.device("cpu"), nullcontext(), optimizer, scheduler, 1.0)
        return dpo.dpo_step(policy, reference, batches[0], 0.1, optimizer, scheduler)

    walls, cpus = [], []
    for i in range(2 + args.steps):
        forwards["n"], t0, c0 = 0, time.perf_counter(), time.process_time()
        step()
        if i >= 2:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    peak = status_mb("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"forwards": forwards["n"], "median_step_s": statistics.median(walls),
                      "median_cpu_s": statistics.median(cpus), "peak_minus_base_mb": peak - base,
                      "peak_reset": reset_ok, "params": sum(p.numel() for p in policy.parameters()),
                      "tokens": batches[0].num_tokens}))


def measure(model="tiny", pairs=32, steps=20, threads=1, dim=None, layers=None):
    """Both rows, each in its own process -> {"settings": str, "rows": {row: measurements}}."""
    from model import PRESETS
    if model != "tiny":
        raise ValueError(f"--model {model}: only the weightless preset tiny (optionally resized) is benchmarked")
    dim, layers = dim or PRESETS["tiny"].dim, layers or PRESETS["tiny"].n_layers
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for row in ROWS:
            cmd = [sys.executable, __file__, "--worker", row, "--workdir", workdir, "--pairs", str(pairs),
                   "--steps", str(steps), "--threads", str(threads), "--dim", str(dim), "--layers", str(layers)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"benchmark row {row} failed:\n{done.stderr[-2000:]}")
            rows[row] = json.loads(done.stdout.strip().splitlines()[-1])
    settings = (f"random-init tiny Llama resized to d = {dim}, {layers} layers ({rows['orpo']['params'] / 1e6:.2f}M "
                f"params), {pairs} synthetic pairs ({rows['orpo']['tokens']} packed tokens) per step, {threads} "
                f"thread(s), median of {steps} steps")
    return {"settings": settings, "rows": rows}


def table(result):
    o = result["rows"]["orpo"]
    lines = [result["settings"], "",
             "| step | forward passes | time per step | CPU time per step | peak memory over no model |",
             "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['forwards']} | {1000 * r['median_step_s']:.1f} ms "
                     f"({r['median_step_s'] / o['median_step_s']:.2f}x) | {1000 * r['median_cpu_s']:.1f} ms | "
                     f"{r['peak_minus_base_mb']:.1f} MB "
                     f"({r['peak_minus_base_mb'] / max(o['peak_minus_base_mb'], 1e-9):.2f}x) |")
    if not all(r["peak_reset"] for r in result["rows"].values()):
        lines.append("note: /proc/self/clear_refs was not writable: memory = ru_maxrss - RSS before loading")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=32, help="pairs per step (one packed batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row, after 2 warmup steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=None, help="model width (default: tiny's 96)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: tiny's 3)")
    p.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    print(table(measure(pairs=args.pairs, steps=args.steps, threads=args.threads, dim=args.dim, layers=args.layers)))


if __name__ == "__main__":
    sys.exit(main())
