"""One full ORPO optimizer step on the CPU: our padding-free step against TRL's ORPOTrainer (issues 8, 9).

Every row does the same work: the same preference pairs (real HH-RLHF pairs tokenized with the Llama-2
tokenizer through data.py), the same batches, the same weights (one safetensors file written by our
model.save_pretrained and loaded by both model.py and transformers), float32, and one optimizer step =
forward over chosen and rejected, backward, grad clipping to 1.0, AdamW. The rows:

  ours           train.train_step on data.pack_pairs(shared_prompt=True): [prompt|chosen|rejected], the
                 prompt computed once, chunked lm_head (model.token_logps), no padding
  ours-unshared  the same with shared_prompt=False: prompt|chosen and prompt|rejected, still no padding
  trl            trl.experimental.orpo.ORPOTrainer.training_step on a batch from its own collator
                 (pads chosen and rejected to the longest of the batch, one forward over [2P, T], full logits)
  pad-max        what the official code (xfactlab/orpo) does: every sequence padded to --max-length,
                 chosen and rejected in two forwards of the transformers model, full-vocabulary log_softmax
  logps-chunked / logps-full   only the per-token log-probs of one batch (forward + backward from the
                 final hidden states): model.token_logps against full (N, V) logits + log_softmax + gather

How it is measured
  * Each row runs in a fresh child process (python benchmarks/step.py --worker ROW), so memory numbers do
    not leak from one row into another. Threads: torch.set_num_threads(--threads) in every child.
  * Time: a loss-check step, --warmup rounds, then --repeats rounds over the --batches batches; the median
    round time. ours, ours-unshared and trl take turns round by round (A B C A B C ...), each in its own
    process, so a change in machine load hits them alike; pad-max (slow, ~10 GB) and the logps rows run alone.
  * tokens/s counts the REAL tokens of the pairs, prompt+chosen plus prompt+rejected, no padding: the same
    numerator for every row, so the ratios are ratios of work done per second on the same pairs. The tokens
    a row actually pushes through the model (with padding, or with the prompt once) are shown separately.
  * CPU time per step (time.process_time of the child) is reported too: on a shared machine it is less
    disturbed than wall time by other processes (the "vs TRL" of CPU time is TRL's CPU time / the row's).
  * Memory: peak resident set size (VmHWM) during the steps minus the resident size just before the first
    step (model loaded, batches built). It is the step's working memory: gradients, AdamW state (the same
    for every training row: 3 x parameter bytes), activations and logits. The peak is reset through
    /proc/self/clear_refs; where that is not allowed we fall back to ru_maxrss (which then includes loading).
  * Loss check: every training row reports the loss of its first step (batch 0, initial weights);
    they must agree to float32 rounding.

Usage (the defaults take about 5-10 minutes on a 2-core CPU):
    python benchmarks/step.py                     # all rows, 2 batches of 8 pairs, 1 warmup + 3 timed rounds
    python benchmarks/step.py --rows ours,trl --repeats 5
    python benchmarks/step.py --quick             # 1 batch, 1 repeat: a smoke run
    python benchmarks/step.py --rows ours --profile   # where the default step's time goes, phase by phase
    python benchmarks/step.py --sweep --json sweep.json   # cost as the work grows (ours vs TRL), and scaling.png

The physical limit (issue 16): at the start and at the end of the run the parent measures float32 matmul
throughput under the same thread count (a --peak-size square matmul, best of 5), by wall time and per CPU
second. Each training row reports its model FLOP/s, model.step_flops (6 x non-embedding params x tokens +
12 x layers x d_attn x the (query, key) pairs the mask allows) of the layout it computes (the shared batch for
ours, the padding-free unshared batch for the others: padding is not model work), and its fraction of that
peak. The chunked lm_head's recompute of the logits in backward (2 x V x D per target) is extra work beyond
the model FLOPs and is reported apart.
"""
import argparse
import copy
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import math

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
HH_RLHF = SHARED / "hh-rlhf-harmless-test.parquet"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"
SHAREGPT = SHARED / "llamafactory-dpo-en-demo.parquet"   # ShareGPT layout, 1-13 turns: the long pairs

TRAIN_ROWS = ("ours", "ours-unshared", "trl", "pad-max")
LOGPS_ROWS = ("logps-chunked", "logps-full")
ALL_ROWS = TRAIN_ROWS + LOGPS_ROWS
PAD_ID = 0   # <unk> in Llama-2: never a real token here, so padding can never be mistaken for one
LR, GRAD_CLIP = 5e-6, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {ALL_ROWS}")
    p.add_argument("--pairs", type=int, default=8, help="pairs per batch (per optimizer step)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches of random pairs, cycled")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds over the batches")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over the batches (median reported)")
    p.add_argument("--pad-max-repeats", type=int, default=1,
                   help="timed rounds of the pad-max row (slow and ~10 GB: run alone, its loss-check step is its warmup)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child process")
    p.add_argument("--max-length", type=int, default=1024, help="max prompt+response tokens (paper: 1024 on HH-RLHF); pad-max pads to it")
    p.add_argument("--lam", type=float, default=0.1, help="lambda of ORPO (TRL's beta)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of model.token_logps (logps rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 batch, no warmup round beyond the first step, 1 repeat")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--synthetic-data", action="store_true", help="synthetic pairs even where the real data is present")
    p.add_argument("--long-pairs", action="store_true",
                   help="the longest ShareGPT multi-turn pairs cut to --max-length instead of random HH-RLHF pairs")
    p.add_argument("--peak-size", type=int, default=3072, help="side of the square float32 matmul that measures the peak")
    p.add_argument("--profile", action="store_true",
                   help="instead of the rows: time the default (ours) step phase by phase, in this process")
    p.add_argument("--mem-cap-gb", type=float, default=14.0,
                   help="a row's process is stopped when its RSS passes this (the machine has 24 GB, shared)")
    p.add_argument("--row-time-limit", type=float, default=300.0,
                   help="a row is stopped when one of its steps (or timed rounds) takes longer, in seconds")
    g = p.add_argument_group("sweep (cost as the work grows: one thing varied at a time, ours against TRL)")
    g.add_argument("--sweep", action="store_true", help="run the sweep instead of the rows, and plot it")
    g.add_argument("--sweep-pairs", default="4,8,16,32", help="pairs per batch (HH-RLHF random pairs, --max-length)")
    g.add_argument("--sweep-lengths", default="512,1024,2048",
                   help="max lengths: the --pairs longest ShareGPT multi-turn pairs cut to each")
    g.add_argument("--sweep-vocabs", default="32000,128256", help="vocabulary sizes, same trunk, the --pairs batch")
    g.add_argument("--sweep-rows", default="ours,trl", help="rows of each sweep point")
    g.add_argument("--sweep-repeats", type=int, default=1, help="timed rounds per point, after the loss-check step")
    g.add_argument("--plot", default=str(Path(__file__).with_name("scaling.png")), help="the sweep's figure")
    g.add_argument("--plot-from", default=None, help="only redraw --plot from a sweep's --json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)     # internal: run one row
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.warmup, args.repeats, args.pad_max_repeats = 1, 0, 1, 1
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {ALL_ROWS}")
    args.rows = rows
    args.sweep_rows = [r for r in args.sweep_rows.split(",") if r]
    if any(r not in ("ours", "ours-unshared", "trl") for r in args.sweep_rows):
        p.error(f"--sweep-rows: choose from ours, ours-unshared, trl (got {args.sweep_rows})")
    for k in ("sweep_pairs", "sweep_lengths", "sweep_vocabs"):
        try:
            setattr(args, k, [int(x) for x in getattr(args, k).split(",") if x])
        except ValueError:
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: want comma-separated integers")
    return args


# -----------------------------------------------------------------------------
# memory of this process, from /proc (Linux)

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; True when the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset_ok: bool) -> float:
    kb = _status_kb("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def child_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:   # the process has just exited
        pass
    return 0.0


# -----------------------------------------------------------------------------
# the physical limit and the model FLOPs

def matmul_peak(threads: int, n: int = 3072, repeats: int = 5) -> dict:
    """float32 (n, n) @ (n, n) under `threads` threads, best of `repeats`: FLOP/s by wall time and per CPU
    second (CPU time counts the threads that run; a matmul keeps all of them busy, so on an idle machine
    per-CPU-second x threads = wall FLOP/s, and under load the CPU figure is the one that is not diluted)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b                                                   # warm: MKL's buffers and thread pool
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    flops = 2 * n**3
    return {"n": n, "threads": threads, "flops_per_s": flops / best_wall, "flops_per_cpu_s": flops / best_cpu}


def matmul_params(model) -> int:
    """Parameters that take part in matmuls, as train.py's MFU counts them (model.Transformer.matmul_params)."""
    return model.matmul_params()


def pack(pairs, shared: bool):
    import data as data_lib
    return data_lib.pack_pairs([data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr)) for pr in pairs],
                               shared_prompt=shared, prompt_loss=True)


def model_flops(flop_info: dict, pairs, shared: bool) -> float:
    """model.step_flops of one batch in the layout a row computes (train.py's MFU count, reused)."""
    import model as model_lib
    return model_lib.step_flops(flop_info["matmul_params"], flop_info["n_layers"], flop_info["d_attn"],
                                [pack(pairs, shared)])


def recompute_flops(flop_info: dict, pairs, shared: bool) -> float:
    """The chunked lm_head's extra work: its backward recomputes each chunk's (C, V) logits, 2 x V x D per target."""
    return 2.0 * flop_info["vocab"] * flop_info["embed_dim"] * pack(pairs, shared).tgt_index.numel()


# -----------------------------------------------------------------------------
# setup (parent process): pairs, batches, one checkpoint shared by every row

def load_pairs(max_length: int, seed: int, synthetic: bool = False, vocab: int = 32000):
    """[(prompt, chosen, rejected) token lists] of the real HH-RLHF pairs, or synthetic ones with a note."""
    import data as data_lib
    if not synthetic and HH_RLHF.exists() and (LLAMA2_TOKENIZER / "tokenizer.json").exists():
        tok = data_lib.load_tokenizer(LLAMA2_TOKENIZER)
        ps = data_lib.build_pairs(HH_RLHF, tok, max_length=max_length, max_prompt_length=max_length)
        st = ps.stats
        print(f"pairs: {HH_RLHF.name}, Llama-2 tokenizer: {st['kept']} of {st['rows']} rows kept "
              f"({', '.join(f'{k} {v}' for k, v in sorted(st.items()) if k.startswith(('dropped', 'truncated')))})")
        pairs = [(pr.prompt_ids.tolist(), pr.chosen_ids.tolist(), pr.rejected_ids.tolist()) for pr in ps]
        return pairs, "HH-RLHF harmless-base test, Llama-2 tokenizer"
    print(f"NOTE: {HH_RLHF} or the Llama-2 tokenizer is absent: using SYNTHETIC pairs whose lengths are drawn "
          "from log-normals fitted to HH-RLHF (median prompt 108, chosen 29, rejected 38 tokens)")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(2000):
        p, c, r = (int(np.clip(rng.lognormal(np.log(m), s), 2, max_length // 2)) for m, s in
                   ((108, 0.8), (29, 1.0), (38, 1.0)))
        ids = lambda n: [1] * (n > 0) + rng.integers(3, vocab, n - 1).tolist()
        pairs.append((ids(p), rng.integers(3, vocab, c).tolist(), rng.integers(3, vocab, r).tolist()))
    return pairs, "SYNTHETIC (HH-RLHF-like lengths)"


def write_checkpoint(args, out_dir: Path) -> dict:
    """The benchmark model, saved once for every row; returns what its FLOP count needs."""
    import model as model_lib
    config = model_lib.ModelConfig(family="llama", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                   n_heads=args.heads, ffn_dim=args.ffn, max_seq_len=max(2048, args.max_length),
                                   bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    torch.manual_seed(args.seed)
    model = model_lib.Transformer(config)
    model.save_pretrained(out_dir)
    return {"matmul_params": matmul_params(model), "params": sum(p.numel() for p in model.parameters()),
            "n_layers": config.n_layers, "d_attn": config.n_heads * config.head_dim, "vocab": config.vocab_size,
            "embed_dim": config.embed_dim}


def tokens_per_pair(pairs):
    L = np.array([[len(p), len(c), len(r)] for p, c, r in pairs], dtype=np.int64)
    shared, unshared = L.sum(1), 2 * L[:, 0] + L[:, 1] + L[:, 2]
    return shared.mean(), unshared.mean(), unshared.sum() / shared.sum(), 2 * L[:, 0].sum() / unshared.sum()


# -----------------------------------------------------------------------------
# the rows (each runs in its own child process)

def ours_row(setup, args, shared_prompt: bool):
    """Our step through train.py's own: train_step (packed_hidden -> token_logps -> eq. 3 -> L_OR -> eq. 6, backward,
    grad clipping, AdamW from build_optimizer, a constant schedule)."""
    import data as data_lib
    import model as model_lib
    import train
    cpu = torch.device("cpu")
    model = model_lib.Transformer.from_pretrained(setup["ckpt"])
    model.train()
    optimizer = train.build_optimizer(model, LR, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [data_lib.pack_pairs([data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr)) for pr in b],
                                   shared_prompt=shared_prompt, prompt_loss=True) for b in setup["batches"]]

    def step(i):
        return train.train_step(model, [batches[i]], args.lam, cpu, nullcontext(), optimizer, scheduler, GRAD_CLIP)["loss"]

    return step, [b.num_tokens for b in batches]


def trl_row(setup, args):
    """TRL's ORPOTrainer: its collator, its training_step (compute_loss -> concatenated_forward ->
    odds_ratio_loss, backward), then what Trainer's loop does next: clip to 1.0 and the optimizer step (fused AdamW,
    Trainer's default on torch >= 2.8, as ours)."""
    import datasets
    import transformers
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["ckpt"], dtype=torch.float32)
    tok = hf_tokenizer()
    config = ORPOConfig(output_dir=str(Path(setup["workdir"]) / "trl"), beta=args.lam, max_length=args.max_length,
                        per_device_train_batch_size=args.pairs, learning_rate=LR, optim="adamw_torch_fused",
                        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                        max_grad_norm=GRAD_CLIP, lr_scheduler_type="constant", bf16=False, fp16=False,
                        use_cpu=True, report_to="none", logging_strategy="no", save_strategy="no",
                        disable_dropout=True, remove_unused_columns=False, dataloader_num_workers=0,
                        seed=args.seed)
    # ORPOTrainer insists on a dataset and tokenizes it; the timed batches below come from our token ids,
    # so both sides see exactly the same tokens (TRL's own tokenization may split the boundary differently)
    ds = datasets.Dataset.from_dict({"prompt": ["Hello?"] * 2, "chosen": [" Hi."] * 2, "rejected": [" No."] * 2})
    trainer = ORPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train()'s loop, read by training_step
    inputs = [trainer.data_collator([trl_features(*pr) for pr in b]) for b in setup["batches"]]
    model = trainer.model

    def step(i):
        loss = trainer.training_step(model, inputs[i])
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    computed = [2 * max(b["chosen_input_ids"].shape[1], b["rejected_input_ids"].shape[1]) * args.pairs
                for b in inputs]
    return step, computed


def hf_tokenizer():
    """A transformers tokenizer for ORPOTrainer (it only tokenizes its tiny construction dataset)."""
    from transformers import PreTrainedTokenizerFast
    if (LLAMA2_TOKENIZER / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(LLAMA2_TOKENIZER / "tokenizer.json"),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers
        t = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = "<unk>"   # PAD_ID: Llama-2 has no pad token
    return tok


def trl_features(p, c, r):
    """One pair in the layout TRL's tokenize_row produces (prompt labels masked with -100)."""
    f = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for side, resp in (("chosen", c), ("rejected", r)):
        f[f"{side}_input_ids"] = p + resp
        f[f"{side}_attention_mask"] = [1] * (len(p) + len(resp))
        f[f"{side}_labels"] = [-100] * len(p) + resp
    return f


def pad_max_row(setup, args):
    """The official code's step (xfactlab/orpo src/orpo_trainer.py compute_loss), in float32: chosen and
    rejected padded to max_length, two forwards, the NLL from the model's own labels loss, eq. 3 from a
    full-vocabulary log_softmax. One deliberate difference: its response mask
    (chosen_attention_mask[:, :-1] - prompt_attention_mask[:, 1:]) also counts the first padding target
    after each sequence; we count response tokens only, so that its loss can be checked against the others."""
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["ckpt"], dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    T = args.max_length

    def padded(seqs):
        ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return ids, mask

    inputs = []
    for b in setup["batches"]:
        pos, pos_mask = padded([p + c for p, c, _ in b])
        neg, neg_mask = padded([p + r for p, _, r in b])
        _, prompt_mask = padded([p for p, _, _ in b])
        inputs.append((pos, pos_mask, neg, neg_mask, prompt_mask))

    def logps(prompt_mask, ids, mask, logits):
        m = mask[:, 1:] - prompt_mask[:, 1:]                             # response targets
        per_token = torch.gather(logits[:, :-1, :].log_softmax(-1), 2, (m * ids[:, 1:]).unsqueeze(2)).squeeze(2)
        return (per_token * m).sum(1).double() / m.sum(1).double()

    def step(i):
        pos, pos_mask, neg, neg_mask, prompt_mask = inputs[i]
        out_neg = model(input_ids=neg, attention_mask=neg_mask, labels=neg.masked_fill(neg_mask == 0, -100),
                        output_hidden_states=True)
        out_pos = model(input_ids=pos, attention_mask=pos_mask, labels=pos.masked_fill(pos_mask == 0, -100),
                        output_hidden_states=True)
        pos_prob = logps(prompt_mask, pos, pos_mask, out_pos.logits)
        neg_prob = logps(prompt_mask, neg, neg_mask, out_neg.logits)
        log_odds = (pos_prob - neg_prob) - (torch.log1p(-torch.exp(pos_prob)) - torch.log1p(-torch.exp(neg_prob)))
        loss = torch.mean(out_pos.loss - args.lam * torch.log(torch.sigmoid(log_odds)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, [2 * T * len(b) for b in setup["batches"]]


def logps_row(setup, args, chunked: bool):
    """Per-token log-probs of all the benchmark pairs packed as one batch (shared layout), from its final
    hidden states, forward + backward: model.token_logps (chunked lm_head, custom backward) against full
    (N, V) logits -> log_softmax -> gather, the way TRL and the official code get them."""
    import data as data_lib
    import model as model_lib
    model = model_lib.Transformer.from_pretrained(setup["ckpt"])
    b = data_lib.pack_pairs([data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr))
                             for b in setup["batches"] for pr in b], shared_prompt=True)
    with torch.no_grad():
        hidden0 = model.packed_hidden(b.input_ids, b.position_ids, b.seg_lens)   # (N, D)

    def step(_):
        hidden = hidden0.clone().requires_grad_()
        if chunked:
            lp = model.token_logps(hidden, b.tgt_index, b.tgt_ids, chunk_size=args.chunk_size)   # (M,)
        else:
            logits = model.lm_head(hidden).float()                                 # (N, V)
            lp = logits.log_softmax(-1)[b.tgt_index, b.tgt_ids]                    # (M,)
        lp.sum().backward()
        model.lm_head.weight.grad = None
        return float(lp.detach().sum())

    return step, [b.num_tokens]


def run_worker(args):
    """A child process serving one row: set up, then obey the parent's commands on stdin, one per line
    ("first": the loss-check step on batch 0; "round": one timed pass over the batches; "done": report
    memory and exit), answering each with a "REPLY {json}" line on stdout."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    setup = torch.load(Path(args.workdir) / "setup.pt")
    row = args.worker
    builders = {"ours": lambda: ours_row(setup, args, True), "ours-unshared": lambda: ours_row(setup, args, False),
                "trl": lambda: trl_row(setup, args), "pad-max": lambda: pad_max_row(setup, args),
                "logps-chunked": lambda: logps_row(setup, args, True), "logps-full": lambda: logps_row(setup, args, False)}
    step, computed = builders[row]()
    base = rss_mb()
    reset_ok = reset_peak_rss()              # from here on, VmHWM is the peak of the steps
    reply = lambda d: print("REPLY " + json.dumps(d), flush=True)
    reply({"computed_tokens": computed, "base_rss_mb": base})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "first":                   # batch 0 at the initial weights: the loss check
            reply({"first_loss": step(0)})
        elif cmd == "round":
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(len(computed)):
                step(i)
            reply({"round_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
        elif cmd == "done":
            peak = peak_rss_mb(reset_ok)
            reply({"peak_rss_mb": peak, "peak_minus_base_mb": peak - base, "peak_reset": reset_ok,
                   "threads": torch.get_num_threads()})
            return


# -----------------------------------------------------------------------------
# --profile: where the default step's time goes

PHASES = ("attention layout (segment indices)", "trunk forward", "lm_head forward (token_logps)", "loss (eqs. 3, 6, 7)",
          "lm_head backward (recompute, index_add)", "trunk backward", "grad clipping", "AdamW step + zero_grad")


def timed_step(model, optimizer, b, lam, totals):
    """train.train_step's work for one shared batch, phase by phase (the same calls, in the same order), adding
    [wall, CPU] seconds per phase into totals. The lm_head backward ends when the gradient of the hidden states
    is complete (a hook on them); the trunk's backward is the rest."""
    import model as model_lib
    import orpo

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        totals[name][0] += time.perf_counter() - t
        totals[name][1] += time.process_time() - c
        return out

    layout = timed(PHASES[0], lambda: model_lib.packed_layout(b.seg_lens.cpu(), b.position_ids, model.config.sliding_window,
                                                              torch.float32, model.attention))
    hidden = timed(PHASES[1], lambda: model._trunk(b.input_ids, b.position_ids, layout))              # (N, D)
    logps = timed(PHASES[2], lambda: model.token_logps(hidden, b.tgt_index, b.tgt_ids))               # (M,)

    def loss_fn():
        P = b.n_pairs
        seq = orpo.mean_logps(logps[b.tgt_response], b.tgt_seq[b.tgt_response], 2 * P)
        or_losses, _ = orpo.odds_ratio_loss(seq[:P], seq[P:])
        return -logps[b.tgt_nll].sum() / b.n_nll_tokens + lam * or_losses.sum() / P

    loss = timed(PHASES[3], loss_fn)
    mark = []
    hidden.register_hook(lambda g: mark.append((time.perf_counter(), time.process_time())))
    t, c = time.perf_counter(), time.process_time()
    loss.backward()
    t1, c1 = time.perf_counter(), time.process_time()
    (th, ch), = mark
    totals[PHASES[4]][0] += th - t
    totals[PHASES[4]][1] += ch - c
    totals[PHASES[5]][0] += t1 - th
    totals[PHASES[5]][1] += c1 - ch
    timed(PHASES[6], lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True))
    timed(PHASES[7], lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))


def phase_flops(flop_info, b) -> dict:
    """Model FLOPs of each phase of one shared batch (the lm_head on its M target rows, as token_logps computes)."""
    import model as model_lib
    lm = flop_info["vocab"] * flop_info["embed_dim"]
    trunk, N, M = flop_info["matmul_params"] - lm, b.num_tokens, b.tgt_index.numel()
    attn = 4 * flop_info["n_layers"] * flop_info["d_attn"] * model_lib.attention_pairs(b.seg_lens)   # forward
    return {PHASES[1]: 2 * trunk * N + attn, PHASES[2]: 2 * lm * M, PHASES[4]: 4 * lm * M, PHASES[5]: 4 * trunk * N + 2 * attn}


def attention_alternative(model, b, repeats: int = 2) -> tuple[float, float]:
    """CPU seconds of one layer's attention forward + backward on batch b: one SDPA call under the (N, N) mask of the
    whole packed batch (model.py's CPU path until the fifth session; built here) against what model.py does now
    (model.attend on packed_layout's calls: the segments on one padded grid, or one SDPA call per segment)."""
    import model as model_lib
    c = model.config
    q = torch.randn(b.num_tokens, c.n_heads, c.head_dim, requires_grad=True)
    k = torch.randn(b.num_tokens, c.n_kv_heads, c.head_dim, requires_grad=True)
    v = torch.randn(b.num_tokens, c.n_kv_heads, c.head_dim, requires_grad=True)
    seg_id, branch = model_lib._token_tags(b.seg_lens, "cpu")
    i, j = torch.arange(b.num_tokens)[:, None], torch.arange(b.num_tokens)
    mask = (seg_id[i] == seg_id[j]) & (i >= j) & ((branch[j] == 0) | (branch[j] == branch[i]))    # (N, N)
    layout = model_lib.packed_layout(b.seg_lens, b.position_ids, None, torch.float32, "sdpa")

    def one_call():
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, enable_gqa=c.n_kv_heads != c.n_heads)
        o.sum().backward()

    def per_segment():
        model_lib.attend(q, k, v, layout).sum().backward()

    res = []
    for fn in (one_call, per_segment):
        fn()
        c0 = time.process_time()
        for _ in range(repeats):
            fn()
        res.append((time.process_time() - c0) / repeats)
    return res[0], res[1]


def profile_ours(args, ckpt, batches, flop_info, peak) -> int:
    """--profile: the default step, phase by phase, with each phase's model FLOP/s against the matmul peak; then
    the attention kernel's alternatives and the top operators of one torch.profiler round."""
    import model as model_lib
    import train
    model = model_lib.Transformer.from_pretrained(ckpt)
    model.train()
    optimizer = train.build_optimizer(model, LR, 0.0)
    packed = [pack(b, True) for b in batches]
    scratch = {k: [0.0, 0.0] for k in PHASES}
    for b in packed:                                       # warmup: allocator, MKL buffers, AdamW state
        timed_step(model, optimizer, b, args.lam, scratch)
    totals = {k: [0.0, 0.0] for k in PHASES}
    for _ in range(args.repeats):
        for b in packed:
            timed_step(model, optimizer, b, args.lam, totals)
    n_steps = args.repeats * len(packed)
    fl = {k: sum(phase_flops(flop_info, b).get(k, 0.0) for b in packed) * args.repeats for k in PHASES}
    wall, cpu = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    print(f"\n### The default step (ours), phase by phase: {n_steps} steps, {args.threads} threads; matmul peak "
          f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s wall, {peak['flops_per_cpu_s'] / 1e9:.1f} per CPU s\n")
    print("| phase | wall per step | CPU per step | share of CPU | model GFLOP per step | GFLOP per CPU s | of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in PHASES:
        w, c = totals[k]
        rate = fl[k] / c if c and fl[k] else 0.0
        print(f"| {k} | {1000 * w / n_steps:,.0f} ms | {1000 * c / n_steps:,.0f} ms | {100 * c / cpu:.0f}% | "
              + (f"{fl[k] / n_steps / 1e9:,.1f} | {rate / 1e9:,.1f} | {100 * rate / peak['flops_per_cpu_s']:.0f}% |"
                 if fl[k] else "- | - | - |"))
    total_fl = sum(fl.values())
    print(f"| **step** | {1000 * wall / n_steps:,.0f} ms | {1000 * cpu / n_steps:,.0f} ms | 100% | "
          f"{total_fl / n_steps / 1e9:,.1f} | {total_fl / cpu / 1e9:,.1f} | {100 * total_fl / cpu / peak['flops_per_cpu_s']:.0f}% |")
    rec = sum(recompute_flops(flop_info, b, True) for b in batches) / len(batches)
    print(f"\nnot counted above: the lm_head backward also recomputes the logits, {rec / 1e9:.1f} GFLOP per step "
          f"(+{100 * rec * n_steps / total_fl:.0f}% of the model FLOPs)")
    b = packed[0]
    one, per = attention_alternative(model, b)
    pairs = model_lib.attention_pairs(b.seg_lens)
    print(f"attention, one layer forward + backward on batch 0 ({b.num_tokens} tokens, {len(b.seg_lens)} pairs): one SDPA "
          f"call under the (N, N) mask {1000 * one:,.0f} ms CPU; model.py's CPU path (segments on a padded grid, or "
          f"one call per segment) {1000 * per:,.0f} ms CPU. The mask allows {pairs:,.0f} of the N^2 = {b.num_tokens ** 2:,} (query, key) pairs "
          f"({100 * pairs / b.num_tokens ** 2:.0f}%)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in packed:
            timed_step(model, optimizer, b, args.lam, scratch)
    print("\ntop operators of one profiled round (self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


# -----------------------------------------------------------------------------
# parent: run the rows, print the tables

class Worker:
    """One row's child process, driven line by line (see run_worker). A watchdog thread stops it when its RSS
    passes --mem-cap-gb or one command runs past --row-time-limit: on a shared 24 GB machine a row that would
    need more is a result ("cannot run here"), not a reason to bring the machine down."""

    def __init__(self, row, args, workdir):
        self.row, self.failed, self.stopped = row, None, None
        self.mem_cap_mb, self.time_limit, self.deadline, self.peak_seen_mb = 1024 * args.mem_cap_gb, args.row_time_limit, None, 0.0
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row, "--workdir", str(workdir)]
        for k in ("pairs", "threads", "max_length", "lam", "chunk_size", "seed"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=REPO)
        self.result = {"row": row, "round_s": [], "cpu_s": []}
        threading.Thread(target=self._watch, daemon=True).start()
        self._read("setup")

    def _watch(self):
        while self.proc.poll() is None:
            rss = child_rss_mb(self.proc.pid)
            self.peak_seen_mb = max(self.peak_seen_mb, rss)
            if rss > self.mem_cap_mb:
                self.stopped = f"stopped: its memory passed the {self.mem_cap_mb / 1024:g} GB cap"
            elif self.deadline is not None and time.time() > self.deadline:
                self.stopped = f"stopped: one step took over the {self.time_limit:.0f} s limit"
            if self.stopped:
                self.proc.kill()
                return
            time.sleep(0.05)

    def _read(self, what):
        for line in self.proc.stdout:
            if line.startswith("REPLY "):
                self.result.update(json.loads(line[len("REPLY "):]))
                return True
        self.proc.wait()
        if self.stopped:
            self.failed = self.stopped
            print(f"  {self.row}: {self.stopped} (during {what}; RSS seen {self.peak_seen_mb:,.0f} MB)")
            return False
        self.stderr.seek(0)
        tail = "\n".join(self.stderr.read().splitlines()[-12:])
        self.failed = f"{self.row}: the child process died during {what} (exit {self.proc.returncode}):\n{tail}"
        print("  FAILED " + self.failed)
        return False

    def ask(self, cmd):
        if self.failed:
            return None
        before = dict(self.result)
        self.deadline = time.time() + self.time_limit
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:   # it died between two commands: _read reports how
            pass
        ok = self._read(cmd)
        self.deadline = None
        if not ok:
            return None
        if cmd == "round":
            for k in ("round_s", "cpu_s"):
                self.result[k] = before[k] + [self.result[k]]
        return self.result

    def close(self):
        if not self.failed:
            self.ask("done")
        self.proc.wait(timeout=60)


def run_group(rows, args, workdir, warmup, repeats):
    """Run rows side by side: each in its own process, but only one computing at a time, round after
    round (A B C A B C ...), so that a change in machine load hits every row alike."""
    workers = []
    for row in rows:
        t0 = time.time()
        w = Worker(row, args, workdir)
        print(f"  {row}: set up in {time.time() - t0:.0f}s")
        workers.append(w)
    for w in workers:
        w.ask("first")
    loads = []
    for r in range(warmup + repeats):
        for w in workers:
            w.ask("round")
        loads.append(os.getloadavg()[0])
        if r >= warmup:
            print(f"  round {r - warmup + 1}/{repeats}: " + ", ".join(
                f"{w.row} {w.result['round_s'][-1]:.1f}s" for w in workers if not w.failed)
                  + f" (load {loads[-1]:.1f})")
    results = {}
    for w in workers:
        w.close()
        if w.failed:
            results[w.row] = {"failed": w.failed, "rss_seen_mb": w.peak_seen_mb}
            continue
        res = w.result
        res["round_s"], res["cpu_s"] = res["round_s"][warmup:], res["cpu_s"][warmup:]
        res["median_round_s"] = statistics.median(res["round_s"])
        res["median_cpu_s"] = statistics.median(res["cpu_s"])
        res["n_batches"] = len(res["computed_tokens"])
        res["loads"] = loads
        results[w.row] = res
        print(f"  {w.row:14s} rounds {[round(x, 2) for x in res['round_s']]} s, step memory "
              f"{res['peak_minus_base_mb']:.0f} MB" + (f", first loss {res['first_loss']:.6f}" if "first_loss" in res else ""))
    return results


def ok(res) -> bool:
    return bool(res) and "failed" not in res


def row_flops(row: str, batches, flop_info: dict) -> tuple[float, float]:
    """(model FLOPs, lm_head recompute FLOPs) of one round over the batches, in the layout the row computes: the
    shared batch for ours, the padding-free unshared one for the others (their padding is not model work)."""
    shared = row == "ours"
    model = sum(model_flops(flop_info, b, shared) for b in batches)
    recompute = sum(recompute_flops(flop_info, b, shared) for b in batches) if row.startswith("ours") else 0.0
    return model, recompute


def fmt_ratio(x, ref):
    return f"{x / ref:.2f}x" if ref else "-"


def print_flops_table(train: dict, flops: dict, peaks: list, threads: int) -> None:
    """Each training row's model FLOP/s against the matmul peak measured in this run (the best of its start and end
    measurements), by wall time and per CPU second; the chunked lm_head's recompute apart."""
    peak_wall = max(p["flops_per_s"] for p in peaks)
    peak_cpu = max(p["flops_per_cpu_s"] for p in peaks)
    print(f"\n### Model FLOP/s against this machine's float32 matmul peak ({threads} threads: "
          f"{peak_wall / 1e9:.1f} GFLOP/s by wall time, {peak_cpu / 1e9:.1f} GFLOP per CPU second)\n")
    print("| step | model GFLOP per step | GFLOP/s (wall) | of peak | GFLOP per CPU s | of peak | "
          "lm_head recompute per step (extra, not counted) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r, res in train.items():
        model, recompute = flops[r]
        n = res["n_batches"]
        wall, cpu = model / res["median_round_s"], model / res["median_cpu_s"]
        extra = f"{recompute / n / 1e9:,.1f} GFLOP (+{100 * recompute / model:.0f}%)" if recompute else "-"
        print(f"| {r} | {model / n / 1e9:,.1f} | {wall / 1e9:,.1f} | {100 * wall / peak_wall:.0f}% | "
              f"{cpu / 1e9:,.1f} | {100 * cpu / peak_cpu:.0f}% | {extra} |")
    print("\nmodel FLOPs: model.step_flops (6 x non-embedding params x tokens + attention pairs the mask allows) of the "
          "layout each row computes (shared batch for ours; padding-free unshared batch for the others)")


def print_tables(args, results, pair_tokens, setup_info, flops=None, peaks=None):
    n_batch_tokens = sum(pair_tokens)
    train = {r: results[r] for r in TRAIN_ROWS if ok(results.get(r))}
    trl = train.get("trl")
    print(f"\n### One ORPO optimizer step on CPU (fp32, {args.threads} threads; {setup_info})\n")
    print("| step | time per step | pair tokens/s | vs TRL | CPU time per step | vs TRL | tokens computed per step | step memory | vs TRL | loss, batch 0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"ours": "ours (shared prompt, default)", "ours-unshared": "ours (unshared)",
             "trl": "TRL ORPOTrainer", "pad-max": f"pad to {args.max_length}, 2 forwards (official code)"}
    for r, res in train.items():
        t = res["median_round_s"] / res["n_batches"]
        tps = n_batch_tokens / res["median_round_s"]
        comp = statistics.mean(res["computed_tokens"])
        cpu = res["median_cpu_s"] / res["n_batches"]
        print(f"| {names[r]} | {1000 * t:,.0f} ms | {tps:,.0f} | "
              f"{fmt_ratio(tps, n_batch_tokens / trl['median_round_s']) if trl else '-'} | {cpu:,.1f} s | "
              f"{fmt_ratio(trl['median_cpu_s'], res['median_cpu_s']) if trl else '-'} | {comp:,.0f} | "
              f"{res['peak_minus_base_mb']:,.0f} MB | {fmt_ratio(res['peak_minus_base_mb'], trl['peak_minus_base_mb']) if trl else '-'} | "
              f"{res['first_loss']:.6f} |")
    lp = {r: results[r] for r in LOGPS_ROWS if ok(results.get(r))}
    if lp:
        print(f"\n### Per-token log-probs of one batch, forward + backward, vocab {args.vocab}\n")
        print("| log-probs | time | memory | vs full |")
        print("|---|---:|---:|---:|")
        full = lp.get("logps-full")
        for r, res in lp.items():
            label = f"chunked (model.token_logps, chunk {args.chunk_size})" if r == "logps-chunked" else "full (N, V) logits + log_softmax"
            print(f"| {label} | {1000 * res['median_round_s']:,.0f} ms | {res['peak_minus_base_mb']:,.0f} MB | "
                  f"{fmt_ratio(res['peak_minus_base_mb'], full['peak_minus_base_mb']) if full else '-'} |")
        n = lp[next(iter(lp))]["computed_tokens"][0]
        print(f"\n(N = {n:,} hidden rows; full float32 logits alone are N x V x 4 B = {n * args.vocab * 4 / 2**20:,.0f} MB)")

    if flops:
        print_flops_table(train, flops, peaks, args.threads)

    # checks and targets
    print()
    losses = {r: res["first_loss"] for r, res in train.items()}
    if len(losses) > 1:
        ref = losses.get("ours", next(iter(losses.values())))
        diffs = {r: abs(v - ref) for r, v in losses.items()}
        worst = max(diffs.values())
        print(f"loss check (batch 0, initial weights): " + ", ".join(f"{r} {v:.6f}" for r, v in losses.items())
              + f"; max |difference| {worst:.2e} -> {'OK' if worst < 1e-4 * max(1, abs(ref)) else 'MISMATCH'}")
    if trl and "ours" in train:
        speed = trl["median_round_s"] / train["ours"]["median_round_s"]
        cpu_speed = trl["median_cpu_s"] / train["ours"]["median_cpu_s"]
        mem = train["ours"]["peak_minus_base_mb"] / trl["peak_minus_base_mb"]
        print(f"target (issue 8) tokens/s >= 1.5x TRL: {speed:.2f}x by wall time, {cpu_speed:.2f}x by CPU time "
              f"-> {'met' if min(speed, cpu_speed) >= 1.5 else 'MISSED'}")
        print(f"target (issue 8) memory <= 0.6x TRL:   {mem:.2f}x -> {'met' if mem <= 0.6 else 'MISSED'}")
    if any(not res["peak_reset"] for res in results.values() if ok(res)):
        print("note: /proc/self/clear_refs was not writable: memory = ru_maxrss - RSS after load (includes load peaks)")


# -----------------------------------------------------------------------------
# --sweep: cost as the work grows, one thing varied at a time, ours against TRL on the same pairs

def load_long_pairs(max_length: int, seed: int, synthetic: bool = False, vocab: int = 32000):
    """Multi-turn pairs for the length axis: the ShareGPT-layout DPO demo (1-13 turns) cut by data.py's rule to
    max_length (prompts up to 3/4 of it), or synthetic pairs near max_length when the data is absent."""
    import data as data_lib
    if not synthetic and SHAREGPT.exists() and (LLAMA2_TOKENIZER / "tokenizer.json").exists():
        tok = data_lib.load_tokenizer(LLAMA2_TOKENIZER)
        ps = data_lib.build_pairs(SHAREGPT, tok, max_length=max_length, max_prompt_length=3 * max_length // 4)
        return [(pr.prompt_ids.tolist(), pr.chosen_ids.tolist(), pr.rejected_ids.tolist()) for pr in ps], \
            "ShareGPT multi-turn (LLaMA-Factory DPO demo), Llama-2 tokenizer, the longest pairs"
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, max(1, n)).tolist()
    return [(ids(int(max_length * rng.uniform(0.4, 0.6))), ids(int(max_length * rng.uniform(0.2, 0.4))),
             ids(int(max_length * rng.uniform(0.2, 0.4)))) for _ in range(200)], "SYNTHETIC long pairs"


def longest(pairs, n: int):
    """The n pairs with the longest sequence (prompt + the longer answer), longest first."""
    return sorted(pairs, key=lambda pr: -(len(pr[0]) + max(len(pr[1]), len(pr[2]))))[:n]


def sweep_points(args) -> list[dict]:
    """One point per value on each axis; the others stay at the centre (--pairs HH-RLHF pairs, --max-length, --vocab)."""
    pts = [dict(axis="pairs", value=n, pairs=n, max_length=args.max_length, vocab=args.vocab, source="hh")
           for n in args.sweep_pairs]
    pts += [dict(axis="length", value=L, pairs=args.pairs, max_length=L, vocab=args.vocab, source="long")
            for L in args.sweep_lengths]
    pts += [dict(axis="vocab", value=V, pairs=args.pairs, max_length=args.max_length, vocab=V, source="hh")
            for V in args.sweep_vocabs]
    return pts


def sweep_record(point, row, res, batch, flop_info) -> dict:
    rec = {**point, "row": row, "pair_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in batch),
           "params": flop_info["params"]}
    if not ok(res):
        return {**rec, "failed": (res or {}).get("failed", "did not run"), "rss_seen_mb": (res or {}).get("rss_seen_mb")}
    n = res["n_batches"]
    return {**rec, "wall_s": res["median_round_s"] / n, "cpu_s": res["median_cpu_s"] / n,
            "memory_mb": res["peak_minus_base_mb"], "first_loss": res["first_loss"],
            "computed_tokens": statistics.mean(res["computed_tokens"])}


def run_sweep(args, peaks) -> int:
    """Every point in its own worker processes (the rows take turns), one batch per point: a loss-check step, then
    --sweep-repeats timed steps; each row is stopped at --mem-cap-gb or past --row-time-limit per step."""
    t_start, records, done = time.time(), [], {}
    hh, hh_source = load_pairs(args.max_length, args.seed, args.synthetic_data, min(args.sweep_vocabs + [args.vocab]))
    order = np.random.default_rng(args.seed).permutation(len(hh))     # nested batches: 4 pairs are the first 4 of 8
    with tempfile.TemporaryDirectory(prefix="orpo-sweep-") as tmp:
        ckpts = {}
        for i, pt in enumerate(sweep_points(args)):
            key = (pt["pairs"], pt["max_length"], pt["vocab"], pt["source"])
            if key in done:                                  # the centre appears on two axes: measured once
                records += [{**r, "axis": pt["axis"], "value": pt["value"]} for r in done[key]]
                continue
            pargs = copy.copy(args)
            pargs.pairs, pargs.max_length, pargs.vocab = pt["pairs"], pt["max_length"], pt["vocab"]
            if pt["source"] == "hh":
                batch, source = [hh[j] for j in order[:pt["pairs"]]], hh_source
            else:
                long_pairs, source = load_long_pairs(pt["max_length"], args.seed, args.synthetic_data,
                                                     min(args.sweep_vocabs + [args.vocab]))
                batch = longest(long_pairs, pt["pairs"])
            if pt["vocab"] not in ckpts:
                ckpts[pt["vocab"]] = (Path(tmp) / f"ckpt{pt['vocab']}", None)
                ckpts[pt["vocab"]] = (ckpts[pt["vocab"]][0], write_checkpoint(pargs, ckpts[pt["vocab"]][0]))
            ckpt, flop_info = ckpts[pt["vocab"]]
            workdir = Path(tmp) / f"point{i}"
            workdir.mkdir()
            torch.save({"batches": [batch], "ckpt": str(ckpt), "workdir": str(workdir)}, workdir / "setup.pt")
            print(f"\n[{time.time() - t_start:.0f}s] {pt['axis']} = {pt['value']}: {pt['pairs']} pairs of {source}, max "
                  f"length {pt['max_length']}, vocab {pt['vocab']}; longest sequence "
                  f"{max(len(p) + max(len(c), len(r)) for p, c, r in batch)}")
            results = run_group(args.sweep_rows, pargs, workdir, 0, args.sweep_repeats)
            done[key] = [sweep_record(pt, row, results.get(row), batch, flop_info) for row in args.sweep_rows]
            records += done[key]
    peaks.append(matmul_peak(args.threads, args.peak_size))
    data = {"records": records, "peaks": peaks, "minutes": (time.time() - t_start) / 60, "load_end": os.getloadavg(),
            "conditions": f"{args.threads} threads, torch {torch.__version__}, model dim {args.dim}, {args.layers} layers, "
                          f"float32; mem cap {args.mem_cap_gb:.0f} GB, {args.row_time_limit:.0f} s per step",
            "mem_cap_gb": args.mem_cap_gb}
    print_sweep(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return plot_scaling(data, args.plot)


def print_sweep(data) -> None:
    recs = data["records"]
    print(f"\n### Cost as the work grows ({data['conditions']}; {data['minutes']:.0f} min)\n")
    print("| axis | value | pair tokens | ours CPU s/step | ours wall s/step | ours memory | TRL CPU s/step | "
          "TRL wall s/step | TRL memory | TRL / ours, CPU time | TRL / ours, memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (axis, value), group in itertools.groupby(recs, key=lambda r: (r["axis"], r["value"])):
        g = {r["row"]: r for r in group}
        ours, trl = g.get("ours"), g.get("trl")
        cell = lambda r: ("not run", "", "") if r is None else (r["failed"], "", "") if "failed" in r else \
            (f"{r['cpu_s']:,.1f}", f"{r['wall_s']:,.1f}", f"{r['memory_mb']:,.0f} MB")
        both = ours and trl and "failed" not in ours and "failed" not in trl
        first = next(iter(g.values()))
        print(f"| {axis} | {value:,} | {first['pair_tokens']:,} | " + " | ".join(cell(ours)) + " | " + " | ".join(cell(trl))
              + (f" | {trl['cpu_s'] / ours['cpu_s']:.1f}x | {trl['memory_mb'] / ours['memory_mb']:.1f}x |" if both else " | - | - |"))
    losses = [abs(g["first_loss"] - o["first_loss"]) for g in recs for o in recs
              if g["row"] == "trl" and o["row"] == "ours" and (g["axis"], g["value"]) == (o["axis"], o["value"])
              and "first_loss" in g and "first_loss" in o]
    if losses:
        print(f"\nfirst-step losses, ours vs TRL: largest |difference| {max(losses):.1e} over {len(losses)} points")


def plot_scaling(data, path) -> int:
    """benchmarks/scaling.png: step memory and CPU time against the tokens of a step, ours and TRL, and the two
    vocabularies side by side: our memory follows the tokens, TRL's follows tokens x vocabulary."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.style.use(REPO / "plots.mplstyle")
    recs = data["records"]
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    style = {"ours": ("C0", "ours (shared prompt, chunked lm_head)"), "trl": ("C1", "TRL ORPOTrainer"),
             "ours-unshared": ("C2", "ours (unshared)")}
    markers = {"pairs": "o", "length": "s"}
    cap = data.get("mem_cap_gb", 14) * 1024
    for row, (color, label) in style.items():
        for axis, m in markers.items():
            pts = sorted((r for r in recs if r["row"] == row and r["axis"] == axis), key=lambda r: r["pair_tokens"])
            okp = [r for r in pts if "failed" not in r]
            if not pts:
                continue
            lab = f"{label.split(' (')[0]}, {'pairs per batch' if axis == 'pairs' else 'max length'} varied"
            axes[0].plot([r["pair_tokens"] for r in okp], [r["memory_mb"] for r in okp], marker=m, color=color,
                         ls="-" if axis == "pairs" else "--", label=lab)
            axes[1].plot([r["pair_tokens"] for r in okp], [r["cpu_s"] for r in okp], marker=m, color=color,
                         ls="-" if axis == "pairs" else "--", label=lab)
            for r in pts:   # a row stopped at the memory cap: an open triangle on the cap line
                if "failed" in r:
                    axes[0].plot(r["pair_tokens"], max(cap, r.get("rss_seen_mb") or 0), marker="^", color=color,
                                 mfc="none", ms=9)
    if any("failed" in r for r in recs):
        axes[0].annotate(f"\u25b3 stopped at the {cap / 1024:g} GB cap", (0.02, 0.97), xycoords="axes fraction",
                         fontsize=7, va="top", color="0.3")
    if any(r["axis"] in markers for r in recs):
        axes[0].axhline(cap, color="0.5", lw=0.8, ls=":")
    for ax, ylab, title in ((axes[0], "step memory (MB, peak RSS - loaded)", "step memory as the tokens grow"),
                            (axes[1], "CPU seconds per step", "CPU time as the tokens grow")):
        if ax.has_data():
            ax.set(xscale="log", yscale="log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="tokens per step (prompt counted with each answer)", ylabel=ylab, title=title)
    axes[0].legend(loc="lower right", fontsize=6.5)
    vocab = [r for r in recs if r["axis"] == "vocab"]
    values = sorted({r["value"] for r in vocab})
    width = 0.38
    for j, row in enumerate(r for r in style if any(v["row"] == r for v in vocab)):
        color, label = style[row]
        for i, V in enumerate(values):
            r = next((x for x in vocab if x["row"] == row and x["value"] == V), None)
            if r is None:
                continue
            state = 12 * r["params"] / 2**20                  # gradients + AdamW m and v, float32
            height = r["memory_mb"] if "failed" not in r else max(cap, r.get("rss_seen_mb") or 0)
            x = i + (j - 0.5) * width
            axes[2].bar(x, height, width, color=color, alpha=0.85 if "failed" not in r else 0.3,
                        label=label if i == 0 else None)
            axes[2].bar(x, min(state, height), width, color="none", edgecolor="k", hatch="//", lw=0,
                        label="of which gradients + AdamW state" if i == 0 and j == 0 else None)
            axes[2].annotate("stopped at the cap" if "failed" in r else f"{height:,.0f}", (x, height), ha="center",
                             fontsize=7, xytext=(0, 2), textcoords="offset points")
    axes[2].set(xticks=range(len(values)), xticklabels=[f"vocab {v:,}" for v in values], ylabel="step memory (MB)",
                title="vocabulary: same trunk, same 8 pairs")
    axes[2].legend(loc="upper left", fontsize=6.5)
    fig.suptitle(f"One ORPO optimizer step on the CPU: {data['conditions']}", fontsize=8)
    fig.savefig(path)
    print(f"wrote {path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.plot_from:
        return plot_scaling(json.loads(Path(args.plot_from).read_text()), args.plot)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs); "
          f"torch {torch.__version__}, {args.threads} threads per row")
    peaks = [matmul_peak(args.threads, args.peak_size)]
    print(f"float32 matmul peak ({args.peak_size}^3, best of 5, {args.threads} threads): "
          f"{peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s wall, {peaks[0]['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU s")
    if args.sweep:
        return run_sweep(args, peaks)
    if args.long_pairs:
        pairs, source = load_long_pairs(args.max_length, args.seed, args.synthetic_data, args.vocab)
        pairs = longest(pairs, args.pairs * args.batches)
    else:
        pairs, source = load_pairs(args.max_length, args.seed, args.synthetic_data, args.vocab)
    sh, un, ratio, prompt_share = tokens_per_pair(pairs)
    print(f"tokens per pair (all {len(pairs)} pairs): {un:.1f} unshared (prompt+chosen + prompt+rejected), "
          f"{sh:.1f} shared (prompt once): {ratio:.3f}x fewer; prompts are {100 * prompt_share:.0f}% of unshared tokens")
    rng = np.random.default_rng(args.seed)
    need = args.pairs * args.batches
    if need > len(pairs):
        raise SystemExit(f"error: --pairs x --batches = {need} exceeds the {len(pairs)} pairs available")
    chosen = rng.choice(len(pairs), need, replace=False)
    batches = [[pairs[j] for j in chosen[i * args.pairs:(i + 1) * args.pairs]] for i in range(args.batches)]
    bsh, bun, bratio, _ = tokens_per_pair([pr for b in batches for pr in b])
    pair_tokens = [sum(2 * len(p) + len(c) + len(r) for p, c, r in b) for b in batches]
    print(f"benchmark batches: {args.batches} x {args.pairs} random pairs, {bun:.1f} tokens per pair unshared, "
          f"{bsh:.1f} shared ({bratio:.3f}x); longest sequence {max(len(p) + max(len(c), len(r)) for b in batches for p, c, r in b)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="orpo-bench-") as workdir:
        ckpt = Path(workdir) / "ckpt"
        flop_info = write_checkpoint(args, ckpt)
        if args.profile:
            return profile_ours(args, ckpt, batches, flop_info, peaks[0])
        torch.save({"batches": batches, "ckpt": str(ckpt), "workdir": workdir}, Path(workdir) / "setup.pt")
        print(f"model: llama dim {args.dim}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, vocab {args.vocab}, "
              f"float32; one safetensors checkpoint loaded by every row")
        group = [r for r in args.rows if r in ("ours", "ours-unshared", "trl")]
        if group:
            print(f"interleaved rows {group}: 1 loss-check step, {args.warmup} warmup + {args.repeats} timed rounds")
            results.update(run_group(group, args, workdir, args.warmup, args.repeats))
        if "pad-max" in args.rows:   # ~10 GB and slow: alone, after the others, fewer rounds
            print(f"pad-max alone: 1 loss-check step + {args.pad_max_repeats} timed rounds")
            results.update(run_group(["pad-max"], args, workdir, 0, args.pad_max_repeats))
        for row in LOGPS_ROWS:
            if row in args.rows:
                results.update(run_group([row], args, workdir, args.warmup, args.repeats))
    setup_info = (f"{args.batches} batches x {args.pairs} pairs of {source}, median of {args.repeats} rounds; "
                  f"model dim {args.dim}, {args.layers} layers, vocab {args.vocab}")
    peaks.append(matmul_peak(args.threads, args.peak_size))
    print(f"float32 matmul peak at the end: {peaks[1]['flops_per_s'] / 1e9:.1f} GFLOP/s wall, "
          f"{peaks[1]['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU s")
    flops = {r: row_flops(r, batches, flop_info) for r in TRAIN_ROWS if ok(results.get(r))}
    print_tables(args, results, pair_tokens, setup_info, flops, peaks)
    load1 = os.getloadavg()
    print(f"\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results,
                                               "pair_tokens": pair_tokens, "load_start": load0, "load_end": load1,
                                               "peaks": peaks, "flops": flops, "flop_info": flop_info},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
