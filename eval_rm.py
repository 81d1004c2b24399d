"""Reward-model win rates: how the ORPO paper (arXiv 2403.07691, §6.1, Tables 2-3, Figure 5) scores policies.

The paper compares ORPO with SFT, DPO and PPO by a *win rate*: every policy answers the same test prompts, a
separately trained reward model (RM) scores each answer, and policy A beats policy B on a prompt when the RM
gives A's answer the higher reward. This file does the three steps:

  1. train-rm   A reward model: a model.py Transformer whose final hidden state at the last token of
                [prompt | answer] goes through a scalar head, r(x, y) = w . h_last + b. It learns from the
                same preference pairs as ORPO with the Bradley-Terry objective (eq. 11):
                    L_RM = -log sigmoid(r(x, y_w) - r(x, y_l))
                through the same data.py batches and the same dist.py (torchrun, FSDP) as train.py.
  2. sample     Each policy samples one answer per test prompt (temperature 1.0 as in the paper), batched
                with model.generate, the prompts split over the ranks under torchrun. Each policy reads the
                prompt with its own tokenizer; the RM reads the answer text with its own (see "Tokenizers").
  3. winrate    The RM scores every answer; for each pair of policies A, B the win rate of A is the mean over
                prompts of [r(A) > r(B)] + 0.5 [r(A) = r(B)]. N rounds (default 3) with different sampling
                seeds give a mean and standard deviation, reported as a table (rows: policy, columns:
                opponent) in the terminal, JSON and CSV, with a histogram of each policy's rewards (Fig. 5)
                and every sampled answer in samples.jsonl. On the synthetic data of data.py, where an oracle
                knows the right answer, the oracle's win rate and the RM's agreement with it are reported too.

Usage:
    python eval_rm.py                           # demo on the output of the default `python train.py`
    python eval_rm.py train-rm --out out/rm     # RM on the synthetic pairs
    python eval_rm.py train-rm --out out/rm --init opt-350m --data pairs.parquet --val-data test.parquet
    python eval_rm.py winrate --rm out/rm --policy orpo=out/final --policy base=tiny --out out/winrate
    torchrun --nproc_per_node 4 eval_rm.py winrate ...   # same numbers, sampling split over 4 ranks
"""
import argparse
import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import dist
import model as model_lib

HEAD_FILE = "reward_head/head.safetensors"   # a subfolder: model.py reads every top-level *.safetensors
META_FILE = "reward_model.json"


class EvalError(ValueError):
    """Bad input to eval_rm.py (a path, a --policy spec, an option); the CLI prints it in one line."""


# -----------------------------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """r(x, y): a Transformer backbone and a scalar head read at the last token of each sequence.

    The last token is the only one that has seen the whole prompt and answer (attention is causal), so its
    hidden state is the natural summary; the same choice as OpenAI's and TRL's reward models.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        dim = hidden_size(backbone)
        self.head = nn.Linear(dim, 1)
        # Zero init: every reward starts at 0, so training starts at L_RM = log 2 and chance accuracy.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, position_ids, seg_lens, last_rows):
        """Packed sequences in, one float32 reward per requested row out. (N,), (N,), (S, 3), (K,) -> (K,)"""
        hidden = self.backbone.packed_hidden(input_ids, position_ids, seg_lens)   # (N, D)
        last = hidden[last_rows].float()                                          # (K, D)
        # the head in float32 even when the backbone runs in bf16: bf16 rewards (8 bits of mantissa) would
        # round nearby scores to the same value and turn real differences into ties
        return last @ self.head.weight.float()[0] + self.head.bias.float()       # (K,)


def hidden_size(backbone):
    """Width D of packed_hidden's output (after OPT's project_out, i.e. the lm_head's input)."""
    return backbone.lm_head.in_features


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """eq. 11: -log sigmoid(r(x, y_w) - r(x, y_l)), averaged over pairs. (P,), (P,) -> (loss, metrics).

    F.logsigmoid stays finite for any margin; log(sigmoid(m)) would give -inf once sigmoid underflows.
    accuracy counts a tie as half a win, like the win rate, so an untrained (all-zero) RM scores 0.5.
    """
    margin = chosen_rewards.float() - rejected_rewards.float()                   # (P,)
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "margin": margin.mean().detach()}


def last_token_rows(batch):
    """Rows of a PackedBatch holding the last chosen and the last rejected token of each pair. -> (P,), (P,)

    Shared-prompt layout: a segment is [prompt | chosen | rejected] and rejected tokens never attend to
    chosen ones, so the last chosen token summarises (x, y_w) and the last rejected token (x, y_l).
    Unshared layout: each segment is one whole sequence; which pair and side it is comes from tgt_seq of
    the targets inside it (0..P-1 chosen, P..2P-1 rejected), so we do not depend on data.py's order.
    """
    seg_lens = batch.seg_lens.to(torch.long)                                      # (S, 3) on CPU
    totals = seg_lens.sum(1)                                                      # (S,)
    starts = torch.cumsum(totals, 0) - totals                                     # (S,)
    P = batch.n_pairs
    if batch.shared_prompt:
        p, c, r = seg_lens.unbind(1)
        if bool(((c == 0) | (r == 0)).any()):
            raise EvalError("a packed pair has an empty chosen or rejected answer; the RM needs both")
        return starts + p + c - 1, starts + p + c + r - 1
    seg_of_row = torch.repeat_interleave(torch.arange(len(totals)), totals)       # (N,)
    seq_of_seg = torch.full((len(totals),), -1, dtype=torch.long)
    seq_of_seg[seg_of_row[batch.tgt_index.cpu()]] = batch.tgt_seq.cpu()
    if bool((seq_of_seg < 0).any()) or len(totals) != 2 * P:
        raise EvalError("a packed sequence has no target token; the RM needs prompt + answer of 2+ tokens")
    last_of_seq = torch.empty(2 * P, dtype=torch.long)
    last_of_seq[seq_of_seg] = starts + totals - 1
    return last_of_seq[:P], last_of_seq[P:]


def pack_sequences(sequences):
    """Token lists -> the unshared packed layout model.packed_hidden reads, one segment per sequence.

    Returns input_ids (N,), position_ids (N,), seg_lens (S, 3) with rows (L, 0, 0), last_rows (S,).
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)         # (S,)
    if bool((lengths == 0).any()):
        raise EvalError("cannot score an empty sequence")
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)  # (N,)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])         # (N,)
    seg_lens = torch.stack([lengths, torch.zeros_like(lengths), torch.zeros_like(lengths)], 1)  # (S, 3)
    last_rows = torch.cumsum(lengths, 0) - 1                                      # (S,)
    return input_ids, position_ids, seg_lens, last_rows


def build_reward_model(init, *, seed=42, device="cpu", param_dtype=None):
    """A fresh RM: backbone from a checkpoint dir, Hub id or preset (random init from `seed`), zero head.

    As in train.py: built on the meta device, sharded under torchrun (dist.shard_model), materialised, then
    filled tensor by tensor, so no rank ever holds the whole model. seed 42 = train.py's default, so
    init="tiny" starts from the same weights as the default ORPO run.
    """
    config, ckpt_dir = model_lib.resolve_model(str(init))
    with torch.device("meta"):
        rm = RewardModel(model_lib.Transformer(config))
    if torch_dist.is_initialized():
        shard_reward_model(rm, param_dtype)
    dist.materialize(rm, device)
    if not torch_dist.is_initialized():
        rm.backbone.tie_weights()               # to_empty gives tied weights separate storage: tie them again
    tensors = model_lib.random_init_tensors(config, seed) if ckpt_dir is None else \
        model_lib.iter_hf_tensors(ckpt_dir, config)
    dist.load_weights(rm.backbone, tensors, where=f"reward model init {init}")
    if hasattr(rm.backbone, "init_buffers"):    # non-persistent buffers are garbage after to_empty
        rm.backbone.init_buffers(device)
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.bias.zero_()
    return rm


def save_reward_model(rm, out_dir, *, tokenizer=None, meta=None, state_dict=None):
    """HF-format backbone (config.json + safetensors, model.py) + reward_head/head.safetensors + reward_model.json.

    state_dict: a full (gathered) state dict of `rm` when it is FSDP-sharded; rm's own otherwise.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else rm.state_dict()
    backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    model_lib.save_hf_state_dict(backbone_sd, rm.backbone.config, out_dir)
    (out_dir / HEAD_FILE).parent.mkdir(exist_ok=True)
    save_file({"weight": sd["head.weight"].float().contiguous(), "bias": sd["head.bias"].float().contiguous()},
              str(out_dir / HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save(out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"kind": "orpo-reward-model", **(meta or {})}, indent=2) + "\n")


def require_rm_dir(rm_dir):
    """A clear error when rm_dir is not what save_reward_model writes."""
    if not (Path(rm_dir) / HEAD_FILE).is_file():
        raise EvalError(f"{rm_dir} is not a reward model directory ({HEAD_FILE} not found); "
                        f"make one with `python eval_rm.py train-rm --out {rm_dir}`")


def load_reward_model(rm_dir, *, dtype=torch.float32, device="cpu"):
    """The inverse of save_reward_model. -> (RewardModel in eval mode, meta dict)."""
    rm_dir = Path(rm_dir)
    require_rm_dir(rm_dir)
    backbone = model_lib.Transformer.from_pretrained(str(rm_dir), dtype=dtype, device=device)
    rm = RewardModel(backbone)
    head = load_file(str(rm_dir / HEAD_FILE))
    if tuple(head["weight"].shape) != tuple(rm.head.weight.shape):
        raise EvalError(f"{rm_dir / HEAD_FILE}: head weight has shape {tuple(head['weight'].shape)}, "
                        f"the backbone needs {tuple(rm.head.weight.shape)}")
    rm.head.load_state_dict(head)
    meta = json.loads((rm_dir / META_FILE).read_text()) if (rm_dir / META_FILE).is_file() else {}
    return rm.to(device=device).eval(), meta


# -----------------------------------------------------------------------------------------------------------
# Training the reward model (eq. 11) through data.py and dist.py


def lr_at(step, steps, lr, warmup):
    """Linear warmup then cosine decay to 10% of lr, as in the paper's training recipe."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rewards(rm, batch, device):
    """Chosen and rejected rewards of a PackedBatch. -> (P,), (P,) float32"""
    chosen_rows, rejected_rows = last_token_rows(batch)
    batch = batch.to(device)
    rows = torch.cat([chosen_rows, rejected_rows]).to(device)                    # (2P,)
    rewards = rm(batch.input_ids, batch.position_ids, batch.seg_lens, rows)      # (2P,)
    return rewards[:batch.n_pairs], rewards[batch.n_pairs:]


def shard_reward_model(rm, param_dtype=None):
    """FSDP2 for the RM: dist.shard_model wraps each block and the backbone (registering packed_hidden as a
    forward method), then the RM itself becomes the root FSDP unit, which owns the head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dist.shard_model(rm.backbone, param_dtype=param_dtype)
    fully_shard(rm, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    return rm


def train_reward_model(train_pairs, *, init="tiny", val_pairs=None, out_dir=None, tokenizer=None, steps=300,
                       batch_size=32, lr=1e-3, weight_decay=0.0, warmup=20, seed=0, init_seed=42,
                       shared_prompt=False, device="cpu", log_every=50, meta=None):
    """Train an RM on preference pairs with eq. 11; optionally save it. -> (rm, metrics)

    train_pairs / val_pairs: data.py TokenizedPairs. Under torchrun (process group initialised) the backbone
    is sharded with dist.shard_model and data.PairBatcher gives each rank its own slice of every step.
    shared_prompt: pack each pair as one [prompt | chosen | rejected] segment (cheaper: the prompt is read
    once) instead of two whole sequences; the rewards are the same (see last_token_rows).
    """
    _, rank, _, world_size = dist.get_dist_info()
    rm = build_reward_model(init, seed=init_seed, device=device)
    rm.train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    # group_batches=1: every batch is a random sample of pairs. With length grouping a batch holds pairs of one
    # length, which on the synthetic data means one task, and the RM then chases one task per step.
    batcher = data.PairBatcher(train_pairs, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                               shared_prompt=shared_prompt, group_batches=1)
    step, t0, batches = 0, time.time(), iter(batcher)
    window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "pairs": 0}   # pair-weighted sums since the last log
    while step < steps:
        try:
            batch = next(batches)
        except StopIteration:                     # next epoch: PairBatcher reshuffles from its seed
            batches = iter(batcher)
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        chosen, rejected = batch_rewards(rm, batch, device)
        loss, metrics = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        optimizer.step()
        step += 1
        for k in ("loss", "accuracy", "margin"):
            window[k] += float(metrics[k]) * batch.n_pairs
        window["pairs"] += batch.n_pairs
        if step % log_every == 0 or step == steps:
            # one batch is a noisy estimate: log the mean over the window, over all ranks
            pairs = window.pop("pairs")
            logged = dist.all_reduce_metrics({k: v / pairs for k, v in window.items()}, pairs, device)
            dist.print0(f"rm step {step:4d}/{steps} | loss {logged['loss']:.4f} | acc {logged['accuracy']:.3f} "
                        f"| margin {logged['margin']:+.3f} | lr {lr_at(step - 1, steps, lr, warmup):.2e} "
                        f"| {time.time() - t0:.1f}s")
            window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "pairs": 0}
    result = {"steps": steps, "train_pairs": len(train_pairs), "final_train_loss": logged["loss"],
              "final_train_accuracy": logged["accuracy"]}
    if val_pairs is not None and len(val_pairs):
        result["val_pairs"] = len(val_pairs)
        result["val_accuracy"] = reward_accuracy(rm, val_pairs, device=device)
        dist.print0(f"rm held-out accuracy: {result['val_accuracy']:.3f} on {len(val_pairs)} pairs")
    if out_dir is not None:
        full_sd = dist.full_state_dict(rm) if world_size > 1 else None
        if rank == 0:
            save_reward_model(rm, out_dir, tokenizer=tokenizer, state_dict=full_sd,
                              meta={"init": str(init), "seed": seed, "lr": lr, "batch_size": batch_size,
                                    "shared_prompt": shared_prompt, **result, **(meta or {})})
        if world_size > 1:
            torch_dist.barrier()
    return rm, result


@torch.no_grad()
def reward_accuracy(rm, pairs, *, batch_size=32, device="cpu"):
    """Fraction of pairs with r(x, y_w) > r(x, y_l) (ties count half), every pair scored on every rank."""
    was_training = rm.training
    rm.eval()
    n, correct = 0, 0.0
    for i in range(0, len(pairs), batch_size):
        batch = data.pack_pairs(list(pairs[i:i + batch_size]), shared_prompt=False)
        chosen, rejected = batch_rewards(rm, batch, device)
        correct += float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())
        n += len(chosen)
    rm.train(was_training)
    return correct / max(n, 1)


# -----------------------------------------------------------------------------------------------------------
# Sampling and scoring, split over the ranks
#
# Work is cut into batches that depend only on the inputs (never on the number of ranks); rank k takes
# batches k, k + W, k + 2W, ... and everything is gathered back in batch order. Each batch samples with its
# own generator, seeded from (round seed, batch index), so 1 process and 8 give the same answers.


def derive_seed(*parts):
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sharded_map(jobs, fn, desc=None):
    """[fn(job) for job in jobs], jobs split round-robin over the ranks, the results on every rank, in order."""
    _, rank, _, world_size = dist.get_dist_info()
    mine = list(range(rank, len(jobs), world_size))
    from tqdm import tqdm
    results = {k: fn(jobs[k]) for k in tqdm(mine, desc=desc, disable=rank != 0 or desc is None, leave=False)}
    if world_size > 1:
        gathered = [None] * world_size
        torch_dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[k] for k in range(len(jobs))]


@torch.no_grad()
def sample_answers(policy, prompts, *, seed, batch_size=32, max_new_tokens=64, temperature=1.0, top_p=1.0,
                   eos_id=None, device="cpu", desc=None):
    """One sampled answer (new token ids, EOS included when generated) per prompt; the same on any world size.

    Prompts are sorted by length before batching, so a batch pads its prompts to similar lengths.
    temperature=0 is greedy decoding.
    """
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]

    def run(k):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, k))
        return policy.generate([prompts[i] for i in batches[k]], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, eos_id=eos_id, generator=generator)

    answers = [None] * len(prompts)
    for idx, outs in zip(batches, sharded_map(list(range(len(batches))), run, desc=desc)):
        for i, out in zip(idx, outs):
            answers[i] = [int(t) for t in out]
    return answers


@torch.no_grad()
def score(rm, sequences, *, max_tokens=8192, device="cpu", desc=None):
    """RM rewards of full sequences (prompt + answer token lists). -> np.ndarray (len(sequences),) float64

    Identical sequences are scored once and share the result, so two identical answers tie exactly
    (packing them in different batches could otherwise change the last bits of their rewards).
    """
    if dist.get_dist_info()[3] > 1 and any(hasattr(p, "device_mesh") for p in rm.parameters()):
        raise EvalError("score() splits sequences over the ranks, so it needs an unsharded reward model "
                        "(load_reward_model) on every rank, not an FSDP-sharded one")
    unique = sorted(set(tuple(s) for s in sequences), key=lambda s: (len(s), s))
    batches, current, n_tokens = [], [], 0
    for seq in unique:                             # greedy packing up to max_tokens per forward pass
        if current and n_tokens + len(seq) > max_tokens:
            batches.append(current)
            current, n_tokens = [], 0
        current.append(seq)
        n_tokens += len(seq)
    if current:
        batches.append(current)

    def run(k):
        input_ids, position_ids, seg_lens, last_rows = pack_sequences(batches[k])
        return rm(input_ids.to(device), position_ids.to(device), seg_lens, last_rows.to(device)).cpu().tolist()

    rewards = {}
    for batch, values in zip(batches, sharded_map(list(range(len(batches))), run, desc=desc)):
        rewards.update(zip(batch, values))
    return np.array([rewards[tuple(s)] for s in sequences], dtype=np.float64)


# -----------------------------------------------------------------------------------------------------------
# Win rates (Tables 2-3) and the oracle


def pairwise_win_rate(a, b):
    """Per-round win rate of A over B: mean over prompts of [a > b] + 0.5 [a == b]. (R, n), (R, n) -> (R,)"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ((a > b) + 0.5 * (a == b)).mean(axis=-1)


def mean_std(values):
    """Mean and sample standard deviation (ddof=1, 0 for a single round) of per-round values."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_round": [float(v) for v in values]}


def win_rates(rewards, correct=None):
    """Every ordered pair of policies: RM win rate, and with an oracle its win rate and the RM's agreement.

    rewards: {policy: (R, n) RM rewards of its answers, round r, prompt i}; correct: {policy: (R, n) bool} or None.
    Returns {"rm": {a: {b: mean_std}}, "oracle": {...}, "agreement": {a: {b: {...}}}, "policies": {a: stats}}.
    Agreement is measured on the prompts where exactly one of the two answers is correct: the fraction of them
    where the RM prefers the correct one (an RM tie counts half).
    """
    names = list(rewards)
    result = {"rm": {a: {} for a in names}, "policies": {}}
    for a in names:
        r = np.asarray(rewards[a])
        result["policies"][a] = {"mean_reward": float(r.mean()), "std_reward": float(r.std()),
                                 "mean_reward_per_round": [float(v) for v in r.mean(-1)]}
        if correct is not None:
            result["policies"][a]["oracle_accuracy"] = mean_std(np.asarray(correct[a], dtype=np.float64).mean(-1))
        for b in names:
            if a != b:
                result["rm"][a][b] = mean_std(pairwise_win_rate(rewards[a], rewards[b]))
    if correct is None:
        return result
    result["oracle"] = {a: {} for a in names}
    result["agreement"] = {a: {} for a in names}
    for a in names:
        for b in names:
            if a == b:
                continue
            ca, cb = np.asarray(correct[a], bool), np.asarray(correct[b], bool)
            result["oracle"][a][b] = mean_std(pairwise_win_rate(ca.astype(float), cb.astype(float)))
            decided = ca != cb                                                    # (R, n)
            ra, rb = np.asarray(rewards[a]), np.asarray(rewards[b])
            rm_pick = (ra > rb) + 0.5 * (ra == rb)                                # 1: RM prefers a
            agree = np.where(ca, rm_pick, 1.0 - rm_pick)[decided]
            result["agreement"][a][b] = {"rate": float(agree.mean()) if agree.size else None,
                                         "n_decided": int(decided.sum())}
    return result


# -----------------------------------------------------------------------------------------------------------
# The whole evaluation: sample, score, compare


def load_policy(spec, device, init_seed=42, dtype=torch.float32):
    """A policy given in-process (an nn.Module), as a checkpoint dir / Hub id, or as a weightless preset
    such as "tiny", randomly initialised from init_seed exactly as train.py initialises it (seed 42)."""
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    preset = random_init_config(spec)
    if preset is not None:
        torch.manual_seed(init_seed)
        return model_lib.Transformer(preset).to(device=device, dtype=dtype).eval()
    return model_lib.Transformer.from_pretrained(str(spec), dtype=dtype, device=device).eval()


def load_prompts(source, tokenizer, *, n_prompts=None, template="auto", split=None, max_prompt_length=1024):
    """Test prompts from preference data (any data.py layout), rendered as training renders them.

    Returns (prompts, stats): each prompt is {"text": the last user message (what the oracle reads),
    "conversation": data.Conversation, "ids": prompt token ids, "template": the rendering template} plus what
    policy_prompt_ids needs to render it for another tokenizer. Rows are read in order until n_prompts usable
    prompts are found, so more than n_prompts rows may be read: rows data.py drops, and prompts longer than
    max_prompt_length tokens, are skipped and counted in stats (stats["rows"]: rows read).
    """
    from collections import Counter
    stats, prompts, template_src = Counter(), [], None
    for where, layout, row in data.read_rows(data.resolve_files(source, split)):
        if n_prompts is not None and len(prompts) >= n_prompts:
            break
        if template_src is None:
            template_src = (data.resolve_template(template, tokenizer, layout),)
        stats["rows"] += 1
        conv = data.parse_row(layout, row, where, stats)
        if conv is None:
            continue
        prompt_text, _, _ = data.render_texts(conv, template_src[0], tokenizer, stats)
        ids = tokenizer.encode(prompt_text)
        if len(ids) > max_prompt_length:
            stats["dropped/prompt_too_long"] += 1
            continue
        user = [m["content"] for m in conv.history if m["role"] == "user"]
        prompts.append({"text": user[-1] if user else prompt_text, "conversation": conv, "ids": ids,
                        "template": template_src[0], "template_option": template, "layout": layout})
    stats["kept"] = len(prompts)
    if not prompts:
        raise EvalError(f"no usable prompts in {source} ({dict(stats)})")
    return prompts, stats


def prompts_line(source, prompts, stats):
    """The log line of load_prompts: how many prompts, from how many rows, and why the other rows were skipped."""
    skipped = {k: v for k, v in stats.items() if k.startswith("dropped/")}
    why = ", ".join(f"{k[len('dropped/'):]} {v}" for k, v in sorted(skipped.items())) or "none"
    return (f"prompts: {len(prompts)} usable from the first {stats['rows']} rows of {source} "
            f"({stats['rows'] - len(prompts)} skipped: {why})")


def policy_prompt_ids(prompts, tok):
    """The prompts rendered and tokenized for a policy with its own tokenizer (its chat template under
    --template auto, its vocabulary), exactly as load_prompts renders them for the RM's."""
    from collections import Counter
    ids = []
    for p in prompts:
        template = data.resolve_template(p["template_option"], tok, p["layout"])
        prompt_text, _, _ = data.render_texts(p["conversation"], template, tok, Counter())
        ids.append(tok.encode(prompt_text))
    return ids


def answer_text(tokenizer, answer_ids):
    """The text of a sampled answer: its tokens before the first EOS. Ids outside the tokenizer's vocabulary
    (an untrained model with vocab_size 512 can sample them) decode to nothing; they are counted."""
    eos = tokenizer.eos_id
    ids = answer_ids[:answer_ids.index(eos)] if eos in answer_ids else answer_ids
    return tokenizer.decode(ids), sum(1 for t in ids if t >= tokenizer.vocab_size)


def scoring_sequences(tokenizer, prompts, answers, stats):
    """[(prompt index, answer text)] -> prompt + answer token ids, rendered and tokenized exactly as data.py
    builds a training sequence (data.render_texts, data.tokenize_texts).

    The RM learnt from sequences [template(prompt) | template(answer) with EOS]; scoring the raw sampled ids
    instead would put its read-out on a different last token (e.g. EOS instead of the newline Zephyr's template
    writes after it) than the one it was trained on.
    """
    texts = []
    for i, text in answers:
        conv = prompts[i]["conversation"]
        raw = (conv.raw[0], text, text) if conv.raw is not None else None
        as_pair = data.Conversation(conv.history, text, text, raw=raw)
        prompt_text, response, _ = data.render_texts(as_pair, prompts[i]["template"], tokenizer, stats)
        texts.append((prompt_text, response, response))
    return [[int(t) for t in p] + [int(t) for t in c] for p, c, _ in data.tokenize_texts(tokenizer, texts, stats)]


def evaluate_policies(rm, policies, prompts, *, tokenizer, policy_toks=None, rounds=3, seed=0, temperature=1.0,
                      top_p=1.0, max_new_tokens=64, batch_size=32, oracle=None, init_seed=42, dtype=torch.float32,
                      device="cpu"):
    """Sample every policy on every prompt for `rounds` rounds, score with the RM, compare every pair.

    rm: a RewardModel (eval mode); tokenizer: the RM's; policies: {name: nn.Module, checkpoint dir or preset};
    policy_toks: {name: tokenizer} (default: policy_tokenizers, i.e. each checkpoint's own): a policy reads its
    prompts and writes its answers with its own, and the RM reads the answer text with `tokenizer`;
    prompts: from load_prompts; oracle: None or a function (prompt text, answer text) -> bool (data.oracle_correct).
    Each policy is loaded, sampled for all rounds and freed before the next (one model in memory at a time).
    A policy's answers in round r are sampled once and reused in all its pairings. The seed of policy p in
    round r depends on (seed, r, p's name), so two names for the same checkpoint draw different samples,
    while greedy decoding (temperature 0) gives identical samples and so exact ties.
    Returns the report dict of win_rates plus "rewards", "samples" and "settings"; the same on every rank.
    """
    from collections import Counter
    names, n = list(policies), len(prompts)
    toks = policy_toks if policy_toks is not None else policy_tokenizers(policies, tokenizer)
    answers = {}                                                                  # name -> [round][prompt]
    for name in names:
        tok = toks[name]
        prompt_ids = [p["ids"] for p in prompts] if tok is tokenizer else policy_prompt_ids(prompts, tok)
        policy = load_policy(policies[name], device, init_seed, dtype)
        answers[name] = [sample_answers(policy, prompt_ids, seed=derive_seed(seed, r, name), batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        eos_id=tok.eos_id, device=device, desc=f"sample {name} round {r}")
                         for r in range(rounds)]
        del policy
    texts, unknown, render_stats = {}, {}, Counter()
    for name in names:
        decoded = [[answer_text(toks[name], a) for a in answers[name][r]] for r in range(rounds)]
        texts[name] = [[t for t, _ in row] for row in decoded]
        unknown[name] = sum(u for row in decoded for _, u in row)
    sequences = scoring_sequences(tokenizer, prompts, [(i, texts[name][r][i]) for name in names
                                                       for r in range(rounds) for i in range(n)], render_stats)
    flat = score(rm, sequences, device=device, desc="score").reshape(len(names), rounds, n)
    rewards = {name: flat[k] for k, name in enumerate(names)}                    # name -> (R, n)
    correct = None
    if oracle is not None:
        correct = {name: np.array([[bool(oracle(prompts[i]["text"], texts[name][r][i])) for i in range(n)]
                                   for r in range(rounds)]) for name in names}
    report = win_rates(rewards, correct)
    for name in names:
        spec = policies[name]
        report["policies"][name]["path"] = str(spec) if not isinstance(spec, nn.Module) else "<in-process module>"
        report["policies"][name]["tokenizer"] = toks[name].name
        report["policies"][name]["out_of_vocab_tokens_dropped"] = unknown[name]
        report["policies"][name]["mean_answer_tokens"] = float(np.mean([len(a) for row in answers[name] for a in row]))
    report["rewards"] = {name: rewards[name].tolist() for name in names}
    report["samples"] = [{"round": r, "policy": name, "prompt_index": i, "prompt": prompts[i]["text"],
                          "answer": texts[name][r][i], "answer_ids": answers[name][r][i],
                          "reward": float(rewards[name][r, i]),
                          **({"oracle_correct": bool(correct[name][r, i])} if correct is not None else {})}
                         for name in names for r in range(rounds) for i in range(n)]
    report["settings"] = {"rounds": rounds, "n_prompts": n, "seed": seed, "temperature": temperature,
                          "top_p": top_p, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                          "world_size": dist.get_dist_info()[3], "render_notes": dict(render_stats)}
    return report


def format_table(matrix, names, title):
    """Rows: policy, columns: opponent, cells "mean ± std" (Tables 2-3 of the paper)."""
    cell = lambda a, b: "-" if a == b else f"{matrix[a][b]['mean']:.3f} ± {matrix[a][b]['std']:.3f}"
    width = max(13, *(len(n) for n in names)) + 2
    lines = [title, "".ljust(width) + "".join(f"vs {b}".ljust(width) for b in names)]
    lines += [a.ljust(width) + "".join(cell(a, b).ljust(width) for b in names) for a in names]
    return "\n".join(lines)


def summary_text(report):
    """The terminal summary: the win-rate table(s), the RM/oracle agreement and per-policy numbers."""
    names, s = list(report["policies"]), report["settings"]
    head = f"{s['n_prompts']} prompts, {s['rounds']} round(s), temperature {s['temperature']}, top-p {s['top_p']}"
    blocks = [format_table(report["rm"], names, f"RM win rate of row vs column, mean ± std over rounds ({head})")]
    if "oracle" in report:
        blocks.append(format_table(report["oracle"], names, "Oracle win rate of row vs column (synthetic data)"))
        agree = [f"{a} vs {b}: {v['rate']:.3f} of {v['n_decided']}" for i, a in enumerate(names)
                 for b in names[i + 1:] if (v := report["agreement"][a][b])["rate"] is not None]
        blocks.append("RM agrees with the oracle, on answer pairs where exactly one is correct: "
                      + ("; ".join(agree) if agree else "no such pair"))
    lines = []
    for name, p in report["policies"].items():
        line = f"{name}: mean reward {p['mean_reward']:+.3f} (std {p['std_reward']:.3f})"
        if "oracle_accuracy" in p:
            line += f", oracle accuracy {p['oracle_accuracy']['mean']:.3f} ± {p['oracle_accuracy']['std']:.3f}"
        lines.append(line)
    return "\n\n".join(blocks + ["\n".join(lines)])


def plot_reward_distributions(rewards, path):
    """Figure 5: a histogram of each policy's RM rewards (all rounds pooled), its mean as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")                         # no display needed; writes the PNG only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = {name: np.asarray(r, dtype=np.float64).ravel() for name, r in rewards.items()}
    lo, hi = min(v.min() for v in values.values()), max(v.max() for v in values.values())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    for k, (name, v) in enumerate(values.items()):
        color = f"C{k}"
        ax.hist(v, bins=bins, alpha=0.45, density=True, color=color, label=f"{name} (mean {v.mean():+.2f})")
        ax.axvline(v.mean(), color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel("reward r(x, y)")
    ax.set_ylabel("density")
    ax.set_title("Reward distribution of each policy's samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report, out_dir):
    """winrates.json (everything), winrates.csv (+ oracle_winrates.csv), rewards.png, samples.jsonl. -> paths"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(report["policies"])
    paths = {"json": out_dir / "winrates.json", "csv": out_dir / "winrates.csv",
             "png": out_dir / "rewards.png", "samples": out_dir / "samples.jsonl"}
    paths["json"].write_text(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2) + "\n")
    tables = [("csv", "rm")] + ([("oracle_csv", "oracle")] if "oracle" in report else [])
    for key, which in tables:
        paths[key] = out_dir / ("winrates.csv" if which == "rm" else "oracle_winrates.csv")
        with open(paths[key], "w", newline="") as f:  # rows: policy, columns: opponent, cells "mean ± std"
            writer = csv.writer(f)
            writer.writerow(["policy"] + [f"vs {b}" for b in names])
            for a in names:
                writer.writerow([a] + ["" if a == b else f"{report[which][a][b]['mean']:.4f} ± "
                                       f"{report[which][a][b]['std']:.4f}" for b in names])
    with open(paths["samples"], "w") as f:
        for record in report["samples"]:
            f.write(json.dumps(record) + "\n")
    plot_reward_distributions(report["rewards"], paths["png"])
    return paths


# -----------------------------------------------------------------------------------------------------------
# Tokenizers: every model reads text with the tokenizer it was trained with
#
# A tokenizer is never guessed. The RM's is --tokenizer, else its --init checkpoint's own, found the way the
# model itself is found (model.resolve_checkpoint: a folder, a Hub id, or a preset naming one, such as
# opt-350m -> facebook/opt-350m). train-rm saves it beside the RM and winrate reads it back from there. A
# random-init preset (tiny) has no tokenizer of its own: data.py's synthetic one fits it on the synthetic
# pairs only, as in train.py's default run. Each policy reads its prompts with its own checkpoint's tokenizer;
# its answers go back to text and the RM re-tokenizes that text with the RM's (scoring_sequences), so a
# policy and the RM may use different vocabularies.


def random_init_config(spec):
    """The ModelConfig of a weightless preset such as "tiny" (random init), or None for a real checkpoint."""
    preset = model_lib.PRESETS.get(str(spec))
    return preset if isinstance(preset, model_lib.ModelConfig) and not Path(str(spec)).is_dir() else None


def load_named_tokenizer(flag, name):
    """data.load_tokenizer, its errors turned into one line that names the option they came from."""
    try:
        return data.load_tokenizer(name)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"{flag}: {e}") from None


def checkpoint_tokenizer(flag, spec, remedy):
    """The tokenizer saved with checkpoint `spec` (a folder, a Hub id or a preset naming one)."""
    try:
        ckpt_dir = model_lib.resolve_checkpoint(spec)
    except ValueError as e:                      # model.CheckpointError: unknown name, offline, no config.json
        raise EvalError(f"{flag}: {e}") from None
    try:      # tokenizer.json, or GPT-2-style vocab.json + merges.txt (OPT)
        return data.load_tokenizer(ckpt_dir)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"{flag}: {e}; without it, how this model reads text is unknown: {remedy}") from None


def init_tokenizer(tokenizer, init, data_source):
    """train-rm's tokenizer: --tokenizer, else --init's own; the synthetic one only for a random-init preset
    on --data synthetic (train.py's demo pairing). Never a silent fallback: anything else is an error."""
    if tokenizer:
        return load_named_tokenizer("--tokenizer", tokenizer)
    if random_init_config(init) is not None:
        if data_source == "synthetic":
            return data.synthetic_tokenizer()
        raise EvalError(f"--init {init} is a random-init preset with no tokenizer of its own, so --data "
                        f"{data_source} needs --tokenizer (a folder, a Hub id, or 'synthetic' for data.py's pairs)")
    return checkpoint_tokenizer(f"--init {init}", init, "pass --tokenizer")


def rm_tokenizer(tokenizer, rm_dir):
    """winrate's RM tokenizer: --tokenizer, else the one train-rm saved beside the RM."""
    if tokenizer:
        return load_named_tokenizer("--tokenizer", tokenizer)
    try:
        return data.load_tokenizer(rm_dir)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"--rm {rm_dir}: {e} (train-rm saves the one the RM was trained with); "
                        f"pass --tokenizer") from None


def policy_tokenizers(policies, rm_tok, given=None):
    """{name: the tokenizer the policy reads prompts with}: the one given for it (--policy-tokenizer), else a
    checkpoint's own; the RM's for a random-init preset or an in-process module, whose vocabulary must then
    hold every id of the RM's tokenizer."""
    toks, given = {}, given or {}
    for name, spec in policies.items():
        where = f"policy {name}" if isinstance(spec, nn.Module) else f"--policy {name}={spec}"
        if name in given:
            toks[name] = load_named_tokenizer(f"--policy-tokenizer {name}", given[name])
            continue
        config = getattr(spec, "config", None) if isinstance(spec, nn.Module) else random_init_config(spec)
        if config is None and not isinstance(spec, nn.Module):
            toks[name] = checkpoint_tokenizer(where, spec, f"save the policy's tokenizer there (train.py does), "
                                                           f"or pass --policy-tokenizer {name}=TOKENIZER")
            continue
        if config is not None and rm_tok.vocab_size > config.vocab_size:
            raise EvalError(f"{where}: its {config.vocab_size}-token vocabulary cannot read the RM's tokenizer "
                            f"({rm_tok.vocab_size} tokens); give a checkpoint that has its own tokenizer")
        toks[name] = rm_tok
    return toks


# -----------------------------------------------------------------------------------------------------------
# Data: preference pairs for the RM, read as train.py reads --data (data.build_pairs)

SYNTHETIC_VAL_PAIRS = 200         # --val-data synthetic: train.py's held-out synthetic pairs use seed 1 too


def synthetic_file(scratch_dir, n_pairs, seed, split):
    """A data.write_synthetic parquet in scratch_dir, written by rank 0, its path shared with every rank.

    split is "train" (RM training) or "eval" (held-out pairs, win-rate prompts): the two never share a prompt."""
    _, rank, _, _ = dist.get_dist_info()
    path = None
    if rank == 0:
        path = data.write_synthetic(Path(scratch_dir) / f"synthetic_{split}_{n_pairs}_seed{seed}.parquet",
                                    n_pairs, seed=seed, split=split)
    if torch_dist.is_initialized():
        holder = [path]
        torch_dist.broadcast_object_list(holder, src=0)
        path = holder[0]
    return path


def read_pairs(flag, source, split, tok, args):
    """One --data / --val-data source (parquet file, folder, glob or Hub id) -> a data.PairSet; prints how
    many rows were kept and why the others were dropped."""
    try:
        pairs = data.build_pairs(source, tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                 template=args.template, split=split)
    except (ValueError, FileNotFoundError) as e:     # data.DataError, missing files, a Hub id offline
        raise EvalError(f"{flag}: {e}") from None
    stats = dict(pairs.stats)
    dist.print0(f"{flag} {source}: {data.stats_line(stats)}")
    if len(pairs) == 0:
        raise EvalError(f"{flag} {source}: no usable pairs after filtering ({data.stats_line(stats)})")
    return pairs


def train_and_val_pairs(args, tok):
    """(train pairs, held-out pairs, where they came from): the held-out pairs are --val-data when given (all of
    --data then trains), else a seeded --val-frac slice of --data."""
    scratch = Path(args.out) / "data"
    source = synthetic_file(scratch, args.synthetic_pairs, 0, "train") if args.data == "synthetic" else args.data
    pairs = read_pairs("--data", source, args.split, tok, args)
    origin = {"data": str(source), "data_stats": dict(pairs.stats)}
    if args.val_data is None:
        train, val = split_pairs(pairs, args.val_frac, args.seed)
        dist.print0(f"held out {len(val)} of those pairs for accuracy (--val-frac {args.val_frac})")
        return train, val, origin
    val_source = synthetic_file(scratch, SYNTHETIC_VAL_PAIRS, 1, "eval") if args.val_data == "synthetic" \
        else args.val_data
    val = read_pairs("--val-data", val_source, args.val_split, tok, args)
    return list(pairs), list(val), {**origin, "val_data": str(val_source), "val_data_stats": dict(val.stats)}


def check_token_ids(pairs, vocab_size, init, tok):
    """Every token id must index the backbone's embedding; otherwise the lookup fails deep inside training."""
    top = max(int(max(p.prompt_ids.max(initial=0), p.chosen_ids.max(initial=0), p.rejected_ids.max(initial=0)))
              for p in pairs)
    if top >= vocab_size:
        raise EvalError(f"tokenizer {tok.name!r} produced token id {top}, outside the {vocab_size}-token vocabulary "
                        f"of --init {init}; pass the tokenizer that model was trained with (--tokenizer)")


def split_pairs(pairs, val_frac, seed):
    """A seeded random train / held-out split of a PairSet. -> (train list, val list)"""
    perm = np.random.default_rng(seed).permutation(len(pairs))
    n_val = int(round(len(pairs) * val_frac))
    if len(pairs) - n_val < 1:
        raise EvalError(f"only {len(pairs)} usable pairs: too few to hold out {val_frac:.0%} and still train")
    return [pairs[i] for i in perm[n_val:]], [pairs[i] for i in perm[:n_val]]


# -----------------------------------------------------------------------------------------------------------
# Command line

DEMO_ROOT = "out"         # where the default `python train.py` writes (train.py --out)
DEMO_INIT_SEED = 42       # train.py's default --seed: the random init of its tiny model


def parse_policies(specs):
    """['NAME=DIR', ...] -> {name: dir}; DIR may also be a model.py preset (e.g. tiny) or a Hub repo id.
    Only the spelling is checked here; policy_tokenizers finds each checkpoint before anything is loaded."""
    policies = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise EvalError(f"--policy {spec!r}: expected NAME=DIR, e.g. --policy orpo=out/final")
        if not all(ch.isalnum() or ch in "-_." for ch in name):
            raise EvalError(f"--policy {spec!r}: the name may use letters, digits, '-', '_' and '.' only")
        if name in policies:
            raise EvalError(f"--policy {spec!r}: the name {name!r} is given twice; give each policy a distinct NAME")
        policies[name] = path
    if len(policies) < 2:
        raise EvalError("--policy: give at least two policies to compare (e.g. --policy orpo=out/final --policy base=tiny)")
    return policies


def parse_policy_tokenizers(specs, policies):
    """['NAME=TOKENIZER', ...] -> {name: tokenizer}, each NAME one of the --policy names."""
    given = {}
    for spec in specs:
        name, sep, tok = spec.partition("=")
        if not sep or not tok.strip():
            raise EvalError(f"--policy-tokenizer {spec!r}: expected NAME=TOKENIZER, e.g. base=path/to/tokenizer")
        if name not in policies:
            raise EvalError(f"--policy-tokenizer {spec!r}: no --policy is named {name!r} "
                            f"(the policies are {', '.join(policies)})")
        given[name] = tok
    return given


def check_args(args):
    """Reject impossible option values in one sentence each, before any data is read or model loaded."""
    rules = []
    if args.command in ("train-rm", "winrate"):
        rules += [("--max-prompt-length", args.max_prompt_length >= 1, "at least 1")]
        if args.template not in ("auto", "zephyr", "raw") and not Path(args.template).is_file():
            raise EvalError(f"--template {args.template}: not auto, zephyr, raw or an existing .jinja file")
    if args.command == "train-rm":
        rules += [("--steps", args.steps >= 1, "at least 1"),
                  ("--batch-size", args.batch_size >= 1, "at least 1"),
                  ("--log-every", args.log_every >= 1, "at least 1"),
                  ("--lr", args.lr > 0, "positive"),
                  ("--warmup", args.warmup >= 0, "0 or more"),
                  ("--synthetic-pairs", args.synthetic_pairs >= 1, "at least 1"),
                  ("--max-length", args.max_length >= args.max_prompt_length, "at least --max-prompt-length"),
                  # 0 is allowed: no held-out slice (experiments/paper_cpu.py measures accuracy itself)
                  ("--val-frac", 0 <= args.val_frac < 1, "in [0, 1)")]
        if args.val_split is not None and args.val_data is None:
            raise EvalError("--val-split names a split of --val-data: give --val-data too (it may be the same "
                            "source as --data)")
        same = args.val_data != "synthetic" and (args.val_data, args.val_split) == (args.data, args.split)
        if same:                                  # (synthetic held-out pairs are a separate set: seed 1, split eval)
            raise EvalError(f"--val-data {args.val_data} is the training data itself (same source and split): "
                            f"give another split (--val-split) or another source")
    if args.command == "winrate":
        rules += [("--n-prompts", args.n_prompts >= 1, "at least 1"),
                  ("--rounds", args.rounds >= 1, "at least 1"),
                  ("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
                  ("--batch-size", args.batch_size >= 1, "at least 1"),
                  ("--temperature", args.temperature >= 0, "0 (greedy) or more"),
                  ("--top-p", 0 < args.top_p <= 1, "in (0, 1]")]
        parse_policies(args.policy)
    for flag, ok, requirement in rules:          # `not ok` also catches nan, for which every comparison is False
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise EvalError(f"{flag} must be {requirement}, got {value}")


def cmd_train_rm(args, device):
    """train-rm: tokenizer -> pairs and held-out pairs -> eq. 11 training -> saved RM with its held-out accuracy."""
    tok = init_tokenizer(args.tokenizer, args.init, args.data)
    config, _ = model_lib.resolve_model(str(args.init))
    train_pairs, val, origin = train_and_val_pairs(args, tok)
    check_token_ids(train_pairs + val, config.vocab_size, args.init, tok)
    _, result = train_reward_model(train_pairs, init=args.init, val_pairs=val, out_dir=args.out, tokenizer=tok,
                                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                   seed=args.seed, init_seed=args.init_seed, shared_prompt=args.shared_prompt,
                                   device=device, log_every=args.log_every,
                                   meta={**origin, "tokenizer": tok.name})
    dist.print0(f"saved reward model to {args.out} (held-out accuracy {result.get('val_accuracy', float('nan')):.3f})")
    return result


def cmd_winrate(args, device):
    """winrate: tokenizers and prompts (cheap, so bad input fails first), then the RM, then sample and score."""
    _, rank, _, _ = dist.get_dist_info()
    policies = parse_policies(args.policy)
    given = parse_policy_tokenizers(args.policy_tokenizer, policies)
    require_rm_dir(args.rm)
    tok = rm_tokenizer(args.tokenizer, args.rm)
    policy_toks = policy_tokenizers(policies, tok, given)
    source = args.data
    if source == "synthetic":            # fresh prompts from a seed the RM and train.py never used
        source = synthetic_file(Path(args.out) / "data", args.n_prompts, 12345, "eval")
    try:
        prompts, stats = load_prompts(source, tok, n_prompts=args.n_prompts, template=args.template,
                                      split=args.split, max_prompt_length=args.max_prompt_length)
    except (ValueError, FileNotFoundError) as e:     # data.DataError, missing files, a Hub id offline
        raise EvalError(f"--data: {e}") from None
    dist.print0(prompts_line(source, prompts, stats))
    dtype = dist.resolve_dtype(args.dtype, device)
    rm, meta = load_reward_model(args.rm, dtype=dtype, device=device)
    use_oracle = args.oracle == "on" or (args.oracle == "auto" and is_synthetic(prompts))
    report = evaluate_policies(rm, policies, prompts, tokenizer=tok, policy_toks=policy_toks, rounds=args.rounds,
                               seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               oracle=data.oracle_correct if use_oracle else None, init_seed=args.init_seed,
                               dtype=dtype, device=device)
    report["reward_model"] = {"dir": str(args.rm), **{k: meta[k] for k in ("val_accuracy", "init", "steps") if k in meta}}
    report["data"] = {"source": str(source), "stats": dict(stats)}
    if rank == 0:
        paths = write_report(report, args.out)
        print(summary_text(report))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


def is_synthetic(prompts):
    """True when every prompt is one of data.py's synthetic tasks (so the oracle applies)."""
    try:
        for p in prompts:
            data.oracle_correct(p["text"], "")
    except ValueError:
        return False
    return True


def demo_commands(root):
    """The two commands the demo runs on the output of the default `python train.py` (train.py --out root)."""
    root = Path(root)
    train_data = root / "data" / "synthetic_train_2000.parquet"    # train.py's default training pairs
    test_data = root / "data" / "synthetic_eval.parquet"           # train.py's held-out pairs (seed 1)
    train_rm = ["train-rm", "--out", str(root / "rm"), "--data", str(train_data) if train_data.exists() else "synthetic",
                "--tokenizer", "synthetic"]          # the tokenizer train.py gives its random-init tiny model
    winrate = ["winrate", "--rm", str(root / "rm"), "--policy", f"orpo={root / 'final'}", "--policy", "base=tiny",
               "--data", str(test_data) if test_data.exists() else "synthetic", "--max-new-tokens", "32",
               "--out", str(root / "winrate")]     # synthetic answers are under 10 tokens: 32 leaves room
    return train_rm, winrate


def cmd_demo(args, device):
    """No arguments: ORPO's final model (out/final) against its own starting point (the tiny model's random init,
    seed 42 as in train.py), judged by an RM trained on the same synthetic pairs, with the oracle beside it."""
    root = Path(args.root)
    if not (root / "final" / "config.json").is_file():
        raise EvalError(f"{root / 'final'} not found: run `python train.py` first (the demo evaluates its output)")
    train_rm, winrate = demo_commands(root)
    parser = build_parser()
    if args.retrain_rm or not (root / "rm" / HEAD_FILE).is_file():
        dist.print0("$ python eval_rm.py " + " ".join(train_rm))
        cmd_train_rm(parser.parse_args(train_rm + ["--device", args.device]), device)
    else:
        dist.print0(f"using the reward model in {root / 'rm'} (--retrain-rm to train it again)")
    dist.print0("$ python eval_rm.py " + " ".join(winrate))
    return cmd_winrate(parser.parse_args(winrate + ["--device", args.device]), device)


def build_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="Reward model + win rates of policies (ORPO paper, Tables 2-3, "
                                     "Fig. 5). With no command: the demo on the output of `python train.py`.",
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
        p.add_argument("--template", default="auto", help="chat template: auto | zephyr | raw | a .jinja file")
        p.add_argument("--split", default=None, help="split of --data (needed for a Hub id or a folder of several)")
        p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are dropped (counted)")
        p.add_argument("--init-seed", type=int, default=DEMO_INIT_SEED,
                       help="seed of a weightless preset (tiny) used as init or policy; 42 = train.py's default")

    p = sub.add_parser("train-rm", help="train a reward model with the Bradley-Terry loss (eq. 11)", formatter_class=fmt)
    p.add_argument("--out", required=True, help="directory to save the RM (HF backbone + reward_head/ + reward_model.json)")
    p.add_argument("--data", default="synthetic",
                   help="preference pairs: parquet file, folder, glob or Hub dataset id (with --split), or 'synthetic'")
    p.add_argument("--synthetic-pairs", type=int, default=2000, help="pairs written when --data synthetic")
    p.add_argument("--init", default="tiny", help="backbone: a checkpoint dir, Hub id or model.py preset")
    p.add_argument("--tokenizer", default=None,
                   help="folder, Hub id or 'synthetic'; default: --init's own (a random-init preset such as tiny "
                        "has none: the synthetic one, for --data synthetic only). Saved with the RM")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (per rank)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (1e-3 suits the tiny demo; ~1e-5 for real models)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine decay")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="without --val-data: fraction of --data held out for accuracy (0: none); not used with --val-data")
    p.add_argument("--val-data", default=None,
                   help="held-out pairs for the RM's accuracy (same forms as --data, e.g. an HH-RLHF test split); "
                        "all of --data then trains and --val-frac is not used")
    p.add_argument("--val-split", default=None, help="split of --val-data (needed for a Hub id or a folder of several)")
    p.add_argument("--max-length", type=int, default=1024, help="max prompt + response tokens (responses truncated)")
    p.add_argument("--shared-prompt", action="store_true",
                   help="pack each pair as [prompt|chosen|rejected] (prompt computed once); same rewards")
    p.add_argument("--seed", type=int, default=0, help="data order and held-out split")
    p.add_argument("--log-every", type=int, default=50, help="log a line every N steps")
    common(p)
    p.set_defaults(func=cmd_train_rm)

    p = sub.add_parser("winrate", help="sample policies, score with the RM, write win-rate tables", formatter_class=fmt)
    p.add_argument("--rm", required=True, help="reward model directory (from train-rm)")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=DIR",
                   help="a policy to compare (repeat; at least two): checkpoint dir, Hub id or preset (tiny)")
    p.add_argument("--data", default="synthetic",
                   help="test prompts: preference data as for train-rm (prompts only; --split) or 'synthetic'")
    p.add_argument("--tokenizer", default=None,
                   help="the RM's tokenizer; default: the one saved in --rm. Each policy reads prompts with its own "
                        "checkpoint's tokenizer (a random-init preset such as tiny: the RM's)")
    p.add_argument("--policy-tokenizer", action="append", default=[], metavar="NAME=TOKENIZER",
                   help="the tokenizer policy NAME reads prompts with, for a checkpoint saved without one (repeat)")
    p.add_argument("--n-prompts", type=int, default=200, help="use the first N usable prompts")
    p.add_argument("--rounds", type=int, default=3, help="sampling rounds with different seeds (mean ± std)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0); 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    p.add_argument("--seed", type=int, default=0, help="base sampling seed (round r of policy p: derived from it)")
    p.add_argument("--oracle", default="auto", choices=["auto", "on", "off"],
                   help="oracle scores (data.oracle_correct); auto = on for synthetic prompts")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights of policies and RM (the reward head always computes in float32); auto: bf16 on GPU")
    p.add_argument("--out", required=True, help="report dir: winrates.json/.csv, rewards.png, samples.jsonl")
    common(p)
    p.set_defaults(func=cmd_winrate)

    p = sub.add_parser("demo", help="the default: evaluate the output of `python train.py`", formatter_class=fmt)
    p.add_argument("--root", default=DEMO_ROOT, help="train.py's --out directory")
    p.add_argument("--retrain-rm", action="store_true", help="train ROOT/rm again even if it exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv or ["demo"])
    try:
        check_args(args)
        device = dist.compute_init(args.device)
        args.func(args, device)
    except (ValueError, FileNotFoundError) as e:  # EvalError, data.DataError, model.CheckpointError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
