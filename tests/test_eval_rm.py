"""eval_rm.py: the Bradley-Terry loss, reward read-out, win rates, report files and sharded evaluation.

Everything runs on tiny random models (2 layers, width 32) and data.py's synthetic pairs, on the CPU.
"""
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval_rm
import model as model_lib
from conftest import ROOT

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=128, head_dim=None, embed_dim=None)


def small_config(**overrides):
    return dataclasses.replace(model_lib.PRESETS["tiny"], **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic dataset, a random policy checkpoint and a reward model with a random (non-zero) head."""
    root = tmp_path_factory.mktemp("eval_rm")
    tok = data.synthetic_tokenizer()
    parquet = data.write_synthetic(root / "synthetic.parquet", 40, seed=3)
    torch.manual_seed(0)
    policy_dir = root / "policy"
    model_lib.Transformer(small_config()).save_pretrained(policy_dir)
    tok.save(policy_dir)
    rm = eval_rm.RewardModel(model_lib.Transformer(small_config()))
    torch.nn.init.normal_(rm.head.weight, std=1.0)    # a zero head would make every answer tie: tests could not fail
    rm_dir = root / "rm"
    eval_rm.save_reward_model(rm, rm_dir, tokenizer=tok, meta={"note": "random"})
    prompts, stats = eval_rm.load_prompts(parquet, tok, n_prompts=12)
    return {"root": root, "tok": tok, "parquet": parquet, "policy_dir": policy_dir, "rm_dir": rm_dir, "rm": rm.eval(),
            "prompts": prompts}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-32 models gain nothing from a second thread, and on a busy 2-core machine the two threads of each
    process fight everyone else's: one thread makes this file several times faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# eq. 11 and the read-out


def test_bradley_terry_loss_matches_hand_computation():
    chosen = torch.tensor([1.0, -0.5, 2.0, 30.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 2.0, -1000.0])
    loss, metrics = eval_rm.bradley_terry_loss(chosen, rejected)
    margins = [1.0, -1.0, 0.0, 1030.0]
    expected = sum(math.log(1 + math.exp(-m)) for m in margins) / 4          # -log sigmoid(m) = log(1 + e^-m)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    loss.backward()
    sigmoid = lambda m: 1 / (1 + math.exp(-m))
    assert chosen.grad.tolist() == pytest.approx([-(1 - sigmoid(m)) / 4 for m in margins], abs=1e-7)
    # a huge negative margin stays finite (log(sigmoid(-1000)) would be -inf)
    far, _ = eval_rm.bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0]))
    assert far.item() == pytest.approx(1000.0)


def test_rewards_are_the_same_in_every_packing(setup):
    """Shared-prompt packing, unshared packing, and one sequence at a time read the same last-token rewards."""
    tok, rm = setup["tok"], setup["rm"]
    pairs = list(data.build_pairs(setup["parquet"], tok)[:5])
    with torch.no_grad():
        shared = eval_rm.batch_rewards(rm, data.pack_pairs(pairs, shared_prompt=True), "cpu")
        unshared = eval_rm.batch_rewards(rm, data.pack_pairs(pairs, shared_prompt=False), "cpu")
    alone = eval_rm.score(rm, [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs] +
                          [list(p.prompt_ids) + list(p.rejected_ids) for p in pairs], max_tokens=1)
    for a, b in zip(shared, unshared):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(torch.cat(unshared).numpy(), alone, atol=1e-5, rtol=1e-5)
    assert np.std(alone) > 1e-3                  # the rewards really differ between sequences


def test_reward_model_save_load_roundtrip(setup, tmp_path):
    rm, _ = eval_rm.load_reward_model(setup["rm_dir"])
    seqs = [p["ids"] + [40, 41, setup["tok"].eos_id] for p in setup["prompts"][:4]]
    np.testing.assert_array_equal(eval_rm.score(rm, seqs), eval_rm.score(setup["rm"], seqs))
    with pytest.raises(eval_rm.EvalError, match="not a reward model directory"):
        eval_rm.load_reward_model(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Win rates


def test_win_rate_arithmetic():
    a = np.array([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])   # 2 rounds, 4 prompts
    b = np.array([[0.0, 2.0, 4.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(eval_rm.pairwise_win_rate(a, b), [(1 + 0.5 + 0 + 1) / 4, 0.0])
    correct = {"a": np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool), "b": np.array([[0, 0, 1, 1], [1, 0, 0, 0]], bool)}
    report = eval_rm.win_rates({"a": a, "b": b}, correct)
    assert report["rm"]["a"]["b"]["per_round"] == [0.625, 0.0]
    assert report["rm"]["a"]["b"]["std"] == pytest.approx(np.std([0.625, 0.0], ddof=1))
    assert report["rm"]["b"]["a"]["mean"] == pytest.approx(1 - report["rm"]["a"]["b"]["mean"])
    # oracle: round 0 a wins prompt 0, loses prompt 3, ties 1-2 -> 0.5; round 1 a wins prompt 1 -> 0.625
    assert report["oracle"]["a"]["b"]["per_round"] == [0.5, 0.625]
    # decided prompts: r0 p0 (a right, RM prefers a: agree), r0 p3 (b right, RM prefers a: disagree),
    # r1 p1 (a right, RM prefers b: disagree)
    assert report["agreement"]["a"]["b"] == {"rate": pytest.approx(1 / 3), "n_decided": 3}
    assert report["policies"]["a"]["oracle_accuracy"]["per_round"] == [0.5, 0.5]


def test_policy_against_itself(setup):
    """Two names for one checkpoint: sampled (temperature 1) answers differ, the win rate is 0.5 up to noise;
    greedy answers are identical and every comparison is an exact tie."""
    policies = {"a": str(setup["policy_dir"]), "b": str(setup["policy_dir"])}
    common = dict(tokenizer=setup["tok"], rounds=2, max_new_tokens=6, batch_size=12, oracle=data.oracle_correct)
    sampled = eval_rm.evaluate_policies(setup["rm"], policies, setup["prompts"] * 2, temperature=1.0, **common)
    ra, rb = np.array(sampled["rewards"]["a"]), np.array(sampled["rewards"]["b"])
    assert (ra != rb).mean() > 0.8                          # different samples, so the test can fail
    win = sampled["rm"]["a"]["b"]["mean"]
    assert abs(win - 0.5) < 0.25                            # 48 comparisons: std of the mean ~0.07
    assert win + sampled["rm"]["b"]["a"]["mean"] == pytest.approx(1.0)

    greedy = eval_rm.evaluate_policies(setup["rm"], policies, setup["prompts"][:6], temperature=0.0, **common)
    by_policy = {p: [s["answer_ids"] for s in greedy["samples"] if s["policy"] == p] for p in "ab"}
    assert by_policy["a"] == by_policy["b"]
    assert greedy["rm"]["a"]["b"]["per_round"] == [0.5, 0.5]
    assert greedy["oracle"]["a"]["b"]["per_round"] == [0.5, 0.5]


# ----------------------------------------------------------------------------------------------------------
# Training an RM on the synthetic data


def test_reward_model_learns_synthetic_preferences(tmp_path):
    """Trained on synthetic pairs, the RM ranks chosen above rejected on held-out pairs far above chance.

    150 steps of 32 pairs reach ~0.83 held-out accuracy (0.69 on prompts absent from the training split)."""
    torch.manual_seed(0)
    tok = data.synthetic_tokenizer()
    pairs = data.build_pairs(data.write_synthetic(tmp_path / "pairs.parquet", 1000, seed=0), tok)
    train, val = eval_rm.split_pairs(pairs, 0.2, seed=0)
    init = tmp_path / "init"
    model_lib.Transformer(small_config()).save_pretrained(init)
    rm, result = eval_rm.train_reward_model(train, init=str(init), val_pairs=val, out_dir=tmp_path / "rm",
                                            tokenizer=tok, steps=RM_STEPS, batch_size=32, lr=RM_LR, warmup=10)
    assert result["val_pairs"] == 200
    assert result["val_accuracy"] > RM_MIN_ACCURACY, result     # chance is 0.5; 200 pairs: std 0.035
    reloaded, meta = eval_rm.load_reward_model(tmp_path / "rm")
    assert meta["val_accuracy"] == result["val_accuracy"]
    assert eval_rm.reward_accuracy(reloaded, val) == result["val_accuracy"]


RM_STEPS, RM_LR, RM_MIN_ACCURACY = 150, 3e-3, 0.7


# ----------------------------------------------------------------------------------------------------------
# Report files and the command line


def test_report_files_exist_and_parse(setup, tmp_path):
    policies = {"orpo": str(setup["policy_dir"]), "other": str(setup["policy_dir"])}
    report = eval_rm.evaluate_policies(setup["rm"], policies, setup["prompts"][:6], tokenizer=setup["tok"], rounds=2,
                                       max_new_tokens=5, oracle=data.oracle_correct)
    paths = eval_rm.write_report(report, tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert set(summary["rm"]) == {"orpo", "other"} and "oracle" in summary and "agreement" in summary
    assert summary["settings"]["rounds"] == 2 and len(summary["rewards"]["orpo"]) == 2
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["policy", "vs orpo", "vs other"] and rows[1][0] == "orpo" and rows[1][1] == ""
    mean, std = (float(x) for x in rows[1][2].split(" ± "))
    assert mean == pytest.approx(summary["rm"]["orpo"]["other"]["mean"], abs=1e-4)
    assert list(csv.reader(paths["oracle_csv"].open()))[0] == rows[0]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(paths["png"]).ndim == 3
    samples = [json.loads(line) for line in paths["samples"].read_text().splitlines()]
    assert len(samples) == 2 * 2 * 6
    assert {"round", "policy", "prompt", "answer", "answer_ids", "reward", "oracle_correct"} <= set(samples[0])
    text = eval_rm.summary_text(report)
    assert "RM win rate" in text and "Oracle win rate" in text and "vs other" in text


@pytest.mark.parametrize("argv, message", [
    (["winrate", "--rm", "RM", "--policy", "orpo", "--out", "X"], "expected NAME=DIR"),
    (["winrate", "--rm", "RM", "--policy", "a=POLICY", "--out", "X"], "at least two policies"),
    (["winrate", "--rm", "RM", "--policy", "a=POLICY", "--policy", "b=/no/such/dir", "--out", "X"], "/no/such/dir"),
    (["winrate", "--rm", "/no/such/rm", "--policy", "a=POLICY", "--policy", "b=tiny", "--out", "X"], "not a reward model"),
    (["winrate", "--rm", "RM", "--policy", "a=POLICY", "--policy", "b=tiny", "--data", "/no/data.parquet", "--out", "X"],
     "no such file"),
    (["demo", "--root", "/no/such/out"], "run `python train.py` first"),
])
def test_cli_errors_are_one_line(setup, tmp_path, capsys, argv, message):
    argv = [{"RM": str(setup["rm_dir"]), "POLICY": str(setup["policy_dir"]), "X": str(tmp_path)}.get(a, a)
            .replace("POLICY", str(setup["policy_dir"])) for a in argv]
    assert eval_rm.main(argv + (["--device", "cpu"] if argv[0] != "demo" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_sharded_evaluation_matches_one_process(setup, tmp_path):
    """torchrun with 2 ranks samples and scores exactly what 1 process does with the same seeds."""
    args = ["winrate", "--rm", str(setup["rm_dir"]), "--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny",
            "--data", str(setup["parquet"]), "--n-prompts", "11", "--rounds", "2", "--batch-size", "4",
            "--max-new-tokens", "6", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "eval_rm.py")
    runs = {"one": [sys.executable, script], "two": [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", "--nproc_per_node", "2", script]}
    results = {}
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = subprocess.run(cmd + args + ["--out", str(out)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results[name] = ([json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()],
                         json.loads((out / "winrates.json").read_text()))
    (one, one_report), (two, two_report) = results["one"], results["two"]
    assert two_report["settings"]["world_size"] == 2 and one_report["settings"]["world_size"] == 1
    assert [s["answer_ids"] for s in one] == [s["answer_ids"] for s in two]
    assert [s["reward"] for s in one] == [s["reward"] for s in two]
    assert one_report["rm"] == two_report["rm"] and one_report["oracle"] == two_report["oracle"]
