"""Smoke test of experiments/paper_cpu.py (every stage at a toy size, so the script cannot rot), and unit tests of its
parts: the letter tasks and their oracle, the DPO and probability-ratio steps, the verdict logic.

The numbers of a toy run mean nothing (a few steps on a few dozen pairs); the test checks that every output is
written, parses, and is consistent with the run that wrote it (the verdicts are computed, not canned).
"""
import copy
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]

import dpo  # noqa: E402
import tasks  # noqa: E402


def load_script():
    # imported by name (experiments/ is on sys.path): the worker processes unpickle its functions by that name
    return importlib.import_module("paper_cpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    paper_cpu = load_script()
    out, work = tmp_path_factory.mktemp("paper_cpu_out"), tmp_path_factory.mktemp("paper_cpu_work")
    assert paper_cpu.main(["--size", "smoke", "--out", str(out), "--work", str(work)]) == 0
    return paper_cpu, out, work


def test_writes_every_output(smoke):
    paper_cpu, out, work = smoke
    for name in ("fig3_fig7_logps.png", "fig7_fig9_log_odds.png", "fig5_rewards.png", "fig6_log_pr_or.png",
                 "fig8_ratio.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name
    for run in ("base", *paper_cpu.run_specs()):
        assert (work / run / "final" / "config.json").is_file(), run
    import eval_rm
    eval_rm.load_reward_model(work / "rm")          # the RM through eval_rm's own loader, whatever its file layout


def test_results_json_is_consistent(smoke):
    paper_cpu, out, work = smoke
    res = json.loads((out / "results.json").read_text())
    s = paper_cpu.SIZES["smoke"]
    assert res["size"] == "smoke" and res["seed"] == paper_cpu.SEED
    runs = res["runs"]
    assert set(runs) == set(paper_cpu.run_specs())
    # every run from the base starts at the base's held-out numbers, and its first step sees the same batch with the
    # same weights: the same step-1 log-probs, whatever the loss. SFT + DPO starts where SFT ended.
    first = {n: next(json.loads(line) for line in (work / n / "metrics.jsonl").read_text().splitlines()
                     if not json.loads(line).get("eval")) for n in runs}
    for n, r in runs.items():
        if r["init"] == "base":
            assert r["start"] == runs["sft"]["start"]
            assert first[n]["chosen_logps"] == pytest.approx(first["sft"]["chosen_logps"], abs=1e-5)
            assert first[n]["rejected_logps"] == pytest.approx(first["sft"]["rejected_logps"], abs=1e-5)
        assert r["end"]["step"] == s.steps
    dpo_start = {k: v for k, v in runs["sft_dpo"]["start"].items() if k.endswith("logps")}
    assert dpo_start == pytest.approx({k: runs["sft"]["end"][k] for k in dpo_start}, abs=1e-5)
    # win rates of each ORPO run over SFT and SFT + DPO, by both judges, with a bootstrap standard error
    assert set(res["win"]) == {f"orpo_{lam}" for lam in paper_cpu.LAMBDAS}
    for w in res["win"].values():
        for opp in ("sft", "sft_dpo"):
            for judge in ("oracle", "rm"):
                b = w[opp][judge]
                assert 0.0 <= b["ci95"][0] <= b["mean"] <= b["ci95"][1] <= 1.0 and b["se"] >= 0
                assert len(w[opp][f"{judge}_rounds"]["per_round"]) == s.rounds
    for p in res["policies"].values():
        assert 0.0 <= p["oracle_accuracy"]["mean"] <= 1.0
    for v in res["diversity"]["table"].values():
        assert -1.0 <= v["per_input"] <= 1.0 and -1.0 <= v["across_input"] <= 1.0
    assert res["eval_letters_seen_in_training"] == 0
    assert res["efficiency"]["rows"]["orpo"]["forwards"] == 1 and res["efficiency"]["rows"]["dpo"]["forwards"] == 2


def test_verdicts_follow_the_numbers(smoke):
    paper_cpu, out, _ = smoke
    res = json.loads((out / "results.json").read_text())
    again = paper_cpu.judge_claims(res)
    assert [c["verdict"] for c in again] == [c["verdict"] for c in res["claims"]]
    fig3 = next(c for c in res["claims"] if c["claim"] == "Fig. 3")
    sft = res["runs"]["sft"]
    rose = sft["end"]["rejected_logps"] > sft["start"]["rejected_logps"] and \
        sft["end"]["chosen_logps"] > sft["start"]["chosen_logps"]
    assert fig3["verdict"] == ("reproduced" if rose else "NOT reproduced")
    md = (out / "results.md").read_text()
    assert paper_cpu.main(["--report-only", "--out", str(out)]) == 0      # recomputes the same report
    assert (out / "results.md").read_text() == md
    assert "PPO" in md and "| policy |" in md
    names = {c["claim"].split(" (")[0] for c in res["claims"]}
    assert names == {"Task", "Fig. 3", "Fig. 7", "Fig. 9", "Tables 2-3", "Fig. 6", "Fig. 8", "Table 4", "Section 7.3"}
    for c in res["claims"]:
        assert f"**{c['claim']}**" in md and f"**{c['verdict']}**" in md


def test_judge_claims_flips_with_the_numbers(smoke):
    """The verdict logic on hand-made numbers: the same code says 'NOT reproduced' when the numbers say so."""
    paper_cpu, out, _ = smoke
    res = json.loads((out / "results.json").read_text())
    good = copy.deepcopy(res)
    m = lambda c, r, o: {"chosen_logps": c, "rejected_logps": r, "log_odds": o}
    good["policies"]["sft"]["oracle_accuracy"]["mean"] = 0.6
    for n, r in good["runs"].items():
        r["start"] = m(-3.0, -3.0, 0.0)
    good["runs"]["sft"]["end"] = m(-1.0, -1.5, 0.5)
    for k, lam in enumerate(paper_cpu.LAMBDAS):
        good["runs"][f"orpo_{lam}"]["end"] = m(-1.0, -2.0 - k, 1.0 + k)
        for opp in ("sft", "sft_dpo"):
            for judge in ("oracle", "rm"):
                good["win"][f"orpo_{lam}"][opp][judge] = {"mean": 0.6, "se": 0.01, "ci95": [0.58, 0.62]}
        good["diversity"]["vs_dpo"][f"orpo_{lam}"] = {"per_input": {"mean": 0.1, "se": 0.01},
                                                      "across_input": {"mean": -0.1, "se": 0.01}}
    good["runs"][f"orpo_{paper_cpu.RATIO_LAMBDA}"]["curve_rejected"] = [-3.0, -2.0, -1.8]
    for b in paper_cpu.RATIO_BETAS:
        good["runs"][f"ratio_{b}"]["curve_rejected"] = [-3.0, -4.0, -5.0]
    good["fig6"] = {"n": 10, "std_log_pr": 1.4, "std_log_or": 2.6}
    good["efficiency"]["rows"] = {"orpo": {"forwards": 1, "median_step_s": 0.1, "median_cpu_s": 0.1,
                                           "peak_minus_base_mb": 10.0},
                                  "dpo": {"forwards": 2, "median_step_s": 0.15, "median_cpu_s": 0.13,
                                          "peak_minus_base_mb": 12.0}}
    verdicts = {c["claim"]: c["verdict"] for c in paper_cpu.judge_claims(good)}
    assert set(verdicts.values()) == {"met", "reproduced"}, verdicts
    bad = copy.deepcopy(good)
    bad["policies"]["sft"]["oracle_accuracy"]["mean"] = 0.29
    bad["runs"]["sft"]["end"] = m(-1.0, -3.5, 2.5)                   # SFT lowered rejected, out-margined ORPO
    bad["win"]["orpo_0.1"]["sft"]["rm"] = {"mean": 0.45, "se": 0.01, "ci95": [0.43, 0.47]}
    bad["win"]["orpo_0.5"]["sft"]["oracle"] = {"mean": 0.515, "se": 0.01, "ci95": [0.495, 0.535]}
    bad["fig6"]["std_log_or"] = 1.0
    bad["runs"]["ratio_0.2"]["curve_rejected"] = [-3.0, -1.0, -1.0]
    bad["diversity"]["vs_dpo"]["orpo_1.0"]["per_input"] = {"mean": -0.1, "se": 0.01}
    bad["efficiency"]["rows"]["dpo"]["peak_minus_base_mb"] = 9.0
    verdicts = {c["claim"]: c["verdict"] for c in paper_cpu.judge_claims(bad)}
    assert verdicts["Task"] == "NOT met" and verdicts["Fig. 3"] == "NOT reproduced"
    assert verdicts["Fig. 7 (λ = 0.1)"] == "partly reproduced" and verdicts["Fig. 9"] == "NOT reproduced"
    assert verdicts["Tables 2-3 (ORPO λ = 0.1 vs SFT)"] == "NOT reproduced"
    assert verdicts["Tables 2-3 (ORPO λ = 0.5 vs SFT)"] == "not reproduced (no significant difference)"
    assert verdicts["Tables 2-3 (ORPO λ = 1.0 vs SFT)"] == "reproduced"
    assert verdicts["Fig. 6"] == verdicts["Fig. 8 (β = 0.2)"] == verdicts["Section 7.3"] == "NOT reproduced"
    assert verdicts["Fig. 8 (β = 1.0)"] == "reproduced"
    assert verdicts["Table 4 (ORPO λ = 1.0 vs SFT + DPO)"] == "NOT reproduced"


def test_letter_tasks_oracle_and_split():
    rng = random.Random(0)
    for split in ("train", "eval"):
        for _ in range(300):
            prompt, good, bad = tasks.example(rng, split)
            assert tasks.oracle_correct(prompt, good) and not tasks.oracle_correct(prompt, " " + bad + "\n")
            assert tasks.letters_split(prompt.split(": ")[1]) == split and len(bad) == len(good)
    assert tasks.oracle_correct("Sort: dbca", "abcd") and tasks.oracle_correct("Reverse: abc", "cba")
    assert tasks.oracle_correct("Copy: abc", "abc") and not tasks.oracle_correct("Copy: abc", "abd")
    last = tasks.LETTERS[-1]
    assert tasks.oracle_correct(f"Next letters: ab{last}", "bc" + tasks.LETTERS[0])      # wraps around
    with pytest.raises(ValueError, match="not a letter-task prompt"):
        tasks.oracle_correct("What is 1 + 2?", "3")


def tiny_batch(n_pairs=4):
    import data
    tok = data.synthetic_tokenizer()
    rng = random.Random(1)
    rows = [tasks.example(rng, "train") for _ in range(n_pairs)]
    pairs = [data.TokenizedPair(*(torch.tensor(x).numpy() for x in
                                  (tok.encode(p), tok.encode(c)[1:] + [tok.eos_id], tok.encode(r)[1:] + [tok.eos_id])))
             for p, c, r in rows]
    return data.pack_pairs(pairs)


def test_dpo_step_starts_at_log2_and_trains_only_the_policy():
    import model as model_lib
    import train
    batch = tiny_batch()
    policy = model_lib.Transformer.from_pretrained("tiny", seed=0)
    reference = model_lib.Transformer.from_pretrained("tiny", seed=0).requires_grad_(False)
    sums, means, _ = dpo.sequence_logps(policy, batch)
    counts = torch.zeros(2 * batch.n_pairs).index_add(0, batch.tgt_seq[batch.tgt_response],
                                                       torch.ones(int(batch.tgt_response.sum())))
    assert torch.allclose(sums, means * counts, atol=1e-4)        # DPO sums what eq. 3 averages
    before = [p.clone() for p in reference.parameters()]
    optimizer = train.build_optimizer(policy, 1e-3, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    m = dpo.dpo_step(policy, reference, batch, 0.1, optimizer, scheduler)
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6) and m["dpo_margin"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, reference.parameters()))
    m2 = dpo.dpo_step(policy, reference, batch, 0.1, optimizer, scheduler)
    assert m2["loss"] < m["loss"]                                  # the policy moved, towards the chosen answers


def test_ratio_step_is_sft_plus_the_probability_ratio_term():
    import model as model_lib
    import train
    batch = tiny_batch()
    policy = model_lib.Transformer.from_pretrained("tiny", seed=0)
    P = batch.n_pairs
    with torch.no_grad():
        _, means, nll = dpo.sequence_logps(policy, batch)
    expected = float(nll + 0.5 * -torch.nn.functional.logsigmoid(0.2 * (means[:P] - means[P:])).mean())
    optimizer = train.build_optimizer(policy, 1e-3, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert dpo.ratio_step(policy, batch, 0.5, 0.2, optimizer, scheduler)["loss"] == pytest.approx(expected, rel=1e-5)
