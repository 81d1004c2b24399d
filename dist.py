"""
Distributed helpers for train.py and eval_rm.py: process group, rank-0 printing, the compute dtype and lr
schedule both use, metric reduction, FSDP2 sharding and loading, atomic checkpoints, the Hugging Face export.

The same code path serves three situations:
  python train.py                        one process, no process group, plain module
  torchrun --nproc_per_node 4 train.py   one node, FSDP2 over NCCL (GPU) or gloo (CPU)
  torchrun --nnodes 2 ... train.py       several nodes (the checkpoint dir must be on a shared filesystem)

Style after nanochat (get_dist_info / compute_init / print0) and torchtitan
(meta device -> fully_shard per block then root -> to_empty -> load weights).
FSDP2, DTensor and DCP are imported where they are used: torch.distributed.tensor alone takes
over a second to import, which a command that never shards or checkpoints need not pay.
"""
import importlib
import json
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import plain_name, save_hf_state_dict   # plain_name: parameter names without the wrappers' prefixes

# -----------------------------------------------------------------------------
# process group


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_master() -> bool:
    return get_dist_info()[1] == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so that N ranks don't print N copies of every line."""
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def compute_init(device_type: str = "auto") -> torch.device:
    """Pick this process's device and, under torchrun, start the process group. Each process owns
    cuda:LOCAL_RANK; set_device comes first so that NCCL binds its communicator to the right GPU. Without
    torchrun nothing is initialised and the model stays a plain module."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device on this machine")
    is_distributed, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if is_distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return device


def compute_cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_dtype(name: str, device) -> torch.dtype:
    """--dtype: auto = bfloat16 on a GPU (a 7B model in float32 needs 28 GB), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def lr_lambda(schedule: str, warmup: int, total_steps: int):
    """Multiplier of the peak lr at optimizer step `step` (0-based), exactly as transformers'
    get_{cosine,inverse_sqrt,constant}_schedule(_with_warmup) that the official scripts ran: a linear
    warmup step / warmup (so the first step has lr 0), then cosine to 0, inverse_sqrt or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "inverse_sqrt":
            # continuous at the end of warmup: 1 / sqrt((step - warmup + t) / t) with the time scale t = warmup,
            # and without warmup t = 10_000 (transformers' default), not a decay from step 1
            timescale = warmup or 10_000
            return 1.0 / math.sqrt((step - warmup + timescale) / timescale)
        return 1.0
    return f


# -----------------------------------------------------------------------------
# metric reduction


def all_reduce_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum each value (a number or a 0-d tensor) over ranks: one collective and one host sync for the dict."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_reduce_metrics(metrics: dict[str, float], count: float, device) -> dict[str, float]:
    """Count-weighted mean of each metric over ranks, sum_r(m_r * n_r) / sum_r(n_r): the metric of the global
    batch (for means over pairs), not a mean of rank means."""
    sums = all_reduce_sum({**{k: v * count for k, v in metrics.items()}, "__count": count}, device)
    total = sums.pop("__count")
    return {k: v / max(total, 1e-12) for k, v in sums.items()}


def all_reduce_max(value: float, device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# -----------------------------------------------------------------------------
# FSDP2 sharding and weight loading


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32,
                activation_checkpointing: bool = False) -> nn.Module:
    """fully_shard each transformer block, then the root (embedding, final norm, lm_head), as torchtitan does.

    Call it on the meta device: sharding only rewrites parameter metadata, nothing is allocated until
    to_empty(). One FSDP unit per block: one block's full weights are gathered at a time. param_dtype is the
    compute dtype (bf16 on GPU); master weights stay fp32, gradients are reduced in reduce_dtype (fp32).
    With no process group (one process) the model is returned unsharded."""
    # model.py recomputes each block in backward when this flag is set (torch.utils.checkpoint around
    # the block call, which runs FSDP's unshard hook again during the recompute)
    model.activation_checkpointing = activation_checkpointing
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # the last block's weights are needed again at the start of backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mp_policy=mp)
    # FSDP hooks only wrap forward(); the ORPO step calls these two methods instead, and
    # both use root-owned weights (embedding in packed_hidden, lm_head in token_logps).
    register_fsdp_forward_method(model, "packed_hidden")
    register_fsdp_forward_method(model, "token_logps")
    return model


@torch.no_grad()
def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], where: str = "checkpoint") -> None:
    """Copy full tensors, one at a time, into this rank's local shards of the parameters. `tensors` yields
    (our parameter name, full tensor), e.g. model.iter_hf_tensors streaming from safetensors: one full tensor
    is in host memory at a time. A DTensor parameter gets its chunk (distribute_tensor with src_data_rank=None
    slices locally, no communication). Every parameter must be loaded: a silent partial load is an error."""
    # state_dict(keep_vars=True): parameters and persistent buffers, by the names a checkpoint uses
    params = {plain_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    seen = set()  # ids, so that tied weights (one tensor, two names) count as loaded once either is
    for name, full in tensors:
        if name not in params:
            raise ValueError(f"{where} has tensor {name!r} which the model does not have")
        p = params[name]
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(full.shape)}, the model expects {tuple(p.shape)}")
        if hasattr(p, "device_mesh"):  # DTensor: keep only our shard
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(local.to_local())
        else:
            p.copy_(full.to(p.device, p.dtype))
        seen.add(id(p))
    missing = sorted(n for n, p in params.items() if id(p) not in seen)
    if missing:
        raise ValueError(f"{where} is missing {len(missing)} parameter(s), e.g. {missing[:3]}")


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate storage for a meta-device (possibly sharded) model on `device`, uninitialised.

    to_empty gives every module its own new tensor, which unties a tied lm_head on a plain module;
    re-tie it. (Under FSDP2 the shared parameter is one sharded parameter and stays shared.)
    """
    model.to_empty(device=device)
    if not dist.is_initialized() and hasattr(model, "tie_weights"):
        model.tie_weights()


# -----------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint for the sharded model + optimizer, small per-rank files for the
# rest; atomic through a temporary dir + rename. Nothing is read with plain pickle, which can run any code:
# the RNG states are JSON, DCP's tensors load with weights_only, and its .metadata (a pickle DCP writes
# itself) through an unpickler that admits only DCP's metadata classes.

# Without a process group DCP warns that it "assumes a single process": that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class CheckpointUnpickler(pickle.Unpickler):
    """Admits what DCP's metadata is made of (its own classes, torch.Size, dtypes, layouts), nothing else; a
    module is imported only once it is known to be one of those (importing a named module can run code)."""

    def find_class(self, module, name):
        if "." not in name and module in {m for m, _ in SAFE_GLOBALS} | {"torch", DCP_METADATA}:
            obj = getattr(importlib.import_module(module), name, None)
            if ((module, name) in SAFE_GLOBALS or (module == "torch" and isinstance(obj, torch.dtype))
                    or (module == DCP_METADATA and isinstance(obj, type) and obj.__module__ == module)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def safe_reader(ckpt_dir: Path):
    """A DCP FileSystemReader whose metadata is read with CheckpointUnpickler, before DCP starts: a planted or
    garbled .metadata is a ValueError naming it, and nothing of the checkpoint is loaded."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = CheckpointUnpickler(f).load()
    except Exception as e:   # a planted pickle, a torn or garbled file, a missing one
        raise ValueError(f"{path} is not DCP checkpoint metadata ({type(e).__name__}: {e}); nothing was loaded "
                         f"from it") from None

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader(str(ckpt_dir))


def _rng_state() -> dict:
    """This rank's RNG states as JSON-able lists (python's Mersenne state, numpy's, torch's bytes)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [key.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write ckpt_root/step_XXXXXXX atomically and point ckpt_root/latest at it.

    All ranks write into a temporary directory (DCP shards for model + optimizer, one RNG-state JSON per rank,
    and from rank 0 trainer_state.json: step, scheduler, data position). After a barrier rank 0 renames the
    directory (atomic on POSIX) and rewrites `latest` (via os.replace): a crash at any point leaves the old
    checkpoint or the new one, never a half-written one under a final name; leftover tmp-* dirs are ignored
    by load and cleaned up here. Then this run's (trainer_state["run_id"]) older checkpoints are pruned to `keep`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _, rank, _, _ = get_dist_info()
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"tmp-step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    barrier()  # every rank has finished writing before the directory becomes visible
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, ckpt_root / "latest")
        _prune(ckpt_root, keep, final, trainer_state.get("run_id", ""))
    barrier()
    return final


def _complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """step_* dirs that were renamed into place (trainer_state.json is written before the rename), oldest first."""
    done = [p for p in Path(ckpt_root).glob("step_*")
            if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=_step)


def _step(ckpt_dir: Path) -> int:
    return int(ckpt_dir.name.split("_")[1])


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The small JSON part of a checkpoint (step, world size, schedule, data position, run id)."""
    return json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())


def _prune(ckpt_root: Path, keep: int, current: Path, run_id: str) -> None:
    """Keep `current` (which `latest` points to) and the keep - 1 newest checkpoints of the same run before
    it; delete this run's older ones and debris of interrupted saves. Another run's checkpoints and later
    steps are never touched: a step number alone does not say which run, or which trajectory, wrote it."""
    ours = [p for p in _complete_checkpoints(ckpt_root)
            if _step(p) < _step(current) and read_trainer_state(p).get("run_id", "") == run_id]
    for old in ours[:max(0, len(ours) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob("tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def find_latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` points to, else the newest complete step_* dir, else None."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        target = ckpt_root / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    done = _complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state in place; return trainer_state. Only on the world
    size that wrote it (train.py checks up front): DCP could reshard the weights, but the data order (batch
    b goes to rank b % world_size) and the per-rank RNG states could not follow the run's trajectory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt_dir, rank = Path(ckpt_dir), get_dist_info()[1]
    trainer_state, rng_file = read_trainer_state(ckpt_dir), ckpt_dir / f"rng_rank{rank}.json"
    try:   # an older checkpoint kept its RNG state as a pickle (rng_rank*.pt), which is never loaded
        rng = json.loads(rng_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {rng_file} ({type(e).__name__}); a checkpoint written before the RNG "
                         f"states were JSON cannot be resumed (a pickle can run code)") from None
    reader = safe_reader(ckpt_dir)                           # checks .metadata before DCP reads anything
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _set_rng_state(rng)
    return trainer_state


# -----------------------------------------------------------------------------
# Hugging Face export


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) fp32 state dict onto rank 0's CPU; other ranks get {}. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {plain_name(k): v for k, v in sd.items()} if is_master() else {}


def export_hf(model: nn.Module, config, tokenizer, out_dir: Path, files: dict[str, str] | None = None) -> Path:
    """Write out_dir in Hugging Face format (config.json, *.safetensors, tokenizer files, and `files`: {name: text},
    e.g. README.md, generation_config.json). A collective (the gather); rank 0 writes into a tmp dir, then renames
    it: a reader never sees half an export."""
    out_dir = Path(out_dir)
    sd = full_state_dict(model)
    if is_master():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_hf_state_dict(sd, config, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
    return out_dir
