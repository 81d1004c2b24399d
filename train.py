"""
Train a causal language model with ORPO (Hong, Lee & Thorne, 2024, arXiv 2403.07691).

    python train.py                                          # tiny model, synthetic pairs, CPU, under a minute
    python train.py --model mistral-7b --data uf.parquet     # one GPU
    torchrun --nproc_per_node 4 train.py --model mistral-7b --data uf.parquet --lam 0.1      # FSDP2, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...

One optimizer step, as in torchtitan (early 2025):
  1. take grad_accum packed micro-batches (data.py: chosen and rejected of P pairs in ONE flat stream,
     no padding), count their pairs and NLL tokens, and all-reduce the counts over the ranks;
  2. per micro-batch, ONE forward: hidden = model.packed_hidden(...), the target log-probs from a
     chunked lm_head (model.token_logps), the eq. 3 average log-prob of every response, the chosen
     NLL, and orpo.orpo_loss; each micro-batch loss is weighted by its share of the global counts so
     that the accumulated gradient is exactly the gradient of one big batch; backward;
  3. clip the grad norm, skip the step if anything is NaN/inf, AdamW, lr schedule;
  4. log metrics reduced over ranks; every N steps eval / checkpoint.
The model is built on the meta device, sharded with FSDP2 (dist.py), materialised, then loaded
tensor by tensor, so that no rank ever holds the whole model in host memory.
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import shlex
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import dist
import orpo
from dist import print0

TINY_LR = 1e-3            # lr for the tiny from-scratch preset; the paper's 5e-6 is for fine-tuning 7B models
PAPER_LR = 5e-6           # official Mistral-ORPO scripts
SYNTHETIC_TRAIN_PAIRS = 2000
SYNTHETIC_EVAL_PAIRS = 200


class UserError(ValueError):
    """Bad input from the command line: printed as one line, exit status 2."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


# -----------------------------------------------------------------------------
# command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every default, except the "None" of flags whose help explains their (model-dependent) default."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py", description="ORPO: SFT + lam * odds-ratio penalty, one stage, no reference model.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="a model.py preset (tiny, mistral-7b, ...), a local HF dir or a Hub id")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto = bfloat16 on CUDA, float32 on CPU (master weights are always float32)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "varlen", "flex"],
                   help="attention kernel; auto = flash-attn, else torch varlen, else SDPA. flash, varlen (torch "
                        ">= 2.10) and flex (torch.compile'd flex_attention, opt-in) need CUDA")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--model-config", default=None, help=argparse.SUPPRESS)  # JSON overrides of a preset (tests)

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="training pairs: parquet file, folder, glob or Hub dataset id (with --split); "
                        "default: data.py's synthetic set, written to OUT/data/")
    g.add_argument("--split", default=None, help="split of --data to train on, when it has several")
    g.add_argument("--eval-data", default=None,
                   help="held-out pairs for eval: parquet file, folder, glob or Hub dataset id (a Hub id, or a "
                        "folder of several splits, needs --eval-split)")
    g.add_argument("--eval-split", default=None,
                   help="split to evaluate on (e.g. test_prefs): of --eval-data when given, else of --data")
    g.add_argument("--eval-fraction", type=float, default=0.05,
                   help="without --eval-data/--eval-split: hold out this fraction of the training pairs, 0 <= f < 1 "
                        "(the synthetic default uses a separate held-out synthetic set instead)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir; default: the model's (synthetic for tiny)")
    g.add_argument("--template", default="auto",
                   help="auto (raw text for HH-RLHF, else the tokenizer's chat template or Zephyr's) | zephyr | raw | a .jinja file")
    g.add_argument("--prompt-column", default=None, help="column holding the prompt (or the conversation)")
    g.add_argument("--chosen-column", default=None, help="column holding the chosen response")
    g.add_argument("--rejected-column", default=None, help="column holding the rejected response")
    g.add_argument("--conversations-column", default=None, help="column holding a ShareGPT conversation")
    g.add_argument("--max-length", type=int, default=2048, help="max tokens of prompt + response (paper: 2048 UltraFeedback, 1024 HH-RLHF)")
    g.add_argument("--max-prompt-length", type=int, default=1024, help="pairs with longer prompts are dropped (paper)")
    g.add_argument("--prompt-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="include prompt tokens in L_SFT, as the official code and TRL do")
    g.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="pack [prompt|chosen|rejected] with the prompt computed once (same loss, fewer tokens)")
    g.add_argument("--synthetic-pairs", type=int, default=SYNTHETIC_TRAIN_PAIRS, help="size of the synthetic train set")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lam", type=float, default=0.1, help="lambda, weight of L_OR (paper: 0.1 Mistral, 0.2 Llama-2, 0.25 Phi-2); 0 = plain SFT")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate; default {PAPER_LR} (official scripts), {TINY_LR} for --model tiny")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training pairs; default 5 (official scripts), 3 for tiny")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="pairs per optimizer step, global over ranks and micro-batches; default 32 (official), 16 for tiny")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="instead of --batch-size: token budget of one micro-batch on one rank (length-grouped batches)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps; default 200 (official), 10 for tiny")
    g.add_argument("--warmup-ratio", type=float, default=None,
                   help="instead of --warmup-steps: fraction of total steps, rounded up (as transformers)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "inverse_sqrt", "constant"],
                   help="after warmup: cosine to 0 (paper, Appendix C), inverse_sqrt (official scripts) or constant; "
                        "all three as transformers' get_*_schedule")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official scripts: 0)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 disables clipping")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many consecutive NaN/inf steps")
    g.add_argument("--seed", type=int, default=42, help="seed of the random init (tiny) and of the data order")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="out", help="output dir: metrics.jsonl, ckpt/, best/, final/, data/")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt/latest exactly (same data order, RNG)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps (and at the end); default 500, 50 for tiny; 0 = only at the end")
    g.add_argument("--eval-every", type=int, default=None, help="eval every N steps (and at the end); default 500, 50 for tiny; 0 = only at the end")
    g.add_argument("--log-every", type=int, default=1, help="log a metrics line every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many step checkpoints to keep (at least 1)")
    g.add_argument("--no-export", action="store_true", help="skip the final HF export (and the best/ export)")
    args = p.parse_args(argv)
    apply_preset_defaults(args)
    return args


def apply_preset_defaults(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the model: the tiny preset trains from scratch in under a minute,
    the real presets fine-tune 7B models with the official Mistral-ORPO recipe."""
    tiny = args.model == "tiny"
    defaults = dict(lr=TINY_LR if tiny else PAPER_LR, epochs=3 if tiny else 5,
                    batch_size=16 if tiny else 32, warmup_steps=10 if tiny else 200,
                    save_every=50 if tiny else 500, eval_every=50 if tiny else 500)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible numbers before any work, in one sentence naming the flag: otherwise they fail late
    (--grad-accum 0 divides by zero, --log-every 0 after the first step) or quietly do something else."""
    at_least = {"--grad-accum": (args.grad_accum, 1), "--log-every": (args.log_every, 1),
                "--max-bad-steps": (args.max_bad_steps, 1), "--keep-checkpoints": (args.keep_checkpoints, 1),
                "--batch-size": (args.batch_size, 1), "--max-tokens": (args.max_tokens, 1),
                "--max-steps": (args.max_steps, 1), "--synthetic-pairs": (args.synthetic_pairs, 1),
                "--max-length": (args.max_length, 1), "--max-prompt-length": (args.max_prompt_length, 1),
                "--warmup-steps": (args.warmup_steps, 0), "--save-every": (args.save_every, 0),
                "--eval-every": (args.eval_every, 0)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            off = " (0 = only at the end)" if low == 0 and flag != "--warmup-steps" else ""
            raise UserError(f"{flag} {value}: must be at least {low}{off}")
    # float ranges: a comparison with nan is False, so nan fails too
    ranges = {"--lr": (args.lr, 0 < args.lr < math.inf, "a positive number"),
              "--epochs": (args.epochs, 0 < args.epochs < math.inf, "a positive number"),
              "--lam": (args.lam, 0 <= args.lam < math.inf, "a number >= 0"),
              "--grad-clip": (args.grad_clip, 0 <= args.grad_clip < math.inf, "a number >= 0 (0 = no clipping)"),
              "--weight-decay": (args.weight_decay, 0 <= args.weight_decay < math.inf, "a number >= 0"),
              "--beta1": (args.beta1, 0 <= args.beta1 < 1, "in [0, 1)"),
              "--beta2": (args.beta2, 0 <= args.beta2 < 1, "in [0, 1)"),
              "--eval-fraction": (args.eval_fraction, 0 <= args.eval_fraction < 1,
                                  "in [0, 1): the share of the training pairs held out for eval")}
    if args.warmup_ratio is not None:
        ranges["--warmup-ratio"] = (args.warmup_ratio, 0 <= args.warmup_ratio <= 1, "in [0, 1]")
    for flag, (value, ok, what) in ranges.items():
        if not ok:
            raise UserError(f"{flag} {value}: must be {what}")
    if args.split is not None and args.data is None:
        raise UserError(f"--split {args.split} needs --data (the synthetic default has no splits)")
    if args.eval_split is not None and args.data is None and args.eval_data is None:
        raise UserError(f"--eval-split {args.eval_split} needs --data or --eval-data (the synthetic default has no splits)")


# -----------------------------------------------------------------------------
# model


def resolve_model(name: str, overrides: str | None):
    """model.resolve_model, with the hidden --model-config overrides of a weightless preset (tests)."""
    import model as model_lib

    config, ckpt_dir = model_lib.resolve_model(name)
    if overrides:
        if ckpt_dir is not None:
            raise UserError("--model-config only applies to presets without a checkpoint (tiny)")
        try:
            o = json.loads(overrides)
        except json.JSONDecodeError:
            o = None
        if not isinstance(o, dict):
            raise UserError(f"--model-config {overrides}: not a JSON object of ModelConfig fields")
        unknown = sorted(set(o) - {f.name for f in dataclasses.fields(config)})
        if unknown:
            raise UserError(f"--model-config: ModelConfig has no field {unknown[0]!r}")
        if config.embed_dim == config.dim:
            o.setdefault("embed_dim", o.get("dim", config.dim))
        if config.head_dim == config.dim // config.n_heads:
            o.setdefault("head_dim", o.get("dim", config.dim) // o.get("n_heads", config.n_heads))
        config = dataclasses.replace(config, **o)
    return config, ckpt_dir


def build_model(args, config, ckpt_dir, device, compute_dtype):
    """meta device -> (compile, activation checkpointing) -> FSDP2 -> to_empty -> load weights."""
    import model as model_lib

    with torch.device("meta"):
        model = model_lib.Transformer(config, attention=args.attention)
    if args.compile:
        for block in model.layers:
            block.compile()
    fsdp_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model = dist.shard_model(model, param_dtype=fsdp_dtype, reduce_dtype=torch.float32,
                             activation_checkpointing=args.activation_checkpointing)
    dist.materialize(model, device)
    if ckpt_dir is None:
        dist.load_weights(model, model_lib.random_init_tensors(config, args.seed), where=f"random init of --model {args.model}")
    else:
        dist.load_sharded_weights(model, ckpt_dir, config)
    # model.py keeps no buffers (RoPE tables are computed per forward), so nothing else is left
    # uninitialised by to_empty; a tied lm_head shares the embedding's (sharded) parameter
    assert not config.tie_embeddings or model.lm_head.weight is model.tok_embeddings.weight
    return model


# -----------------------------------------------------------------------------
# data


def load_data(args, tok, rank: int, world_size: int):
    """Train and eval PairSets (tokenized, filtered, with counts of what was dropped and why)."""
    import data as data_lib

    columns = {k: v for k, v in dict(prompt=args.prompt_column, chosen=args.chosen_column, rejected=args.rejected_column,
                                        conversations=args.conversations_column).items() if v}
    kw = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
              template=args.template, columns=columns or None)
    train_src, eval_src = args.data, args.eval_data
    if train_src is None:  # the embedded default: synthetic pairs with a held-out synthetic eval set
        data_dir = Path(args.out) / "data"
        train_src = data_dir / f"synthetic_train_{args.synthetic_pairs}.parquet"
        if rank == 0 and not train_src.exists():
            data_lib.write_synthetic(train_src, args.synthetic_pairs, seed=0, split="train")
        if eval_src is None:
            eval_src = data_dir / "synthetic_eval.parquet"
            if rank == 0 and not eval_src.exists():
                data_lib.write_synthetic(eval_src, SYNTHETIC_EVAL_PAIRS, seed=1, split="eval")
        dist.barrier()
    elif eval_src is None and args.eval_split is not None:
        eval_src = train_src       # another split of the training source
    train = read_pairs("train", train_src, args.split, tok, kw)
    if eval_src is not None:
        # --eval-split names the split of whichever source the eval pairs come from (a Hub id needs one)
        evals = read_pairs("eval", eval_src, args.eval_split, tok, kw)
    elif args.eval_fraction > 0:
        train, evals = hold_out(train, args.eval_fraction, args.seed)
        print0(f"eval: held out {len(evals)} of the training pairs (--eval-fraction {args.eval_fraction})")
    else:
        evals = []
    if len(train) == 0:
        raise UserError(f"--data {train_src}: no usable pairs after filtering")
    return train, evals


def read_pairs(name: str, source, split, tok, kw):
    """data.build_pairs for the train or eval pairs, its one-sentence errors saying which of the two."""
    import data as data_lib

    try:
        pairs = data_lib.build_pairs(source, tok, split=split, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{name} data: {e}") from None
    report_stats(name, source if split is None else f"{source} [{split}]", pairs)
    return pairs


def hold_out(pairs, fraction: float, seed: int):
    """Split off a fixed random fraction of the pairs (same on every rank: seeded)."""
    n_eval = max(1, int(round(len(pairs) * fraction)))
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in perm[n_eval:]], [pairs[i] for i in perm[:n_eval]]


def report_stats(name, source, pairs) -> None:
    import data as data_lib
    stats = getattr(pairs, "stats", None)
    print0(f"{name}: {len(pairs)} pairs from {source}" + (f" ({data_lib.stats_line(stats)})" if stats else ""))


def make_batchers(args, train_pairs, eval_pairs, rank: int, world_size: int):
    """(train batcher, eval batcher or None, optimizer steps per epoch).

    --batch-size is global: each rank packs batch / (world * accum) pairs per micro-batch. Batch b of an
    epoch goes to rank b % world_size, so a 2-rank run sees the same global batches as a 1-rank run
    with twice the grad_accum.
    """
    import data as data_lib

    if args.max_tokens is None:
        per_micro = args.batch_size // (world_size * args.grad_accum)
        if per_micro * world_size * args.grad_accum != args.batch_size or per_micro == 0:
            raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of "
                            f"world size {world_size} x --grad-accum {args.grad_accum}")
        size = dict(batch_size=per_micro)
    else:
        size = dict(max_tokens=args.max_tokens)
    kw = dict(seed=args.seed, rank=rank, world_size=world_size, shared_prompt=args.shared_prompt,
              prompt_loss=args.prompt_loss, **size)
    batcher = data_lib.PairBatcher(train_pairs, grad_accum=args.grad_accum, **kw)
    info = batcher.epoch_info(0)
    if info["pairs_dropped"]:
        print0(f"train: {info['pairs_dropped']} pairs per epoch left out so that every rank gets the same "
               f"number of micro-batches (a different remainder each epoch)")
    eval_batcher = None
    if len(eval_pairs):
        eval_batcher = data_lib.PairBatcher(eval_pairs, **kw)
        dropped = eval_batcher.epoch_info(0)["pairs_dropped"]
        if dropped:
            print0(f"eval: {dropped} of the eval pairs left out to give every rank the same batches")
    return batcher, eval_batcher, info["batches_per_rank"] // args.grad_accum


def load_tokenizer(args, ckpt_dir):
    import data as data_lib

    if args.tokenizer:
        return data_lib.load_tokenizer(args.tokenizer)
    if ckpt_dir is None:                  # a random-init preset: the synthetic tokenizer (vocab <= 512)
        return data_lib.synthetic_tokenizer()
    return data_lib.load_tokenizer(ckpt_dir)


# -----------------------------------------------------------------------------
# the ORPO step


def sequence_logps(token_logps, tgt_seq, tgt_response, n_seqs: int):
    """eq. 3: average log-prob of each response, by scatter-add over the packed targets. -> (n_seqs,) float32"""
    resp_seq = tgt_seq[tgt_response]                                   # (R,)
    sums = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, resp_seq, token_logps[tgt_response].float())
    counts = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device)
    counts = counts.index_add(0, resp_seq, torch.ones_like(resp_seq, dtype=torch.float32))
    return sums / counts                                               # (2P,) chosen then rejected


def micro_batch_loss(model, batch, lam: float, n_pairs_total: float, n_nll_total: float):
    """ONE forward over a packed micro-batch -> (loss to backprop, metric sums).

    The returned loss is this micro-batch's share of the big-batch loss
        L = sum_{all NLL tokens} nll / n_nll_total + lam * sum_{all pairs} L_OR / n_pairs_total,
    where the totals count every micro-batch of the step on every rank. Summing these shares over
    micro-batches (backward accumulates) and ranks (FSDP reduces) gives exactly one big batch's gradient.
    """
    hidden = model.packed_hidden(batch.input_ids, batch.position_ids, batch.seg_lens)   # (N, D)
    logps = model.token_logps(hidden, batch.tgt_index, batch.tgt_ids)                   # (M,) float32
    P = batch.n_pairs
    seq = sequence_logps(logps, batch.tgt_seq, batch.tgt_response, 2 * P)               # (2P,)
    chosen_logps, rejected_logps = seq[:P], seq[P:]
    nll_sum = -logps[batch.tgt_nll].float().sum()                                       # L_SFT numerator
    # orpo_loss averages over the P pairs of this micro-batch; reweight to the global totals:
    # w * (nll/w + lam * mean L_OR) = nll_sum/n_nll_total + lam * sum L_OR / n_pairs_total
    w = P / n_pairs_total
    chosen_nll = nll_sum / n_nll_total / w
    loss, m = orpo.orpo_loss(chosen_logps, rejected_logps, chosen_nll, lam=lam)
    # metric sums stay device tensors: reading them here (float()) would make the host wait for this
    # forward before it can launch the backward; train_step syncs once per optimizer step instead
    sums = {k: m[k] * P for k in ("or_loss", "log_odds", "chosen_logps", "rejected_logps",
                                  "reward_acc", "reward_margin")}
    sums.update(nll_sum=nll_sum.detach(), n_nll=batch.tgt_nll.sum(), n_pairs=P, n_tokens=batch.num_tokens)
    return loss * w, sums


def finish_metrics(sums: dict, lam: float) -> dict:
    """Metric sums (over micro-batches and ranks) -> big-batch means."""
    P = max(sums["n_pairs"], 1)
    m = {k: sums[k] / P for k in ("or_loss", "log_odds", "chosen_logps", "rejected_logps", "reward_acc", "reward_margin")}
    m["nll"] = sums["nll_sum"] / max(sums["n_nll"], 1)
    m["loss"] = m["nll"] + lam * m["or_loss"]
    return m


def add_into(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


def train_step(model, micro_batches, lam, device, world_size, autocast):
    """Forward/backward over the micro-batches of one optimizer step; returns global metric sums."""
    counts = dist.all_reduce_sum({"pairs": sum(b.n_pairs for b in micro_batches),
                                  "nll": sum(b.n_nll_tokens for b in micro_batches)}, device)
    sums = {}
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast:
            loss, part = micro_batch_loss(model, batch, lam, counts["pairs"], counts["nll"])
        # FSDP averages gradients over ranks; our per-rank losses are already shares of the global
        # batch and must be summed, so undo the average by scaling with the world size
        (loss * world_size).backward()
        add_into(sums, part)
    return dist.all_reduce_sum(sums, device)


@torch.no_grad()
def evaluate(model, batcher, lam, device, autocast) -> dict:
    sums = {}
    batcher.rewind()                    # the same eval batches every time
    for batch in batcher:
        batch = batch.to(device)
        with autocast:
            _, part = micro_batch_loss(model, batch, lam, 1.0, 1.0)
        add_into(sums, part)
    sums = dist.all_reduce_sum(sums, device)
    return finish_metrics(sums, lam)


# -----------------------------------------------------------------------------
# schedule, optimizer, throughput


def warmup_steps(args, total_steps: int) -> int:
    """--warmup-steps, or --warmup-ratio of the total rounded up (transformers' TrainingArguments.get_warmup_steps),
    so that a small ratio of a short run still warms up. The start line prints the result."""
    if args.warmup_ratio is None:
        return args.warmup_steps
    return math.ceil(args.warmup_ratio * total_steps)


def build_optimizer(args, model, device):
    decay = [p for p in model.parameters() if p.ndim >= 2]       # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.ndim < 2]     # norms, biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=fused)


# dense bf16 tensor-core peak, FLOP/s, by substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "MI300": 1307e12}


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def attention_pairs(seg_lens: torch.Tensor) -> float:
    """(query, key) pairs the attention mask allows, summed over the segments (p, c, r) of a packed batch:
    [prompt|chosen] is causal, (p + c)(p + c + 1) / 2, and each rejected query sees the prompt and the
    rejected tokens up to itself, r * p + r(r + 1) / 2. The unshared layout is c = r = 0 per sequence.
    (benchmarks/gpu.py imports it.)"""
    p, c, r = (x.double() for x in seg_lens.unbind(1))
    main = p + c
    return float((main * (main + 1) / 2 + r * p + r * (r + 1) / 2).sum())


def step_flops(n_params: int, n_layers: int, d_attn: int, micro_batches) -> float:
    """Model FLOPs of one optimizer step on this rank: 6 per parameter per token (forward + backward
    matmuls) plus attention, QK^T and AV at 2 * d_attn FLOPs each per allowed (query, key) pair per
    layer forward, x3 with backward: 12 * n_layers * d_attn per pair."""
    flops = 0.0
    for b in micro_batches:
        flops += 6 * n_params * b.num_tokens + 12 * n_layers * d_attn * attention_pairs(b.seg_lens)
    return flops


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux reports kB


# -----------------------------------------------------------------------------
# logging


def format_line(rec: dict, total_steps: int) -> str:
    s = (f"step {rec['step']:>5d}/{total_steps} | loss {rec['loss']:.4f} | nll {rec['nll']:.4f} | "
         f"or {rec['or_loss']:.4f} | log_odds {rec['log_odds']:+.3f} | logp w {rec['chosen_logps']:.3f} "
         f"l {rec['rejected_logps']:.3f} | acc {rec['reward_acc']:.2f} | margin {rec['reward_margin']:+.3f} | "
         f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s")
    if rec.get("mfu") is not None:
        s += f" | mfu {100 * rec['mfu']:.1f}%"
    s += f" | mem {rec['mem_gb']:.2f}GB"
    if rec.get("skipped"):
        s += " | SKIPPED (non-finite)"
    return s


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint, so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    keep = [l for l in lines if json.loads(l)["step"] <= step]
    if len(keep) < len(lines):
        path.write_text("".join(l + "\n" for l in keep))


def append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# -----------------------------------------------------------------------------
# setup and resume


@dataclasses.dataclass
class Job:
    """Everything setup() builds, handed explicitly to the loop, eval, save and finish (no closures)."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    out: Path
    config: object                  # model.ModelConfig
    tok: object                     # the tokenizer, exported with the model
    model: torch.nn.Module          # FSDP2-sharded under torchrun
    n_params: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batcher: object                 # data.PairBatcher of the training pairs
    eval_batcher: object            # data.PairBatcher of the eval pairs, None without any
    total_steps: int
    autocast: object                # torch.autocast, or nullcontext when the params are in the compute dtype
    peak_flops: float | None        # of one device, for MFU; None when unknown (CPU)
    t_start: float

    @property
    def ckpt_root(self) -> Path:
        return self.out / "ckpt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


@dataclasses.dataclass
class LoopState:
    """The trainer's counters: what a checkpoint holds besides weights, optimizer, schedule and data position."""
    step: int = 0                   # optimizer steps done
    epoch: int = 0
    best_eval: float = math.inf     # lowest eval loss so far (exported to OUT/best/)
    bad_steps: int = 0              # consecutive non-finite steps
    run_id: str = ""                # tells this run's checkpoints from others' (dist.save_checkpoint prunes only its own)


def micro_batch_stream(batcher):
    """(epoch, micro-batch) forever, epoch after epoch, from the batcher's current (maybe resumed) position."""
    while True:
        for batch in batcher:
            yield batcher.epoch, batch


def check_attention(args, device, compute_dtype, config) -> None:
    """Fail before any work if the requested kernel cannot run here (it would fail in the first forward)."""
    import model as model_lib

    if args.attention == "auto":
        return
    try:
        with torch.enable_grad():     # training needs the backward (flex has none on the CPU)
            model_lib.pick_attention(args.attention, device, compute_dtype, config.sliding_window)
    except RuntimeError as e:
        hint = " (pip install -r requirements-gpu.txt)" if args.attention == "flash" else ""
        raise UserError(f"--attention {args.attention}: {e}{hint}; use --attention auto or sdpa") from None


def find_resume_point(args, world_size: int) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume from, its trainer state), or (None, None) to start fresh, after checking that
    --out can hold this run: a fresh start next to an earlier run's checkpoints would mix the two runs
    (its pruning, `latest`, a later --resume), so it is refused rather than deleting what is there."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    latest = dist.find_latest_checkpoint(out / "ckpt")
    if latest is None:
        if args.resume:
            print0(f"--resume: no checkpoint in {out / 'ckpt'}, starting from scratch")
        return None, None
    saved = dist.read_trainer_state(latest)
    if not args.resume:
        raise UserError(f"--out {out} already holds checkpoints of an earlier run (step {saved['step']}); "
                        f"pass --resume to continue it, or choose another --out")
    # the data order (batch b goes to rank b % world_size) and the per-rank RNG states depend on it
    if saved["world_size"] != world_size:
        raise UserError(f"resume needs the same number of ranks: the checkpoint was written by "
                        f"{saved['world_size']}, this run has {world_size}")
    return latest, saved


def restore_batcher(batcher, saved: dict, ckpt: Path) -> None:
    """The checkpoint's position in the data. data.py refuses (ValueError) when a batching setting or the
    data changed, as the same position would then mean other pairs; here that becomes one clear line."""
    try:
        batcher.load_state_dict(saved["batcher"])
    except ValueError as e:
        raise UserError(f"{ckpt}: {e}") from None


def setup(args) -> tuple[Job, Path | None]:
    """Device, data, model, optimizer and schedule; and the checkpoint to resume from. Ordered to fail fast:
    the output dir, the checkpoint and the data position are checked before the model is built."""
    t_start = time.time()
    device = dist.compute_init(args.device)
    _, rank, _, world_size = dist.get_dist_info()
    ckpt, saved = find_resume_point(args, world_size)
    compute_dtype = dist.resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    # model config + tokenizer, then data (tokenization does not need the weights)
    config, ckpt_dir = resolve_model(args.model, args.model_config)
    check_attention(args, device, compute_dtype, config)
    if config.positions == "learned" and args.max_length > config.max_seq_len:
        raise UserError(f"--max-length {args.max_length} is longer than the {config.max_seq_len} positions "
                        f"{args.model} has learned; use --max-length {config.max_seq_len} or less")
    tok = load_tokenizer(args, ckpt_dir)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    train_pairs, eval_pairs = load_data(args, tok, rank, world_size)
    batcher, eval_batcher, steps_per_epoch = make_batchers(args, train_pairs, eval_pairs, rank, world_size)
    if saved is not None:
        restore_batcher(batcher, saved, ckpt)
    total_steps = args.max_steps if args.max_steps is not None else max(1, int(args.epochs * steps_per_epoch))
    warmup = warmup_steps(args, total_steps)

    model = build_model(args, config, ckpt_dir, device, compute_dtype)
    optimizer = build_optimizer(args, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, dist.lr_lambda(args.schedule, warmup, total_steps))
    # without FSDP (one process) on GPU, bf16 compute comes from autocast; FSDP casts params itself
    use_autocast = compute_dtype != torch.float32 and world_size == 1
    autocast = torch.autocast(device.type, dtype=compute_dtype) if use_autocast else nullcontext()
    job = Job(args, device, rank, world_size, out, config, tok, model, count_params(model), optimizer, scheduler,
              batcher, eval_batcher, total_steps, autocast, peak_flops(device), t_start)
    print0(f"model {args.model}: {job.n_params / 1e6:.2f}M params, {config.n_layers} layers | "
           f"device {device} x {world_size} | dtype {compute_dtype} | lam {args.lam} | "
           f"lr {args.lr} {args.schedule}, warmup {warmup} | "
           f"batch {args.batch_size if args.max_tokens is None else f'{args.max_tokens} tokens/micro'} x accum {args.grad_accum} | "
           f"{total_steps} steps ({steps_per_epoch}/epoch)")
    return job, ckpt


def resume(job: Job, ckpt: Path | None) -> LoopState:
    """Weights, optimizer, RNG and schedule from `ckpt` (the data position was restored in setup), with
    metrics.jsonl cut back to it, so the file reads as one uninterrupted run; without one, a fresh start."""
    if ckpt is None:
        if job.rank == 0 and job.metrics_path.exists():
            job.metrics_path.unlink()   # of a run killed before its first checkpoint
        # a new id per run; only rank 0's is ever written (it writes trainer_state.json and prunes)
        return LoopState(run_id=uuid.uuid4().hex[:12])
    saved = dist.load_checkpoint(ckpt, job.model, job.optimizer)
    job.scheduler.load_state_dict(saved["scheduler"])
    state = LoopState(step=saved["step"], epoch=saved["epoch"], best_eval=saved["best_eval"],
                      bad_steps=saved["bad_steps"], run_id=saved.get("run_id", ""))
    if job.rank == 0:
        truncate_metrics(job.metrics_path, state.step)
    print0(f"resumed from {ckpt} at step {state.step}")
    return state


# -----------------------------------------------------------------------------
# the loop


def optimizer_step(job: Job, state: LoopState, stream) -> tuple[dict, list, float]:
    """One optimizer step: grad_accum micro-batches forward/backward, clip, skip it if anything is
    non-finite, AdamW, schedule. Updates `state`; returns (its metrics record, its micro-batches, seconds)."""
    args, t0 = job.args, time.time()
    micro = []
    for _ in range(args.grad_accum):
        state.epoch, b = next(stream)
        micro.append(b)
    sums = train_step(job.model, micro, args.lam, job.device, job.world_size, job.autocast)
    grad_norm = clip_grad_norm(job.model, args.grad_clip)
    m = finish_metrics(sums, args.lam)
    finite = math.isfinite(m["loss"]) and math.isfinite(grad_norm)
    if finite:
        job.optimizer.step()
        state.bad_steps = 0
    else:
        state.bad_steps += 1
    job.optimizer.zero_grad(set_to_none=True)
    lr = job.scheduler.get_last_lr()[0]
    job.scheduler.step()
    state.step += 1
    if job.device.type == "cuda":
        torch.cuda.synchronize(job.device)
    dt = time.time() - t0
    if not finite:
        print0(f"step {state.step}: non-finite loss or grad norm (loss {m['loss']}, grad norm {grad_norm}); "
               f"step skipped ({state.bad_steps} in a row)")
    rec = {"step": state.step, "epoch": state.epoch, **m, "lr": lr, "grad_norm": grad_norm,
           "tokens": sums["n_tokens"], "tokens_per_s": sums["n_tokens"] / dt, "skipped": not finite}
    return rec, micro, dt


def log_step(job: Job, rec: dict, micro, dt: float) -> dict:
    """Complete a step's record with MFU, peak memory and wall time (collectives: every rank calls this),
    then append it to metrics.jsonl and print it, on rank 0."""
    config = job.config
    flops = step_flops(job.n_params, config.n_layers, config.n_heads * config.head_dim, micro)
    flops = dist.all_reduce_sum({"f": flops}, job.device)["f"]
    rec["mfu"] = flops / dt / (job.peak_flops * job.world_size) if job.peak_flops else None
    rec["mem_gb"] = dist.all_reduce_max(memory_gb(job.device), job.device)
    rec["time"] = time.time() - job.t_start
    if job.rank == 0:
        append_jsonl(job.metrics_path, rec)
        tqdm.write(format_line(rec, job.total_steps))
    return rec


def run_eval(job: Job, state: LoopState) -> dict | None:
    """Eval metrics on the held-out pairs at state.step (None without any); a new best is exported to OUT/best/."""
    if job.eval_batcher is None:
        return None
    job.model.eval()
    m = evaluate(job.model, job.eval_batcher, job.args.lam, job.device, job.autocast)
    job.model.train()
    improved = m["loss"] < state.best_eval
    if improved:
        state.best_eval = m["loss"]
        if not job.args.no_export:
            dist.export_hf(job.model, job.config, job.tok, job.out / "best")
    if job.rank == 0:
        append_jsonl(job.metrics_path, {"step": state.step, "eval": True, **{f"eval_{k}": v for k, v in m.items()},
                                        "best": improved})
        tqdm.write(f"eval  {state.step:>5d} | loss {m['loss']:.4f} | nll {m['nll']:.4f} | or {m['or_loss']:.4f} | "
                   f"log_odds {m['log_odds']:+.3f} | acc {m['reward_acc']:.2f}"
                   + (f" | best so far -> {job.out / 'best'}" if improved and not job.args.no_export else ""))
    return m


def save(job: Job, state: LoopState) -> None:
    trainer_state = dict(dataclasses.asdict(state), world_size=job.world_size,
                         scheduler=job.scheduler.state_dict(), batcher=job.batcher.state_dict())
    dist.save_checkpoint(job.ckpt_root, state.step, job.model, job.optimizer, trainer_state,
                         keep=job.args.keep_checkpoints)


def train_loop(job: Job, state: LoopState) -> dict:
    """Optimizer steps from state.step to the end, with logging, periodic eval and checkpoints.
    Returns the first and last logged step records and the step-0 eval, for the summary."""
    args = job.args
    records = {"first": None, "last": None, "eval0": None}
    stream = micro_batch_stream(job.batcher)
    job.model.train()
    if state.step == 0 and args.eval_every:
        records["eval0"] = run_eval(job, state)      # the starting point of the eval curves
    # the bar only on an interactive terminal: in a log file its redraws are noise (the lines say it all)
    bar = tqdm(total=job.total_steps, initial=state.step, disable=job.rank != 0 or not sys.stderr.isatty(), leave=False)
    while state.step < job.total_steps:
        rec, micro, dt = optimizer_step(job, state, stream)
        if state.step % args.log_every == 0 or state.step == job.total_steps or rec["skipped"]:
            rec = log_step(job, rec, micro, dt)
            records["first"] = records["first"] or rec
            records["last"] = rec
        bar.update(1)
        if state.bad_steps >= args.max_bad_steps:
            raise TrainingDiverged(f"{state.bad_steps} consecutive steps had a NaN/inf loss or gradient; stopping at "
                                   f"step {state.step} to protect the weights (last good checkpoint: "
                                   f"{job.ckpt_root}/latest); try a lower --lr or --dtype float32")
        if state.step < job.total_steps:             # the last step is evaluated and saved by finish()
            if args.eval_every and state.step % args.eval_every == 0:
                run_eval(job, state)
            if args.save_every and state.step % args.save_every == 0:
                save(job, state)
    bar.close()
    return records


# -----------------------------------------------------------------------------
# the end of a run


def finish(job: Job, state: LoopState, records: dict) -> dict:
    """Final eval, checkpoint and HF export; prints and returns the summary."""
    final_eval = run_eval(job, state)
    save(job, state)
    if not job.args.no_export:
        dist.export_hf(job.model, job.config, job.tok, job.out / "final")
    summary = {**records, "eval": final_eval, "steps": state.step, "wall_s": time.time() - job.t_start,
               "out": str(job.out)}
    print_summary(job.args, summary)
    return summary


def finish_completed_run(job: Job, state: LoopState) -> dict:
    """--resume of a run that has done all its steps: nothing to train, evaluate or save again (that would
    append a second final eval and rewrite the checkpoint just loaded); only a missing final export is made."""
    final = job.out / "final"
    if not job.args.no_export and not (final / "config.json").is_file():
        dist.export_hf(job.model, job.config, job.tok, final)
        print0(f"the run in {job.out} was already complete at step {state.step}; wrote its missing export {final}")
    else:
        print0(f"the run in {job.out} is already complete: its checkpoint is at step {state.step}, this run has "
               f"{job.total_steps} steps (raise --max-steps or --epochs to train further)")
    return {"first": None, "last": None, "eval0": None, "eval": None, "steps": state.step,
            "wall_s": time.time() - job.t_start, "out": str(job.out)}


def run(args) -> dict:
    """The whole run: setup, resume, the loop, final eval, checkpoint and export. Returns a summary."""
    check_args(args)
    job, ckpt = setup(args)
    state = resume(job, ckpt)
    if ckpt is not None and state.step >= job.total_steps:
        return finish_completed_run(job, state)
    records = train_loop(job, state)
    return finish(job, state, records)


def count_params(model) -> int:
    """Parameter count of the full model (a sharded parameter reports its global shape; tied ones count once)."""
    return sum(p.numel() for p in model.parameters())


def clip_grad_norm(model, max_norm: float) -> float:
    """Global grad norm over all ranks (clipped to max_norm when > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm is already reduced over ranks
        norm = norm.full_tensor()
    return float(norm)


def eval_commands(args) -> list[str]:
    """The eval_rm.py commands that evaluate this run, runnable as printed: a reward model trained on the
    training pairs with the run's backbone, tokenizer and template, then the win rate of OUT/final against
    the starting model on held-out prompts. The default tiny synthetic run has eval_rm.py's own demo."""
    out, q = Path(args.out), shlex.quote
    demo = (args.data is None and args.eval_data is None and args.model == "tiny" and args.seed == 42
            and args.tokenizer is None and args.template == "auto")
    if demo:   # eval_rm.py's demo knows this layout (and the tiny model's init seed, 42)
        return ["python eval_rm.py" + ("" if str(out) == "out" else f" demo --root {q(str(out))}")]
    import model as model_lib
    random_init = isinstance(model_lib.PRESETS.get(args.model), model_lib.ModelConfig)
    # the tokenizer this run read text with (load_tokenizer): the RM must read it the same way
    tokenizer = args.tokenizer or ("synthetic" if random_init else None)
    template = ["--template", args.template] if args.template != "auto" else []
    if args.data is None:      # the synthetic pairs this run wrote (and its synthetic held-out set)
        rm_data = ["--data", str(out / "data" / f"synthetic_train_{args.synthetic_pairs}.parquet")]
        prompts = ["--data", args.eval_data or str(out / "data" / "synthetic_eval.parquet")]
    else:
        rm_data = ["--data", args.data] + (["--split", args.split] if args.split else [])
        prompts = (["--data", args.eval_data] if args.eval_data else
                   ["--data", args.data] if args.eval_split else rm_data)
    prompts += ["--split", args.eval_split] if args.eval_split else []
    init = [] if args.model == "tiny" else ["--init", args.model]
    # the base policy "tiny" is the random init of --seed (eval_rm.py assumes train.py's default, 42)
    seed = ["--init-seed", str(args.seed)] if args.model == "tiny" and args.seed != 42 else []
    rm_tok = ["--tokenizer", tokenizer] if tokenizer else []
    # OUT/final carries the run's tokenizer; a base checkpoint read through --tokenizer may have none
    base_tok = ["--policy-tokenizer", f"base={args.tokenizer}"] if args.tokenizer and not random_init else []
    train_rm = ["train-rm", "--out", str(out / "rm"), *init, *rm_data, *rm_tok, *template]
    winrate = ["winrate", "--rm", str(out / "rm"), "--policy", f"orpo={out / 'final'}", "--policy",
               f"base={args.model}", *base_tok, *seed, *prompts, *template, "--out", str(out / "winrate")]
    return ["python eval_rm.py " + shlex.join(c) for c in (train_rm, winrate)]


def print_summary(args, s: dict) -> None:
    out = Path(args.out)
    first, last, e0, e1 = s["first"], s["last"], s["eval0"], s["eval"]
    if first and last:
        print0(f"done at step {s['steps']} after {s['wall_s']:.0f}s | train nll {first['nll']:.3f} -> {last['nll']:.3f} | "
               f"log_odds {first['log_odds']:+.3f} -> {last['log_odds']:+.3f} | "
               f"reward_acc {first['reward_acc']:.2f} -> {last['reward_acc']:.2f}")
    if e0 and e1:
        print0(f"eval (held-out pairs): nll {e0['nll']:.3f} -> {e1['nll']:.3f} | log_odds {e0['log_odds']:+.3f} -> "
               f"{e1['log_odds']:+.3f} | reward_acc {e0['reward_acc']:.2f} -> {e1['reward_acc']:.2f}")
    exported = "" if args.no_export else "final/ (HF model + tokenizer), best/ (best eval loss), "
    print0(f"outputs in {out}/: {exported}ckpt/ (--resume), metrics.jsonl"
           + (", data/ (synthetic pairs)" if args.data is None else ""))
    if args.no_export:         # eval_rm.py evaluates OUT/final, which this run did not write
        return
    commands = eval_commands(args)
    print0("evaluate with:  " + "\n                ".join(commands))
    if args.data is not None and args.eval_data is None and args.eval_split is None:
        print0("                (win-rate prompts from the training data: give held-out pairs to --data for a fair test)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except TrainingDiverged as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("ORPO_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # a UserError is the same on every rank: print it once; anything else may be one rank's alone
        (print0 if isinstance(e, UserError) else print)(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        dist.compute_cleanup()


if __name__ == "__main__":
    sys.exit(main())
