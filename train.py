"""
Train a causal language model with ORPO (Hong, Lee & Thorne, 2024, arXiv 2403.07691).

    python train.py                                          # tiny model, synthetic pairs, CPU, under a minute
    python train.py --model mistral-7b                       # one GPU, the paper's UltraFeedback and lambda
    torchrun --nproc_per_node 4 train.py --model mistral-7b --data uf.parquet --lam 0.1      # FSDP2, 4 GPUs

One optimizer step is one call of train_step (as in torchtitan): grad_accum packed micro-batches (data.py), each
ONE forward, the eq. 3 averages, L_OR per pair (orpo.py), the loss as eq. 6 reads, backward; then clip, skip the
update if anything is NaN/inf, AdamW, schedule. Trainer.fit runs, logs, evaluates and checkpoints the steps. The model
is built on the meta device, sharded with FSDP2 (dist.py), materialised, then loaded tensor by tensor.
"""
import argparse
import hashlib
import importlib.util
import dataclasses
import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __name__ == "__main__":   # Ctrl-C while torch imports: one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))

import torch

import data
import dist
import model as model_lib
import orpo
from dist import print0

TINY_LR = 1e-3            # lr for the tiny from-scratch preset; the paper's 5e-6 is for fine-tuning 7B models
PAPER_LR = 5e-6           # official Mistral-ORPO scripts
MAX_BAD_STEPS = 5         # consecutive NaN/inf steps (each skipped) before the run stops
UF = "HuggingFaceH4/ultrafeedback_binarized"    # the paper's data (Mistral-ORPO-α), its train and test splits:
UF_SPLITS = ("train_prefs", "test_prefs")
PAPER_LAM = {"mistral-7b": 0.1, "llama2-7b": 0.2, "phi-2": 0.25}   # the paper's lambdas; the official scripts': 0.1
BETAS = (0.9, 0.999)      # AdamW's (see build_optimizer)
MODULES = ("torch", "safetensors", "tokenizers", "huggingface_hub")   # whose versions run.json records


class UserError(ValueError):
    """Bad input from the command line: printed as one line, exit status 2."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights at the end: exit status 1."""


BAD_INPUT = (UserError, FileNotFoundError, data.DataError, model_lib.CheckpointError, model_lib.ModelConfigError)


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="ORPO: SFT + lam * odds-ratio penalty, one stage, no reference model.")
    add = p.add_argument
    add("--model", default="tiny", help="a model.py preset (tiny, mistral-7b, ...), a local HF dir or a Hub id")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bfloat16 on CUDA, else float32")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    add("--attention", default="auto", choices=model_lib.KERNELS, help="auto = flash, else varlen, else sdpa (CPU)")
    add("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    add("--data", help=f"pairs: parquet file, folder, glob, Hub id or synthetic (data.py's); a checkpoint's: {UF}")
    add("--split", help=f"split of --data to train on ({UF_SPLITS[0]} for {UF})")
    add("--eval-data", help="held-out pairs, in the forms of --data (a Hub id needs --eval-split)")
    add("--eval-split", help=f"split of --eval-data, else of --data ({UF_SPLITS[1]} for {UF})")
    add("--eval-fraction", type=float, default=0.05, help="else hold out this fraction of the training pairs")
    add("--tokenizer", help="tokenizer dir; None: the model's (synthetic for tiny)")
    add("--template", default="auto", help="auto (HH-RLHF raw, else the tokenizer's or Zephyr) | zephyr | raw | .jinja")
    add("--columns", help="the data's column names, e.g. prompt=q,chosen=good,rejected=bad or conversations=turns")
    add("--max-length", type=int, default=2048, help="max prompt + answer tokens (paper: 2048 UltraFeedback, 1024 HH)")
    add("--max-prompt-length", type=int, help="longer prompts are dropped; None: min(1024 (paper), --max-length)")
    add("--prompt-loss", action=argparse.BooleanOptionalAction, default=True, help="prompt tokens in L_SFT (as TRL)")
    add("--shared-prompt", action=argparse.BooleanOptionalAction, default=True, help="pack [prompt|chosen|rejected]")
    add("--synthetic-pairs", type=int, default=2000, help="size of the synthetic train set")
    add("--lam", type=float, help="weight of L_OR (0: SFT); the paper's: 0.1 mistral-7b, 0.2 llama2-7b, 0.25 phi-2")
    add("--lr", type=float, help=f"peak learning rate; {PAPER_LR} for a checkpoint (official scripts)")
    add("--epochs", type=float, help="passes over the training pairs; 5 for a checkpoint (official scripts)")
    add("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    add("--batch-size", type=int, help="pairs per optimizer step, over all ranks and micro-batches; 32 official")
    add("--max-tokens", type=int, help="instead of --batch-size: tokens per micro-batch per rank (length-grouped)")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add("--warmup-steps", type=int, help="linear warmup steps; 200 for a checkpoint (official scripts)")
    add("--schedule", default="cosine", choices=["cosine", "inverse_sqrt", "constant"], help="cosine to 0: paper")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official scripts: 0)")
    add("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 disables clipping")
    add("--seed", type=int, default=42, help="seed of the random init (tiny) and of the data order")
    add("--out", default="out", help="output dir: metrics.jsonl, run.json, curves.png, ckpt/, best/, final/")
    add("--resume", action="store_true", help="continue OUT/ckpt exactly (a changed setting is refused, see README)")
    add("--save-every", type=int, help="checkpoint every N steps and at the end (0: only then); 500 for a checkpoint")
    add("--eval-every", type=int, help="eval every N steps and at the end (0: only then); 500 for a checkpoint")
    add("--log-every", type=int, default=1, help="log a metrics line every N steps")
    add("--keep-checkpoints", type=int, default=2, help="how many step checkpoints to keep (at least 1)")
    add("--no-export", action="store_true", help="skip the final HF export (and the best/ export)")
    add("--comm-timeout", type=float, default=dist.COMM_TIMEOUT_S, help="seconds to wait for a stalled or dead rank")
    add("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="also log to TensorBoard or W&B")
    # the model's defaults (--help shows them): the tiny preset trains from scratch in under a minute on the synthetic
    # pairs; a checkpoint fine-tunes as the official scripts did, on the paper's UltraFeedback (as Mistral-ORPO-α)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="tiny")
    model = pre.parse_known_args(argv)[0].model
    tiny = model == "tiny"
    p.set_defaults(data="synthetic" if tiny else UF, lam=PAPER_LAM.get(model, 0.1), lr=TINY_LR if tiny else PAPER_LR,
                   epochs=3 if tiny else 5, batch_size=16 if tiny else 32, warmup_steps=10 if tiny else 200,
                   save_every=50 if tiny else 500, eval_every=50 if tiny else 500)
    args = p.parse_args(argv)
    if args.max_prompt_length is None:
        args.max_prompt_length = min(1024, args.max_length)
    sink = args.report_to     # optional packages: a missing one is said before any work
    if sink != "none" and importlib.util.find_spec(sink) is None:
        p.exit(2, f"error: --report-to {sink}: {sink} is not installed (pip install {sink})\n")
    if args.data == UF:   # its splits, as the paper: train_prefs, evaluated on test_prefs
        args.split = args.split or UF_SPLITS[0]
        args.eval_split = args.eval_split or (UF_SPLITS[1] if args.eval_data is None else None)
    args.data = None if args.data == "synthetic" else args.data   # None: the synthetic pairs
    return args


def check_args(args: argparse.Namespace, world_size: int) -> tuple[Path | None, dict | None]:
    """Every flag check that needs no model, up front, in one line naming the flag. -> (checkpoint, its state)."""
    at_least = {"--grad-accum": 1, "--log-every": 1, "--keep-checkpoints": 1, "--batch-size": 1, "--max-tokens": 1,
                "--max-steps": 1, "--synthetic-pairs": 1, "--warmup-steps": 0, "--save-every": 0, "--eval-every": 0}
    checks = {flag: (v, v is None or v >= low, f"at least {low}" + " (0 = only at the end)" * flag.endswith("every"))
              for flag, low in at_least.items() for v in [getattr(args, flag[2:].replace("-", "_"))]}
    # (value, ok, what it must be); a comparison with nan is False, so nan fails too
    checks |= {"--lr": (args.lr, 0 < args.lr < math.inf, "a positive number"),
              "--epochs": (args.epochs, 0 < args.epochs < math.inf, "a positive number"),
              "--lam": (args.lam, 0 <= args.lam < math.inf, "a number >= 0"),
              "--grad-clip": (args.grad_clip, 0 <= args.grad_clip < math.inf, "a number >= 0 (0 = no clipping)"),
              "--weight-decay": (args.weight_decay, 0 <= args.weight_decay < math.inf, "a number >= 0"),
              "--eval-fraction": (args.eval_fraction, 0 <= args.eval_fraction < 1, "in [0, 1): a share of the pairs"),
              # numpy's legacy seeding (and so many a library) takes 32 bits
              "--seed": (args.seed, 0 <= args.seed < 2**32, "an integer in [0, 2**32 - 1]"),
              "--comm-timeout": (args.comm_timeout, 0 < args.comm_timeout < math.inf, "a positive number of seconds")}
    for flag, (value, ok, what) in checks.items():
        if not ok:
            raise UserError(f"{flag} {value}: must be {what}")
    if args.split is not None and args.data is None:
        raise UserError(f"--split {args.split} needs --data (the synthetic default has no splits)")
    if args.eval_split is not None and args.data is None and args.eval_data is None:
        raise UserError(f"--eval-split {args.eval_split} needs --data or --eval-data (synthetic pairs have no splits)")
    if args.max_tokens is None and args.batch_size % (world_size * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of "
                        f"world size {world_size} x --grad-accum {args.grad_accum}")
    data.check_lengths(args.max_length, args.max_prompt_length)
    data.parse_columns(args.columns)
    try:
        data.check_template(args.template)
    except FileNotFoundError as e:
        raise UserError(f"--template: {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    latest, saved = dist.find_resumable_checkpoint(out / "ckpt")   # the newest intact one; damaged ones are named
    if saved and not args.resume:   # a fresh start beside another run's checkpoints would mix them (pruning, latest)
        raise UserError(f"--out {out} already holds checkpoints of an earlier run (step {saved['step']}); "
                        f"pass --resume to continue it, or choose another --out")
    # DCP could reshard the weights, but not the data order (batch b to rank b % world_size) and per-rank RNG states
    if saved and saved["world_size"] != world_size:
        raise UserError(f"resume needs the same number of ranks: the checkpoint was written by "
                        f"{saved['world_size']}, this run has {world_size}")
    if args.resume and not saved:
        print0(f"--resume: no checkpoint in {out / 'ckpt'}, starting from scratch")
    return latest, saved


def check_model(args, config, tok, device, compute_dtype) -> None:
    """The checks that need the model's config: every token id embeds (else an IndexError, on CUDA a device-side
    assert), the kernel runs here, there are enough learned positions."""
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"--tokenizer {args.tokenizer or '(default)'} has {tok.vocab_size} ids but --model "
                        f"{args.model} embeds {config.vocab_size} (vocab_size): use one with at most that many")
    model_lib.pick_attention(args.attention, device, compute_dtype, config.sliding_window)   # it runs here
    if config.positions == "learned" and args.max_length > config.max_seq_len:
        raise UserError(f"--max-length {args.max_length} is longer than the {config.max_seq_len} positions "
                        f"{args.model} has learned; use --max-length {config.max_seq_len} or less")


def check_settings(args, saved: dict | None, now: dict) -> None:
    """--resume continues one trajectory: a setting in `now` (by the flag that sets it) that differs from the
    checkpoint's is refused in one line (the optimizer and scheduler states would keep the old lr, the rest change
    the run mid-way). One change is allowed: the total, under a schedule that ignores it (constant, inverse_sqrt)."""
    for flag, value in json.loads(json.dumps(now)).items() if saved else ():   # as JSON has them: tuples are lists
        old, total = saved.get("settings", {}).get(flag, value), flag == "--max-steps/--epochs"   # unknown: unchecked
        if value != old and (not total or args.schedule == "cosine"):
            if flag == "--model":
                field = next(k for k in {**old, **value} if value.get(k) != old.get(k))
                value, old = f"{args.model} ({field} {value[field]})", f"{field} {old.get(field)}"
            why = " (cosine decays over the total: only constant and inverse_sqrt may grow)" if total else ""
            raise UserError(f"{flag} {value} differs from the checkpoint's {old}{why}: resume with the saved value, "
                            f"or start a new run in another --out")


# -----------------------------------------------------------------------------
# model, tokenizer, data

def build_model(args, config, ckpt_dir, device, compute_dtype):
    """meta device -> (activation checkpointing) -> FSDP2 -> to_empty -> weights, one tensor at a time."""
    with torch.device("meta"):
        model = model_lib.Transformer(config, attention=args.attention)
    model = dist.shard_model(model, param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                             reduce_dtype=torch.float32, activation_checkpointing=args.activation_checkpointing)
    dist.materialize(model, device)
    if ckpt_dir is None:
        dist.load_weights(model, model_lib.random_init_tensors(config, args.seed), f"random init of {args.model}")
    else:
        dist.load_weights(model, model_lib.iter_hf_tensors(ckpt_dir, config), str(ckpt_dir))
    # no buffers are left uninitialised by to_empty (RoPE is computed per forward); a tied lm_head stays tied
    assert not config.tie_embeddings or model.lm_head.weight is model.tok_embeddings.weight
    return model


def load_data(args, tok, config, ckpt_dir, rank: int, world_size: int, resumed: bool):
    """The pairs (data.train_and_eval_pairs), OUT/run.json at a fresh start, then the batchers -> (train batcher, eval
    batcher or None, optimizer steps per epoch). --batch-size is global: each step is the same pairs in the same
    order however it is split into ranks x --grad-accum micro-batches (data.PairBatcher)."""
    train, evals, origin = data.train_and_eval_pairs(
        args.data or "synthetic", args.split, args.eval_data or (None if args.data else "synthetic"), args.eval_split,
        args.eval_fraction, args.seed, tok, Path(args.out) / "data", synthetic_pairs=args.synthetic_pairs,
        writer=rank == 0, barrier=dist.barrier, log=print0, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, template=args.template, columns=data.parse_columns(args.columns))
    # the exports carry the template the pairs were rendered with (None: raw text), not just the tokenizer's own
    tok.chat_template = origin["chat_template"]
    run_json = Path(args.out) / "run.json"
    if rank == 0 and not (resumed and run_json.exists()):
        run_json.write_text(json.dumps(run_record(args, origin, tok, ckpt_dir), indent=1) + "\n")
    long = sum(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > config.max_seq_len
               for p in itertools.chain(train, evals))
    if long and config.positions == "rope":   # (past learned positions, check_model refuses the run)
        print0(f"warning: {long} of {len(train) + len(evals)} pairs are longer than the {config.max_seq_len} positions"
               f" (max_position_embeddings) of --model {args.model}; --max-length {config.max_seq_len} cuts them")
    size = (dict(batch_size=args.batch_size // (world_size * args.grad_accum)) if args.max_tokens is None
            else dict(max_tokens=args.max_tokens))
    kw = dict(seed=args.seed, rank=rank, world_size=world_size, shared_prompt=args.shared_prompt,
              prompt_loss=args.prompt_loss, **size)
    batcher = data.PairBatcher(train, grad_accum=args.grad_accum, **kw)
    info = batcher.epoch_info(0)
    if dropped := info["pairs_dropped"]:   # a different remainder each epoch
        print0(f"train: {dropped} pairs per epoch left out so that every rank gets the same micro-batches")
    eval_batcher = data.PairBatcher(evals, drop_remainder=False, **kw) if len(evals) else None   # all pairs count
    return batcher, eval_batcher, info["batches_per_rank"] // args.grad_accum


def run_record(args, origin: dict, tok, ckpt_dir) -> dict:
    """OUT/run.json: what eval_rm.py (`demo --root OUT`) and the exports read, and what reproduces the run."""
    sources = [(origin["data"], args.split), (origin["eval_data"], args.eval_split)]
    files = dict.fromkeys(f for src, split in sources if src for f in data.resolve_files(src, split))
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                                 capture_output=True, text=True).stdout.strip()
    gen = Path(ckpt_dir or "") / "generation_config.json"   # the base's, else what generate() needs
    return {**{k: vars(args)[k] for k in ("model", "seed", "template", "max_length", "max_prompt_length")},
            "tokenizer": args.tokenizer or ("synthetic" if ckpt_dir is None else None),   # null: --model's own
            "train_data": origin["data"], "train_split": args.split,
            "eval_data": origin["eval_data"], "eval_split": args.eval_split,   # null: held out of the train pairs
            "args": vars(args),
            "command": shlex.join(sys.argv),
            "data_files": [{"path": str(f), "size": f.stat().st_size,
                            "sha256": hashlib.file_digest(f.open("rb"), "sha256").hexdigest()} for f in files],
            "versions": {"python": sys.version.split()[0], **{m: __import__(m).__version__ for m in MODULES},
                         "git_commit": git or None},
            "generation_config": json.loads(gen.read_text()) if ckpt_dir and gen.is_file() else
                                 {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}}


# -----------------------------------------------------------------------------
# the ORPO step

def train_step(model, micro_batches, lam: float, device, autocast=nullcontext(), optimizer=None, scheduler=None,
               grad_clip: float = 0.0) -> dict:
    """One optimizer step on this rank's micro-batches (data.PackedBatch) -> the metrics of the whole step
    (all micro-batches, all ranks). Without an optimizer it stops after the backward (the gradients stay in
    .grad), and under torch.no_grad after the forward: Trainer.run_eval is this step without the update."""
    # eq. 6's denominators count every micro-batch of the step on every rank (known before any forward)
    counts = dist.all_reduce_sum({"pairs": sum(b.n_pairs for b in micro_batches),
                                  "nll": sum(b.n_nll_tokens for b in micro_batches)}, device)
    world_size = dist.get_dist_info()[3]
    sums = {}
    for batch in micro_batches:
        b, P = batch.to(device), batch.n_pairs
        with autocast:   # ONE forward: the chosen and the rejected answers of the P pairs in one packed stream
            hidden = model.packed_hidden(b.input_ids, b.position_ids, b.seg_lens)          # (N, D)
            logps = model.token_logps(hidden, b.tgt_index, b.tgt_ids)                     # (M,) float32
        seq_logps = orpo.mean_logps(logps[b.tgt_response], b.tgt_seq[b.tgt_response], 2 * P)   # (2P,) eq. 3
        or_losses, per_pair = orpo.odds_ratio_loss(seq_logps[:P], seq_logps[P:])         # (P,) eq. 7
        nll_sum = -logps[b.tgt_nll].sum()                               # L_SFT over the chosen tokens, summed
        # eq. 6 for the whole step, L = sum NLL / n_nll + lam * sum L_OR / n_pairs, where n_nll (tokens) and
        # n_pairs count all micro-batches on all ranks: each micro-batch adds its own terms of the two sums, so
        # the gradients that backward accumulates over micro-batches and FSDP reduces over ranks add up to
        # exactly one big batch's gradient. FSDP *averages* over ranks; the factor world_size undoes that.
        loss = nll_sum / counts["nll"] + lam * or_losses.sum() / counts["pairs"]
        if torch.is_grad_enabled():
            (loss * world_size).backward()
        # metric sums stay device tensors: reading one here would make the host wait for this forward
        for k, v in {"nll": nll_sum.detach(), **{k: v.sum() for k, v in per_pair.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v
    if optimizer is not None:   # the global grad norm over all ranks (a DTensor under FSDP2), clipped when > 0
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf, foreach=True)
    sums = dist.all_reduce_sum(sums, device)                  # all metrics: one collective, one host sync
    m = {k: v / counts["pairs"] for k, v in sums.items()}     # means over the pairs...
    m["nll"] = sums["nll"] / counts["nll"]                     # ...and over the NLL tokens
    m["loss"] = m["nll"] + lam * m["or_loss"]                 # eq. 6, as logged
    if optimizer is None:
        return m
    m["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    m["skipped"] = not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]))
    if not m["skipped"]:           # a NaN/inf update would ruin the weights and AdamW's moments for good
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    m["lr"] = scheduler.get_last_lr()[0]
    scheduler.step()
    return m


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW, weight decay on matrices only; betas and eps of torch and of the Trainer the official scripts ran."""
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]   # norms, biases
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=1e-8, fused=True)   # CPU too: 1/3 of the loop's time


# -----------------------------------------------------------------------------
# logging and curves

def metrics_logger(args, resumed_step: int | None):
    """Rank 0's logger: appends a record to OUT/metrics.jsonl and, with --report-to, logs its numbers under the same
    names to W&B or TensorBoard (OUT/tensorboard/). What came after the checkpoint a run resumes from is cut from
    both (all of it at a fresh start: a run killed before its first checkpoint), so they read as one run."""
    path = Path(args.out) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    keep = lines[:-1] if lines and not lines[-1].endswith("}") else lines   # records are flat: "}" ends each one
    if len(keep) < len(lines):       # the last record of a run killed while writing it
        print0(f"{path}: dropped its torn last line (written by an interrupted run)")
    keep = [l for l in keep if resumed_step is not None and l.strip() and json.loads(l)["step"] <= resumed_step]
    if keep != lines:
        path.write_text("".join(l + "\n" for l in keep))
    sink = None
    if args.report_to == "wandb":
        import wandb
        sink = wandb.init(project="orpo", dir=args.out, config=vars(args)).log
    elif args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        first = 0 if resumed_step is None else resumed_step + 1
        tb = SummaryWriter(str(Path(args.out) / "tensorboard"), purge_step=first)

        def sink(values, step):
            for k, v in values.items():
                tb.add_scalar(k, v, step)
            tb.flush()                  # a run that stops early keeps what it logged

    def log(rec):
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if sink:                        # the numbers: not the flags (eval, best, skipped), not None
            sink({k: v for k, v in rec.items() if type(v) in (int, float) and k != "step"}, step=rec["step"])
    return log


CURVES = {"logps": "mean log P(y|x) per token (eq. 3)", "log_odds": "log odds ratio (eq. 5)",
          "nll": "L_SFT (NLL)", "or_loss": "L_OR (eq. 7)"}


def plot_curves(runs: dict, png_path, panels=tuple(CURVES), title=None) -> None:
    """The paper's Figs. 3 and 7 from {run name: its metrics.jsonl records}: chosen and rejected log-probs (a panel
    per run), then log odds, NLL and L_OR (runs overlaid); lines: train batches (smoothed), dots: held-out.
    x = updates before the forward: s - 1 for train step s, s for an eval at s."""
    from matplotlib import figure, style        # no pyplot: no GUI backend, no global figure state
    style.use(Path(__file__).with_name("plots.mplstyle"))
    cells = [(p, n) for p in panels for n in (runs if p == "logps" else [None])]   # (panel, its one run or None)
    fig = figure.Figure(figsize=(max(6.4, 3.6 * len(cells)), 3.6), layout="constrained")
    for ax, (panel, only) in zip(fig.subplots(1, len(cells), squeeze=False)[0], cells):
        for i, (name, recs) in enumerate((n, r) for n, r in runs.items() if only in (None, n)):
            lines = ([("chosen_logps", "C0", "chosen "), ("rejected_logps", "C1", "rejected ")] if panel == "logps"
                     else [(panel, f"C{i}", name and name + " ")])
            train, evals = [r for r in recs if not r.get("eval")], [r for r in recs if r.get("eval")]
            k = max(1, len(train) // 30)        # a moving average over k steps: single batches are noisy
            for key, color, label in lines:
                y = [sum(r[key] for r in train[j - k + 1:j + 1]) / k for j in range(k - 1, len(train))]
                ax.plot([r["step"] - 1 for r in train][k - 1:], y, color=color, label=f"{label}train")
                ax.plot([r["step"] for r in evals], [r[f"eval_{key}"] for r in evals], "o--", color=color,
                        markersize=4, linewidth=0.8, label=f"{label}held-out")
        ax.set(title=only or CURVES[panel], xlabel="optimizer step")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(png_path)


# -----------------------------------------------------------------------------
# the run

class Trainer:
    """One run: __init__ builds it in fail-fast order (flags, --out and checkpoint, model config, data, weights),
    fit() trains it; it holds what they share, and the counters a checkpoint keeps besides weights and schedule."""

    def __init__(self, args, argv=()):
        self.args, self.argv, self.t_start = args, list(argv), time.time()
        self.device = dist.compute_init(args.device, args.comm_timeout)
        _, self.rank, _, self.world_size = dist.get_dist_info()
        ckpt, saved = check_args(args, self.world_size)
        compute_dtype = dist.resolve_dtype(args.dtype, self.device)
        torch.manual_seed(args.seed)
        self.config, ckpt_dir = model_lib.resolve_model(args.model)
        # --tokenizer, else the checkpoint's own, else (a weightless preset) the synthetic one (vocab <= 512)
        self.tok = data.load_tokenizer(args.tokenizer or ckpt_dir or "synthetic")
        check_model(args, self.config, self.tok, self.device, compute_dtype)
        self.out, self.metrics_path = Path(args.out), Path(args.out) / "metrics.jsonl"
        if holder := dist.lock_out_dir(self.out, self.device):   # one run per --out (two would interleave their files)
            raise UserError(f"--out {self.out} is in use by {holder}; wait for it or choose another --out")
        self.batcher, self.eval_batcher, steps_per_epoch = load_data(args, self.tok, self.config, ckpt_dir, self.rank,
                                                                     self.world_size, resumed=ckpt is not None)
        if saved is not None:   # data.py refuses a position saved under other batching settings or other data
            self.batcher.load_state_dict(saved["batcher"])
        self.total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
        self.settings = {"--lr": args.lr, "--weight-decay": args.weight_decay, "AdamW betas": BETAS, "--lam": args.lam,
                         "--grad-clip": args.grad_clip, "--schedule": args.schedule, "--prompt-loss": args.prompt_loss,
                         "--shared-prompt": args.shared_prompt, "--dtype": str(compute_dtype).removeprefix("torch."),
                         "--model": dataclasses.asdict(self.config), "--warmup-steps": args.warmup_steps,
                         "--max-steps/--epochs": self.total_steps}
        check_settings(args, saved, self.settings)     # before the weights are read
        schedule = dist.lr_lambda(args.schedule, args.warmup_steps, self.total_steps)
        if args.warmup_steps >= self.total_steps:
            peak = args.lr * schedule(self.total_steps - 1)
            print0(f"warning: {self.total_steps} steps with warmup {args.warmup_steps}: the lr never reaches its "
                   f"peak (max {peak:.1e} of {args.lr:.1e})")
        self.model = build_model(args, self.config, ckpt_dir, self.device, compute_dtype)
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # one process on a GPU: bf16 compute comes from autocast (under FSDP, FSDP casts the params itself)
        use_autocast = compute_dtype != torch.float32 and self.world_size == 1
        self.autocast = torch.autocast(self.device.type, dtype=compute_dtype) if use_autocast else nullcontext()
        # a sharded parameter reports its global shape; tied ones count once
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_matmul = self.model.matmul_params()
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none"
        self.peak_flops = next((v for k, v in model_lib.PEAK_FLOPS.items() if k in gpu), None)   # unknown: None
        print0(f"model {args.model}: {self.n_params / 1e6:.2f}M params ({self.n_matmul / 1e6:.2f}M in matmuls: MFU's "
               f"6N, as torchtitan), {self.config.n_layers} layers | device {self.device} x {self.world_size} | dtype "
               f"{compute_dtype} | lam {args.lam} | lr {args.lr} {args.schedule}, warmup {args.warmup_steps} | "
               f"batch {args.batch_size if args.max_tokens is None else f'{args.max_tokens} tokens/micro'} x accum "
               f"{args.grad_accum} | {self.total_steps} steps ({steps_per_epoch}/epoch)")
        self.log = metrics_logger(args, saved and saved["step"]) if self.rank == 0 else None
        self.resume(ckpt)

    def resume(self, ckpt: Path | None) -> None:
        """Counters, weights, optimizer, RNG and schedule from `ckpt`; without one, a fresh start."""
        self.step, self.epoch, self.best_eval, self.bad_steps = 0, 0, math.inf, 0
        if ckpt is None:
            return
        saved = dist.load_checkpoint(ckpt, self.model, self.optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step, self.epoch, self.best_eval, self.bad_steps = (saved[k] for k in ("step", "epoch", "best_eval",
                                                                                    "bad_steps"))
        print0(f"resumed from {ckpt} at step {self.step}")

    def fit(self) -> int:
        """The steps to the end with logs, evals and checkpoints, then finish(). -> exit status (128 + a signal's)."""
        args = self.args
        if self.step >= self.total_steps:    # --resume of a complete run
            return self.finish(complete=True)
        self.model.train()
        if self.step == 0 and args.eval_every:
            self.run_eval()                           # the starting point of the eval curves
        stream = (batch for _ in itertools.count() for batch in self.batcher)
        stop = []   # SIGINT/SIGTERM from here on: the first ends the run after its step, with a checkpoint; a second
        for s in (signal.SIGINT, signal.SIGTERM):   # exits at once (even inside a collective; the last save stays)
            signal.signal(s, lambda signum, _: os._exit(128 + signum) if stop else stop.append(signum))
        while self.step < self.total_steps:
            t0 = time.time()
            micro = [next(stream) for _ in range(args.grad_accum)]
            m = train_step(self.model, micro, args.lam, self.device, self.autocast, self.optimizer, self.scheduler,
                           args.grad_clip)
            self.step, self.epoch = self.step + 1, self.batcher.epoch
            self.bad_steps = self.bad_steps + 1 if m["skipped"] else 0
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.time() - t0
            if self.step % args.log_every == 0 or self.step == self.total_steps or m["skipped"]:
                self.log_step(m, micro, dt)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise TrainingDiverged(f"{self.bad_steps} consecutive steps had a NaN/inf loss or gradient; stopping "
                                       f"at step {self.step} (last good checkpoint: {self.out / 'ckpt'}/latest); try "
                                       f"a lower --lr or --dtype float32")
            if self.step < self.total_steps:           # the last step is evaluated and saved by finish()
                if signum := int(dist.all_reduce_max(stop[0] if stop else 0, self.device)):   # all ranks, one step
                    saved, argv = self.save(), self.argv + ([] if "--resume" in self.argv else ["--resume"])
                    run = "python" if self.world_size == 1 else f"torchrun --nproc_per_node {self.world_size}"
                    print0(f"{signal.Signals(signum).name}: stopped at step {self.step}"
                           f"{', checkpoint written' * saved}; resume with: {run} train.py {shlex.join(argv)}",
                           file=sys.stderr)
                    return 128 + signum   # as a shell reports a process the signal ended
                if args.eval_every and self.step % args.eval_every == 0:
                    self.run_eval()
                if args.save_every and self.step % args.save_every == 0:
                    self.save()
        return self.finish()

    def log_step(self, m: dict, micro, dt: float) -> None:
        """The step's record with throughput, MFU, memory and time (collectives: all ranks call it); rank 0 logs it."""
        c = self.config
        flops = model_lib.step_flops(self.n_matmul, c.n_layers, c.n_heads * c.head_dim, micro)
        totals = dist.all_reduce_sum({"tokens": sum(b.num_tokens for b in micro), "flops": flops}, self.device)
        mfu = totals["flops"] / dt / (self.peak_flops * self.world_size) if self.peak_flops else None
        mem = (torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)   # Linux reports kB
        rec = {"step": self.step, "epoch": self.epoch, **m, "tokens": totals["tokens"],
               "tokens_per_s": totals["tokens"] / dt, "mfu": mfu, "mem_gb": dist.all_reduce_max(mem, self.device),
               "time": time.time() - self.t_start}
        if self.rank == 0:
            self.log(rec)
            print0(f"step {self.step:>5d}/{self.total_steps} | loss {m['loss']:.4f} | nll {m['nll']:.4f} | "
                   f"or {m['or_loss']:.4f} | log_odds {m['log_odds']:+.3f} | logp w {m['chosen_logps']:.3f} "
                   f"l {m['rejected_logps']:.3f} | acc {m['reward_acc']:.2f} | margin {m['reward_margin']:+.3f} | "
                   f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s"
                   + ("" if mfu is None else f" | mfu {100 * mfu:.1f}%") + f" | mem {rec['mem_gb']:.2f}GB"
                   + (" | SKIPPED (non-finite)" if m["skipped"] else ""))

    def run_eval(self) -> dict | None:
        """Eval metrics on the held-out pairs (None without any); a new best (of finite weights) goes to OUT/best/."""
        if self.eval_batcher is None:
            return None
        self.model.eval()
        self.eval_batcher.rewind()          # the same eval batches every time
        with torch.no_grad():               # train_step without an update: the metrics of all held-out pairs
            m = train_step(self.model, list(self.eval_batcher), self.args.lam, self.device, self.autocast)
        self.model.train()
        improved = m["loss"] < self.best_eval and not dist.nonfinite(dict(self.model.named_parameters()), self.device)
        self.best_eval = m["loss"] if improved else self.best_eval
        if improved and not self.args.no_export:
            self.export(self.out / "best", m)
        if self.rank == 0:
            self.log({"step": self.step, "eval": True, **{f"eval_{k}": v for k, v in m.items()}, "best": improved})
            print0(f"eval  {self.step:>5d} | loss {m['loss']:.4f} | nll {m['nll']:.4f} | or {m['or_loss']:.4f} | "
                   f"log_odds {m['log_odds']:+.3f} | acc {m['reward_acc']:.2f}"
                   + (f" | best so far -> {self.out / 'best'}" if improved and not self.args.no_export else ""))
        return m

    def save(self) -> bool:   # -> written
        if dist.nonfinite(dict(self.model.named_parameters()), self.device):
            print0(f"step {self.step}: the weights hold NaN/inf: no checkpoint written (the last good one stays)")
            return False
        state = {"step": self.step, "epoch": self.epoch, "best_eval": self.best_eval, "bad_steps": self.bad_steps,
                 "world_size": self.world_size, "scheduler": self.scheduler.state_dict(),
                 "batcher": self.batcher.state_dict(), "settings": self.settings}
        dist.save_checkpoint(self.out / "ckpt", self.step, self.model, self.optimizer, state,
                             keep=self.args.keep_checkpoints)
        return True

    def finish(self, complete=False) -> int:
        """Final eval, checkpoint, export (never of NaN/inf weights), curves.png and a summary of what was written.
        Of a run resumed complete: only a missing export (a kill while exporting). -> exit status"""
        args, out = self.args, self.out
        e1 = None if complete else self.run_eval()
        finite = complete or self.save()
        missing = finite and not args.no_export and not (complete and (out / "final" / "config.json").is_file())
        if missing:
            self.export(out / "final", e1)
        if complete:
            print0(f"the run in {out} is already complete: its checkpoint is at step {self.step}, this run has "
                   f"{self.total_steps} steps" + ("; wrote its missing export final/" if missing else ""))
        elif self.rank == 0:   # of the whole run's metrics.jsonl (a resumed run's too): curves.png, first -> last
            recs = [json.loads(l) for l in self.metrics_path.read_text().splitlines() if l]
            plot_curves({"": recs}, out / "curves.png", title=f"ORPO, lam {args.lam}: {out.resolve().name}")
            train, evals = [r for r in recs if not r.get("eval")], [r for r in recs if r.get("eval")]
            for name, pre, rs in (("train", "", train), ("held-out", "eval_", evals)):
                if len(rs) > 1:
                    print(f"{name}: " + " | ".join(f"{k} {rs[0][pre + k]:.3f} -> {rs[-1][pre + k]:.3f}"
                                                    for k in ("nll", "log_odds", "reward_acc")))
        print0(f"done at step {self.step} after {time.time() - self.t_start:.0f}s")
        outputs = {"final/config.json": "final/ and best/ (Hub-ready: weights, tokenizer, README.md card)",
                   "ckpt/latest": "ckpt/ (--resume)", "run.json": "run.json", "curves.png": "curves.png",
                   "metrics.jsonl": "metrics.jsonl", "data": "data/ (synthetic pairs)"}
        print0(f"outputs in {out}/: " + ", ".join(what for f, what in outputs.items() if (out / f).exists()))
        if not finite:
            raise TrainingDiverged(f"the weights hold NaN/inf at step {self.step}: {out / 'final'} not written; try "
                                   f"a lower --lr or --dtype float32")
        if not args.no_export:     # eval_rm.py evaluates OUT/final, reading OUT/run.json
            root = "" if str(out) == "out" else f" demo --root {shlex.quote(str(out))}"
            print0(f"evaluate with:  python eval_rm.py{root}")
        return 0

    def export(self, out_dir: Path, metrics: dict | None) -> None:
        """OUT/final or OUT/best as a Hub repo: weights, tokenizer, generation config and model card (of run.json)."""
        run = json.loads((self.out / "run.json").read_text()) if self.rank == 0 else None   # rank 0 writes files
        files = run and {"README.md": model_card(run, self.step, metrics),
                         "generation_config.json": json.dumps(run.get("generation_config", {}), indent=2)}
        dist.export_hf(self.model, self.config, self.tok, out_dir, files=files)


def model_card(run: dict, step: int, metrics: dict | None) -> str:
    """README.md of an export: the Hub's front matter, the base, the held-out metrics, and run.json for the rest
    (data, lambda, command, versions). It is uploaded as it is: absolute local paths show as their file names,
    except on the line that names a local base."""
    a = run["args"]
    on_hub = lambda v: isinstance(v, str) and bool(data.HUB_ID.fullmatch(v)) and not Path(v).exists()
    base = model_lib.PRESETS.get(a["model"], a["model"])
    datasets = [f"- {d}" for d in dict.fromkeys((run["train_data"], run["eval_data"])) if on_hub(d)]
    origin = (f"[{base}](https://huggingface.co/{base})" if on_hub(base) else f"trained from {a['model']}"
              if Path(a["model"]).is_dir() else f"the `{a['model']}` preset, random init (seed {a['seed']})")
    meta = [f"base_model: {base}"] * on_hub(base) + ["datasets:"] * bool(datasets) + datasets
    head = ["---", *meta, "library_name: transformers", "tags:", "- orpo", "---", "",
            f"# {Path(a['out']).resolve().name}", "", f"Base model: {origin}."]
    source = lambda d, split: f"`{d}`" + (f" [{split}]" if split else "")
    train = source(run["train_data"], run["train_split"])
    held_out = source(run["eval_data"], run["eval_split"]) if run["eval_data"] else "pairs of the training data"
    body = [f"Fine-tuned with ORPO (Hong, Lee & Thorne, 2024, [arXiv 2403.07691](https://arxiv.org/abs/2403.07691)), "
            f"lam {a['lam']}, on {train}, by train.py of *ORPO, from scratch*. Held-out: {held_out}.", "",
            f"| step {step} | |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in (metrics or {}).items()), "",
            f"Made with `{run['command']}`; its OUT/run.json:", "", "```json", json.dumps(run, indent=1), "```", ""]
    body = re.sub(r"(?<![\w.:/~-])/[^\s'\"`,]+", lambda m: Path(m[0]).name, "\n".join(body))   # local paths -> names
    return "\n".join(head) + "\n" + body


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:     # a signal before fit() raises KeyboardInterrupt: nothing to save yet
        return Trainer(args, sys.argv[1:] if argv is None else argv).fit()
    except KeyboardInterrupt:
        print0("interrupted", file=sys.stderr)
        return 130
    except (TrainingDiverged, ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # bad input (and a divergence) is the same on every rank: said once; anything else may be one rank's alone
        (print0 if isinstance(e, (*BAD_INPUT, TrainingDiverged)) else print)(f"error: {msg}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    except (OSError, RuntimeError) as e:   # a full disk, an unwritable --out, a stalled or dead rank: no traceback
        if not (line := dist.fault_line(e)):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    finally:
        dist.compute_cleanup()
        for s, handler in handlers.items():
            signal.signal(s, handler or signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
