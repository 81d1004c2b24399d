"""The steps train.py does not have, on the project's packed forward (model.packed_hidden + model.token_logps):

  dpo_step     SFT + DPO's second stage (Rafailov et al., 2023; the paper's Appendix C baseline):
               L_DPO = -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
               log pi the SUM of the response's token log-probs, ref a frozen copy of the SFT model (one more
               forward per step, no backward: section 7.3's cost).
  ratio_step   Appendix B's ablation: ORPO with the log odds ratio replaced by the log probability ratio,
               L = L_SFT + lambda * -log sigmoid(beta (log P(y_w|x) - log P(y_l|x))), P the eq. 3 averages.
  lm_step      next-token NLL on plain sequences: pretraining the shared base.

ORPO and SFT themselves are train.train_step (the same packed batches, the same optimizer and schedule), so every
run of the experiment differs only in its loss. Each step returns train_step's metric names (chosen_logps,
rejected_logps, log_odds: eq. 3 averages and eq. 5, whatever the loss), so the curves of all runs compare.
"""
import math

import torch
import torch.nn.functional as F

import orpo


def sequence_logps(model, batch):
    """One packed forward -> (sums (2P,), eq. 3 means (2P,), L_SFT: mean NLL of the chosen-side targets).
    Sequences 0..P-1 are the chosen answers, P..2P-1 the rejected ones (data.PackedBatch)."""
    P = batch.n_pairs
    hidden = model.packed_hidden(batch.input_ids, batch.position_ids, batch.seg_lens)     # (N, D)
    logps = model.token_logps(hidden, batch.tgt_index, batch.tgt_ids)                    # (M,) float32
    resp, seq = logps[batch.tgt_response], batch.tgt_seq[batch.tgt_response]
    sums = logps.new_zeros(2 * P).index_add(0, seq, resp)                                 # (2P,)
    return sums, orpo.mean_logps(resp, seq, 2 * P), -logps[batch.tgt_nll].mean()


def update(model, loss, optimizer, scheduler, grad_clip):
    """backward, clip, AdamW, schedule: train.train_step's update (a non-finite step is skipped there and here)."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(float(loss.detach())) and math.isfinite(float(norm)):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"grad_norm": float(norm), "lr": lr}


def metrics(means, P, **extra):
    """train_step's names: eq. 3 averages, eq. 5, pair accuracy, as means over the batch's pairs."""
    chosen, rejected = means[:P].detach(), means[P:].detach()
    return {"chosen_logps": float(chosen.mean()), "rejected_logps": float(rejected.mean()),
            "log_odds": float(orpo.log_odds_ratio(chosen, rejected).mean()),
            "reward_acc": float((chosen > rejected).float().mean()), **{k: float(v) for k, v in extra.items()}}


def dpo_step(policy, reference, batch, beta, optimizer, scheduler, grad_clip=1.0):
    """One DPO step: the policy's forward and backward, the frozen reference's forward (no graph)."""
    P = batch.n_pairs
    sums, means, nll = sequence_logps(policy, batch)
    with torch.no_grad():
        ref_sums, _, _ = sequence_logps(reference, batch)
    margin = beta * ((sums[:P] - ref_sums[:P]) - (sums[P:] - ref_sums[P:]))                # (P,)
    loss = -F.logsigmoid(margin).mean()
    m = metrics(means, P, loss=loss.detach(), nll=nll.detach(), dpo_margin=margin.detach().mean())
    return {**m, **update(policy, loss, optimizer, scheduler, grad_clip)}


def ratio_step(model, batch, lam, beta, optimizer, scheduler, grad_clip=1.0):
    """One step of L_SFT + lambda * L_PR (Appendix B), L_PR = -log sigmoid(beta (log P_w - log P_l))."""
    P = batch.n_pairs
    _, means, nll = sequence_logps(model, batch)
    pr_losses = -F.logsigmoid(beta * (means[:P] - means[P:]))                             # (P,)
    loss = nll + lam * pr_losses.mean()
    m = metrics(means, P, loss=loss.detach(), nll=nll.detach(), or_loss=pr_losses.detach().mean())
    return {**m, **update(model, loss, optimizer, scheduler, grad_clip)}


def pack_sequences(sequences):
    """Plain token sequences -> packed (input_ids (N,), position_ids (N,), seg_lens (S, 3), targets): each sequence
    its own segment, row t predicting token t + 1."""
    lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)                    # (S,)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)               # (N,)
    pos = torch.cat([torch.arange(n) for n in lens.tolist()])                              # (N,)
    seg_lens = torch.stack([lens, torch.zeros_like(lens), torch.zeros_like(lens)], 1)      # (S, 3)
    rows = torch.cat([start + torch.arange(n - 1) for start, n in zip((torch.cumsum(lens, 0) - lens).tolist(),
                                                                        lens.tolist())])   # (M,)
    return ids, pos, seg_lens, rows, ids[rows + 1]


def lm_step(model, sequences, optimizer, scheduler, grad_clip=1.0):
    """One next-token-prediction step on plain sequences (the base's pretraining)."""
    ids, pos, seg_lens, rows, targets = pack_sequences(sequences)
    hidden = model.packed_hidden(ids, pos, seg_lens)                                        # (N, D)
    loss = -model.token_logps(hidden, rows, targets).mean()
    return {"loss": float(loss.detach()), **update(model, loss, optimizer, scheduler, grad_clip)}
