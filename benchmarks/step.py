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
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
HH_RLHF = SHARED / "hh-rlhf-harmless-test.parquet"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"

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


# -----------------------------------------------------------------------------
# setup (parent process): pairs, batches, one checkpoint shared by every row

def load_pairs(max_length: int, seed: int):
    """[(prompt, chosen, rejected) token lists] of the real HH-RLHF pairs, or synthetic ones with a note."""
    import data as data_lib
    if HH_RLHF.exists() and (LLAMA2_TOKENIZER / "tokenizer.json").exists():
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
        ids = lambda n: [1] * (n > 0) + rng.integers(3, 32000, n - 1).tolist()
        pairs.append((ids(p), rng.integers(3, 32000, c).tolist(), rng.integers(3, 32000, r).tolist()))
    return pairs, "SYNTHETIC (HH-RLHF-like lengths)"


def write_checkpoint(args, out_dir: Path) -> None:
    import model as model_lib
    config = model_lib.ModelConfig(family="llama", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                   n_heads=args.heads, ffn_dim=args.ffn, max_seq_len=max(2048, args.max_length),
                                   bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    torch.manual_seed(args.seed)
    model_lib.Transformer(config).save_pretrained(out_dir)


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
    optimizer = train.build_optimizer(model, LR, 0.0, cpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [data_lib.pack_pairs([data_lib.TokenizedPair(*(np.asarray(x, np.int32) for x in pr)) for pr in b],
                                   shared_prompt=shared_prompt, prompt_loss=True) for b in setup["batches"]]

    def step(i):
        return train.train_step(model, [batches[i]], args.lam, cpu, nullcontext(), optimizer, scheduler, GRAD_CLIP)["loss"]

    return step, [b.num_tokens for b in batches]


def trl_row(setup, args):
    """TRL's ORPOTrainer: its collator, its training_step (compute_loss -> concatenated_forward ->
    odds_ratio_loss, backward), then what Trainer's loop does next: clip to 1.0 and the optimizer step."""
    import datasets
    import transformers
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["ckpt"], dtype=torch.float32)
    tok = hf_tokenizer()
    config = ORPOConfig(output_dir=str(Path(setup["workdir"]) / "trl"), beta=args.lam, max_length=args.max_length,
                        per_device_train_batch_size=args.pairs, learning_rate=LR, optim="adamw_torch",
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
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
# parent: run the rows, print the tables

class Worker:
    """One row's child process, driven line by line (see run_worker)."""

    def __init__(self, row, args, workdir):
        self.row, self.failed = row, None
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row, "--workdir", str(workdir)]
        for k in ("pairs", "threads", "max_length", "lam", "chunk_size", "seed"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=REPO)
        self.result = {"row": row, "round_s": [], "cpu_s": []}
        self._read("setup")

    def _read(self, what):
        for line in self.proc.stdout:
            if line.startswith("REPLY "):
                self.result.update(json.loads(line[len("REPLY "):]))
                return True
        self.stderr.seek(0)
        tail = "\n".join(self.stderr.read().splitlines()[-12:])
        self.failed = f"{self.row}: the child process died during {what} (exit {self.proc.wait()}):\n{tail}"
        print("  FAILED " + self.failed)
        return False

    def ask(self, cmd):
        if self.failed:
            return None
        before = dict(self.result)
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        if not self._read(cmd):
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
            results[w.row] = None
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


def fmt_ratio(x, ref):
    return f"{x / ref:.2f}x" if ref else "-"


def print_tables(args, results, pair_tokens, setup_info):
    n_batch_tokens = sum(pair_tokens)
    train = {r: results[r] for r in TRAIN_ROWS if results.get(r)}
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
    lp = {r: results[r] for r in LOGPS_ROWS if results.get(r)}
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
    if any(not res["peak_reset"] for res in results.values() if res):
        print("note: /proc/self/clear_refs was not writable: memory = ru_maxrss - RSS after load (includes load peaks)")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs); "
          f"torch {torch.__version__}, {args.threads} threads per row")
    pairs, source = load_pairs(args.max_length, args.seed)
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
        write_checkpoint(args, ckpt)
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
    print_tables(args, results, pair_tokens, setup_info)
    load1 = os.getloadavg()
    print(f"\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results,
                                               "pair_tokens": pair_tokens, "load_start": load0, "load_end": load1},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
