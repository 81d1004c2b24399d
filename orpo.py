"""The ORPO objective: Odds Ratio Preference Optimization (Hong, Lee & Thorne, 2024, arXiv 2403.07691).

ORPO aligns a language model in one stage, with no reference model. For a prompt x with a chosen
answer y_w and a rejected answer y_l it adds to the ordinary SFT loss a penalty on the log odds ratio:

    log P(y|x)   = (1/m) sum_t log P(y_t | x, y_<t)           eq. 3   -> mean_logps, average_logps
    odds(y|x)    = P(y|x) / (1 - P(y|x))                       eq. 4   -> log_odds_ratio
    OR(y_w, y_l) = odds(y_w|x) / odds(y_l|x)                   eq. 5   -> log_odds_ratio
    L_OR         = -log sigmoid(log OR(y_w, y_l))              eq. 7   -> odds_ratio_loss
    L_ORPO       = E[L_SFT + lambda * L_OR]                    eq. 6   -> orpo_loss

L_SFT is the token-level NLL of the *chosen* sequence only (prompt tokens too unless the labels mask them, as in
the official code and TRL): the model is taught to produce y_w, and L_OR pushes y_l's odds below y_w's.

The gradient of L_OR (eqs. 8-10), -delta * [grad log P_w / (1 - P_w) - grad log P_l / (1 - P_l)] with
delta = (1 + odds_w / odds_l)^-1, fades once y_w is ahead; 1/(1 - P) speeds it up when P nears 1.

Three numerical traps of public implementations are avoided: log(1 - exp(x)) cancels as x -> 0 (NaN or -inf),
so the two-branch log1mexp is used; log(sigmoid(x)) underflows, so F.logsigmoid; bf16 sums of log-probs lose
the answer, so everything runs in float32 or wider.

Two ways in: orpo_loss for one batch (eq. 3 by average_logps on padded logits), or the per-pair L_OR of
odds_ratio_loss to weight the terms yourself, as train.py does over micro-batches and ranks (mean_logps).
Torch only, no side effects: copy it into your own trainer.
"""
import math

import torch
import torch.nn.functional as F


def wide(x):
    """x in float32, or wider if it already is (never bf16/fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_logps(token_logps, seq, n_seqs):
    """eq. 3: the mean of the token log-probs of each of n_seqs sequences. token_logps (R,) are the labelled
    tokens of all sequences in any order, seq (R,) the sequence each belongs to -> (n_seqs,) float32 or wider.
    A sequence with no token gets NaN (0 / 0), since its average is undefined."""
    token_logps = wide(token_logps)
    sums = token_logps.new_zeros(n_seqs).index_add(0, seq, token_logps)
    counts = token_logps.new_zeros(n_seqs).index_add(0, seq, torch.ones_like(token_logps))
    return sums / counts


def average_logps(logits, labels, ignore_index=-100):
    """eq. 3 on a padded batch: the mean log-prob of each row's labelled tokens. (B, T, V), (B, T) -> (B,).

    `labels` are aligned with the input ids as in Hugging Face: position t is predicted by the logits at
    t - 1, so the shift happens here. Positions equal to ignore_index (the prompt, padding) are skipped.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]                      # (B, T-1, V), (B, T-1)
    # log_softmax + gather in one call, in float32 (bf16 would round away the differences eq. 6 is about);
    # autograd keeps a float32 (B, V, T-1) log-softmax, which train.py avoids with a chunked lm_head
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels,
                                   ignore_index=ignore_index, reduction="none")  # (B, T-1)
    keep = labels != ignore_index                                        # (B, T-1)
    row = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)
    return mean_logps(token_logps[keep], row[keep], len(labels))


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate and with finite gradients (Maechler, 2012): log(-expm1(x)) near 0,
    where 1 - exp(x) cancels, log1p(-exp(x)) far from it; each branch sees only inputs where it is safe, so
    neither puts a NaN in the gradient. The cap at -tiny moves only P = 1 (infinite odds); a cap at -eps would
    freeze log(1 - P) at -15.9 above log P = -1.2e-7, and with it the 1/(1 - P) factor of eqs. 8-10."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    near_branch = torch.log(-torch.expm1(torch.where(near_zero, x, -math.log(2))))
    far_branch = torch.log1p(-torch.exp(torch.where(near_zero, -math.log(2), x)))
    return torch.where(near_zero, near_branch, far_branch)


def log_odds_ratio(chosen_logps, rejected_logps):
    """eqs. 4-5 in log space: log odds(y_w|x) - log odds(y_l|x), with log odds = log P - log(1 - P). -> (B,)"""
    chosen_logps, rejected_logps = wide(chosen_logps), wide(rejected_logps)
    return (chosen_logps - log1mexp(chosen_logps)) - (rejected_logps - log1mexp(rejected_logps))


def odds_ratio_loss(chosen_logps, rejected_logps):
    """eq. 7 per pair, L_OR = -logsigmoid(log OR) (B,), and detached (B,) metrics; averaged, TRL's (beta = lam):
      or_loss         L_OR                                       TRL "log_odds_ratio" is its negative
      log_odds        log OR, eq. 5                              TRL "log_odds_chosen"
      chosen_logps    log P(y_w|x), eq. 3                        TRL "logps/chosen"
      rejected_logps  log P(y_l|x)                               TRL "logps/rejected"
      reward_acc      1 where log P(y_w|x) > log P(y_l|x)         TRL "rewards/accuracies"
      reward_margin   log P(y_w|x) - log P(y_l|x)                TRL "rewards/margins" is beta times this
    """
    log_odds = log_odds_ratio(chosen_logps, rejected_logps)            # (B,)
    or_losses = -F.logsigmoid(log_odds)                                 # (B,) eq. 7, never log(sigmoid)
    chosen, rejected = wide(chosen_logps.detach()), wide(rejected_logps.detach())
    metrics = {"or_loss": or_losses.detach(), "log_odds": log_odds.detach(), "chosen_logps": chosen,
               "rejected_logps": rejected, "reward_acc": (chosen > rejected).to(chosen.dtype),
               "reward_margin": chosen - rejected}
    return or_losses, metrics


def orpo_loss(chosen_logps, rejected_logps, chosen_nll, lam=0.1):
    """eqs. 6-7: loss = L_SFT + lam * L_OR, averaged over the B pairs of the batch. Returns (loss, metrics).

    chosen_logps, rejected_logps: (B,) eq. 3 averages (average_logps); chosen_nll: L_SFT, a scalar or (B,)
    values that are averaged; lam = 0 is plain SFT, the paper's baseline. For exact accumulation over
    micro-batches, weight the terms yourself (odds_ratio_loss; train.py's train_step does).
    metrics: detached 0-d tensors, "nll" (L_SFT, TRL "nll_loss") and the means of odds_ratio_loss's.
    """
    or_losses, per_pair = odds_ratio_loss(chosen_logps, rejected_logps)
    nll = wide(torch.as_tensor(chosen_nll, device=or_losses.device)).mean()
    loss = nll + lam * or_losses.mean()                                 # eq. 6
    return loss, {"nll": nll.detach(), **{k: v.mean() for k, v in per_pair.items()}}
