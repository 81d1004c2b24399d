"""Reward-model win rates: how the ORPO paper (arXiv 2403.07691, §6.1, Tables 2-3, Figure 5) scores policies.

Every policy answers the same test prompts; a reward model (RM), a model.py Transformer with a scalar head on
the last token's hidden state, r(x, y) = w . h_last, trained with the Bradley-Terry loss (eq. 11)
L_RM = -log sigmoid(r(x, y_w) - r(x, y_l)), scores each answer; A's win rate over B is the mean over prompts of
[r(A) > r(B)] + 0.5 [r(A) = r(B)], mean ± std over rounds of sampling seeds. On data.py's synthetic pairs an
oracle that knows the right answers gives its own win rate and the RM's agreement with it.

    python eval_rm.py [demo --root OUT]        # any train.py run, from its OUT/run.json (default: out)
    python eval_rm.py train-rm --out runs/rm --init opt-350m --data pairs.parquet --eval-data test.parquet
    python eval_rm.py winrate --rm runs/rm --policy orpo=out/final --policy base=tiny --out runs/winrate
    torchrun --nproc_per_node 4 eval_rm.py winrate ...   # the same numbers, sampling split over 4 ranks
"""
import argparse
import dataclasses
import hashlib
import itertools
import json
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dist
import model as model_lib

META_FILE = "reward_model.json"   # train-rm's settings and held-out accuracy; marks a reward-model directory


class EvalError(ValueError):
    """Bad input to eval_rm.py (a path, a --policy spec, an option); the CLI prints it in one line."""


def one_line(flag, fn, *args, why="", **kwargs):
    """fn(*args), a ValueError or FileNotFoundError from it (DataError, CheckpointError...) named by its flag."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"{flag}: {e}{why}") from None


# -----------------------------------------------------------------------------------------------------------
# The reward model and its training (eq. 11)

class RewardModel(nn.Module):
    """r(x, y) = w . h_last: a Transformer and a scalar head on the last token, the only one that saw all of prompt
    and answer. The head is transformers' `score`, with no bias: a bias cancels in eq. 11 (r(x, y_w) - r(x, y_l))."""

    def __init__(self, config):
        super().__init__()
        # lm_head is never used: tied and bias-free, nothing of it is saved (transformers' classifier has none)
        self.backbone = model_lib.Transformer(dataclasses.replace(config, tie_embeddings=True, lm_head_bias=False))
        self.score = nn.Linear(config.embed_dim, 1, bias=False)   # the width of packed_hidden's output
        nn.init.zeros_(self.score.weight)       # every reward starts at 0: L_RM starts at log 2, accuracy at chance

    def forward(self, input_ids, position_ids, seg_lens, last_rows):
        """Packed sequences in, one float32 reward per requested row out. (N,), (N,), (S, 3), (K,) -> (K,)"""
        hidden = self.backbone.packed_hidden(input_ids, position_ids, seg_lens)   # (N, D)
        last = hidden[last_rows].float()                                          # (K, D)
        # the head in float32 even under a bf16 backbone: 8 bits of mantissa would turn close rewards into ties
        return last @ self.score.weight.float()[0]                                # (K,)


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """eq. 11: -log sigmoid(r(x, y_w) - r(x, y_l)), the mean over pairs (logsigmoid: finite for any margin); the
    accuracy counts a tie as half, like the win rate: an all-zero RM scores 0.5. (P,), (P,) -> (loss, metrics)"""
    margin = chosen_rewards.float() - rejected_rewards.float()                   # (P,)
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "margin": margin.mean().detach()}


def batch_rewards(rm, batch, device):
    """Chosen and rejected rewards of a PackedBatch, read at the last row of each answer: segments [prompt | chosen |
    rejected] (shared prompt), else [prompt | chosen] for every pair, then [prompt | rejected]. -> (P,), (P,)"""
    seg_lens, P = batch.seg_lens.to(torch.long), batch.n_pairs                   # (S, 3) on CPU
    ends = torch.cumsum(seg_lens.sum(1), 0) - 1                                   # (S,) last row of each segment
    rows = torch.cat([ends - seg_lens[:, 2], ends] if batch.shared_prompt else [ends[:P], ends[P:]])   # (2P,)
    batch = batch.to(device)
    rewards = rm(batch.input_ids, batch.position_ids, batch.seg_lens, rows.to(device))                  # (2P,)
    return rewards[:P], rewards[P:]


def build_reward_model(init, *, seed=42, device="cpu"):
    """A fresh RM on a checkpoint dir, Hub id or preset (weightless: from `seed`), built on the meta device."""
    config, ckpt_dir = model_lib.resolve_model(str(init))
    with torch.device("meta"):
        rm = RewardModel(config)
    if torch_dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dist.shard_model(rm.backbone)                 # each block, then the backbone (packed_hidden registered)
        fully_shard(rm, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))   # the root: the head
    dist.materialize(rm, device)
    if not torch_dist.is_initialized():
        rm.backbone.tie_weights()                     # to_empty gives tied weights separate storage
    tensors = model_lib.iter_hf_tensors(ckpt_dir, config) if ckpt_dir else model_lib.random_init_tensors(config, seed)
    dist.load_weights(rm.backbone, ((n, t) for n, t in tensors if not n.startswith("lm_head.")),
                      where=f"reward model init {init}")
    nn.init.zeros_(rm.score.weight)                   # to_empty left the head uninitialised
    return rm


def save_reward_model(rm, out_dir, *, tokenizer=None, meta=None, state_dict=None):
    """What AutoModelForSequenceClassification loads (the head as score.weight), META_FILE and the tokenizer."""
    out_dir, config, tok = Path(out_dir), rm.backbone.config, tokenizer
    sd = state_dict if state_dict is not None else rm.state_dict()      # a sharded rm's: gathered by the caller
    # transformers reads the reward at the rightmost token that is not pad: any id but the EOS (or template text
    # after it) that ends every sequence. The tokenizer's pad, else id 0 (Llama's unk; GPT-2 has only EOS), or 1.
    pad = config.pad_token_id if tok is None else tok.pad_id if tok.pad_id not in (None, tok.eos_id) else \
        int(tok.eos_id == 0)
    arch = model_lib.config_to_hf(config)["architectures"][0].replace("CausalLM", "SequenceClassification")
    hf_config = {"architectures": [arch], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad}
    model_lib.save_hf_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, config,
                                 out_dir, extra={"score.weight": sd["score.weight"].float()}, hf_config=hf_config)
    if tok is not None:
        dataclasses.replace(tok, pad_token=tok.tokenizer.id_to_token(pad)).save(out_dir)
    shutil.rmtree(out_dir / "reward_head", ignore_errors=True)      # the head of the old layout, if it was here
    (out_dir / META_FILE).write_text(json.dumps({"kind": "orpo-reward-model", **(meta or {})}, indent=2) + "\n")


def read_rm_dir(rm_dir):
    """A reward-model directory, checked before anything is loaded. -> its META_FILE"""
    rm_dir, old = Path(rm_dir), (Path(rm_dir) / "reward_head").is_dir()
    if old or not (rm_dir / META_FILE).is_file():
        why = ("holds a reward model in the old layout (its head in reward_head/, which transformers cannot load): "
               "retrain it" if old else f"is not a reward model directory ({META_FILE} not found); make one")
        raise EvalError(f"{rm_dir} {why} with `python eval_rm.py train-rm --out {rm_dir}`")
    try:
        return json.loads((rm_dir / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read {rm_dir / META_FILE}: {e}") from None


def load_reward_model(rm_dir, *, dtype=torch.float32, device="cpu"):
    """The inverse of save_reward_model, the head in float32. -> (RewardModel in eval mode, meta dict)."""
    meta = read_rm_dir(rm_dir)
    with torch.device("meta"):
        rm = RewardModel(model_lib.load_config(rm_dir))
    rm.backbone.to(dtype)                             # the head stays float32
    rm.to_empty(device=device)
    rm.backbone.tie_weights()
    tensors = model_lib.iter_hf_tensors(rm_dir, rm.backbone.config, extra=("score.weight",))
    dist.load_weights(rm, ((n if n == "score.weight" else f"backbone.{n}", t) for n, t in tensors), where=str(rm_dir))
    return rm.eval(), meta


def train_reward_model(train_pairs, *, init="tiny", val_pairs=None, out_dir=None, tokenizer=None, max_steps=300,
                       batch_size=32, lr=1e-3, warmup_steps=20, seed=0, init_seed=42, shared_prompt=False,
                       device="cpu", log_every=50, meta=None):
    """Eq. 11 with AdamW and dist.lr_lambda's cosine schedule, sharded under torchrun; the accuracy on val_pairs;
    saved to out_dir. shared_prompt packs [prompt | chosen | rejected]: same rewards, the prompt read once."""
    _, rank, _, world_size = dist.get_dist_info()
    rm = build_reward_model(init, seed=init_seed, device=device).train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, dist.lr_lambda("cosine", warmup_steps, max_steps))
    # group_batches=1: every batch is a random sample of pairs. With length grouping a batch holds pairs of one
    # length, which on the synthetic data means one task, and the RM then chases one task per step.
    batcher = data.PairBatcher(train_pairs, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                               shared_prompt=shared_prompt, group_batches=1)
    batches = itertools.chain.from_iterable(itertools.repeat(batcher))   # epoch after epoch, each reshuffled
    window, t0 = Counter(), time.time()          # pair-weighted sums of the metrics since the last log line
    for step in range(1, max_steps + 1):
        batch, step_lr = next(batches), optimizer.param_groups[0]["lr"]
        loss, metrics = bradley_terry_loss(*batch_rewards(rm, batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.update({k: float(v) * batch.n_pairs for k, v in metrics.items()}, pairs=batch.n_pairs)
        if step % log_every == 0 or step == max_steps:
            # one batch is a noisy estimate: log the pair-weighted mean over the window and all ranks
            sums = dist.all_reduce_sum(dict(window), device)
            logged = {k: sums[k] / sums["pairs"] for k in metrics}
            dist.print0(f"rm step {step:4d}/{max_steps} | loss {logged['loss']:.4f} | acc {logged['accuracy']:.3f} "
                        f"| margin {logged['margin']:+.3f} | lr {step_lr:.2e} | {time.time() - t0:.1f}s")
            window = Counter()
    result = {"steps": max_steps, "train_pairs": len(train_pairs), "final_train_loss": logged["loss"],
              "final_train_accuracy": logged["accuracy"]}
    if val_pairs:
        result.update(val_pairs=len(val_pairs), val_accuracy=reward_accuracy(rm, val_pairs, device=device))
        dist.print0(f"rm held-out accuracy: {result['val_accuracy']:.3f} on {len(val_pairs)} pairs")
    if out_dir is not None:
        full_sd = dist.full_state_dict(rm) if world_size > 1 else None    # a collective: every rank takes part
        if rank == 0:
            save_reward_model(rm, out_dir, tokenizer=tokenizer, state_dict=full_sd,
                              meta={"init": str(init), "seed": seed, "lr": lr, "batch_size": batch_size,
                                    "shared_prompt": shared_prompt, **result, **(meta or {})})
        dist.barrier()
    return rm, result


@torch.no_grad()
def reward_accuracy(rm, pairs, *, batch_size=32, device="cpu"):
    """Fraction of pairs with r(x, y_w) > r(x, y_l) (ties count half), every pair scored on every rank."""
    correct, rm = 0.0, rm.eval()
    for i in range(0, len(pairs), batch_size):
        batch = data.pack_pairs(list(pairs[i:i + batch_size]), shared_prompt=False)
        chosen, rejected = batch_rewards(rm, batch, device)
        correct += float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())
    return correct / max(len(pairs), 1)


# -----------------------------------------------------------------------------------------------------------
# Sampling and scoring, split over the ranks
#
# Work is cut into batches that depend only on the inputs (never on the number of ranks); rank k takes batches k,
# k + W, ..., gathered back in order. Each batch samples with its own generator, seeded from (round seed, batch
# index), so 1 process and 8 give the same answers.

def derive_seed(*parts):
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def sharded_map(n_jobs, fn, desc=None):
    """[fn(k) for k in range(n_jobs)], split round-robin over the ranks; the results on every rank, in order."""
    _, rank, _, world_size = dist.get_dist_info()
    quiet = rank != 0 or desc is None or not sys.stderr.isatty()      # a log file gets no bars' carriage returns
    results = {k: fn(k) for k in tqdm(range(rank, n_jobs, world_size), desc=desc, disable=quiet, leave=False)}
    if world_size > 1:
        gathered = [None] * world_size
        torch_dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[k] for k in range(n_jobs)]


def sample_answers(policy, prompts, *, seed, batch_size=32, device="cpu", desc=None, **sampling):
    """One sampled answer (new ids, EOS included) per prompt by generate(**sampling), the same on any world size."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))       # batched in length order
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    def run(k):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, k))
        return policy.generate([prompts[i] for i in batches[k]], generator=generator, **sampling)
    by_prompt = dict(zip(order, itertools.chain.from_iterable(sharded_map(len(batches), run, desc=desc))))
    return [[int(t) for t in by_prompt[i]] for i in range(len(prompts))]


@torch.no_grad()
def score(rm, sequences, *, max_tokens=8192, device="cpu", desc=None):
    """RM rewards (float64) of token lists, on every rank; repeated sequences are scored once, so they tie exactly."""
    if any(len(s) == 0 for s in sequences):
        raise EvalError("cannot score an empty sequence")
    unique = sorted(set(tuple(s) for s in sequences), key=lambda s: (len(s), s))
    bucket = np.cumsum([len(s) for s in unique]) // max_tokens      # about max_tokens a forward, in length order
    cuts = (np.flatnonzero(np.diff(bucket)) + 1).tolist()
    batches = [unique[a:b] for a, b in zip([0, *cuts], [*cuts, len(unique)])]
    def run(k):                                   # one segment per sequence: the unshared packed layout
        lengths = torch.tensor([len(s) for s in batches[k]], dtype=torch.long)          # (S,)
        input_ids = torch.tensor([t for s in batches[k] for t in s], dtype=torch.long)  # (N,)
        position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])           # (N,)
        seg_lens = torch.stack([lengths, torch.zeros_like(lengths), torch.zeros_like(lengths)], 1)  # (S, 3)
        last_rows = torch.cumsum(lengths, 0) - 1                                        # (S,)
        return rm(input_ids.to(device), position_ids.to(device), seg_lens, last_rows.to(device)).cpu().tolist()
    rewards = dict(zip(itertools.chain(*batches), itertools.chain(*sharded_map(len(batches), run, desc=desc))))
    return np.array([rewards[tuple(s)] for s in sequences], dtype=np.float64)


def load_prompts(source, tokenizer, *, n_prompts=None, template="auto", split=None, max_prompt_length=1024,
                 log=lambda line: None):
    """The first n_prompts usable prompts of preference data, rendered as training renders them, each {"text": its
    last user message (the oracle reads it), "ids", ...}; skipped rows counted (in a `log` line). -> (prompts, stats)"""
    stats, prompts = Counter(), []
    for where, layout, row in data.read_rows(data.resolve_files(source, split)):
        if n_prompts is not None and len(prompts) >= n_prompts:
            break
        if stats["rows"] == 0:                   # the template follows the layout, known from the first row
            resolved = data.resolve_template(template, tokenizer, layout)
        stats["rows"] += 1
        conv = data.parse_row(layout, row, where, stats)
        if conv is None:
            continue
        prompt_text, _, _ = data.render_texts(conv, resolved, tokenizer, stats)
        ids = tokenizer.encode(prompt_text)
        if len(ids) > max_prompt_length:
            stats["dropped/prompt_too_long"] += 1
            continue
        user = [m["content"] for m in conv.history if m["role"] == "user"]
        prompts.append({"text": user[-1] if user else prompt_text, "conversation": conv, "ids": ids, "layout": layout,
                        "prompt_text": prompt_text, "template": resolved, "template_option": template})
    stats["kept"] = len(prompts)
    if not prompts:
        raise EvalError(f"no usable prompts in {source} ({dict(stats)})")
    why = ", ".join(f"{k[len('dropped/'):]} {v}" for k, v in sorted(stats.items()) if k.startswith("dropped/"))
    log(f"prompts: {len(prompts)} usable from the first {stats['rows']} rows of {source} "
        f"({stats['rows'] - len(prompts)} skipped: {why or 'none'})")
    return prompts, stats


def answer_text(tok, prompt_ids, answer_ids):
    """A sampled answer's text: its tokens before EOS decoded after the prompt, then cut from it. Decoded alone, a
    SentencePiece answer (Llama-2, Mistral) loses its leading space: "Assistant:No," for "Assistant: No," (▁No)."""
    answer_ids = list(answer_ids[:answer_ids.index(tok.eos_id)] if tok.eos_id in answer_ids else answer_ids)
    before, full = tok.decode(prompt_ids), tok.decode(list(prompt_ids) + answer_ids)
    return full[len(before):] if full.startswith(before) else tok.decode(answer_ids)


def scoring_sequences(tokenizer, prompts, answers, stats):
    """[(prompt index, answer text)] -> ids rendered exactly as data.py builds a training sequence: the raw sampled
    ids would put the RM's read-out on another last token (EOS, not the newline Zephyr writes after it)."""
    texts = []
    for i, text in answers:                  # raw text: the answer follows the prompt as it was sampled
        p = prompts[i]
        texts.append((p["prompt_text"], text, text) if p["template"] is None else data.render_texts(
            data.Conversation(p["conversation"].history, text, text), p["template"], tokenizer, stats))
    return [[int(t) for t in p] + [int(t) for t in c] for p, c, _ in data.tokenize_texts(tokenizer, texts, stats)]


def evaluate_policies(rm, policies, prompts, *, tokenizer, policy_toks=None, rounds=3, seed=0, temperature=1.0,
                      top_p=1.0, max_new_tokens=64, batch_size=32, oracle=None, init_seed=42, dtype=torch.float32,
                      device="cpu"):
    """Sample every policy {name: dir, Hub id or preset} on every prompt, `rounds` times (one model in memory at a
    time), score with the RM, compare every pair. -> win_rates' report + "rewards", "samples", "settings"."""
    names, n, render_stats = list(policies), len(prompts), Counter()
    sampling = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    toks = policy_toks if policy_toks is not None else policy_tokenizers(policies, tokenizer, {})
    answers, texts, out_of_vocab = {}, {}, {}    # name -> [round][prompt] ids, [round][prompt] texts, a count
    for name in names:
        tok = toks[name]                         # not the RM's: every prompt rendered again, with its chat template
        render = lambda p: data.render_texts(p["conversation"], data.resolve_template(p["template_option"], tok,
                                                                                        p["layout"]), tok, Counter())[0]
        prompt_ids = [p["ids"] if tok is tokenizer else tok.encode(render(p)) for p in prompts]
        # a weightless preset (tiny) is initialised from init_seed, as train.py does it
        policy = model_lib.Transformer.from_pretrained(str(policies[name]), dtype=dtype, device=device, seed=init_seed)
        answers[name] = [sample_answers(policy, prompt_ids, seed=derive_seed(seed, r, name), eos_id=tok.eos_id,
                                        device=device, desc=f"sample {name} round {r}", **sampling)
                         for r in range(rounds)]
        del policy
        texts[name] = [[answer_text(tok, prompt_ids[i], a) for i, a in enumerate(row)] for row in answers[name]]
        # ids past the tokenizer's vocabulary (an untrained tiny model can sample them) decode to nothing: counted
        out_of_vocab[name] = sum(t >= tok.vocab_size for row in answers[name] for ids in row for t in ids)
    sequences = scoring_sequences(tokenizer, prompts, [(i, t) for name in names for row in texts[name]
                                                       for i, t in enumerate(row)], render_stats)
    flat = score(rm, sequences, device=device, desc="score").reshape(len(names), rounds, n)
    rewards = {name: flat[k] for k, name in enumerate(names)}                    # name -> (R, n)
    judge = lambda row: [bool(oracle(prompts[i]["text"], t)) for i, t in enumerate(row)]        # (n,) a round
    try:                                         # data.oracle_correct knows the answers of synthetic prompts only
        correct = None if oracle is None else {name: np.array([judge(row) for row in texts[name]]) for name in names}
    except ValueError:
        correct = None
    report = win_rates(rewards, correct)
    for name in names:
        report["policies"][name].update(path=str(policies[name]), tokenizer=toks[name].name,
                                        out_of_vocab_tokens_dropped=int(out_of_vocab[name]),
                                        mean_answer_tokens=float(np.mean([len(a) for r in answers[name] for a in r])))
    report["rewards"] = {name: rewards[name].tolist() for name in names}
    report["samples"] = [{"round": r, "policy": name, "prompt_index": i, "prompt": prompts[i]["text"],
                          "answer": texts[name][r][i], "answer_ids": answers[name][r][i],
                          "reward": float(rewards[name][r, i]),
                          **({"oracle_correct": bool(correct[name][r, i])} if correct is not None else {})}
                         for name in names for r in range(rounds) for i in range(n)]
    report["settings"] = {"rounds": rounds, "n_prompts": n, "seed": seed, **sampling,
                          "world_size": dist.get_dist_info()[3], "render_notes": dict(render_stats)}
    return report


# -----------------------------------------------------------------------------------------------------------
# Win rates (Tables 2-3), the oracle, and the report: terminal summary, JSON, CSV, Figure 5, samples

def pairwise_win_rate(a, b):
    """Per-round win rate of A over B: mean over prompts of [a > b] + 0.5 [a == b]. (R, n), (R, n) -> (R,)"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ((a > b) + 0.5 * (a == b)).mean(axis=-1)


def mean_std(values):
    """Mean and sample standard deviation (ddof=1, 0 for a single round) of per-round values."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "per_round": [float(v) for v in values]}


def win_rates(rewards, correct=None):
    """RM win rates of every ordered pair of {policy: (R, n) rewards}; with the oracle's {policy: (R, n) bool}, its
    win rates and the RM's agreement: where exactly one answer is correct, how often the RM prefers it (ties half)."""
    result = {"rm": {}, "policies": {}, **({} if correct is None else {"oracle": {}, "agreement": {}})}
    for a, ra in rewards.items():
        ra, others = np.asarray(ra), [b for b in rewards if b != a]
        result["policies"][a] = {"mean_reward": float(ra.mean()), "std_reward": float(ra.std()),
                                 "mean_reward_per_round": [float(v) for v in ra.mean(-1)]}
        result["rm"][a] = {b: mean_std(pairwise_win_rate(ra, rewards[b])) for b in others}
        if correct is None:
            continue
        ca = np.asarray(correct[a], bool)
        result["policies"][a]["oracle_accuracy"] = mean_std(ca.mean(-1))
        result["oracle"][a], result["agreement"][a] = {}, {}
        for b in others:
            rb, cb = np.asarray(rewards[b]), np.asarray(correct[b], bool)
            result["oracle"][a][b] = mean_std(pairwise_win_rate(ca, cb))
            rm_pick = (ra > rb) + 0.5 * (ra == rb)                                # (R, n), 1: RM prefers a
            agree = np.where(ca, rm_pick, 1.0 - rm_pick)[ca != cb]
            result["agreement"][a][b] = {"rate": float(agree.mean()) if agree.size else None,
                                         "n_decided": int((ca != cb).sum())}
    return result


def table_rows(matrix, names, digits, corner, diagonal):
    """A win-rate table (Tables 2-3): rows are policies, columns their opponents, cells "mean ± std"."""
    cell = lambda a, b: diagonal if a == b else f"{matrix[a][b]['mean']:.{digits}f} ± {matrix[a][b]['std']:.{digits}f}"
    return [[corner] + [f"vs {b}" for b in names]] + [[a] + [cell(a, b) for b in names] for a in names]


def summary_text(report):
    """The terminal summary: the win-rate table(s), the RM/oracle agreement and per-policy numbers."""
    names, s = list(report["policies"]), report["settings"]
    width = max(13, *(len(n) for n in names)) + 2
    table = lambda matrix: ["".join(c.ljust(width) for c in row) for row in table_rows(matrix, names, 3, "", "-")]
    head = f"{s['n_prompts']} prompts, {s['rounds']} round(s), temperature {s['temperature']}, top-p {s['top_p']}"
    blocks = [[f"RM win rate of row vs column, mean ± std over rounds ({head})", *table(report["rm"])]]
    if "oracle" in report:
        agree = [f"{a} vs {b}: {v['rate']:.3f} of {v['n_decided']}" for i, a in enumerate(names)
                 for b in names[i + 1:] if (v := report["agreement"][a][b])["rate"] is not None]
        blocks += [["Oracle win rate of row vs column (synthetic data)", *table(report["oracle"])],
                   ["RM agrees with the oracle, on answer pairs where exactly one is correct: "
                    + ("; ".join(agree) if agree else "no such pair")]]
    accuracy = lambda p: f", oracle accuracy {p['oracle_accuracy']['mean']:.3f} ± {p['oracle_accuracy']['std']:.3f}"
    lines = [f"{name}: mean reward {p['mean_reward']:+.3f} (std {p['std_reward']:.3f})"
             + (accuracy(p) if "oracle_accuracy" in p else "") for name, p in report["policies"].items()]
    return "\n\n".join("\n".join(block) for block in blocks + [lines])


def figure_title(report):
    """rewards.png's title: the first policy's win rate over each other one, prompts, rounds, RM held-out accuracy."""
    names, s = list(report["policies"]), report["settings"]
    wins = ", ".join(f"{b} {w['mean']:.3f} ± {w['std']:.3f}" for b, w in report["rm"][names[0]].items())
    accuracy = report.get("reward_model", {}).get("val_accuracy")
    return (f"RM win rate of {names[0]} over {wins}\n{s['n_prompts']} prompts, {s['rounds']} rounds, RM held-out "
            f"accuracy {'unknown' if accuracy is None else f'{accuracy:.3f}'}")


def plot_reward_distributions(rewards, path, title="Reward distribution of each policy's samples"):
    """Figure 5: a panel per policy, its rewards' histogram (rounds pooled), its mean dashed, the others' dotted."""
    import matplotlib.pyplot as plt               # (without a display, matplotlib picks Agg: a PNG needs no more)
    values = {name: np.asarray(r, dtype=np.float64).ravel() for name, r in rewards.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=30)     # shared by every panel
    with plt.style.context(Path(__file__).with_name("plots.mplstyle")):
        fig, axes = plt.subplots(len(values), 1, sharex=True, squeeze=False, figsize=(6.4, 1.0 + 1.5 * len(values)))
        for k, (ax, (name, v)) in enumerate(zip(axes[:, 0], values.items())):
            ax.hist(v, bins=bins, density=True, color=f"C{k}", alpha=0.6)
            for j, (other, w) in enumerate(values.items()):
                ax.axvline(w.mean(), color=f"C{j}", linestyle="--" if j == k else ":",
                           label=f"{other} mean {w.mean():+.3f}")
            ax.set(ylabel=f"{name}\ndensity")
            ax.legend(loc="upper right")
        axes[-1, 0].set_xlabel("reward r(x, y)")
        fig.suptitle(title)
        fig.savefig(path)
    plt.close(fig)
    return fig                                    # (closed: for a look at its axes and title)


def write_report(report, out_dir):
    """winrates.json (all but the samples), winrates.csv (+ oracle_winrates.csv), rewards.png, samples.jsonl."""
    (out_dir := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "winrates.json", "png": out_dir / "rewards.png", "samples": out_dir / "samples.jsonl"}
    paths["json"].write_text(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2) + "\n")
    for key, which, name in (("csv", "rm", "winrates.csv"), ("oracle_csv", "oracle", "oracle_winrates.csv")):
        if which in report:
            paths[key] = out_dir / name                   # (no cell holds a comma: names are letters, digits, -_.)
            rows = table_rows(report[which], list(report["policies"]), 4, "policy", "")
            paths[key].write_text("".join(",".join(row) + "\n" for row in rows))
    paths["samples"].write_text("".join(json.dumps(record) + "\n" for record in report["samples"]))
    plot_reward_distributions(report["rewards"], paths["png"], title=figure_title(report))
    return paths


# -----------------------------------------------------------------------------------------------------------
# Command line. Every model reads text with the tokenizer it was trained with (the RM's is saved with it), never a
# guessed one.


def model_tokenizer(where, spec, given_flag, given, remedy, fallback=None):
    """How model `spec` reads text: the flag's tokenizer, else its checkpoint's own, else `fallback` (a weightless
    preset has none); up front, an id past its embedding (from its config alone) is refused, not a CUDA assert."""
    config, ckpt_dir = one_line(where, model_lib.resolve_model, spec)      # ckpt_dir None: a weightless preset
    tok = fallback
    if given:
        tok = one_line(given_flag, data.load_tokenizer, given)
    elif ckpt_dir is not None:
        tok = one_line(where, data.load_tokenizer, ckpt_dir,
                       why=f"; without it, how this model reads text is unknown: {remedy}")
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise EvalError(f"{where}: its {config.vocab_size}-token vocabulary cannot read tokenizer {tok.name!r} "
                        f"({tok.vocab_size} tokens); pass the tokenizer it was trained with ({given_flag})")
    return tok


def policy_tokenizers(policies, rm_tok, given):
    """{name: its tokenizer}: --policy-tokenizer's, else the checkpoint's own, else (a weightless preset) the RM's."""
    remedy = "save the policy's tokenizer there (train.py does), or pass --policy-tokenizer {}=TOKENIZER"
    return {name: model_tokenizer(f"--policy {name}={spec}", spec, f"--policy-tokenizer {name}", given.get(name),
                                  remedy.format(name), fallback=rm_tok) for name, spec in policies.items()}


def parse_policies(args):
    """--policy NAME=DIR (two or more) and --policy-tokenizer NAME=TOKENIZER, as spelt. -> ({name: dir}, {name: tok})"""
    policies, given = {}, {}
    for flag, specs, into, example in (("--policy", args.policy, policies, "NAME=DIR, e.g. --policy orpo=out/final"), (
            "--policy-tokenizer", args.policy_tokenizer, given, "NAME=TOKENIZER, e.g. base=path/to/tokenizer")):
        for spec in specs:
            name, sep, value = spec.partition("=")
            problems = [(not sep or not name.strip() or not value.strip(), f"expected {example}"),
                        (not all(ch.isalnum() or ch in "-_." for ch in name),
                         "the name may use letters, digits, '-', '_' and '.' only"),
                        (name in into, f"the name {name!r} is given twice; give each policy a distinct NAME"),
                        (into is given and name not in policies,
                         f"no --policy is named {name!r} (the policies are {', '.join(policies)})")]
            for bad, why in problems:
                if bad:
                    raise EvalError(f"{flag} {spec!r}: {why}")
            into[name] = value
        if into is policies and len(policies) < 2:
            raise EvalError("--policy: give at least two policies to compare "
                            "(e.g. --policy orpo=out/final --policy base=tiny)")
    return policies, given


def check_args(args):
    """Every flag value checked once, before any data is read or model loaded (the demo's, once it built them)."""
    if args.command == "demo":
        return args
    one_line("--template", data.check_template, args.template)
    if args.max_prompt_length is None:           # train.py's rule: 1024, or all of a shorter --max-length
        args.max_prompt_length = min(1024, getattr(args, "max_length", 1024))
    if args.command == "winrate":
        one_line("--temperature/--top-p", model_lib.check_sampling, args.temperature, args.top_p)
        parse_policies(args)
        at_least_1, rules = ("--n-prompts", "--rounds", "--max-new-tokens", "--batch-size", "--max-prompt-length"), []
    else:
        data.check_lengths(args.max_length, args.max_prompt_length)
        at_least_1 = ("--max-steps", "--batch-size", "--log-every")
        # --eval-fraction 0 is allowed: no held-out slice (experiments/paper_cpu.py measures accuracy itself)
        rules = [("--lr", args.lr > 0, "positive"), ("--warmup-steps", args.warmup_steps >= 0, "0 or more"),
                 ("--eval-fraction", 0 <= args.eval_fraction < 1, "in [0, 1)")]
        source = args.eval_data or args.data     # --eval-split alone: another split of --data, as in train.py
        if args.eval_split is not None and source == "synthetic":
            raise EvalError(f"--eval-split {args.eval_split}: the synthetic pairs have no splits")
        if (args.eval_data or args.eval_split) and source != "synthetic" and (source, args.eval_split) == (
                args.data, args.split):            # (synthetic held-out pairs are a separate set: seed 1, "eval")
            raise EvalError(f"--eval-data {source} is the training data itself (same source and split): "
                            f"give another split (--eval-split) or another source")
    value = lambda flag: getattr(args, flag[2:].replace("-", "_"))
    for flag, ok, requirement in [(f, value(f) >= 1, "at least 1") for f in at_least_1] + rules:
        if not ok:                               # `not ok` also catches nan, for which every comparison is False
            raise EvalError(f"{flag} must be {requirement}, got {value(flag)}")
    return args


def cmd_train_rm(args, device):
    """train-rm: its tokenizer (against --init's vocabulary), the pairs and held-out pairs, eq. 11, the saved RM."""
    tok = model_tokenizer(f"--init {args.init}", args.init, "--tokenizer", args.tokenizer, "pass --tokenizer",
                          fallback=data.synthetic_tokenizer() if args.data == "synthetic" else None)
    if tok is None:
        raise EvalError(f"--init {args.init} is a random-init preset with no tokenizer of its own, so --data "
                        f"{args.data} needs --tokenizer (a folder, a Hub id, or 'synthetic' for data.py's pairs)")
    # train.py's rule: all of --data trains against --eval-data (or --eval-split), else an --eval-fraction of it
    train_pairs, held_out, origin = data.train_and_eval_pairs(
        args.data, args.split, args.eval_data, args.eval_split, args.eval_fraction, args.seed, tok,
        Path(args.out) / "data", writer=dist.is_master(), barrier=dist.barrier, log=dist.print0,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, template=args.template)
    meta = {**{k.replace("eval_", "val_"): v for k, v in origin.items()}, "tokenizer": tok.name}   # val_data, ...
    same_names = ("max_steps", "batch_size", "lr", "warmup_steps", "seed", "init_seed", "shared_prompt", "log_every")
    _, result = train_reward_model(train_pairs, init=args.init, val_pairs=held_out, out_dir=args.out, tokenizer=tok,
                                   device=device, meta=meta, **{k: getattr(args, k) for k in same_names})
    dist.print0(f"saved reward model to {args.out} (held-out accuracy {result.get('val_accuracy', float('nan')):.3f})")


def cmd_winrate(args, device):
    """winrate: tokenizers and prompts first (bad input fails before any model is loaded), then the RM."""
    policies, given = parse_policies(args)
    meta = read_rm_dir(args.rm)
    rm_tok = model_tokenizer(f"--rm {args.rm}", args.rm, "--tokenizer", args.tokenizer,
                             "pass --tokenizer (train-rm saves the one the RM was trained with)")
    policy_toks = policy_tokenizers(policies, rm_tok, given)
    source = args.data
    if source == "synthetic":            # fresh prompts from a seed the RM and train.py never used
        source = Path(args.out) / "data" / f"synthetic_prompts_{args.n_prompts}.parquet"
        if dist.is_master():
            data.write_synthetic(source, args.n_prompts, seed=12345, split="eval")
        dist.barrier()
    prompts, stats = one_line("--data", load_prompts, source, rm_tok, n_prompts=args.n_prompts, split=args.split,
                              template=args.template, max_prompt_length=args.max_prompt_length, log=dist.print0)
    dtype = dist.resolve_dtype(args.dtype, device)
    rm, _ = load_reward_model(args.rm, dtype=dtype, device=device)
    same_names = ("rounds", "seed", "temperature", "top_p", "max_new_tokens", "batch_size", "init_seed")
    report = evaluate_policies(rm, policies, prompts, tokenizer=rm_tok, policy_toks=policy_toks, dtype=dtype,
                               oracle=data.oracle_correct, device=device, **{k: getattr(args, k) for k in same_names})
    kept = {k: meta[k] for k in ("val_accuracy", "init", "steps") if k in meta}
    report.update(reward_model={"dir": str(args.rm), **kept}, data={"source": str(source), "stats": dict(stats)})
    if dist.is_master():
        paths = write_report(report, args.out)
        print(summary_text(report))
        print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_demo(args, device):
    """OUT/final of any train.py run against the model it started from (OUT/run.json), judged by an RM (OUT/rm)."""
    root = Path(args.root)
    if not (root / "run.json").is_file():
        raise EvalError(f"{root / 'run.json'} not found: run `python train.py --out {shlex.quote(str(root))}` first")
    run = json.loads((root / "run.json").read_text())
    if not (root / "final" / "config.json").is_file():
        raise EvalError(f"{root / 'final'} not found: the run has not finished, or it ran with --no-export")
    tok, weightless = run["tokenizer"], model_lib.weightless_preset(run["model"]) is not None
    opt = lambda flag, value: [] if value is None else [flag, str(value)]
    common = [*opt("--init-seed", run["seed"] if weightless else None), "--template", run["template"],
              "--max-prompt-length", str(run["max_prompt_length"]), "--device", args.device]
    data_of = lambda side: ["--data", run[f"{side}_data"], *opt("--split", run[f"{side}_split"])]
    train_rm = ["train-rm", "--out", str(root / "rm"), "--init", run["model"], *data_of("train"),
                *opt("--tokenizer", tok), "--max-length", str(run["max_length"]), *common]
    winrate = ["winrate", "--rm", str(root / "rm"), "--policy", f"orpo={root / 'final'}", "--policy",
               f"base={run['model']}", *opt("--policy-tokenizer", f"base={tok}" if tok and not weightless else None),
               *data_of("eval" if run["eval_data"] else "train"), *common, "--out", str(root / "winrate"),
               *opt("--max-new-tokens", 32 if tok == "synthetic" else None)]   # synthetic answers: < 10 tokens
    parsed = [check_args(build_parser().parse_args(argv)) for argv in (train_rm, winrate)]
    if args.retrain_rm or not (root / "rm" / META_FILE).is_file():
        dist.print0("$ python eval_rm.py " + shlex.join(train_rm))
        cmd_train_rm(parsed[0], device)
    else:
        dist.print0(f"using the reward model in {root / 'rm'} (--retrain-rm to train it again)")
    if run["eval_data"] is None:
        dist.print0("note: the run held out no separate pairs, so the win-rate prompts come from its training data")
    dist.print0("$ python eval_rm.py " + shlex.join(winrate))
    cmd_winrate(parsed[1], device)


def build_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " No command: demo.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command")

    def command(name, func, summary):
        p = sub.add_parser(name, help=summary, formatter_class=fmt)
        p.set_defaults(func=func)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
        if name != "demo":
            p.add_argument("--out", required=True, help="train-rm: the RM's dir; winrate: the report's")
            p.add_argument("--tokenizer", help="the RM's: a folder, Hub id or 'synthetic' (default: its own)")
            p.add_argument("--batch-size", type=int, default=32, help="pairs a step (a rank); prompts a generate()")
            p.add_argument("--seed", type=int, default=0, help="data order and held-out split; base sampling seed")
            p.add_argument("--data", default="synthetic", help="pairs: file, folder, glob, Hub id or synthetic")
            p.add_argument("--split", default=None, help="split of --data (a Hub id or a folder of several needs one)")
            p.add_argument("--template", default="auto", help="chat template: auto | zephyr | raw | a .jinja file")
            p.add_argument("--max-prompt-length", type=int, help="longer prompts dropped (min(1024, --max-length))")
            p.add_argument("--init-seed", type=int, default=42, help="random init of tiny; 42 = train.py's --seed")
        return p.add_argument
    add = command("train-rm", cmd_train_rm, "train a reward model with the Bradley-Terry loss (eq. 11)")
    add("--init", default="tiny", help="backbone: a checkpoint dir, Hub id or model.py preset")
    add("--eval-data", default=None, help="held-out pairs for the RM's accuracy (as --data); all of --data trains")
    add("--eval-split", default=None, help="split of --eval-data, or without it another split of --data")
    add("--eval-fraction", type=float, default=0.1, help="else: the fraction of --data held out (0: none)")
    add("--max-length", type=int, default=1024, help="max prompt + response tokens (responses truncated)")
    add("--max-steps", type=int, default=300, help="optimizer steps")
    add("--lr", type=float, default=1e-3, help="peak lr (1e-3 suits the tiny demo; ~1e-5 for real models)")
    add("--warmup-steps", type=int, default=20, help="linear warmup steps, then cosine decay to 0")
    add("--shared-prompt", action="store_true", help="pack a pair as [prompt|chosen|rejected]; same rewards")
    add("--log-every", type=int, default=50, help="log a line every N steps")
    add = command("winrate", cmd_winrate, "sample policies, score with the RM, write win-rate tables")
    add("--rm", required=True, help="reward model directory (from train-rm)")
    add("--policy", action="append", default=[], metavar="NAME=DIR", help="repeat: checkpoint dir, Hub id or tiny")
    add("--policy-tokenizer", action="append", default=[], metavar="NAME=TOK", help="for one saved without (repeat)")
    add("--n-prompts", type=int, default=200, help="use the first N usable prompts")
    add("--rounds", type=int, default=3, help="sampling rounds with different seeds (mean ± std)")
    add("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0); 0 = greedy")
    add("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    add("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on a GPU")
    add = command("demo", cmd_demo, "the default: evaluate a train.py run from the run.json it wrote")
    add("--root", default="out", help="train.py's --out directory")
    add("--retrain-rm", action="store_true", help="train ROOT/rm again even if it exists")
    return parser


def main(argv=None):
    args = build_parser().parse_args((sys.argv[1:] if argv is None else list(argv)) or ["demo"])
    try:
        args.func(check_args(args), dist.compute_init(args.device))     # every flag checked before the device is up
    except (ValueError, FileNotFoundError) as e:      # EvalError, data.DataError, model.CheckpointError, ...
        dist.print0(f"error: {e}", file=sys.stderr)   # the same on every rank under torchrun: printed once
        return 2
    finally:
        dist.compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
