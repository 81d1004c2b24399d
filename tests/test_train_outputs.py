"""What a train.py run leaves besides the weights: the paper's data by default, a Hub-ready export (tokenizer with
its chat template, generation_config.json, model card), run.json's settings, --report-to and OUT/curves.png.

One subprocess run (a small local checkpoint, no --data, 2 steps) reads the paper's UltraFeedback from a Hugging
Face cache built here in the real repo's file layout, offline, as a user's HF_HUB_CACHE would hold it.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import model as model_lib
import train

ROOT = Path(__file__).resolve().parents[1]
UF = "HuggingFaceH4/ultrafeedback_binarized"
SMALL = model_lib.ModelConfig(family="llama", vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                              max_seq_len=1024, tie_embeddings=True)
BASE_GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 17, "do_sample": True}
PNG = b"\x89PNG\r\n\x1a\n"


def uf_rows(n, seed):
    """UltraFeedback-binarized rows (its columns and types) around synthetic prompts and answers."""
    src = data.write_synthetic(Path(os.environ.get("TMPDIR", "/tmp")) / f"uf_src_{os.getpid()}_{seed}.parquet", n,
                               seed=seed, split="train" if seed == 0 else "eval")
    t = pq.read_table(src).to_pylist()
    src.unlink()
    chat = lambda p, a: [{"content": p, "role": "user"}, {"content": a, "role": "assistant"}]
    return [{"prompt": r["prompt"], "prompt_id": hashlib.sha256(r["prompt"].encode()).hexdigest(),
             "chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"]),
             "messages": chat(r["prompt"], r["chosen"]), "score_chosen": 8.0, "score_rejected": 4.0} for r in t]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An HF_HUB_CACHE holding HuggingFaceH4/ultrafeedback_binarized as the Hub ships it: refs/main -> a commit,
    snapshots/<commit>/data/<split>-00000-of-00001.parquet for its six splits."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo, commit = cache / "datasets--HuggingFaceH4--ultrafeedback_binarized", "3949bf5f8c17c394422ccfab0c31ea9c20bdeb85"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for split, n, seed in (("train_prefs", 40, 0), ("test_prefs", 12, 1), ("train_sft", 8, 0), ("test_sft", 8, 1),
                           ("train_gen", 8, 0), ("test_gen", 8, 1)):
        f = repo / "snapshots" / commit / "data" / f"{split}-00000-of-00001.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(uf_rows(n, seed)), f)
    return cache


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random Llama in HF format with the synthetic tokenizer and a generation_config.json of its own."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model_lib.Transformer(SMALL).save_pretrained(path)
    data.synthetic_tokenizer().save(path)
    (path / "generation_config.json").write_text(json.dumps(BASE_GENERATION))
    return path


@pytest.fixture(scope="module")
def uf_run(tmp_path_factory, hub_cache, checkpoint):
    """`python train.py --model CKPT` with no --data, offline, against the built cache; 2 steps, eval every step."""
    out = tmp_path_factory.mktemp("uf_run") / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(checkpoint), "--out", str(out), "--batch-size", "4",
           "--max-steps", "2", "--eval-every", "1", "--save-every", "0", "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, hub_cache / "datasets--HuggingFaceH4--ultrafeedback_binarized"


# -----------------------------------------------------------------------------
# 1. the paper's data and lambda by default


def test_a_real_checkpoint_without_data_trains_on_ultrafeedback(uf_run):
    out, log, _ = uf_run
    assert f"train: 40 pairs from {UF} [train_prefs]" in log and f"eval: 12 pairs from {UF} [test_prefs]" in log
    assert "| lam 0.1 |" in log
    run = json.loads((out / "run.json").read_text())
    assert (run["train_data"], run["train_split"], run["eval_data"], run["eval_split"]) == (
        UF, "train_prefs", UF, "test_prefs")


def test_presets_carry_the_papers_lambda_and_the_default_data():
    lam = lambda *argv: train.parse_args(list(argv)).lam
    assert (lam("--model", "mistral-7b"), lam("--model", "llama2-7b"), lam("--model", "phi-2")) == (0.1, 0.2, 0.25)
    assert lam("--model", "opt-125m") == lam("--model", "someone/model") == lam() == 0.1
    assert lam("--model", "phi-2", "--lam", "0.5") == 0.5
    args = train.parse_args(["--model", "phi-2"])
    assert (args.data, args.split, args.eval_split) == (UF, "train_prefs", "test_prefs")
    args = train.parse_args(["--model", "phi-2", "--eval-fraction", "0.1", "--split", "train_sft"])
    assert (args.data, args.split, args.eval_split) == (UF, "train_sft", "test_prefs")
    assert train.parse_args(["--model", "phi-2", "--data", "my.parquet"]).eval_split is None   # the user's data
    assert train.parse_args([]).data is None and train.parse_args(["--model", "phi-2", "--data", "synthetic"]).data is None


def test_data_synthetic_on_a_checkpoint(tmp_path, checkpoint, capsys):
    argv = ["--model", str(checkpoint), "--data", "synthetic", "--synthetic-pairs", "32", "--out", str(tmp_path / "o"),
            "--batch-size", "4", "--max-steps", "1", "--eval-every", "0", "--save-every", "0", "--no-export"]
    assert train.main(argv) == 0
    log = capsys.readouterr().out
    assert "train: 32 pairs from " in log and "synthetic_train_32.parquet" in log and UF not in log
    assert "eval: 200 pairs from " in log and "synthetic_eval.parquet" in log     # the synthetic held-out set, as tiny's


# -----------------------------------------------------------------------------
# 2. the export: a folder the Hub and transformers take as it is


@pytest.mark.parametrize("which", ["final", "best"])
def test_export_is_a_complete_hub_folder(uf_run, checkpoint, which):
    transformers = pytest.importorskip("transformers")
    out, _, _ = uf_run
    d = out / which
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "README.md"):
        assert (d / f).is_file(), f
    tok = transformers.AutoTokenizer.from_pretrained(d)
    # the template the run rendered its pairs with (BOS written by the template where training prepended one)
    assert tok.chat_template == "{{ bos_token }}" + data.ZEPHYR_TEMPLATE
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).endswith("<|assistant|>\n")
    transformers.AutoModelForCausalLM.from_pretrained(d)
    gen = transformers.GenerationConfig.from_pretrained(d)     # the base's own file, copied
    assert (gen.max_new_tokens, gen.eos_token_id) == (17, 2)


def test_model_card(uf_run, checkpoint):
    import yaml
    out, _, _ = uf_run
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["tags"] == ["orpo"] and meta["datasets"] == [UF] and meta["library_name"] == "transformers"
    assert "base_model" not in meta                            # a local base: no Hub id to name
    assert "arxiv.org/abs/2403.07691" in card and "train_prefs" in card and "test_prefs" in card
    assert "\"lam\": 0.1," in card and "--report-to tensorboard" in card
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval"] and f"{last['eval_loss']:.4f}" in card and f"{last['eval_reward_acc']:.4f}" in card
    # uploadable: no local absolute path, except the one line naming the local base
    local = [line for line in card.splitlines() if str(out.parent) in line or str(checkpoint) in line]
    assert len(local) == 1 and "trained from" in local[0] and str(checkpoint) in local[0]


def test_run_json_has_the_command_versions_and_data_files(uf_run):
    out, _, repo = uf_run
    run = json.loads((out / "run.json").read_text())
    assert "train.py" in run["command"] and "--report-to tensorboard" in run["command"]
    v = run["versions"]
    assert v["torch"] == torch.__version__ and v["python"] == sys.version.split()[0]
    assert {"safetensors", "tokenizers", "huggingface_hub"} <= set(v)
    assert v["git_commit"] is None or len(v["git_commit"]) == 40
    files = {Path(f["path"]).name: f for f in run["data_files"]}
    assert set(files) == {"train_prefs-00000-of-00001.parquet", "test_prefs-00000-of-00001.parquet"}
    for f in files.values():
        blob = Path(f["path"]).read_bytes()
        assert f["size"] == len(blob) and f["sha256"] == hashlib.sha256(blob).hexdigest()


def test_tiny_export_has_a_generation_config_from_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--synthetic-pairs", "32", "--max-steps", "1", "--eval-every", "0", "--save-every", "0"]) == 0
    gen = json.loads(Path("out/final/generation_config.json").read_text())
    tok = data.synthetic_tokenizer()
    assert gen == {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    card = Path("out/final/README.md").read_text()
    assert "base_model" not in card and "random" in card and str(tmp_path) not in card
    assert Path("out/curves.png").read_bytes()[:8] == PNG


# -----------------------------------------------------------------------------
# 3. --report-to and curves.png


def test_tensorboard_logs_every_metric_at_its_step(uf_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = uf_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        for k, v in rec.items():
            if type(v) in (int, float) and k != "step":
                assert k in tags, k
    steps = lambda tag: [e.step for e in acc.Scalars(tag)]
    assert steps("nll") == [1, 2] and steps("eval_nll") == [0, 1, 2] and steps("eval_log_odds") == [0, 1, 2]
    assert [e.value for e in acc.Scalars("nll")] == pytest.approx([r["nll"] for r in recs if not r.get("eval")])


def test_curves_png(uf_run):
    out, log, _ = uf_run
    png = (out / "curves.png").read_bytes()
    assert png[:8] == PNG and len(png) > 5000 and "curves.png" in log


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_report_to_without_its_package_is_one_line(tmp_path, capsys, monkeypatch, package):
    import importlib.util
    if package == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.setitem(sys.modules, package, None)        # find_spec then reports it missing, as when not installed
    with pytest.raises(SystemExit) as e:
        train.main(["--report-to", package, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: --report-to {package}: {package} is not installed (pip install {package})"
    assert not (tmp_path / "out").exists()
