"""Hardening of train.py (issue 17 items 3, 5, 8, 9, 10; issue 14's defaults; issue 16's MFU count): a resume that
honours or refuses every flag, signals that stop with a checkpoint, no export of non-finite weights, and the
warnings and range checks of the flags. Runs are in-process (train.main) where the item is not about processes;
signals are real ones, sent to real processes (python train.py, torchrun)."""
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import model as model_lib
import train
from conftest import read_metrics as metrics, save_checkpoint, subprocess_env as env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--synthetic-pairs", "64", "--batch-size", "8", "--eval-every", "3", "--save-every", "2"]


def small(**changes):
    """A config smaller than the tiny preset, with its vocabulary (the synthetic tokenizer's)."""
    return model_lib.ModelConfig(**{**dict(family="llama", vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                           ffn_dim=64, max_seq_len=1024, tie_embeddings=True), **changes})


def run_main(argv) -> tuple[int, str, str]:
    """train.main in this process, single-threaded (as the subprocesses: same kernels) -> (status, stdout, stderr)."""
    n, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(n)
    return status, out.getvalue(), err.getvalue()


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -----------------------------------------------------------------------------
# item 3: resume honours or refuses every flag


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    """A complete 6-step tiny run, cosine schedule (checkpoints at steps 4 and 6)."""
    out = tmp_path_factory.mktemp("cosine") / "run"
    status, log, err = run_main(["--out", out, *ARGS, "--max-steps", "6", "--no-export"])
    assert status == 0, err
    return out


@pytest.mark.parametrize("change,needle", [
    (["--lr", "5e-4"], "--lr 0.0005 differs from the checkpoint's 0.001: resume with the saved value, or start a "
                       "new run in another --out"),
    (["--weight-decay", "0.1"], "--weight-decay 0.1 differs from the checkpoint's 0.0"),
    (["--lam", "0.5"], "--lam 0.5 differs from the checkpoint's 0.1"),
    (["--schedule", "constant"], "--schedule constant differs from the checkpoint's cosine"),
    (["--grad-clip", "0.5"], "--grad-clip 0.5 differs from the checkpoint's 1.0"),
    (["--no-prompt-loss"], "--prompt-loss False differs from the checkpoint's True"),
    (["--warmup-steps", "3"], "--warmup-steps 3 differs from the checkpoint's 10"),
    (["--max-steps", "12"], "--max-steps/--epochs 12 differs from the checkpoint's 6 (cosine decays over the total"),
    ("model", "--model"),
])
def test_resume_refuses_a_changed_setting_in_one_line(cosine_run, tmp_path, change, needle):
    """Each setting that shapes the trajectory is compared with the checkpoint's: a change is refused (exit 2),
    before anything is loaded or written. Before, --lr/--weight-decay were silently ignored and --lam, --schedule
    and --max-steps silently applied (the cosine schedule re-stretched: the lr jumped)."""
    if change == "model":   # another config (dim 64) with the same tokenizer: was a DCP size-mismatch traceback
        path = save_checkpoint(tmp_path / "other", small(dim=64))
        change, needle = ["--model", path, "--lr", "1e-3", "--data", "synthetic"], f"--model {path} (dim 64) differs from the checkpoint's dim "
    before = {f: f.stat().st_mtime_ns for f in cosine_run.rglob("*") if f.is_file()}
    status, _, err = run_main(["--out", cosine_run, *ARGS, "--max-steps", "6", "--no-export", "--resume", *change])
    assert status == 2
    assert needle in one_error_line(err)
    assert {f: f.stat().st_mtime_ns for f in cosine_run.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("schedule", ["constant", "inverse_sqrt"])
def test_a_longer_run_continues_a_schedule_that_ignores_the_total(tmp_path, schedule):
    """The one change resume supports: a larger --max-steps under constant/inverse_sqrt continues on the same lr
    curve (warmup 4 of a 6-step run, then 4 more steps), and the start line shows the new total."""
    out, lr = tmp_path / "run", 1e-3
    argv = ["--out", out, *ARGS, "--schedule", schedule, "--warmup-steps", "4", "--no-export"]
    assert run_main([*argv, "--max-steps", "6"])[0] == 0
    status, log, err = run_main([*argv, "--max-steps", "10", "--resume"])
    assert status == 0, err
    assert "10 steps" in log and "resumed from" in log
    lrs = [r["lr"] for r in metrics(out)]
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))
    f = train.dist.lr_lambda(schedule, 4, 10)
    assert lrs == pytest.approx([lr * f(s) for s in range(10)], rel=1e-12)
    assert lrs[:4] == pytest.approx([0, lr / 4, lr / 2, 3 * lr / 4])     # warmup, then no jump at the resume
    assert all(abs(b - a) <= 0.2 * lr for a, b in zip(lrs[4:], lrs[5:]))
    state = json.loads((out / "ckpt" / "step_0000010" / "trainer_state.json").read_text())
    assert state["settings"]["--max-steps/--epochs"] == 10 and state["settings"]["--schedule"] == schedule


# -----------------------------------------------------------------------------
# item 5 and item 10: the tokenizer fits the model, --seed in range


def test_a_tokenizer_larger_than_the_embedding_is_refused(shared_data, tmp_path):
    tok = shared_data / "tokenizers" / "llama2"
    status, _, err = run_main(["--out", tmp_path / "out", "--model", "tiny", "--tokenizer", tok])
    assert status == 2
    assert f"--tokenizer {tok} has 32000 ids but --model tiny embeds 512 (vocab_size)" in one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**70)])
def test_seed_out_of_range_is_one_line(tmp_path, seed):
    status, _, err = run_main(["--out", tmp_path / "out", "--seed", seed])
    assert status == 2 and f"--seed {seed}: must be an integer in [0, 2**32 - 1]" in one_error_line(err)


# -----------------------------------------------------------------------------
# item 8: SIGTERM, SIGINT


def start(out: Path, extra=(), torchrun=False) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_a_step(proc, out: Path):
    deadline = time.time() + 120
    path = out / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline and not (path.exists() and path.read_text().strip()):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.stderr.read()[-2000:]


SIGNAL_ARGS = ["--max-steps", "80", "--save-every", "0", "--eval-every", "0"]


def test_sigterm_checkpoints_the_step_and_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGTERM (a cluster's preemption): the step ends, a checkpoint of it is written, one line says how to resume
    (exit 143); that command completes the run with the weights of a run never interrupted."""
    out = tmp_path / "stopped"
    proc = start(out, SIGNAL_ARGS)
    wait_for_a_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    step = max(r["step"] for r in metrics(out))
    assert step < 80
    cmd = f"python train.py --out {out} {' '.join(ARGS)} {' '.join(SIGNAL_ARGS)} --resume"
    assert err.strip().splitlines()[-1] == f"SIGTERM: stopped at step {step}, checkpoint written; resume with: {cmd}"
    assert (out / "ckpt" / "latest").read_text() == f"step_{step:07d}"

    status, log, _ = run_main(cmd.split()[2:])
    assert status == 0 and f"resumed from {out / 'ckpt' / f'step_{step:07d}'} at step {step}" in log
    reference = tmp_path / "reference"
    assert run_main(["--out", reference, *ARGS, *SIGNAL_ARGS])[0] == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, 81))
    ref, got = final_weights(reference), final_weights(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)


def test_a_second_signal_exits_at_once(tmp_path):
    """SIGTERM and SIGINT together: the first handled would stop after the step, the second exits at once, without
    a checkpoint and without a traceback, status 128 + its number."""
    out = tmp_path / "twice"
    proc = start(out, SIGNAL_ARGS)
    wait_for_a_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 143) and "Traceback" not in err and "stopped at step" not in err, err
    assert not (out / "ckpt" / "latest").exists()


def test_ctrl_c_during_setup_is_one_line(tmp_path, monkeypatch):
    """SIGINT before the first step (here: while the data loads): 'interrupted', status 130, no traceback."""
    load = data.train_and_eval_pairs

    def interrupted_load(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return load(*a, **kw)

    monkeypatch.setattr(data, "train_and_eval_pairs", interrupted_load)
    status, _, err = run_main(["--out", tmp_path / "out", *ARGS])
    assert status == 130 and err.strip() == "interrupted"


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(tmp_path):
    """torchrun forwards SIGTERM to its workers: both ranks agree on the step (an all_reduce of the flag), write one
    checkpoint together (both RNG states), and rank 0 says how to resume under torchrun."""
    out = tmp_path / "ddp"
    proc = start(out, ["--max-steps", "300", "--save-every", "0", "--eval-every", "0"], torchrun=True)
    wait_for_a_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    step = max(r["step"] for r in metrics(out))
    said = [l for l in err.splitlines() if "stopped at step" in l]
    assert len(said) == 1 and said[0].startswith(f"SIGTERM: stopped at step {step}, checkpoint written; resume with: "
                                                 f"torchrun --nproc_per_node 2 train.py --out {out}"), err[-3000:]
    ckpt = out / "ckpt" / (out / "ckpt" / "latest").read_text()
    assert ckpt.name == f"step_{step:07d}" and {"rng_rank0.json", "rng_rank1.json"} <= {p.name for p in ckpt.iterdir()}


# -----------------------------------------------------------------------------
# item 9: never export non-finite weights


def test_non_finite_weights_are_never_exported_or_saved(tmp_path):
    """An absurd weight decay makes the weights inf/NaN in step 1; the next steps are skipped as NaN, fewer than
    MAX_BAD_STEPS: the run used to exit 0 with NaN weights in final/. Now no checkpoint, no final/, a summary
    of what was written, and exit 1."""
    out = tmp_path / "nan"
    status, log, err = run_main(["--out", out, *ARGS, "--max-steps", "3", "--lr", "1e30", "--weight-decay", "1e10",
                                 "--warmup-steps", "0", "--eval-every", "0"])
    assert status == 1
    assert not (out / "final").exists() and not (out / "best").exists() and not (out / "ckpt" / "latest").exists()
    assert "the weights hold NaN/inf: no checkpoint written" in log
    assert f"outputs in {out}/: run.json, curves.png, metrics.jsonl, data/ (synthetic pairs)" in log
    assert "the weights hold NaN/inf at step 3" in one_error_line(err)


# -----------------------------------------------------------------------------
# issue 14 item 5: defaults that don't trip


def test_max_prompt_length_follows_max_length(tmp_path):
    args = train.parse_args(["--max-length", "512", "--out", str(tmp_path / "out")])
    assert args.max_prompt_length == 512 and train.check_args(args, 1) == (None, None)
    assert train.parse_args([]).max_prompt_length == 1024


def test_warnings_of_a_short_warmup_and_of_pairs_past_the_rope_positions(tmp_path):
    """A warmup longer than the run, and pairs longer than a RoPE checkpoint's max_position_embeddings (counted),
    are each one warning line; the run goes on."""
    model = save_checkpoint(tmp_path / "short", small(max_seq_len=24))
    out = tmp_path / "out"
    status, log, _ = run_main(["--out", out, "--model", model, "--data", "synthetic", *ARGS, "--max-steps", "2", "--warmup-steps", "10",
                               "--lr", "1e-3", "--no-export"])
    assert status == 0
    assert "warning: 2 steps with warmup 10: the lr never reaches its peak (max 1.0e-04 of 1.0e-03)" in log
    tok = data.synthetic_tokenizer()
    pairs = [p for f in ("synthetic_train_64", "synthetic_eval") for p in data.build_pairs(out / "data" / f"{f}.parquet", tok)]
    long = sum(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > 24 for p in pairs)
    assert 0 < long < len(pairs)
    assert f"warning: {long} of {len(pairs)} pairs are longer than the 24 positions (max_position_embeddings)" in log


# -----------------------------------------------------------------------------
# issue 16: MFU counts the matmul parameters


@pytest.mark.parametrize("config", [small(), small(tie_embeddings=False),
                                    model_lib.ModelConfig(family="opt", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                                          ffn_dim=64, positions="learned", norm="layernorm",
                                                          mlp_kind="relu", max_seq_len=128)])
def test_mfu_counts_params_without_the_embedding_lookup(config):
    """As torchtitan: the input embedding (and OPT's position table) is a lookup, not a matmul; but a tied matrix
    is also the lm_head's, so it counts once."""
    model = model_lib.Transformer(config)
    total = sum(p.numel() for p in model.parameters())     # a tied matrix once
    embedding = config.vocab_size * config.embed_dim
    positions = 0 if config.positions == "rope" else model.pos_embeddings.weight.numel()
    expected = total - positions - (0 if config.tie_embeddings else embedding)
    assert model.matmul_params() == expected
