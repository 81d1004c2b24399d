"""Resume reads no plain pickle: a checkpoint whose files were replaced by malicious pickles is refused in one
line, and the code planted in them never runs (lean issue's sibling: the hardening issue, item 1)."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

import dist
import model as model_lib


class Planted:
    """Unpickling this runs os.system: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_checkpoint(tmp_path):
    config = model_lib.ModelConfig(family="llama", vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32)
    model = model_lib.Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (1, 6))).sum().backward()
    optimizer.step()
    ckpt = dist.save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, {"step": 1})
    return ckpt, model, optimizer


def test_weights_optimizer_and_rng_round_trip_without_pickle(tmp_path):
    ckpt, model, optimizer = tiny_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "rng_rank0.json",
                                                      "trainer_state.json"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert dist.load_checkpoint(ckpt, model, optimizer)["step"] == 1
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # the RNG states of the moment of the save are back: the same draws come again
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


@pytest.mark.parametrize("victim", [".metadata", "rng_rank0.json", "rng_rank0.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, victim):
    ckpt, model, optimizer = tiny_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    if victim == "rng_rank0.pt":              # a checkpoint of the older layout, its RNG state a pickle
        (ckpt / "rng_rank0.json").unlink()
    (ckpt / victim).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError) as e:
        dist.load_checkpoint(ckpt, model, optimizer)
    assert not marker.exists()
    message = str(e.value)
    assert "\n" not in message and (victim.replace(".pt", ".json") in message or victim in message)


def test_resume_from_a_planted_checkpoint_is_one_line_and_runs_nothing(tmp_path, capsys):
    import train
    out, marker = tmp_path / "run", tmp_path / "pwned"
    argv = ["--out", str(out), "--synthetic-pairs", "40", "--batch-size", "4", "--max-steps", "2",
            "--save-every", "1", "--eval-every", "0", "--no-export"]
    assert train.main(argv) == 0
    latest = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    (latest / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ".metadata is not DCP checkpoint metadata" in err[0]
    assert not marker.exists()


def test_the_metadata_unpickler_imports_no_module_it_does_not_admit(tmp_path):
    """A pickle that names an unknown module is refused before that module is imported."""
    import sys
    (tmp_path / "evil_module_xyz.py").write_text("import pathlib; pathlib.Path(__file__).with_name('ran').touch()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        payload = b"\x80\x04cevil_module_xyz\nanything\n."   # GLOBAL evil_module_xyz.anything
        with pytest.raises(pickle.UnpicklingError):
            dist.CheckpointUnpickler(__import__("io").BytesIO(payload)).load()
    finally:
        sys.path.remove(str(tmp_path))
    assert not (tmp_path / "ran").exists() and "evil_module_xyz" not in sys.modules
