"""Smoke tests of the benchmark code paths (benchmarks/step.py, gpu.py, gpu_check): tiny sizes, no timing asserts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import data  # noqa: E402
import model as M  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "512", "--pairs", "2",
        "--max-length", "256", "--peak-size", "128", "--synthetic-data"]


def tiny_config(**kw):
    return M.ModelConfig(**{**dict(family="llama", vocab_size=300, dim=32, n_layers=2, n_heads=4, ffn_dim=64), **kw})


def test_matmul_params_exclude_the_input_embedding_as_torchtitan_does():
    untied = M.Transformer(tiny_config())
    total = sum(p.numel() for p in untied.parameters())
    assert step.matmul_params(untied) == total - 300 * 32                 # the lm_head stays: it is a matmul
    tied = M.Transformer(tiny_config(tie_embeddings=True))
    assert step.matmul_params(tied) == sum(p.numel() for p in tied.parameters())   # counted once, as the lm_head
    opt = M.Transformer(M.ModelConfig(family="opt", vocab_size=300, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                                      max_seq_len=64, norm="layernorm", positions="learned", mlp_kind="relu",
                                      tie_embeddings=True))
    assert step.matmul_params(opt) == sum(p.numel() for p in opt.parameters()) - 66 * 32   # learned positions out


def test_model_flops_are_train_step_flops_and_the_recompute_is_apart(tmp_path):
    args = step.parse_args(TINY)
    info = step.write_checkpoint(args, tmp_path / "ckpt")
    pairs, _ = step.load_pairs(256, 0, synthetic=True, vocab=512)
    batch = pairs[:3]
    for shared in (True, False):
        packed = step.pack(batch, shared)
        expected = M.step_flops(info["matmul_params"], 1, 32, [packed])
        assert step.model_flops(info, batch, shared) == expected
        import gpu
        assert gpu.step_flops(M.load_config(tmp_path / "ckpt"), info["matmul_params"], packed) == expected
    M_targets = step.pack(batch, True).tgt_index.numel()
    assert step.recompute_flops(info, batch, True) == 2 * 512 * 32 * M_targets
    model, recompute = step.row_flops("ours", [batch], info)
    assert recompute > 0 and step.row_flops("trl", [batch], info)[1] == 0.0
    assert model < step.row_flops("trl", [batch], info)[0]                # the prompt is computed once


def test_matmul_peak_reports_wall_and_cpu_throughput():
    peak = step.matmul_peak(1, n=64, repeats=2)
    assert peak["flops_per_s"] > 0 and peak["flops_per_cpu_s"] > 0 and peak["n"] == 64


def test_sweep_varies_one_thing_at_a_time_from_the_centre():
    args = step.parse_args([])
    points = step.sweep_points(args)
    centre = dict(pairs=8, max_length=1024, vocab=32000)
    assert {(p["axis"], p["value"]) for p in points} == {("pairs", 4), ("pairs", 8), ("pairs", 16), ("pairs", 32),
                                                         ("length", 512), ("length", 1024), ("length", 2048),
                                                         ("vocab", 32000), ("vocab", 128256)}
    for p in points:
        changed = {k for k in centre if p[k] != centre[k]}
        assert changed <= {p["axis"] if p["axis"] != "length" else "max_length"}
    pairs = [([1] * 5, [2] * 3, [3] * 9), ([1] * 50, [2], [3]), ([1], [2], [3])]
    assert step.longest(pairs, 2) == pairs[:2][::-1]


def test_a_row_past_the_memory_cap_is_stopped_and_reported(tmp_path):
    args = step.parse_args(TINY + ["--mem-cap-gb", "0.02"])   # 20 MB: less than the child's torch import
    step.write_checkpoint(args, tmp_path / "ckpt")
    pairs, _ = step.load_pairs(256, 0, synthetic=True, vocab=512)
    torch.save({"batches": [pairs[:2]], "ckpt": str(tmp_path / "ckpt"), "workdir": str(tmp_path)}, tmp_path / "setup.pt")
    w = step.Worker("ours", args, tmp_path)
    assert w.failed and "memory passed the 0.02 GB cap" in w.failed
    assert w.ask("round") is None                            # a stopped row answers nothing more
    w.close()


def test_quick_run_reports_model_flops_against_the_measured_peak(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert step.main(["--quick", "--rows", "ours", *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Model FLOP/s against this machine's float32 matmul peak" in text and "lm_head recompute" in text
    res = json.loads(out.read_text())
    assert len(res["peaks"]) == 2 and res["flops"]["ours"][0] > 0 and res["flops"]["ours"][1] > 0
    assert res["flop_info"]["matmul_params"] < res["flop_info"]["params"]


def test_profile_names_every_phase_of_the_step(capsys):
    assert step.main(["--profile", "--repeats", "1", "--batches", "1", *TINY]) == 0
    text = capsys.readouterr().out
    for phase in step.PHASES:
        assert f"| {phase} |" in text
    assert "model.py's CPU path (segments on a padded grid" in text and "top operators" in text


def test_scaling_plot_draws_measured_and_stopped_rows(tmp_path):
    base = dict(max_length=1024, vocab=32000, source="hh", params=1000)
    recs = []
    for axis, values in (("pairs", (4, 8)), ("length", (512, 1024)), ("vocab", (32000, 128256))):
        for i, v in enumerate(values):
            for row, mem in (("ours", 100 * (i + 1)), ("trl", 400 * (i + 1))):
                rec = {**base, "axis": axis, "value": v, "pairs": 8, "row": row, "pair_tokens": 1000 * (i + 1),
                       "wall_s": 1.0 + i, "cpu_s": 2.0 + i, "memory_mb": mem, "first_loss": 1.0}
                if row == "trl" and i == 1 and axis != "pairs":
                    rec = {k: x for k, x in rec.items() if k not in ("wall_s", "cpu_s", "memory_mb", "first_loss")}
                    rec.update(failed="stopped: its memory passed the 16 GB cap", rss_seen_mb=16500)
                recs.append(rec)
    data = {"records": recs, "conditions": "test", "mem_cap_gb": 16, "minutes": 0.1}
    step.print_sweep(data)
    assert step.plot_scaling(data, tmp_path / "s.png") == 0 and (tmp_path / "s.png").stat().st_size > 10_000


def test_gpu_benchmark_without_cuda_says_so_in_one_sentence(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: benchmarks/gpu.py would run for real")
    import gpu
    assert gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_gpu_check_dry_run_reports_every_part_not_available_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would run for real")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert {line.split(" | ")[0][2:5] for line in rows} == {"(a)", "(b)", "(c)"}
    assert all(" | not available here | " in line for line in rows) and "failed" not in table


def test_gpu_check_train_part_runs_train_py_as_written(tmp_path):
    """Part (c)'s real train.py command line, on the CPU with tiny shapes (--smoke-cpu): a train.py change that
    breaks it (a new default, a renamed flag) fails here, not in the first GPU session's only run."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "out"), "--smoke-cpu",
                        "--train-steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| (c)"))
    assert " | ok | " in row and "3 steps" in row, table + r.stdout[-2000:]
