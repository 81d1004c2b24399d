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
from collections import Counter

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
    rm = eval_rm.RewardModel(small_config())
    torch.nn.init.normal_(rm.score.weight, std=1.0)    # a zero head would make every answer tie: tests could not fail
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
    train, val = data.hold_out(pairs, 0.2, seed=0)
    init = tmp_path / "init"
    model_lib.Transformer(small_config()).save_pretrained(init)
    rm, result = eval_rm.train_reward_model(train, init=str(init), val_pairs=val, out_dir=tmp_path / "rm",
                                            tokenizer=tok, max_steps=RM_STEPS, batch_size=32, lr=RM_LR,
                                            warmup_steps=10)
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
     "--data: "),
    (["demo", "--root", "/no/such/out"], "run.json not found: run `python train.py --out /no/such/out` first"),
])
def test_cli_errors_are_one_line(setup, tmp_path, capsys, argv, message):
    argv = [{"RM": str(setup["rm_dir"]), "POLICY": str(setup["policy_dir"]), "X": str(tmp_path)}.get(a, a)
            .replace("POLICY", str(setup["policy_dir"])) for a in argv]
    assert eval_rm.main(argv + (["--device", "cpu"] if argv[0] != "demo" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_sharded_evaluation_matches_one_process(setup, tmp_path):
    """torchrun with 2 ranks samples and scores exactly what 1 process does with the same seeds; neither writes
    progress bars' carriage returns into a log."""
    args = ["winrate", "--rm", str(setup["rm_dir"]), "--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny",
            "--data", str(setup["parquet"]), "--n-prompts", "11", "--rounds", "2", "--batch-size", "4",
            "--max-new-tokens", "6", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "eval_rm.py")
    runs = {"one": [sys.executable, script], "two": [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", "--nproc_per_node", "2", script]}
    results = {}
    for name, cmd in runs.items():
        out, log = tmp_path / name, tmp_path / f"{name}.log"
        with open(log, "w") as stderr:               # a log file, not a terminal: no tqdm carriage returns
            proc = subprocess.run(cmd + args + ["--out", str(out)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + log.read_text()[-3000:]
        assert b"\r" not in log.read_bytes(), log.read_bytes()[-300:]        # (read_text turns \r into \n)
        results[name] = ([json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()],
                         json.loads((out / "winrates.json").read_text()))
    (one, one_report), (two, two_report) = results["one"], results["two"]
    assert two_report["settings"]["world_size"] == 2 and one_report["settings"]["world_size"] == 1
    assert [s["answer_ids"] for s in one] == [s["answer_ids"] for s in two]
    assert [s["reward"] for s in one] == [s["reward"] for s in two]
    assert one_report["rm"] == two_report["rm"] and one_report["oracle"] == two_report["oracle"]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: each model reads text with its own, never a silent synthetic fallback


def permuted_tokenizer(perm):
    """data.synthetic_tokenizer with every token id i renumbered perm[i]: the same text, another vocabulary."""
    spec = json.loads(data.synthetic_tokenizer().tokenizer.to_str())
    spec["model"]["vocab"] = {t: int(perm[i]) for t, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    for special in spec["post_processor"]["special_tokens"].values():
        special["ids"] = [int(perm[i]) for i in special["ids"]]
    from tokenizers import Tokenizer
    return data.Tok(Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                    unk_token="<unk>", chat_template=data.ZEPHYR_TEMPLATE, name="permuted")


def permuted_checkpoint(src_dir, out_dir, perm):
    """The model in src_dir with its (tied) embedding rows renumbered by perm, saved with permuted_tokenizer(perm):
    on text it computes exactly what the original computes, through other token ids."""
    model = model_lib.Transformer.from_pretrained(str(src_dir))
    with torch.no_grad():
        old = model.tok_embeddings.weight[:len(perm)].clone()
        model.tok_embeddings.weight[torch.as_tensor(perm)] = old
    model.save_pretrained(out_dir)
    permuted_tokenizer(perm).save(out_dir)
    return out_dir


PERM = np.random.default_rng(7).permutation(data.synthetic_tokenizer().vocab_size)


def fake_hub_cache(monkeypatch, root, kind, repo_id):
    """An offline Hugging Face cache holding one snapshot of repo_id (kind "model" or "dataset"), laid out as
    snapshot_download leaves it; returns the snapshot folder to fill."""
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    folder = root / f"{kind}s--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_permuted_tokenizer_is_another_vocabulary():
    """The helper behind the two tests below: same text, ids renumbered, so a test that mixes them up can fail."""
    tok, other = data.synthetic_tokenizer(), permuted_tokenizer(PERM)
    ids = tok.encode("<|user|>\nWhat is 3 + 4?</s>")
    assert other.encode("<|user|>\nWhat is 3 + 4?</s>") == [int(PERM[i]) for i in ids] != ids
    assert other.decode(other.encode("abc xyz"), skip_special_tokens=True) == "abc xyz" and other.eos_id == PERM[tok.eos_id]


def train_rm_argv(tmp_path, *extra):
    """A train-rm command line small enough for a test: tiny RM, 2 steps of 4 pairs."""
    return ["train-rm", "--out", str(tmp_path / "rm"), "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1",
            "--log-every", "1", "--device", "cpu", *extra]


def test_train_rm_takes_the_tokenizer_of_a_preset_checkpoint(setup, tmp_path, monkeypatch):
    """--init opt-350m resolves, as the model does, to the Hub repo facebook/opt-350m (here a fake offline cache
    holding a small model and a non-synthetic tokenizer); that tokenizer reads the data and is saved with the RM
    (it used to be data.py's 103-token synthetic one)."""
    snapshot = fake_hub_cache(monkeypatch, tmp_path / "hub", "model", "facebook/opt-350m")
    permuted_checkpoint(setup["policy_dir"], snapshot, PERM)
    assert eval_rm.main(train_rm_argv(tmp_path, "--init", "opt-350m", "--data", str(setup["parquet"]))) == 0
    saved = data.load_tokenizer(tmp_path / "rm")
    assert saved.encode("What is 3 + 4?") == permuted_tokenizer(PERM).encode("What is 3 + 4?")
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["tokenizer"] == str(snapshot)


def test_policies_read_prompts_with_their_own_tokenizer(setup, tmp_path):
    """Policy b is policy a with its vocabulary renumbered (model and tokenizer together): on text they are the
    same function, so greedy answers must be the same text and every comparison an exact tie. Feeding b the
    RM's token ids, as a single shared tokenizer would, makes b answer something else."""
    torch.manual_seed(1)
    a = model_lib.Transformer(small_config())
    for weight in (p for p in a.parameters() if p.dim() == 2):   # at the usual std 0.02, greedy answers are
        torch.nn.init.normal_(weight, std=0.2)                       # "\n\n\n..." whatever the prompt
    a.save_pretrained(tmp_path / "a")
    setup["tok"].save(tmp_path / "a")
    b_dir = permuted_checkpoint(tmp_path / "a", tmp_path / "b", PERM)
    policies = {"a": str(tmp_path / "a"), "b": str(b_dir)}
    report = eval_rm.evaluate_policies(setup["rm"], policies, setup["prompts"][:8], tokenizer=setup["tok"],
                                       rounds=1, temperature=0.0, max_new_tokens=8, oracle=data.oracle_correct)
    by_policy = {p: [s for s in report["samples"] if s["policy"] == p] for p in "ab"}
    assert [s["answer"] for s in by_policy["a"]] == [s["answer"] for s in by_policy["b"]]
    assert len({s["answer"] for s in by_policy["a"]}) > 2                # answers depend on the prompt
    assert [s["answer_ids"] for s in by_policy["a"]] != [s["answer_ids"] for s in by_policy["b"]]
    assert report["rm"]["a"]["b"]["per_round"] == [0.5]
    assert report["policies"]["b"]["tokenizer"] == str(b_dir)                # b's own, not the RM's


def test_real_tokenizer_and_eval_data_on_hh_rlhf(shared_data, tmp_path):
    """A real checkpoint (stories260K, Llama tokenizer of 512 pieces) reads real HH-RLHF pairs with its own
    tokenizer, and --eval-data measures the held-out accuracy on another file while all of --data trains."""
    import pyarrow.parquet as pq
    table = pq.read_table(shared_data / "hh-rlhf-harmless-test.parquet").slice(0, 90)
    pq.write_table(table.slice(0, 60), tmp_path / "hh_train.parquet")
    pq.write_table(table.slice(60, 30), tmp_path / "hh_val.parquet")
    stories = shared_data / "models" / "stories260K"
    argv = train_rm_argv(tmp_path, "--init", str(stories), "--data", str(tmp_path / "hh_train.parquet"),
                         "--eval-data", str(tmp_path / "hh_val.parquet"), "--max-length", "256",
                         "--max-prompt-length", "192", "--lr", "1e-4")
    assert eval_rm.main(argv) == 0
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    tok = data.load_tokenizer(stories)
    kw = dict(max_length=256, max_prompt_length=192)
    assert meta["train_pairs"] == len(data.build_pairs(tmp_path / "hh_train.parquet", tok, **kw))   # no slice held out
    assert meta["val_pairs"] == len(data.build_pairs(tmp_path / "hh_val.parquet", tok, **kw)) > 0
    assert meta["val_data"] == str(tmp_path / "hh_val.parquet")
    assert data.load_tokenizer(tmp_path / "rm").vocab_size == 512 == tok.vocab_size


def test_random_init_policy_cannot_borrow_a_larger_tokenizer(setup, shared_data, tmp_path, capsys, no_model_loads):
    """--tokenizer llama2 for the RM: a random-init tiny policy (512 ids) cannot read its 32000 pieces. (The RM
    reads them: a 128-id RM is refused the same way, and first.)"""
    eval_rm.save_reward_model(eval_rm.RewardModel(small_config(vocab_size=32000)), tmp_path / "rm")
    argv = ["winrate", "--rm", str(tmp_path / "rm"), "--tokenizer", str(shared_data / "tokenizers" / "llama2"),
            "--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny", "--out", str(tmp_path), "--device", "cpu"]
    assert eval_rm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --policy b=tiny: its 512-token vocabulary") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# --data forms, --eval-data, and bad options caught before any model is loaded


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model is built or loaded: option errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was reported")
    for name in ("build_reward_model", "load_reward_model"):
        monkeypatch.setattr(eval_rm, name, refuse)
    monkeypatch.setattr(model_lib.Transformer, "from_pretrained", refuse)


def test_data_accepts_a_glob_and_a_hub_dataset_id(setup, tmp_path, monkeypatch):
    """train-rm --data takes a glob; winrate --data a Hub dataset id with --split (a fake offline cache here).
    Both used to fail with "no such file or directory"."""
    for part, seed in (("a", 5), ("b", 6)):
        data.write_synthetic(tmp_path / f"pairs_{part}.parquet", 20, seed=seed, split="train")
    glob = str(tmp_path / "pairs_*.parquet")
    assert eval_rm.main(train_rm_argv(tmp_path, "--data", glob, "--tokenizer", "synthetic")) == 0
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["data"] == glob and meta["train_pairs"] + meta["val_pairs"] == 40

    snapshot = fake_hub_cache(monkeypatch, tmp_path / "hub", "dataset", "someone/pairs")
    (snapshot / "data").mkdir()
    data.write_synthetic(snapshot / "data" / "test-00000-of-00001.parquet", 10, seed=8, split="eval")
    data.write_synthetic(snapshot / "data" / "train-00000-of-00001.parquet", 10, seed=9, split="train")
    out = tmp_path / "winrate"
    argv = ["winrate", "--rm", str(setup["rm_dir"]), "--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny",
            "--data", "someone/pairs", "--split", "test", "--n-prompts", "3", "--rounds", "1",
            "--max-new-tokens", "2", "--out", str(out), "--device", "cpu"]
    assert eval_rm.main(argv) == 0
    prompts = {json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()}
    test_prompts = {p["text"] for p in eval_rm.load_prompts(snapshot / "data" / "test-00000-of-00001.parquet",
                                                            setup["tok"], n_prompts=3)[0]}
    assert prompts == test_prompts


def test_eval_data_replaces_the_eval_fraction_slice(tmp_path):
    """--eval-data: every --data pair trains, the held-out accuracy is measured on --eval-data's pairs."""
    val = data.write_synthetic(tmp_path / "val.parquet", 24, seed=1, split="eval")
    train = data.write_synthetic(tmp_path / "train.parquet", 30, seed=0, split="train")
    argv = train_rm_argv(tmp_path, "--data", str(train), "--tokenizer", "synthetic", "--eval-data", str(val),
                         "--eval-fraction", "0.5")
    assert eval_rm.main(argv) == 0
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["train_pairs"] == 30 and meta["val_pairs"] == 24 and meta["val_data"] == str(val)
    # synthetic held-out pairs are their own set (seed 1, split "eval"), not the training pairs again
    eval_rm.check_args(eval_rm.build_parser().parse_args(["train-rm", "--out", "x", "--eval-data", "synthetic"]))


@pytest.mark.parametrize("argv, message", [
    (["train-rm", "--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["train-rm", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["train-rm", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train-rm", "--lr", "0"], "--lr must be positive"),
    (["train-rm", "--lr", "nan"], "--lr must be positive, got nan"),
    (["train-rm", "--eval-fraction", "1"], "--eval-fraction must be in [0, 1)"),
    (["train-rm", "--eval-fraction", "-0.1"], "--eval-fraction must be in [0, 1)"),
    (["train-rm", "--eval-split", "test"], "--eval-split test: the synthetic pairs have no splits"),
    (["train-rm", "--data", "PARQUET", "--eval-data", "PARQUET"], "is the training data itself"),
    (["train-rm", "--data", "PARQUET", "--eval-split", "test", "--split", "test"], "is the training data itself"),
    (["train-rm", "--max-prompt-length", "2048"], "need 0 < max_prompt_length (2048) <= max_length (1024)"),
    (["train-rm", "--template", "/no/such.jinja"], "--template: "),
    (["train-rm", "--data", "PARQUET"], "--init tiny is a random-init preset with no tokenizer"),
    (["train-rm", "--data", "/no/such.parquet", "--tokenizer", "synthetic"], "train data: "),
    (["train-rm", "--init", "/no/such/dir"], "--init /no/such/dir: "),
    (["winrate", "--top-p", "0"], "--temperature/--top-p: sampling needs 0 < top_p <= 1 and temperature >= 0, "
                                  "got top_p=0.0"),
    (["winrate", "--top-p", "1.5"], "sampling needs 0 < top_p <= 1 and temperature >= 0, got top_p=1.5"),
    (["winrate", "--temperature", "-1"], "sampling needs 0 < top_p <= 1 and temperature >= 0, got top_p=1.0, "
                                         "temperature=-1.0"),
    (["winrate", "--n-prompts", "0"], "--n-prompts must be at least 1"),
    (["winrate", "--rounds", "0"], "--rounds must be at least 1"),
    (["winrate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["winrate", "--policy", "a=tiny"], "is given twice"),
    (["winrate", "--rm", "BARE_RM"], "(train-rm saves the one the RM was trained with)"),
    (["winrate", "--policy", "c=BARE_POLICY"], "how this model reads text is unknown"),
])
def test_bad_options_fail_in_one_line_before_loading(setup, tmp_path, capsys, no_model_loads, argv, message):
    bare_rm, bare_policy = tmp_path / "bare_rm", tmp_path / "bare_policy"
    eval_rm.save_reward_model(setup["rm"], bare_rm)                       # no tokenizer saved
    model_lib.Transformer(small_config()).save_pretrained(bare_policy)
    subs = {"PARQUET": str(setup["parquet"]), "BARE_RM": str(bare_rm), "BARE_POLICY": str(bare_policy)}
    argv = [subs.get(a, a.replace("BARE_POLICY", str(bare_policy))) for a in argv]
    if argv[0] == "train-rm":
        argv += ["--out", str(tmp_path / "rm")]
    else:
        rm = [] if "--rm" in argv else ["--rm", str(setup["rm_dir"])]
        argv += rm + ["--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny", "--out", str(tmp_path / "wr")]
    assert eval_rm.main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_load_prompts_reads_on_past_unusable_rows(tmp_path):
    """n_prompts counts usable prompts, not rows: skipped rows are counted, and the log line says why."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [("x" * 300, "a", "b")] * 3 + [(f"What is {i} + 1?", "a", "b") for i in range(5)]
    pq.write_table(pa.table({k: [r[j] for r in rows] for j, k in enumerate(("prompt", "chosen", "rejected"))}),
                   tmp_path / "p.parquet")
    prompts, stats = eval_rm.load_prompts(tmp_path / "p.parquet", data.synthetic_tokenizer(), n_prompts=4,
                                          max_prompt_length=100)
    assert [p["text"] for p in prompts] == [f"What is {i} + 1?" for i in range(4)]
    assert stats["rows"] == 7 and stats["dropped/prompt_too_long"] == 3
    lines = []
    eval_rm.load_prompts(tmp_path / "p.parquet", data.synthetic_tokenizer(), n_prompts=4, max_prompt_length=100,
                         log=lines.append)
    assert "4 usable from the first 7 rows" in lines[0] and "3 skipped: prompt_too_long 3" in lines[0]


def test_eval_split_alone_is_another_split_of_data(tmp_path, monkeypatch):
    """--eval-split without --eval-data holds out another split of --data, as train.py reads it."""
    snapshot = fake_hub_cache(monkeypatch, tmp_path / "hub", "dataset", "someone/pairs")
    (snapshot / "data").mkdir()
    data.write_synthetic(snapshot / "data" / "train-00000-of-00001.parquet", 20, seed=9, split="train")
    data.write_synthetic(snapshot / "data" / "test-00000-of-00001.parquet", 8, seed=8, split="eval")
    argv = train_rm_argv(tmp_path, "--data", "someone/pairs", "--split", "train", "--eval-split", "test",
                         "--tokenizer", "synthetic")
    assert eval_rm.main(argv) == 0
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["train_pairs"] == 20 and meta["val_pairs"] == 8 and meta["val_data"] == "someone/pairs"


# ----------------------------------------------------------------------------------------------------------
# The demo: any train.py run, from the OUT/run.json it wrote (written by hand here, as the contract says)


def fake_run(root, **run):
    """An OUT of train.py: synthetic train/eval files, OUT/final (a small model with the synthetic tokenizer) and
    OUT/run.json with the contract's fields (defaults: the default run's)."""
    train = data.write_synthetic(root / "data" / "train.parquet", 40, seed=0, split="train")
    held_out = data.write_synthetic(root / "data" / "eval.parquet", 5, seed=1, split="eval")
    model_lib.Transformer(small_config()).save_pretrained(root / "final")
    data.synthetic_tokenizer().save(root / "final")
    run = {"model": "tiny", "seed": 42, "tokenizer": "synthetic", "template": "auto", "train_data": str(train),
           "train_split": None, "eval_data": str(held_out), "eval_split": None, "max_length": 2048,
           "max_prompt_length": 1024, "args": {}, **run}
    (root / "run.json").write_text(json.dumps(run))
    return run


@pytest.fixture
def quick_rm(monkeypatch):
    """The demo trains its RM for the default 300 steps: 2 here."""
    real = eval_rm.train_reward_model
    monkeypatch.setattr(eval_rm, "train_reward_model", lambda *a, **kw: real(*a, **{**kw, "max_steps": 2}))


def test_demo_runs_from_run_json(tmp_path, capsys, quick_rm):
    """A weightless preset with another seed: train-rm and winrate from run.json, base re-created from that seed."""
    run = fake_run(tmp_path, seed=7)
    assert eval_rm.main(["demo", "--root", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    commands = [line[len("$ python eval_rm.py "):] for line in out.splitlines() if line.startswith("$ python eval_rm.py")]
    assert len(commands) == 2
    for flags in (["--init", "tiny"], ["--init-seed", "7"], ["--data", run["train_data"]], ["--tokenizer", "synthetic"]):
        assert " ".join(flags) in commands[0], (flags, commands[0])
    for flags in (["--policy", f"base=tiny"], ["--init-seed", "7"], ["--data", run["eval_data"]],
                  ["--max-new-tokens", "32"], ["--policy", f"orpo={tmp_path / 'final'}"]):
        assert " ".join(flags) in commands[1], (flags, commands[1])
    report = json.loads((tmp_path / "winrate" / "winrates.json").read_text())
    architectures = json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"]
    assert report["settings"]["n_prompts"] == 5 and "oracle" in report and architectures == ["LlamaForSequenceClassification"]
    # the second time the RM is reused
    assert eval_rm.main(["demo", "--root", str(tmp_path), "--device", "cpu"]) == 0
    assert "using the reward model in" in capsys.readouterr().out


def test_demo_of_a_checkpoint_run_without_held_out_pairs(tmp_path, capsys, quick_rm):
    """A base checkpoint saved without a tokenizer, read through --tokenizer synthetic, no held-out pairs: the RM
    gets that tokenizer, the base policy reads with it (--policy-tokenizer), the prompts come from the training
    data (and a note says so)."""
    base = model_lib.Transformer(small_config()).save_pretrained(tmp_path / "base")
    run = fake_run(tmp_path / "out", model=str(base), eval_data=None)
    assert eval_rm.main(["demo", "--root", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"--init {base} " in out and f"--policy-tokenizer base=synthetic" in out and "--init-seed" not in out
    assert "the win-rate prompts come from its training data" in out
    samples = [json.loads(line) for line in (tmp_path / "out" / "winrate" / "samples.jsonl").read_text().splitlines()]
    train_prompts = {p["text"] for p in eval_rm.load_prompts(run["train_data"], data.synthetic_tokenizer())[0]}
    assert {s["prompt"] for s in samples} <= train_prompts


def test_a_user_error_prints_once_under_torchrun(setup, tmp_path):
    """Every rank finds the same bad input; only rank 0 says so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "eval_rm.py"), "winrate", "--rm", str(tmp_path / "no_rm"), "--policy", "a=tiny",
           "--policy", "b=tiny", "--out", str(tmp_path / "wr"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("is not a reward model directory") == 1, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# The reward model in transformers' format (AutoModelForSequenceClassification), and its old layout

BASE_HF = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
FAMILY_CONFIGS = {   # every family, with what sets it apart: GQA, a window shorter than the test's texts, OPT's
    "llama": dict(model_type="llama", **BASE_HF, intermediate_size=48, num_key_value_heads=2),   # projections,
    "mistral": dict(model_type="mistral", **BASE_HF, intermediate_size=48, num_key_value_heads=2, sliding_window=4),
    "opt": dict(model_type="opt", **BASE_HF, ffn_dim=40, word_embed_proj_dim=24, do_layer_norm_before=False),
    "phi": dict(model_type="phi", **BASE_HF, intermediate_size=40, partial_rotary_factor=0.5),   # untied + bias
}


def random_checkpoint(config, out_dir, seed=0):
    """A model of `config` with every weight random (std 0.2: far from uniform attention), saved to out_dir."""
    torch.manual_seed(seed)
    model = model_lib.Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model.save_pretrained(out_dir)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_reward_model_loads_in_transformers_with_the_same_scores(family, tmp_path):
    """train-rm's output is what TRL's RewardTrainer writes: AutoModelForSequenceClassification loads it with no
    missing or unexpected key and gives eval_rm's rewards, one sequence at a time and right-padded in a batch
    (it reads the rightmost token that is not pad_token_id). A classifier saved by transformers loads here too."""
    transformers = pytest.importorskip("transformers")
    init = random_checkpoint(model_lib.config_from_hf(FAMILY_CONFIGS[family]), tmp_path / "init")
    rm = eval_rm.build_reward_model(init)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    eval_rm.save_reward_model(rm, tmp_path / "rm", tokenizer=data.synthetic_tokenizer())
    hf_config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf_config["architectures"] == [{"llama": "Llama", "mistral": "Mistral", "opt": "OPT", "phi": "Phi"}[family]
                                          + "ForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "LABEL_0"} and hf_config["pad_token_id"] == data.synthetic_tokenizer().pad_id
    assert not (tmp_path / "rm" / "reward_head").exists()
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm",
                                                                                output_loading_info=True)
    assert hf.config.num_labels == 1 and not any(info.values()), info        # nothing missing, unexpected, resized
    seqs = [[1] + list(range(10 + k, 10 + k + n)) + [2] for k, n in enumerate((9, 3, 14))]   # lengths 11, 5, 16
    ours = eval_rm.score(eval_rm.load_reward_model(tmp_path / "rm")[0], seqs)
    np.testing.assert_allclose(ours, eval_rm.score(rm.eval(), seqs), atol=1e-6)
    pad, T = hf.config.pad_token_id, max(map(len, seqs))
    batch = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        batched = hf(batch, attention_mask=(torch.arange(T) < torch.tensor([[len(s)] for s in seqs])).long()).logits
        alone = [hf(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    np.testing.assert_allclose(batched[:, 0].numpy(), ours, atol=1e-4)
    np.testing.assert_allclose(alone, ours, atol=1e-4)
    assert np.std(ours) > 1e-2                                              # the rewards really differ
    hf.save_pretrained(tmp_path / "hf_saved")                     # the other direction: a classifier from elsewhere
    (tmp_path / "hf_saved" / eval_rm.META_FILE).write_text("{}")             # (train-rm's marker of an RM directory)
    np.testing.assert_allclose(eval_rm.score(eval_rm.load_reward_model(tmp_path / "hf_saved")[0], seqs), ours,
                               atol=1e-5)


def test_pad_token_is_never_eos(setup, tmp_path):
    """transformers pools the rightmost token that is not pad: with pad = EOS it would skip the EOS every sequence
    ends with. A tokenizer without a pad (Llama-2, GPT-2) gets id 0, written into the saved tokenizer too."""
    tok = data.synthetic_tokenizer()
    for pad_token, expected in ((tok.pad_token, tok.pad_id), (None, 0), (tok.eos_token, 0)):
        eval_rm.save_reward_model(setup["rm"], tmp_path, tokenizer=dataclasses.replace(tok, pad_token=pad_token))
        assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == expected != tok.eos_id
        assert data.load_tokenizer(tmp_path).pad_id == expected


def test_old_layout_and_garbled_files_are_one_line_errors(setup, tmp_path, capsys):
    """An RM saved before the head moved into the safetensors (reward_head/) is refused, telling to retrain; a
    garbled reward_model.json or config.json is an error naming the file."""
    old = tmp_path / "old"
    model_lib.Transformer(small_config()).save_pretrained(old)
    (old / "reward_head").mkdir()
    (old / "reward_head" / "head.safetensors").write_bytes(b"")
    (old / "reward_model.json").write_text('{"kind": "orpo-reward-model"}')
    garbled = tmp_path / "garbled"
    eval_rm.save_reward_model(setup["rm"], garbled, tokenizer=setup["tok"])
    (garbled / "reward_model.json").write_text('{"kind": "orpo-rew')
    bad_config = tmp_path / "bad_config"
    eval_rm.save_reward_model(setup["rm"], bad_config, tokenizer=setup["tok"])
    (bad_config / "config.json").write_text("{")
    for rm_dir, message in ((old, "old layout"), (garbled, f"{garbled / 'reward_model.json'}"),
                            (bad_config, f"{bad_config / 'config.json'}")):
        with pytest.raises(ValueError, match="retrain" if rm_dir is old else "cannot read"):   # (CheckpointError too)
            eval_rm.load_reward_model(rm_dir)
        argv = ["winrate", "--rm", str(rm_dir), "--policy", f"a={setup['policy_dir']}", "--policy", "b=tiny",
                "--out", str(tmp_path / "wr"), "--device", "cpu"]
        assert eval_rm.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_train_rm_max_prompt_length_follows_max_length():
    """--max-length 512 alone works (the prompt limit is min(1024, --max-length) unless given), as in train.py."""
    parse = lambda *argv: eval_rm.check_args(eval_rm.build_parser().parse_args(list(argv)))
    assert parse("train-rm", "--out", "x", "--max-length", "512").max_prompt_length == 512
    assert parse("train-rm", "--out", "x").max_prompt_length == 1024
    assert parse("winrate", "--out", "x", "--rm", "r", "--policy", "a=tiny", "--policy", "b=tiny")\
        .max_prompt_length == 1024


# ----------------------------------------------------------------------------------------------------------
# rewards.png, vocabularies, and answers scored on the tokens the RM was trained on


def test_rewards_png_is_a_figure_for_a_report(tmp_path):
    """One panel per policy, each mean a labelled line, and a title with the first policy's win rate ± std over
    each other one, the number of prompts and rounds and the RM's held-out accuracy."""
    rewards = {"orpo": np.array([[0.5, 1.0, 2.0], [0.0, 1.5, 1.0]]), "base": np.zeros((2, 3)),
               "sft": np.ones((2, 3))}
    report = eval_rm.win_rates(rewards)
    report.update(settings={"n_prompts": 3, "rounds": 2}, reward_model={"val_accuracy": 0.8625})
    title = eval_rm.figure_title(report)
    wins = report["rm"]["orpo"]
    for text in (f"{wins['base']['mean']:.3f} ± {wins['base']['std']:.3f}", f"{wins['sft']['mean']:.3f} ± "
                 f"{wins['sft']['std']:.3f}", "3 prompts", "2 rounds", "0.863"):
        assert text in title, (text, title)
    assert "accuracy unknown" in eval_rm.figure_title({**report, "reward_model": {}})
    fig = eval_rm.plot_reward_distributions(rewards, tmp_path / "rewards.png", title=title)
    assert (tmp_path / "rewards.png").read_bytes()[:4] == b"\x89PNG" and fig._suptitle.get_text() == title
    assert len(fig.axes) == 3
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert "orpo mean +1.000" in labels and "base mean +0.000" in labels and "sft mean +1.000" in labels


def test_a_policy_tokenizer_larger_than_its_embedding_is_refused(setup, tmp_path, capsys, no_model_loads):
    """A policy whose own tokenizer (or --policy-tokenizer) has more ids than its embedding table: one line up
    front, from the policy's config.json alone (it used to be an IndexError inside generate())."""
    small = small_config(vocab_size=64)                                   # the synthetic tokenizer has 103 ids
    own = model_lib.Transformer(small).save_pretrained(tmp_path / "own")
    setup["tok"].save(own)
    bare = model_lib.Transformer(small).save_pretrained(tmp_path / "bare")
    for policy, extra in ((own, []), (bare, ["--policy-tokenizer", "a=synthetic"])):
        argv = ["winrate", "--rm", str(setup["rm_dir"]), "--policy", f"a={policy}", "--policy", "b=tiny", *extra,
                "--out", str(tmp_path / "wr"), "--device", "cpu"]
        assert eval_rm.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --policy a={policy}: its 64-token vocabulary cannot read tokenizer") \
            and "(103 tokens)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("tokenizer", ["llama2", "mistral", "gpt2", "opt"])
@pytest.mark.parametrize("source, template", [("hh-rlhf-harmless-test.parquet", "auto"),       # raw HH-RLHF text
                                              ("llamafactory-dpo-en-demo.parquet", "zephyr")])  # ShareGPT, templated
def test_a_training_pair_fed_back_is_scored_on_its_training_tokens(shared_data, tmp_path, tokenizer, source,
                                                                   template):
    """A pair's chosen response, fed back as a policy's sample, is scored on exactly the tokens the RM trained on.
    Decoded alone, a SentencePiece answer (Llama-2, Mistral) lost its leading space: "Assistant:No," scored where
    "Assistant: No," (▁No) was trained."""
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(shared_data / source).slice(0, 40), tmp_path / "rows.parquet")
    tok = data.load_tokenizer(shared_data / "tokenizers" / tokenizer)
    big = dict(max_length=10**6, max_prompt_length=10**6)
    pairs = {tuple(p.prompt_ids): p for p in data.build_pairs(tmp_path / "rows.parquet", tok, template=template, **big)}
    prompts, _ = eval_rm.load_prompts(tmp_path / "rows.parquet", tok, template=template,
                                      max_prompt_length=10**6)
    fed_back = [(i, pairs[tuple(p["ids"])]) for i, p in enumerate(prompts) if tuple(p["ids"]) in pairs]
    assert len(fed_back) >= 30                      # (a pair whose prompt merged into its answer has no such sample)
    answers = [(i, eval_rm.answer_text(tok, prompts[i]["ids"], [int(t) for t in pair.chosen_ids]))
               for i, pair in fed_back]
    sequences = eval_rm.scoring_sequences(tok, prompts, answers, Counter())
    expected = [[int(t) for t in pair.prompt_ids] + [int(t) for t in pair.chosen_ids] for _, pair in fed_back]
    assert sum(s == e for s, e in zip(sequences, expected)) == len(expected)
