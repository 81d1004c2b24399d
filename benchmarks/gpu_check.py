"""The first GPU session's checks, in one command, written to one markdown table (issue 16).

    bash benchmarks/gpu_check.sh "$OUT"          # or: python benchmarks/gpu_check.py OUT_DIR

Parts, each with a time limit inside a total budget (--budget-s, 450 s: under 8 minutes on one H200):
  (a) the CUDA tests: every real attention kernel against SDPA, forward and backward, in both packing layouts
      (tests/test_attention.py::test_gpu_backends_match_sdpa, run with pytest -rs so that skips name their reason);
  (b) benchmarks/gpu.py over kernels x layouts at Mistral-7B layer shapes (--bench-layers layers);
  (c) a short bf16 run of train.py's real loop under torchrun --nproc_per_node 1 (FSDP2 on one GPU), on a
      Mistral-7B-shaped model cut to --train-layers layers that this script writes as a local HF folder (random
      weights, data.py's synthetic tokenizer, synthetic pairs): once with a sliding window of 16 positions, which
      the short synthetic pairs reach (Mistral's 4096 they do not, and model.py drops a window no sequence reaches),
      and, where torch's varlen kernel can run and time is left, once without it (so that varlen trains too);
  (d) OUT_DIR/gpu_check.md: each part's status and numbers (kernel times, tokens/s, MFU, memory), and the logs.
A status is "ok", "failed" (ran and was wrong, crashed or timed out) or "not available here" (no CUDA, a kernel
missing, torch too old): only "failed" makes the exit status 1. Needs no network. Without CUDA this is a dry run:
every GPU part is "not available here", in a second, exit status 0.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OK, FAILED, MISSING = "ok", "failed", "not available here"
# Mistral-7B-v0.1's shapes (config.json), cut to a few layers
MISTRAL_7B = dict(family="mistral", vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                  max_seq_len=32768, rope_theta=10000.0, norm_eps=1e-5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder for gpu_check.md and the logs (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="total time for all parts")
    p.add_argument("--bench-layers", type=int, default=4, help="layers of the gpu.py model")
    p.add_argument("--train-layers", type=int, default=2, help="layers of the trained Mistral-7B-shaped model")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per step of gpu.py")
    p.add_argument("--train-tokens", type=int, default=8192,
                   help="tokens per step of train.py (a window the batch reaches takes SDPA on torch < 2.12)")
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)   # dev only: part (c), tiny, on the CPU
    return p.parse_args(argv)


def environment() -> dict:
    """What this machine offers: the facts every part's "not available here" refers to."""
    import model as model_lib
    flash, varlen, params = model_lib._varlen_kernels()
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": "none",
           "flash-attn": flash is not None, "torch varlen": varlen is not None, "varlen window": "window_size" in params}
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name(0)
    return env


def run(cmd, log: Path, timeout: float, env=None) -> tuple[int | None, str]:
    """Run cmd with its output into log; (exit status, or None past the timeout; the output)."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=max(1.0, timeout),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = None
        f.write(f"\n[exit {rc}, {time.time() - t0:.0f}s]\n")
    return rc, log.read_text()


# -----------------------------------------------------------------------------
# (a) the CUDA tests

def cuda_tests(env, out: Path, timeout: float) -> list[tuple]:
    if not env["cuda"]:
        return [("(a) CUDA kernel tests vs SDPA", MISSING, "no CUDA device: torch.cuda.is_available() is False")]
    rc, text = run([sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
                    "tests/test_attention.py::test_gpu_backends_match_sdpa"], out / "tests.log", timeout)
    rows = []
    for m in re.finditer(r"test_gpu_backends_match_sdpa\[(\w+)-(\w+)\] (PASSED|FAILED|SKIPPED|ERROR)", text):
        family, backend, result = m.groups()
        status = {"PASSED": OK, "SKIPPED": MISSING}.get(result, FAILED)
        rows.append((f"(a) {backend} vs SDPA, {family}, fwd + bwd, shared and unshared", status, result.lower()))
    reasons = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", text)
    if reasons:
        rows.append(("(a) skip reasons", MISSING, "; ".join(sorted(set(reasons)))))
    if rc is None or not rows:
        rows.append(("(a) CUDA kernel tests", FAILED, "timed out" if rc is None else f"pytest exit {rc}, see tests.log"))
    return rows


# -----------------------------------------------------------------------------
# (b) benchmarks/gpu.py

def kernel_bench(env, out: Path, args, timeout: float) -> tuple[list[tuple], list[str]]:
    if not env["cuda"]:
        return [("(b) gpu.py kernels x layouts", MISSING, "no CUDA device")], []
    rc, text = run([sys.executable, "benchmarks/gpu.py", "--kernels", "flash,varlen,sdpa", "--layouts", "shared,unshared",
                    "--layers", str(args.bench_layers), "--warmup", "2", "--steps", "5",
                    "--max-tokens", str(args.max_tokens)], out / "gpu_bench.log", timeout)
    table = [line for line in text.splitlines() if line.startswith("|")]
    notes = [line for line in text.splitlines() if line.startswith(("kernel ", "check ", "row ", "loss finite"))]
    status = OK if rc == 0 else FAILED
    detail = "timed out" if rc is None else f"exit {rc}" + ("" if rc == 0 else ", see gpu_bench.log")
    rows = [("(b) gpu.py kernels x layouts, Mistral-7B layer shapes", status, detail + "; " + "; ".join(notes))]
    rows += [(f"(b) kernel {m.group(1)}", MISSING, m.group(2)) for m in
             (re.match(r"kernel (\w+): skipped, (.*)", n) for n in notes) if m]
    return rows, table


# -----------------------------------------------------------------------------
# (c) train.py under torchrun, a Mistral-7B-shaped model cut to a few layers

def write_model(folder: Path, layers: int, window: int | None, smoke: bool = False) -> str:
    import data as data_lib
    import model as model_lib
    shapes = {**MISTRAL_7B, **(dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512) if smoke else {})}
    config = model_lib.ModelConfig(**shapes, n_layers=layers, sliding_window=window)
    torch.manual_seed(0)
    with torch.device("cpu" if smoke else "cuda"):          # random init on the GPU: seconds, not minutes
        model = model_lib.Transformer(config)
    model.to("cpu").save_pretrained(folder)                 # safetensors writes host memory
    data_lib.synthetic_tokenizer().save(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{n / 1e9:.2f}B params"


WINDOW = 16   # a sliding window the synthetic pairs reach (about 30 tokens a sequence)


def train_run(env, out: Path, args, window: int | None, tag: str, timeout: float) -> tuple:
    import model as model_lib
    name = f"(c) train.py bf16, torchrun 1 GPU (FSDP2), Mistral-7B shapes x {args.train_layers} layers, window {window}"
    if not env["cuda"] and not args.smoke_cpu:
        return name, MISSING, "no CUDA device"
    device, dtype = ("cpu", "float32") if args.smoke_cpu else ("cuda", "bfloat16")
    kernel = model_lib.pick_attention("auto", torch.device(device), getattr(torch, dtype), window)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=os.environ.get("TMPDIR")) as tmp:
        t0 = time.time()
        size = write_model(Path(tmp) / "model", args.train_layers, window, args.smoke_cpu)
        written = time.time() - t0
        run_dir = Path(tmp) / "run"
        rc, text = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
                        "--model", str(Path(tmp) / "model"), "--data", "synthetic", "--dtype", dtype, "--max-steps", str(args.train_steps),
                        "--max-tokens", str(args.train_tokens), "--lr", "1e-5", "--warmup-steps", "2", "--eval-every", "0",
                        "--save-every", "0", "--no-export", "--keep-checkpoints", "1", "--out", str(run_dir)],
                       out / f"train_{tag}.log", timeout - written)
        metrics = run_dir / "metrics.jsonl"
        recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in recs if not r.get("eval")]
    if rc != 0 or not steps:
        return name, FAILED, ("timed out" if rc is None else f"exit {rc}") + f", see train_{tag}.log"
    timed = steps[3:] or steps                                # the first steps compile kernels and warm the allocator
    med = lambda k: statistics.median(r[k] for r in timed if r.get(k) is not None)
    finite = all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in steps)
    mfu = med("mfu") if any(r.get("mfu") is not None for r in timed) else None
    return name, OK if finite else FAILED, (
        f"{size}, kernel {kernel}, {len(steps)} steps, model written in {written:.0f}s; median of steps "
        f"{steps.index(timed[0]) + 1}-{len(steps)}: {med('tokens_per_s'):,.0f} tokens/s, "
        + (f"MFU {100 * mfu:.1f}% (train.py's count)" if mfu is not None else "MFU - (peak unknown)")
        + f", peak memory {max(r['mem_gb'] for r in steps):.1f} GB; loss {steps[0]['loss']:.3f} -> "
        f"{steps[-1]['loss']:.3f}" + ("" if finite else " NOT FINITE"))


# -----------------------------------------------------------------------------

def write_report(path: Path, env: dict, rows: list[tuple], table: list[str], elapsed: float) -> None:
    lines = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s)", "",
             "environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| part | status | numbers / reason |", "|---|---|---|"]
    lines += [f"| {part} | {status} | {detail.replace('|', '/')} |" for part, status, detail in rows]
    if table:
        lines += ["", "## benchmarks/gpu.py", ""] + table
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    left = lambda: args.budget_s - (time.time() - t0)
    env = environment()
    print(f"gpu_check: {env}", flush=True)
    rows = cuda_tests(env, out, min(120.0, left()))
    bench_rows, table = kernel_bench(env, out, args, min(200.0, left()))
    rows += bench_rows
    rows.append(train_run(env, out, args, WINDOW, "window", min(200.0, left())))
    if args.smoke_cpu:
        rows[-1] = (rows[-1][0] + " (CPU smoke: tiny shapes, float32)", *rows[-1][1:])
    if env["cuda"] and env["torch varlen"] and not env["flash-attn"] and not env["varlen window"]:
        if left() > 90:   # torch < 2.12 varlen has no window: the run above used SDPA; this one trains on varlen
            rows.append(train_run(env, out, args, None, "nowindow", left() - 10))
        else:
            rows.append(("(c) train.py without a window (varlen kernel)", MISSING, "no time left in --budget-s"))
    write_report(out / "gpu_check.md", env, rows, table, time.time() - t0)
    print((out / "gpu_check.md").read_text())
    return 1 if any(status == FAILED for _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
