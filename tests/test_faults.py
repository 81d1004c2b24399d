"""Faults around a run, each one line and never a damaged checkpoint (hardening issue, items 2, 6, 7, 8, 9): one run
per --out (a flock that a killed run does not leave behind), resume from the newest *intact* checkpoint, a stalled
rank ending the job after --comm-timeout, a full disk naming the path, NaN weights in a checkpoint refused.
Real processes and signals where the item is about them; everything else in this process."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist
import model as model_lib
import train
from conftest import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--synthetic-pairs", "64", "--max-steps", "6", "--batch-size", "8", "--save-every", "2", "--eval-every", "3",
        "--no-export"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        e.pop(k, None)
    return e


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def steps_and_evals(out: Path):
    recs = records(out)
    return [r["step"] for r in recs if not r.get("eval")], [r["step"] for r in recs if r.get("eval")]


def wait_for(predicate, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}:\n" + proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(out), *ARGS, *extra], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def error_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if "error: " in l or "Traceback" in l]


# -----------------------------------------------------------------------------
# item 2: one run per --out

def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    """Run A is stopped (SIGSTOP) after its first metrics line; run B on the same --out exits 2 naming A's pid and
    touches nothing; A, continued, ends with the metrics of a lone run. (--save-every 0: B meets A's lock, not A's
    checkpoints, whatever the moment.)"""
    out = tmp_path / "c"
    a = start(out, "--save-every", "0")
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), a,
                 "metrics line")
        a.send_signal(signal.SIGSTOP)
        b = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), *ARGS, "--lam", "1.0"],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        said = error_lines(b.stdout + b.stderr)
        assert len(said) == 1 and said[0].startswith(f"error: --out {out} is in use by pid {a.pid} on host "), said
        assert said[0].endswith("; wait for it or choose another --out") and "(started " in said[0]
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=240) == 0, a.communicate()[0][-3000:]
    finally:
        a.kill()
        a.wait()
    assert steps_and_evals(out) == ([1, 2, 3, 4, 5, 6], [0, 3, 6])     # 9 lines, as a lone run writes
    assert not (out / ".lock").exists()                                 # a finished run leaves no lock behind


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "c"
    a = start(out)
    try:
        wait_for(lambda: (out / ".lock").is_file() and (out / ".lock").read_text(), a, "lock")
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        a.kill()
        a.wait()
    assert (out / ".lock").read_text().startswith(f"pid {a.pid} on host ")   # left behind, still naming the dead run
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 0


# -----------------------------------------------------------------------------
# item 6: resume from the newest intact checkpoint

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete 6-step run that kept its checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_main(["--out", str(out), *ARGS, "--keep-checkpoints", "3"]) == 0
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path, size):
    with open(path, "r+b") as f:
        f.truncate(size(path.stat().st_size))


DAMAGE = {   # what a crash, a full disk or a bad copy leaves; the words the skip line must say
    "truncated .distcp": (lambda c: truncate(c / "__0_0.distcp", lambda n: n // 2), "__0_0.distcp has "),
    "0-byte .distcp": (lambda c: truncate(c / "__0_0.distcp", lambda n: 0), "__0_0.distcp has 0 bytes of the "),
    "missing .metadata": (lambda c: (c / ".metadata").unlink(), ".metadata is not DCP checkpoint metadata"),
    "garbage .metadata": (lambda c: (c / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata is not DCP"),
    "garbled trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"step": 6, "epo'),
                                   "trainer_state.json is not valid JSON"),
    "garbled rng_rank0.json": (lambda c: (c / "rng_rank0.json").write_text("[3, 1"), "rng_rank0.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_damaged_newest_checkpoint(finished, tmp_path, capsys, damage):
    out = copy_of(finished, tmp_path)
    harm, needle = DAMAGE[damage]
    harm(out / "ckpt" / "step_0000006")
    shutil.rmtree(out / "ckpt" / "step_0000002")
    capsys.readouterr()
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 0
    said = capsys.readouterr().out.splitlines()
    skipped = [l for l in said if l.startswith("resume: skipped the damaged checkpoint step_0000006 (")]
    assert len(skipped) == 1 and needle in skipped[0] and skipped[0].endswith("; using step_0000004"), said
    assert f"resumed from {out / 'ckpt' / 'step_0000004'} at step 4" in said
    assert steps_and_evals(out) == ([1, 2, 3, 4, 5, 6], [0, 3, 6])       # steps 5 and 6 trained again, once
    assert dist.checkpoint_problem(out / "ckpt" / "step_0000006") is None  # and saved again, intact


def test_resume_with_no_intact_checkpoint_is_one_line(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    for step in (2, 4, 6):
        truncate(out / "ckpt" / f"step_{step:07d}" / "__0_0.distcp", lambda n: 10)
    capsys.readouterr()
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'ckpt'} holds no intact checkpoint: step_0000006: ")
    assert "step_0000004: " in err[0] and "step_0000002: " in err[0] and "has 10 bytes of the" in err[0]


def test_a_torn_last_metrics_line_is_dropped_with_a_note(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "epoch": 1, "lo')                  # a kill in the middle of a write
    capsys.readouterr()
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 0
    assert "metrics.jsonl: dropped its torn last line" in capsys.readouterr().out
    assert steps_and_evals(out) == ([1, 2, 3, 4, 5, 6], [0, 3, 6])


# -----------------------------------------------------------------------------
# item 9: a checkpoint with non-finite weights

def test_resume_from_a_checkpoint_with_nan_weights_names_the_tensor(finished, tmp_path, capsys):
    """Write NaN into step 4's model weights the way save_checkpoint writes them (DCP), keep its JSON files, resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "ckpt" / "step_0000006")
    ckpt = out / "ckpt" / "step_0000004"
    dcp_to_torch_save(ckpt, tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=False)    # our own file, written just now
    state["model"]["layers.1.attn.wk.weight"][0, 0] = float("nan")
    (ckpt / ".metadata").unlink()
    (ckpt / "__0_0.distcp").unlink()
    dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    capsys.readouterr()
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {ckpt}: tensor 'layers.1.attn.wk.weight' has NaN/inf values; remove this checkpoint "
                   f"to resume from the one before"]


# -----------------------------------------------------------------------------
# item 8: a full disk (a file-size limit: EFBIG the way ENOSPC would be; as root, chmod would not stop a write)

def file_size_limit(nbytes):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # else the kernel kills the writer; ignored: write fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_one_stays(finished, tmp_path, capsys):
    """Resume from step 4 with files limited to 256 kB: the data and the metrics fit, the step-6 checkpoint (4 MB)
    does not. One line naming the path and the cause, exit 1, no half-written dir; step 4 then resumes to the end."""
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "ckpt" / "step_0000006")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), *ARGS, "--resume"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=240, preexec_fn=file_size_limit(256_000))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert error_lines(proc.stdout + proc.stderr) == [
        f"error: cannot write checkpoint to {out / 'ckpt' / 'tmp-step_0000006'}: [Errno 27] File too large"]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert run_main(["--out", str(out), *ARGS, "--resume"]) == 0
    assert f"resumed from {out / 'ckpt' / 'step_0000004'} at step 4" in capsys.readouterr().out
    assert steps_and_evals(out) == ([1, 2, 3, 4, 5, 6], [0, 3, 6])


def test_an_export_that_cannot_be_written_names_the_path_and_keeps_the_old_one(tmp_path):
    config = model_lib.ModelConfig(family="llama", vocab_size=64, dim=64, n_layers=2, n_heads=2, ffn_dim=128)
    model = model_lib.Transformer(config)
    dist.export_hf(model, config, None, tmp_path / "final")
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    handler, limits = signal.getsignal(signal.SIGXFSZ), resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        file_size_limit(20_000)()
        with pytest.raises(OSError) as e:
            dist.export_hf(model, config, None, tmp_path / "final")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(e.value)   # safetensors' own words for EFBIG: "... I/O error: File too large (os error 27)"
    assert message.startswith(f"cannot write export to {tmp_path / 'final.tmp'}: ") and "File too large" in message
    assert "\n" not in message
    assert not (tmp_path / "final.tmp").exists() and (tmp_path / "final" / "model.safetensors").read_bytes() == before


# -----------------------------------------------------------------------------
# item 7: a stalled rank

def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for torchrun to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stalled_rank_ends_the_job_after_comm_timeout(tmp_path):
    """torchrun, 2 ranks over gloo: SIGSTOP rank 1 once step 1 is logged (its collectives are done); rank 0 waits
    --comm-timeout 5 s in the next collective, then ends with one line naming the timeout and the flag."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           "--out", str(out), *ARGS, "--save-every", "0", "--comm-timeout", "5"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        wait_for(lambda: any(not r.get("eval") for r in (records(out) if (out / "metrics.jsonl").is_file() else [])),
                 job, "step 1")
        ranks = {rank_of(p): p for p in children(job.pid)}
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: not alive(ranks[0]), job, "the end of rank 0")
        os.kill(stopped, signal.SIGCONT)   # else torchrun waits 30 s before its SIGTERM becomes a SIGKILL
        log = job.communicate(timeout=240)[0]
    finally:
        if stopped:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        job.kill()
        job.wait()
    assert job.returncode != 0
    said = [l for l in log.splitlines() if l.startswith("error: rank 0")]   # (rank 1, continued, may say more)
    assert len(said) == 1, log[-4000:]
    assert said[0].startswith("error: rank 0: a collective failed (") and "Timed out" in said[0], said
    assert said[0].endswith("the process-group timeout is 5 s (train.py --comm-timeout)"), said
    assert max(r["step"] for r in records(out)) < 6
