"""orpo.py against the paper's equations, written out again here in float64 the plain way."""
import math

import pytest
import torch
import torch.nn.functional as F

from orpo import average_logps, log1mexp, log_odds_ratio, mean_logps, odds_ratio_loss, orpo_loss


def reference_loss(chosen_logps, rejected_logps, chosen_nll, lam):
    """eqs. 4-7 straight from the paper, in float64, for log-probs not too close to 0."""
    p_w, p_l = chosen_logps.double().exp(), rejected_logps.double().exp()
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)                       # eq. 4
    log_or = torch.log(odds_w / odds_l)                                     # eq. 5
    l_or = -torch.log(1 / (1 + torch.exp(-log_or)))                         # eq. 7
    return chosen_nll.double().mean() + lam * l_or.mean(), log_or         # eq. 6


def test_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(64, generator=g, dtype=torch.float64) * 5 - 0.01
    rejected = -torch.rand(64, generator=g, dtype=torch.float64) * 5 - 0.01
    nll = torch.rand(64, generator=g, dtype=torch.float64) * 3
    for lam in (0.0, 0.1, 1.0):
        loss, metrics = orpo_loss(chosen, rejected, nll, lam=lam)
        ref_loss, ref_log_or = reference_loss(chosen, rejected, nll, lam)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(metrics["log_odds"], ref_log_or.mean(), rtol=1e-6, atol=1e-9)
        # float32 inputs agree to float32 precision
        loss32, _ = orpo_loss(chosen.float(), rejected.float(), nll.float(), lam=lam)
        torch.testing.assert_close(loss32.double(), ref_loss, rtol=1e-5, atol=0)


def test_gradient_is_eqs_8_to_10():
    g = torch.Generator().manual_seed(1)
    chosen = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 - 0.05).requires_grad_()
    rejected = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 - 0.05).requires_grad_()
    l_or = -F.logsigmoid(log_odds_ratio(chosen, rejected))
    l_or.sum().backward()
    p_w, p_l = chosen.detach().exp(), rejected.detach().exp()
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
    delta = 1 / (1 + odds_w / odds_l)                                       # eq. 9
    # eq. 10: h = grad log P_w / (1 - P_w) - grad log P_l / (1 - P_l); L_OR descends along h
    torch.testing.assert_close(chosen.grad, -delta / (1 - p_w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rejected.grad, delta / (1 - p_l), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_loss_and_gradients_across_the_whole_range(dtype):
    edges = torch.tensor([0.0, -1e-12, -1e-6, -0.69, -50.0, -100.0])
    chosen = edges.repeat_interleave(len(edges)).to(dtype).requires_grad_()
    rejected = edges.repeat(len(edges)).to(dtype).requires_grad_()
    nll = (-chosen).float().mean()
    for lam in (0.0, 0.1, 1.0):
        chosen.grad = rejected.grad = None
        loss, metrics = orpo_loss(chosen, rejected, nll, lam=lam)
        loss.backward()
        assert torch.isfinite(loss), (dtype, lam)
        assert all(torch.isfinite(v) for v in metrics.values()), metrics
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # the odds term is computed in float32 or wider even for half-precision inputs
    assert log_odds_ratio(chosen, rejected).dtype == torch.float32


def test_log1mexp_is_accurate_where_the_naive_form_fails():
    x = torch.tensor([-1e-10, -1e-5, -0.5, -0.7, -1.0, -20.0, -100.0], dtype=torch.float64)
    # log(1 - e^x) = log(-expm1(x)) is exact in double for these x, except where e^x underflows against 1;
    # there log(1 - e^x) = -e^x - e^2x/2 - ... to double precision
    expected = [math.log(-math.expm1(v)) if v > -20 else -math.exp(v) - math.exp(2 * v) / 2 for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    x32 = torch.tensor([-1e-6, -1e-3, -0.69, -0.7, -30.0])
    torch.testing.assert_close(log1mexp(x32).double(), log1mexp(x32.double()), rtol=1e-6, atol=0)
    assert not torch.isfinite(torch.log(1 - torch.exp(torch.tensor(-1e-9))))  # the trap avoided
    # P = 1 exactly is capped just below 1 instead of giving infinite odds
    assert torch.isfinite(log1mexp(torch.tensor(0.0)))


def test_average_logps_equals_a_loop_over_sequences():
    g = torch.Generator().manual_seed(2)
    B, T, V = 5, 11, 23
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    starts = [0, 3, 7, 10, 1]                 # ragged prompts, ignored
    ends = [11, 9, 11, 11, 6]                 # ragged padding, ignored
    for b in range(B):
        labels[b, : starts[b]] = -100
        labels[b, ends[b]:] = -100
    got = average_logps(logits, labels)
    for b in range(B):
        logps = [torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
                 for t in range(1, T) if labels[b, t] != -100]
        assert abs(got[b].item() - (sum(logps) / len(logps)).item()) < 1e-5
    # log_softmax and the sum run in float32 whatever the logits' dtype
    got_bf16 = average_logps(logits.bfloat16(), labels)
    assert got_bf16.dtype == torch.float32
    torch.testing.assert_close(got_bf16, average_logps(logits.bfloat16().float(), labels))


def test_invariant_to_batch_order_and_lam_scales_only_the_or_term():
    g = torch.Generator().manual_seed(3)
    chosen, rejected = -torch.rand(32, generator=g) * 4, -torch.rand(32, generator=g) * 4
    nll = torch.rand(32, generator=g)
    perm = torch.randperm(32, generator=g)
    loss, m = orpo_loss(chosen, rejected, nll, lam=0.3)
    loss_perm, _ = orpo_loss(chosen[perm], rejected[perm], nll[perm], lam=0.3)
    torch.testing.assert_close(loss, loss_perm)
    loss0, m0 = orpo_loss(chosen, rejected, nll, lam=0.0)
    loss2, _ = orpo_loss(chosen, rejected, nll, lam=0.6)
    torch.testing.assert_close(loss0, nll.mean())                          # lam = 0 is plain SFT
    torch.testing.assert_close(loss - loss0, 0.3 * m["or_loss"])
    torch.testing.assert_close(loss2 - loss0, 0.6 * m["or_loss"])
    assert m0["or_loss"] == m["or_loss"]                                   # metrics do not depend on lam


def test_metrics():
    chosen = torch.tensor([-1.0, -2.0, -0.5])
    rejected = torch.tensor([-2.0, -1.0, -3.0])
    _, m = orpo_loss(chosen, rejected, torch.tensor(1.5), lam=0.1)
    assert m["reward_acc"].item() == pytest.approx(2 / 3)
    assert m["reward_margin"].item() == pytest.approx((1.0 - 1.0 + 2.5) / 3)
    assert m["chosen_logps"].item() == pytest.approx(-3.5 / 3)
    assert m["nll"].item() == pytest.approx(1.5)
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())


def test_lam_zero_never_leaks_nan_into_sft():
    chosen = torch.tensor([0.0, -1e-30], requires_grad=True)              # P = 1: infinite odds
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    nll = torch.tensor([0.3, 0.2], requires_grad=True)
    loss, _ = orpo_loss(chosen, rejected, nll, lam=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.25)
    assert torch.equal(nll.grad, torch.tensor([0.5, 0.5]))
    assert torch.equal(chosen.grad, torch.zeros(2)) and torch.equal(rejected.grad, torch.zeros(2))


def test_per_pair_terms_give_orpo_loss_and_mean_logps_any_order():
    """odds_ratio_loss's per-pair L_OR and metrics, averaged, are orpo_loss's; mean_logps (eq. 3 on a packed
    batch) is average_logps' per-row mean, whatever the order of the tokens."""
    g = torch.Generator().manual_seed(4)
    chosen, rejected = -torch.rand(8, generator=g) * 4, -torch.rand(8, generator=g) * 4
    or_losses, per_pair = odds_ratio_loss(chosen, rejected)
    loss, m = orpo_loss(chosen, rejected, torch.tensor(0.5), lam=0.2)
    torch.testing.assert_close(loss, 0.5 + 0.2 * or_losses.mean())
    for k, v in per_pair.items():
        assert v.shape == (8,) and not v.requires_grad
        torch.testing.assert_close(v.mean(), m[k])
    token_logps, seq = -torch.rand(30, generator=g), torch.randint(0, 3, (30,), generator=g)
    perm = torch.randperm(30, generator=g)
    expected = torch.stack([token_logps[seq == s].mean() for s in range(3)])
    torch.testing.assert_close(mean_logps(token_logps[perm], seq[perm], 3), expected)
    assert torch.isnan(mean_logps(token_logps, seq, 4)[3])                # a sequence without tokens


def test_log_odds_stay_exact_and_alive_as_p_nears_one():
    """log(1 - P) is not frozen near P = 1: at log P = -1e-9 the log odds equal the exact value (a cap at
    -eps gave 4.43 instead of 9.21) and still have the 1/(1 - P) gradient of eqs. 8-10."""
    for x in (-1e-9, -1e-20):
        chosen = torch.tensor([x], requires_grad=True)
        rejected = torch.tensor([-math.log(2)])                       # P = 1/2: log odds 0
        lo = log_odds_ratio(chosen, rejected)
        exact = x - math.log(-math.expm1(x))
        assert lo.item() == pytest.approx(exact, rel=1e-6)
        lo.backward()
        assert chosen.grad.item() == pytest.approx(1 + 1 / -math.expm1(x), rel=1e-4)
