"""Tests of train.py and dist.py: the ORPO step, gradient accumulation, FSDP2 over 2 ranks, resume, export.

Cheap unit tests check the step against an independent reference (per-sequence forwards, orpo.average_logps).
The end-to-end tests share ONE reference run (a small random-init checkpoint, 12 steps, grad_accum 2) that
the 2-rank torchrun run, the SIGKILL-and-resume run and the export test all compare against.
Every run is single-threaded (torch.set_num_threads(1) / OMP_NUM_THREADS=1), so that in-process and
subprocess runs use the same kernels and can be compared closely.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import dist
import model as model_lib
import orpo
import train
from conftest import read_metrics, run_main, save_checkpoint, subprocess_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# smaller than the tiny preset (same vocabulary: the synthetic tokenizer's), so that every run here takes seconds
SMALL = model_lib.ModelConfig(family="llama", vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                              max_seq_len=1024, tie_embeddings=True)
STEPS = 12
# the reference run: 8 pairs per step as 2 micro-batches of 4 on one rank (== 2 ranks x 1 micro-batch of 4); a
# checkpoint --model gets the fine-tuning defaults, so every setting the runs depend on is given
RUN_ARGS = ["--data", "synthetic", "--synthetic-pairs", "200", "--batch-size", "8", "--max-steps", str(STEPS),
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


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def contract_keys(run: dict) -> dict:
    """run.json's keys of the contract with eval_rm.py (keys may be added to it, never removed)."""
    return {k: run[k] for k in ("model", "seed", "tokenizer", "template", "train_data", "train_split", "eval_data",
                                "eval_split", "max_length", "max_prompt_length", "args")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small):
    out = tmp_path_factory.mktemp("reference")
    assert run_main(["--out", str(out), "--model", small, "--grad-accum", "2", *RUN_ARGS]) == 0
    return out


# -----------------------------------------------------------------------------
# the step, against an independent reference


def small_model(seed=0):
    torch.manual_seed(seed)
    return model_lib.Transformer(SMALL)


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

    # no optimizer: train_step stops after the backward, leaving the accumulated gradients in .grad
    m_acc = train.train_step(model, [pack(pairs[:2]), pack(pairs[2:7]), pack(pairs[7:])], lam, cpu)
    accumulated = grads(model)
    model.zero_grad()
    m_big = train.train_step(model, [pack(pairs)], lam, cpu)
    one_batch = grads(model)
    model.zero_grad()
    reference_loss(model, pairs, lam, prompt_loss).backward()
    reference = grads(model)

    for name in reference:
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
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
    train.train_step(model, [data.pack_pairs(pairs)], 0.0, cpu)
    g1 = grads(model)
    model.zero_grad()
    train.train_step(model, [data.pack_pairs(other)], 0.0, cpu)
    g2 = grads(model)
    model.zero_grad()
    train.train_step(model, [data.pack_pairs(other)], 0.5, cpu)
    g3 = grads(model)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(g2[n], g3[n]) for n in g2)   # ...while lam > 0 does use them


def test_lr_schedules():
    f = dist.lr_lambda("cosine", 10, 110)
    assert f(0) == 0.0 and f(0) < f(5) < f(9) < 1.0                  # linear warmup from 0
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    g = dist.lr_lambda("inverse_sqrt", 10, 110)
    assert g(10) == pytest.approx(1.0) and g(40) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt", "constant"])
@pytest.mark.parametrize("warmup", [0, 200])
def test_lr_schedules_equal_transformers(schedule, warmup):
    """The multiplier at every step equals transformers' scheduler of the same name (what the official scripts
    ran), including its warmup convention (step / warmup: lr 0 at the first step) and inverse_sqrt's time
    scale (the warmup, or 10_000 without one)."""
    transformers = pytest.importorskip("transformers")
    total = 1000
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = {"cosine": lambda: transformers.get_cosine_schedule_with_warmup(opt, warmup, total),
          "inverse_sqrt": lambda: transformers.get_inverse_sqrt_schedule(opt, warmup),
          "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, warmup)}[schedule]()
    ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                             dist.lr_lambda(schedule, warmup, total))
    for step in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        ours.optimizer.step(), ours.step(), opt.step(), hf.step()


def test_attention_flops_count_the_pairs_the_mask_allows():
    """MFU's attention term counts the (query, key) pairs of model.py's packed mask, in both layouts (a
    rejected token sees neither the chosen tokens nor itself twice): 12 * layers * d_attn FLOPs per pair."""
    g = torch.Generator().manual_seed(0)
    for seg_lens in (torch.randint(1, 9, (5, 3), generator=g), torch.tensor([[6, 0, 0], [3, 0, 0]])):
        seg_id, branch = model_lib._token_tags(seg_lens, torch.device("cpu"))
        q, k = torch.arange(len(seg_id))[:, None], torch.arange(len(seg_id))   # the rule, written out: same pair,
        mask = (seg_id[q] == seg_id[k]) & (q >= k) & ((branch[k] == 0) | (branch[k] == branch[q]))   # causal, no w->l
        assert model_lib.attention_pairs(seg_lens) == int(mask.sum())
        batch = type("Batch", (), {"seg_lens": seg_lens, "num_tokens": len(seg_id)})
        assert model_lib.step_flops(0, 3, 8, [batch]) == 12 * 3 * 8 * int(mask.sum())


# -----------------------------------------------------------------------------
# end to end


def test_default_tiny_run_learns(tmp_path):
    """The tiny preset on the synthetic pairs: nll falls, log_odds and reward accuracy rise (eval set)."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--synthetic-pairs", "400", "--max-steps", "100", "--eval-every", "50",
            "--save-every", "0", "--no-export"]
    assert run_main(argv) == 0
    steps, evals = read_metrics(out), read_metrics(out, eval_records=True)
    assert [r["step"] for r in steps] == list(range(1, 101))
    assert [r["step"] for r in evals] == [0, 50, 100]        # eval 0 is the untrained model
    start, end = evals[0], evals[-1]
    assert end["eval_nll"] < start["eval_nll"] - 2.0
    assert end["eval_log_odds"] > start["eval_log_odds"] + 0.1
    assert end["eval_reward_acc"] > start["eval_reward_acc"] + 0.1
    mean = lambda recs, k: sum(r[k] for r in recs) / len(recs)
    assert mean(steps[-10:], "nll") < mean(steps[:10], "nll") - 2.0


def test_two_ranks_fsdp_match_one_rank(reference_run, small, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2 on CPU), 1 micro-batch of 4 pairs per rank, follows the same
    loss curve and ends at the same weights as 1 process with 2 micro-batches of 4 (the same global batches)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--out", str(out), "--model", small, *RUN_ARGS]
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


def test_resume_after_sigkill_equals_uninterrupted(reference_run, small, tmp_path):
    """SIGKILL a run after its first checkpoint, leave debris of an interrupted save, resume: the metrics and the
    final weights equal the uninterrupted reference run's."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--model", small, "--grad-accum", "2", *RUN_ARGS]
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


def test_nan_guard_skips_steps_then_stops(tmp_path, small, capsys):
    """An absurd lr blows the weights up: the non-finite steps are skipped and logged, then the run stops
    (after train.MAX_BAD_STEPS of them in a row)."""
    out = tmp_path / "nan"
    argv = ["--out", str(out), "--model", small, "--data", "synthetic", "--synthetic-pairs", "100", "--batch-size", "4",
            "--max-steps", "20", "--lr", "1e30", "--warmup-steps", "0", "--no-export"]
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert "consecutive steps had a NaN/inf" in err
    recs = read_metrics(out)
    assert [r["skipped"] for r in recs][-train.MAX_BAD_STEPS:] == [True] * train.MAX_BAD_STEPS and len(recs) < 20


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "mistral-7b"], "mistralai/Mistral-7B-v0.1"),          # offline and not cached
    (["--data", "/nonexistent/pairs.parquet"], "/nonexistent/pairs.parquet"),
    (["--attention", "flash", "--device", "cpu"], "--attention flash"),
    (["--attention", "varlen", "--device", "cpu"], "--attention varlen"),
    (["--model", "OPT_128"], "longer than the 128 positions"),     # a checkpoint with 128 learned positions
    (["--batch-size", "7", "--grad-accum", "2"], "--batch-size 7"),
    (["--tokenizer", "/nonexistent/tok"], "/nonexistent/tok"),
])
def test_bad_input_is_one_clean_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "OPT_128" in argv:
        opt = model_lib.ModelConfig(family="opt", vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    positions="learned", norm="layernorm", mlp_kind="relu", max_seq_len=128)
        argv = ["--model", save_checkpoint(tmp_path / "opt", opt)]
    assert run_main(["--out", str(tmp_path / "out"), "--synthetic-pairs", "20", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be at least 1"),
    (["--save-every", "-1"], "--save-every -1: must be at least 0 (0 = only at the end)"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan"),
    (["--eval-fraction", "1.0"], "--eval-fraction 1.0: must be in [0, 1)"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0"),
    (["--split", "train"], "--split train needs --data"),
    (["--eval-split", "test"], "--eval-split test needs --data or --eval-data"),
    (["--columns", "prompt"], "--columns prompt"),
    (["--max-length", "512", "--max-prompt-length", "600"], "max_prompt_length (600) <= max_length (512)"),
    (["--template", "/nonexistent/t.jinja"], "--template"),
])
def test_bad_numbers_and_combinations_are_one_clean_line(tmp_path, capsys, argv, needle):
    """Checked before any work: each would otherwise fail late (ZeroDivisionError after the first step) or
    quietly do something else (--keep-checkpoints 0 kept every checkpoint, --split ignored)."""
    assert run_main(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_clean_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_main(["--out", str(tmp_path / "afile"), "--synthetic-pairs", "20"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'afile'} is a file, not a directory"


# -----------------------------------------------------------------------------
# checkpoints of a finished run: fresh start, resume, pruning

FINISHED_ARGS = ["--data", "synthetic", "--synthetic-pairs", "40", "--batch-size", "4", "--max-steps", "4", "--lr", str(train.TINY_LR),
                 "--save-every", "1", "--eval-every", "2", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def finished_args(small):
    return ["--model", small, *FINISHED_ARGS]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, finished_args):
    """A complete 4-step run that saved after every step (keeping 2), and its console output."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("finished") / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert run_main(["--out", str(out), *finished_args]) == 0
    return out, log.getvalue()


def tree(path: Path) -> dict:
    """Every file under path -> (size, mtime_ns): what 'nothing was touched' means."""
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file()}


def test_finished_run_layout(finished_run):
    out, log = finished_run
    assert sorted(p.name for p in (out / "ckpt").glob("step_*")) == ["step_0000003", "step_0000004"]
    assert (out / "ckpt" / "latest").read_text() == "step_0000004"
    assert "warmup 1 |" in log                         # --warmup-steps, shown
    assert [r["lr"] for r in read_metrics(out)][:2] == [0.0, pytest.approx(train.TINY_LR)]


def test_fresh_start_into_an_earlier_runs_out_is_refused(finished_run, finished_args, capsys):
    """Without --resume, a second run in the same --out would mix its checkpoints with the first run's
    (pruned as older, `latest` dangling, a later --resume loading the other run): refused, nothing touched."""
    out, _ = finished_run
    before = tree(out)
    assert run_main(["--out", str(out), *finished_args, "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out} already holds checkpoints of an earlier run (step 4); "
        f"pass --resume to continue it, or choose another --out")
    assert tree(out) == before


def test_resume_of_a_finished_run_does_nothing(finished_run, finished_args, tmp_path, capsys):
    """No second final eval, no re-save (which deleted the checkpoint just loaded), no re-export; a missing
    final export (a run killed while exporting) is the one thing still done."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    before = tree(out)
    assert run_main(["--out", str(out), *finished_args, "--resume"]) == 0
    assert "already complete: its checkpoint is at step 4, this run has 4 steps" in capsys.readouterr().out
    assert tree(out) == before
    shutil.rmtree(out / "final")
    assert run_main(["--out", str(out), *finished_args, "--resume"]) == 0
    assert "wrote its missing export" in capsys.readouterr().out
    after = tree(out)
    assert {k: v for k, v in after.items() if not k.startswith("final/")} == \
           {k: v for k, v in before.items() if not k.startswith("final/")}
    assert final_weights(out).keys() == final_weights(finished_run[0]).keys()


def edit_trainer_state(out: Path, **changes):
    path = out / "ckpt" / (out / "ckpt" / "latest").read_text() / "trainer_state.json"
    state = json.loads(path.read_text())
    for k, v in changes.items():
        state[k] = v
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("change,needle", [
    ("world_size", "error: resume needs the same number of ranks: the checkpoint was written by 2, this run has 1"),
    (["--batch-size", "8"], "batch size"),
    (["--grad-accum", "2"], "grad_accum"),
    (["--seed", "1"], "seed"),
])
def test_resume_with_other_ranks_or_batching_is_one_clean_line(finished_run, finished_args, tmp_path, capsys, change,
                                                               needle):
    """The saved data position means other pairs under another world size or batching: refused up front,
    before the model is loaded, in one line."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    extra = ["--max-steps", "8"]
    if change == "world_size":      # as if written by torchrun --nproc_per_node 2
        edit_trainer_state(out, world_size=2)
    else:
        extra += change
    assert run_main(["--out", str(out), *finished_args, "--resume", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err


def fake_checkpoint(root: Path, step: int):
    d = root / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    return d


def test_prune_keeps_the_new_checkpoint_and_the_later_steps(tmp_path):
    """keep=2: the checkpoint just written and the newest older one; later steps (of the trajectory a resume from
    an older checkpoint leaves) stay until rewritten; interrupted saves' debris goes."""
    root = tmp_path / "ckpt"
    steps = [fake_checkpoint(root, s) for s in (1, 2, 3, 4)]
    (root / "tmp-step_0000009").mkdir()
    names = lambda: sorted(p.name for p in root.iterdir())
    dist._prune(root, 2, steps[2])                  # step 3 was just written: step 1 goes, step 4 stays
    assert names() == ["step_0000002", "step_0000003", "step_0000004"]
    dist._prune(root, 1, steps[1])                  # step 2 rewritten after a resume: steps 3 and 4 are not older
    assert names() == ["step_0000002", "step_0000003", "step_0000004"]
    dist._prune(root, 1, steps[3])
    assert names() == ["step_0000004"]


# -----------------------------------------------------------------------------
# data sources and the closing hint


def test_eval_split_is_the_split_of_eval_data(tmp_path, small, capsys):
    """--eval-data with --eval-split reads that split (a Hub id needs it; here a local folder in the Hub
    layout with two splits); before, the split was ignored for --eval-data."""
    hub = tmp_path / "hub" / "data"
    data.write_synthetic(hub / "train_prefs-00000-of-00001.parquet", 40, seed=0, split="train")
    data.write_synthetic(hub / "test_prefs-00000-of-00001.parquet", 12, seed=1, split="eval")
    src = str(tmp_path / "hub")
    argv = ["--out", str(tmp_path / "out"), "--model", small, "--data", src, "--split", "train_prefs",
            "--eval-data", src, "--eval-split", "test_prefs", "--batch-size", "4", "--max-steps", "1",
            "--eval-every", "0", "--no-export"]
    assert run_main(argv) == 0
    log = capsys.readouterr().out
    assert f"train: 40 pairs from {src} [train_prefs]" in log and f"eval: 12 pairs from {src} [test_prefs]" in log


def test_run_json_of_the_default_run_and_its_hint(tmp_path, monkeypatch, capsys):
    """The default synthetic tiny run (in its default --out, out/) tells eval_rm.py what it trained on in
    out/run.json (the contract in eval_rm.py's demo), and its closing hint is the plain `python eval_rm.py`."""
    monkeypatch.chdir(tmp_path)
    argv = ["--synthetic-pairs", "40", "--max-steps", "1", "--eval-every", "0", "--save-every", "0"]
    assert run_main(argv) == 0
    assert contract_keys(json.loads(Path("out/run.json").read_text())) == {
        "model": "tiny", "seed": 42, "tokenizer": "synthetic", "template": "auto",
        "train_data": "out/data/synthetic_train_40.parquet", "train_split": None,
        "eval_data": "out/data/synthetic_eval.parquet", "eval_split": None,
        "max_length": 2048, "max_prompt_length": 1024, "args": vars(train.parse_args(argv))}
    assert Path("out/data/synthetic_train_40.parquet").is_file() and Path("out/final/config.json").is_file()
    assert capsys.readouterr().out.splitlines()[-1] == "evaluate with:  python eval_rm.py"


@pytest.mark.parametrize("eval_split", ["test_prefs", None])
def test_run_json_names_the_data_splits_and_tokenizer(tmp_path, small, capsys, eval_split):
    """--data/--split/--eval-split and --tokenizer: the eval pairs are another split of the training source (so
    eval_data is train_data), or, without --eval-split, held out of the training pairs (eval_data null)."""
    hub = tmp_path / "hub" / "data"
    data.write_synthetic(hub / "train_prefs-00000-of-00001.parquet", 40, seed=0, split="train")
    data.write_synthetic(hub / "test_prefs-00000-of-00001.parquet", 12, seed=1, split="eval")
    src, tok, out = str(tmp_path / "hub"), str(tmp_path / "tok"), tmp_path / "my run"
    data.synthetic_tokenizer().save(tok)
    argv = ["--out", str(out), "--model", small, "--data", src, "--split", "train_prefs", "--tokenizer", tok,
            "--batch-size", "4", "--max-steps", "1", "--eval-every", "0"]
    argv += ["--eval-split", eval_split] if eval_split else []
    assert run_main(argv) == 0
    assert contract_keys(json.loads((out / "run.json").read_text())) == {
        "model": small, "seed": 42, "tokenizer": tok, "template": "auto", "train_data": src,
        "train_split": "train_prefs", "eval_data": src if eval_split else None, "eval_split": eval_split,
        "max_length": 2048, "max_prompt_length": 1024, "args": vars(train.parse_args(argv))}
    assert capsys.readouterr().out.splitlines()[-1] == f"evaluate with:  python eval_rm.py demo --root '{out}'"


def test_bad_input_under_torchrun_is_said_once(tmp_path):
    """A user error is the same on every rank: rank 0 alone prints it (it was printed once per rank)."""
    missing = str(tmp_path / "no" / "such" / "model")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--out", str(tmp_path / "out"), "--model", missing]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert len(said) == 1 and missing in said[0] and "no such directory" in said[0], proc.stdout + proc.stderr
