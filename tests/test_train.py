"""Tests of train.py and dist.py: the ORPO step, gradient accumulation, FSDP2 over 2 ranks, resume, export.

Cheap unit tests check the step against an independent reference (per-sequence forwards, orpo.average_logps).
The end-to-end tests share ONE reference run (a small override of the tiny preset, 12 steps, grad_accum 2) that
the 2-rank torchrun run, the SIGKILL-and-resume run and the export test all compare against.
Every run is single-threaded (torch.set_num_threads(1) / OMP_NUM_THREADS=1), so that in-process and
subprocess runs use the same kernels and can be compared closely.
"""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import model as model_lib
import orpo
import train

ROOT = Path(__file__).resolve().parents[1]
# smaller than the tiny preset, so that every run here takes seconds
SMALL = {"n_layers": 2, "dim": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}
SMALL_JSON = json.dumps(SMALL)
STEPS = 12
# the reference run: 8 pairs per step as 2 micro-batches of 4 on one rank (== 2 ranks x 1 micro-batch of 4)
RUN_ARGS = ["--model-config", SMALL_JSON, "--synthetic-pairs", "200", "--batch-size", "8", "--max-steps", str(STEPS),
            "--save-every", "4", "--eval-every", "4", "--warmup-steps", "2", "--lr", "3e-3"]
# metrics that must agree between runs (time, throughput and memory may not)
COMPARED = ["loss", "nll", "or_loss", "log_odds", "chosen_logps", "rejected_logps", "reward_acc", "reward_margin",
            "lr", "grad_norm", "tokens"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_main(argv):
    """train.main in this process, single-threaded; returns its exit status."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(n)


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def read_metrics(out: Path, eval_records=False) -> list[dict]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in recs if bool(r.get("eval")) == eval_records]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert run_main(["--out", str(out), "--grad-accum", "2", *RUN_ARGS]) == 0
    return out


# -----------------------------------------------------------------------------
# the step, against an independent reference


def small_model(seed=0):
    torch.manual_seed(seed)
    return model_lib.Transformer(train.resolve_model("tiny", SMALL_JSON)[0])


def small_pairs(tmp_path, n):
    tok = data.synthetic_tokenizer()
    return data.build_pairs(data.write_synthetic(tmp_path / "pairs.parquet", n, seed=3), tok)


def reference_loss(model, pairs, lam, prompt_loss=True):
    """The ORPO loss of one big batch, written the plain way: each sequence through model.forward alone,
    eq. 3 from orpo.average_logps with HF-style labels, the NLL a token mean over all chosen targets."""
    chosen_logps, rejected_logps, nll_sum, n_nll = [], [], 0.0, 0
    for pr in pairs:
        p = torch.as_tensor(pr.prompt_ids, dtype=torch.long)
        for side, out in ((pr.chosen_ids, chosen_logps), (pr.rejected_ids, rejected_logps)):
            ids = torch.cat([p, torch.as_tensor(side, dtype=torch.long)])[None]       # (1, T)
            logits = model(ids)                                                       # (1, T, V)
            labels = ids.clone()
            labels[:, :len(p)] = -100
            out.append(orpo.average_logps(logits, labels)[0])
            if out is chosen_logps:
                nll_labels = ids.clone()
                if not prompt_loss:
                    nll_labels[:, :len(p)] = -100
                nll_sum = nll_sum + F.cross_entropy(logits[0, :-1], nll_labels[0, 1:], ignore_index=-100, reduction="sum")
                n_nll += int((nll_labels[0, 1:] != -100).sum())
    loss, _ = orpo.orpo_loss(torch.stack(chosen_logps), torch.stack(rejected_logps), nll_sum / n_nll, lam=lam)
    return loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lam,shared_prompt,prompt_loss", [(0.1, True, True), (0.1, False, False), (0.0, True, True)])
def test_accumulated_step_equals_one_big_batch_and_reference(tmp_path, one_thread, lam, shared_prompt, prompt_loss):
    """3 micro-batches of uneven size give the gradient of one big batch, which equals the gradient of the
    plainly written ORPO loss (per-sequence forwards). With lam = 0 that is the gradient of the NLL alone."""
    pairs = list(small_pairs(tmp_path, 10))
    model = small_model()
    cpu = torch.device("cpu")
    pack = lambda ps: data.pack_pairs(ps, shared_prompt=shared_prompt, prompt_loss=prompt_loss)

    sums = train.train_step(model, [pack(pairs[:2]), pack(pairs[2:7]), pack(pairs[7:])], lam, cpu, 1, nullcontext())
    accumulated = grads(model)
    model.zero_grad()
    big = train.train_step(model, [pack(pairs)], lam, cpu, 1, nullcontext())
    one_batch = grads(model)
    model.zero_grad()
    reference_loss(model, pairs, lam, prompt_loss).backward()
    reference = grads(model)

    for name in reference:
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    m_acc, m_big = train.finish_metrics(sums, lam), train.finish_metrics(big, lam)
    for k in m_big:
        assert m_acc[k] == pytest.approx(m_big[k], rel=1e-5, abs=1e-6), k
    if lam == 0:   # plain SFT: the OR term is measured but not optimised
        assert m_big["loss"] == pytest.approx(m_big["nll"])
        assert m_big["or_loss"] > 0


def test_sft_gradient_ignores_rejected_when_lam_is_zero(tmp_path, one_thread):
    """lam = 0: changing the rejected answers changes nothing in the gradient (only chosen tokens are trained)."""
    pairs = list(small_pairs(tmp_path, 6))
    other = [data.TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids[::-1].copy()) for p in pairs]
    model, cpu = small_model(), torch.device("cpu")
    train.train_step(model, [data.pack_pairs(pairs)], 0.0, cpu, 1, nullcontext())
    g1 = grads(model)
    model.zero_grad()
    train.train_step(model, [data.pack_pairs(other)], 0.0, cpu, 1, nullcontext())
    g2 = grads(model)
    model.zero_grad()
    train.train_step(model, [data.pack_pairs(other)], 0.5, cpu, 1, nullcontext())
    g3 = grads(model)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(g2[n], g3[n]) for n in g2)   # ...while lam > 0 does use them


def test_lr_schedules():
    args = train.parse_args(["--warmup-steps", "10", "--schedule", "cosine"])
    f = train.lr_lambda(args, 110)
    assert f(0) < f(5) < f(9) <= 1.0                       # linear warmup
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    args.schedule = "inverse_sqrt"
    g = train.lr_lambda(args, 110)
    assert g(10) == pytest.approx(1.0) and g(40) == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# end to end


def test_default_tiny_run_learns(tmp_path):
    """The tiny preset on the synthetic pairs: nll falls, log_odds and reward accuracy rise (eval set)."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--synthetic-pairs", "400", "--max-steps", "80", "--eval-every", "40",
            "--save-every", "0", "--no-export"]
    assert run_main(argv) == 0
    steps, evals = read_metrics(out), read_metrics(out, eval_records=True)
    assert [r["step"] for r in steps] == list(range(1, 81))
    assert [r["step"] for r in evals] == [0, 40, 80]         # eval 0 is the untrained model
    start, end = evals[0], evals[-1]
    assert end["eval_nll"] < start["eval_nll"] - 2.0
    assert end["eval_log_odds"] > start["eval_log_odds"] + 0.1
    assert end["eval_reward_acc"] > start["eval_reward_acc"] + 0.1
    mean = lambda recs, k: sum(r[k] for r in recs) / len(recs)
    assert mean(steps[-10:], "nll") < mean(steps[:10], "nll") - 2.0


def test_two_ranks_fsdp_match_one_rank(reference_run, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2 on CPU), 1 micro-batch of 4 pairs per rank, follows the same
    loss curve and ends at the same weights as 1 process with 2 micro-batches of 4 (the same global batches)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--out", str(out), *RUN_ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cpu x 2" in proc.stdout
    ref, got = read_metrics(reference_run), read_metrics(out)
    assert len(got) == len(ref) == STEPS
    for r, g in zip(ref, got):
        for k in COMPARED:
            assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-5), (r["step"], k)
    ref_w, got_w = final_weights(reference_run), final_weights(out)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_after_sigkill_equals_uninterrupted(reference_run, tmp_path):
    """SIGKILL a run after its first checkpoint, leave debris of an interrupted save, resume: the metrics and the
    final weights equal the uninterrupted reference run's."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--grad-accum", "2", *RUN_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = out / "ckpt" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed:\n" + log[-2000:]
    killed_at = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert max(killed_at) < STEPS

    # debris of a save killed half-way: a tmp dir with partial files, a step dir without its trainer state,
    # and a `latest` pointer to a checkpoint that is not there; resume must fall back to the newest complete one
    ckpt = out / "ckpt"
    (ckpt / "tmp-step_0000099").mkdir()
    (ckpt / "tmp-step_0000099" / "__0_0.distcp").write_bytes(b"\0" * 100)
    (ckpt / "step_0000098").mkdir()
    (ckpt / "step_0000098" / "__0_0.distcp").write_bytes(b"\0" * 100)
    latest.write_text("step_0000097")

    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    ref, got = read_metrics(reference_run), read_metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        for k in COMPARED:
            assert g[k] == pytest.approx(r[k], rel=1e-6, abs=1e-7), (r["step"], k)
    for k in ("eval_loss", "eval_log_odds"):
        assert read_metrics(out, True)[-1][k] == pytest.approx(read_metrics(reference_run, True)[-1][k], rel=1e-6)
    ref_w, got_w = final_weights(reference_run), final_weights(out)
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not list(ckpt.glob("tmp-*")), "debris of the interrupted save was not cleaned up"


def test_export_loads_in_transformers_with_identical_logits(reference_run):
    transformers = pytest.importorskip("transformers")
    final = reference_run / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = model_lib.Transformer.from_pretrained(str(final)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    tok = data.load_tokenizer(str(final))
    assert tok.encode("What is 1 + 2?") == data.synthetic_tokenizer().encode("What is 1 + 2?")
    assert (reference_run / "best" / "config.json").is_file()


def test_nan_guard_skips_steps_then_stops(tmp_path, capsys):
    """An absurd lr blows the weights up: the non-finite steps are skipped and logged, then the run stops."""
    out = tmp_path / "nan"
    argv = ["--out", str(out), "--model-config", SMALL_JSON, "--synthetic-pairs", "100", "--batch-size", "4",
            "--max-steps", "20", "--lr", "1e30", "--warmup-steps", "0", "--max-bad-steps", "2", "--no-export"]
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert "consecutive steps had a NaN/inf" in err
    recs = read_metrics(out)
    assert [r["skipped"] for r in recs][-2:] == [True, True] and len(recs) < 20


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "mistral-7b"], "mistralai/Mistral-7B-v0.1"),          # offline and not cached
    (["--data", "/nonexistent/pairs.parquet"], "/nonexistent/pairs.parquet"),
    (["--attention", "flash", "--device", "cpu"], "--attention flash"),
    (["--attention", "varlen", "--device", "cpu"], "--attention varlen"),
    (["--attention", "flex", "--device", "cpu"], "no backward on the CPU"),
    (["--batch-size", "7", "--grad-accum", "2"], "--batch-size 7"),
])
def test_bad_input_is_one_clean_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_main(["--out", str(tmp_path), "--synthetic-pairs", "20", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.splitlines()) == 1
