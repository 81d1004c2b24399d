"""The ORPO objective: Odds Ratio Preference Optimization (Hong, Lee & Thorne, 2024, arXiv 2403.07691).

ORPO aligns a language model in one stage, with no reference model. For a prompt x with a chosen
answer y_w and a rejected answer y_l it adds to the ordinary SFT loss a penalty on the log odds ratio:

    log P(y|x)   = (1/m) sum_t log P(y_t | x, y_<t)           eq. 3   -> average_logps
    odds(y|x)    = P(y|x) / (1 - P(y|x))                       eq. 4   -> log_odds_ratio
    OR(y_w, y_l) = odds(y_w|x) / odds(y_l|x)                   eq. 5   -> log_odds_ratio
    L_OR         = -log sigmoid(log OR(y_w, y_l))              eq. 7   -> orpo_loss
    L_ORPO       = E[L_SFT + lambda * L_OR]                    eq. 6   -> orpo_loss

L_SFT is the usual token-level negative log-likelihood of the *chosen* sequence only: the model is
taught to produce y_w, and L_OR then pushes y_l's odds below y_w's. Like the official code and TRL,
the NLL covers the prompt tokens too unless the caller masks them; that choice lives in the labels.

The gradient of L_OR (eqs. 8-10) is  -delta * [grad log P_w / (1 - P_w) - grad log P_l / (1 - P_l)]
with delta = (1 + odds_w / odds_l)^-1: it fades once y_w is clearly ahead, and the 1/(1 - P) factor
speeds it up when the model is very sure of either answer.

Three numerical traps that public implementations fall into are avoided here:
  * log(1 - exp(x)) cancels catastrophically as x -> 0, giving NaN or -inf: we use the two-branch
    log1mexp (Maechler, 2012) and cap P just below 1, where the odds are infinite;
  * log(sigmoid(x)) underflows for very negative x: we use F.logsigmoid;
  * summing thousands of log-probs in bfloat16 loses the answer: everything here runs in float32 or
    wider, whatever the logits' dtype.

This file depends on torch alone and has no side effects: copy it into your own trainer.
"""
import math

import torch
import torch.nn.functional as F


def average_logps(logits, labels, ignore_index=-100):
    """eq. 3: the mean log-prob of each row's labelled tokens. logits (B, T, V), labels (B, T) -> (B,) float32.

    `labels` are aligned with the input ids as in Hugging Face: position t is predicted by the logits at
    t - 1, so the shift happens here. Positions equal to ignore_index (the prompt, padding) are skipped.
    A row with no labelled token gets NaN, since its average is undefined.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]                      # (B, T-1, V), (B, T-1)
    # cross_entropy = log_softmax + gather in one call, in float32 (bf16 log-probs would round away the
    # differences eq. 6 is about); autograd keeps one float32 (B, V, T-1) log-softmax for the backward,
    # which model.token_logps avoids by chunking. Ignored positions come back as 0
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels,
                                   ignore_index=ignore_index, reduction="none")  # (B, T-1)
    n_tokens = (labels != ignore_index).sum(-1)                          # (B,)
    return token_logps.sum(-1) / n_tokens


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate everywhere and with finite gradients (Maechler, 2012).

    Near 0, 1 - exp(x) cancels, so we use log(-expm1(x)); far from 0, exp(x) is tiny and log1p(-exp(x))
    is exact. Each branch only sees inputs where it is safe, so neither can put a NaN in the gradient.
    x is capped at -eps (P <= 1 - eps): at P = 1 the odds are infinite and the loss would be too.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -math.log(2)
    near_branch = torch.log(-torch.expm1(torch.where(near_zero, x, -math.log(2))))
    far_branch = torch.log1p(-torch.exp(torch.where(near_zero, -math.log(2), x)))
    return torch.where(near_zero, near_branch, far_branch)


def log_odds_ratio(chosen_logps, rejected_logps):
    """eqs. 4-5 in log space: log odds(y_w|x) - log odds(y_l|x), with log odds = log P - log(1 - P). -> (B,)"""
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)      # never bf16/fp16
    chosen_logps, rejected_logps = chosen_logps.to(dtype), rejected_logps.to(dtype)
    return (chosen_logps - log1mexp(chosen_logps)) - (rejected_logps - log1mexp(rejected_logps))


def orpo_loss(chosen_logps, rejected_logps, chosen_nll, lam=0.1):
    """eqs. 6-7: loss = L_SFT + lam * L_OR, averaged over the B pairs of the batch. Returns (loss, metrics).

    chosen_logps, rejected_logps: (B,) average log-probs of the responses (eq. 3, see average_logps).
    chosen_nll: L_SFT, a scalar or (B,) per-example values that are averaged.
    lam = 0 gives plain SFT, the paper's baseline. To accumulate gradients over micro-batches exactly,
    weight each micro-batch's loss by its share of the pairs (and its NLL by its share of the tokens).

    metrics: detached 0-d tensors, with their names in TRL's ORPOTrainer (whose beta is our lam):
      nll             L_SFT                                     TRL "nll_loss"
      or_loss         mean of L_OR = -logsigmoid(log OR)         TRL "log_odds_ratio" is its negative
      log_odds        mean of log OR, eq. 5                      TRL "log_odds_chosen"
      chosen_logps    mean of log P(y_w|x), eq. 3                TRL "logps/chosen"
      rejected_logps  mean of log P(y_l|x)                       TRL "logps/rejected"
      reward_acc      fraction of pairs with log P(y_w|x) > log P(y_l|x)    TRL "rewards/accuracies"
      reward_margin   mean of log P(y_w|x) - log P(y_l|x)        TRL "rewards/margins" is beta times this
    """
    log_odds = log_odds_ratio(chosen_logps, rejected_logps)            # (B,)
    or_losses = -F.logsigmoid(log_odds)                                 # (B,) eq. 7, never log(sigmoid)
    nll = torch.as_tensor(chosen_nll, device=log_odds.device)
    nll = nll.to(torch.promote_types(nll.dtype, torch.float32)).mean()
    loss = nll + lam * or_losses.mean()                                 # eq. 6
    chosen, rejected = chosen_logps.detach().float(), rejected_logps.detach().float()
    metrics = {
        "nll": nll.detach(),
        "or_loss": or_losses.detach().mean(),
        "log_odds": log_odds.detach().mean(),
        "chosen_logps": chosen.mean(),
        "rejected_logps": rejected.mean(),
        "reward_acc": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
    }
    return loss, metrics
