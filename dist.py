"""
Distributed helpers for train.py and eval_rm.py, one process (a plain module) or torchrun on one or more nodes (FSDP2
over NCCL or gloo; OUT on a shared filesystem): process group, the lock on OUT, dtype and lr schedule, metric reduction,
FSDP2 sharding (torchtitan's meta device -> fully_shard per block, then root -> to_empty -> load), atomic checkpoints,
the HF export. FSDP2, DTensor and DCP are imported where used: torch.distributed.tensor alone takes a second to import.
"""
import datetime
import fcntl
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

from model import CheckpointError, save_hf_state_dict

# -----------------------------------------------------------------------------
# process group, and one run per output directory


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


# 10 minutes, NCCL's own default (gloo's is 30): longer than any phase where one rank works while the others wait
# (rank 0 writing a 7B export, tokenizing a large data set), and a stalled peer still ends the job, not never
COMM_TIMEOUT_S = 600.0
_OUT_LOCK = None   # OUT/.lock, open and flock-ed while this process (rank 0) runs in OUT


def compute_init(device_type: str = "auto", comm_timeout_s: float = COMM_TIMEOUT_S) -> torch.device:
    """This process's device and, under torchrun, the process group (collectives fail after comm_timeout_s). Each
    process owns cuda:LOCAL_RANK; set_device comes first so that NCCL binds its communicator to the right GPU."""
    global COMM_TIMEOUT_S
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device on this machine")
    is_distributed, rank, local_rank, world_size = get_dist_info()
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    if is_distributed and not dist.is_initialized():
        backend, COMM_TIMEOUT_S = "nccl" if device_type == "cuda" else "gloo", comm_timeout_s
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=comm_timeout_s))
        dist.barrier()
    return device


def compute_cleanup() -> None:
    global _OUT_LOCK
    if _OUT_LOCK is not None:   # unlinked while still held, then released: a finished run leaves no lock behind
        Path(_OUT_LOCK.name).unlink(missing_ok=True)
        _OUT_LOCK = _OUT_LOCK.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def lock_out_dir(out: Path, device) -> str:
    """Rank 0 makes OUT and flocks OUT/.lock for the run's life, writing its pid, host and start into it; returns "",
    or on every rank what the file says of the process holding it. The kernel drops a dead process's flock."""
    global _OUT_LOCK
    holder, path = "", Path(out) / ".lock"
    if get_dist_info()[1] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", buffering=1)   # line-buffered: the holder line is on disk once printed
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:   # unlinked by its holder's compute_cleanup
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = f.seek(0) or f.read().strip() or "another process"
            f.close()
        else:
            f.truncate(0)
            print(f"pid {os.getpid()} on host {os.uname().nodename} (started {datetime.datetime.now():%F %T})", file=f)
            _OUT_LOCK = f
    failed = all_reduce_max(bool(holder), device)   # every rank takes part: all learn rank 0's answer
    return holder or ("another run" if failed else "")


def fault_line(e: BaseException) -> str | None:
    """One line for a fault of the machine, not a bug (else None): an OSError (a full disk, an unwritable path), or
    a collective that timed out or lost its peer (NCCL raises a DistError, gloo a RuntimeError that says so)."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    gloo = any(s in text for s in ("Timed out", "Connection closed by peer", "Connection reset by peer"))
    if isinstance(e, dist.DistError) or (dist.is_initialized() and gloo and not isinstance(e, OSError)):
        return (f"rank {get_dist_info()[1]}: a collective failed ({text}): another rank stalled or died; the "
                f"process-group timeout is {COMM_TIMEOUT_S:g} s (train.py --comm-timeout)")
    return text if isinstance(e, OSError) else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_dtype(name: str, device) -> torch.dtype:
    """--dtype: auto = bfloat16 on a GPU (a 7B model in float32 needs 28 GB), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def lr_lambda(schedule: str, warmup: int, total_steps: int):
    """Multiplier of the peak lr at optimizer step `step` (0-based), exactly as transformers' get_{cosine,inverse_sqrt,
    constant}_schedule(_with_warmup): a linear warmup step / warmup (the first step has lr 0), then the schedule."""
    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "inverse_sqrt":
            # continuous after warmup: 1 / sqrt((step - warmup + t) / t), t = warmup, or 10_000 without (transformers')
            timescale = warmup or 10_000
            return 1.0 / math.sqrt((step - warmup + timescale) / timescale)
        return 1.0
    return f


# -----------------------------------------------------------------------------
# metric reduction


def all_reduce_sum(values: dict[str, float], device, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """Sum (or op) each value (a number or a 0-d tensor) over ranks: one collective and one host sync for the dict."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(value: float, device) -> float:
    return all_reduce_sum({"max": float(value)}, device, dist.ReduceOp.MAX)["max"]


# -----------------------------------------------------------------------------
# FSDP2 sharding and weight loading


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None, reduce_dtype=torch.float32,
                activation_checkpointing: bool = False) -> nn.Module:
    """fully_shard each block (one block's full weights gathered at a time), then the root, as torchtitan does, on the
    meta device. param_dtype is the compute dtype; master weights stay fp32. Without a process group: unsharded."""
    # model.py recomputes each block in backward when set (FSDP's unshard hook runs again in the recompute)
    model.activation_checkpointing = activation_checkpointing
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(model.layers):
        # the last block's weights are needed again at the start of backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)
    # FSDP hooks wrap forward() only; the ORPO step calls these two, which use root-owned weights (embedding, lm_head)
    register_fsdp_forward_method(model, "packed_hidden")
    register_fsdp_forward_method(model, "token_logps")
    return model


@torch.no_grad()
def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], where: str = "checkpoint") -> None:
    """Copy full tensors (name, tensor), e.g. streamed by model.iter_hf_tensors, one at a time into this rank's shards
    (distribute_tensor with src_data_rank=None slices locally). A silent partial load is an error."""
    # state_dict(keep_vars=True): parameters and persistent buffers, by the names a checkpoint uses
    params = model.state_dict(keep_vars=True)
    seen = set()  # ids, so that tied weights (one tensor, two names) count as loaded once either is
    for name, full in tensors:
        if name not in params:
            raise ValueError(f"{where} has tensor {name!r} which the model does not have")
        p = params[name]
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
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
    """Allocate a meta-device model on `device`, uninitialised; re-tie a plain module's lm_head (to_empty unties it)."""
    model.to_empty(device=device)
    if not dist.is_initialized() and hasattr(model, "tie_weights"):
        model.tie_weights()


# -----------------------------------------------------------------------------
# checkpoints: DCP for the sharded model + optimizer, JSON for the rest; atomic through a tmp dir + rename. No plain
# pickle, which can run any code: DCP's .metadata (its own pickle) is read by an unpickler admitting only its classes.

# Without a process group DCP warns that it "assumes a single process": that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class CheckpointUnpickler(pickle.Unpickler):
    """Admits what DCP's metadata is made of (its own classes, torch.Size, dtypes, layouts), nothing else; a
    module is imported only once it is known to be one of those (importing a named module can run code)."""

    class Forbidden(pickle.UnpicklingError):   # a planted pickle: refused, never taken for a torn file and skipped
        pass

    def find_class(self, module, name):
        if "." not in name and module in {m for m, _ in SAFE_GLOBALS} | {"torch", DCP_METADATA}:
            obj = getattr(importlib.import_module(module), name, None)
            if ((module, name) in SAFE_GLOBALS or (module == "torch" and isinstance(obj, torch.dtype))
                    or (module == DCP_METADATA and isinstance(obj, type) and obj.__module__ == module)):
                return obj
        raise self.Forbidden(f"{module}.{name} is not part of checkpoint metadata")


def safe_reader(ckpt_dir: Path):
    """A DCP reader of .metadata by CheckpointUnpickler (a planted pickle: CheckpointError; garbage: ValueError)."""
    from torch.distributed.checkpoint import FileSystemReader
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = CheckpointUnpickler(f).load()
    except Exception as e:
        raise (CheckpointError if isinstance(e, CheckpointUnpickler.Forbidden) else ValueError)(
            f"{path} is not DCP checkpoint metadata ({type(e).__name__}: {e}); nothing was loaded from it") from None
    reader = FileSystemReader(str(ckpt_dir))
    reader.read_metadata = lambda *args, **kwargs: metadata   # in place of DCP's pickle.load
    return reader


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def checkpoint_problem(ckpt_dir: Path) -> str | None:
    """Why ckpt_dir cannot be resumed from (a file missing, garbled, cut short by a full disk), or None if intact."""
    try:
        metadata = safe_reader(ckpt_dir).read_metadata()
        for path in [ckpt_dir / "trainer_state.json", *ckpt_dir.glob("rng_rank*.json")]:   # (a missing one: load says)
            read_json(path)
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        return str(e)
    items = metadata.storage_data.values()
    for name in sorted({item.relative_path for item in items}):   # each file must reach the end of its last item
        size = max(item.offset + item.length for item in items if item.relative_path == name)
        have = (ckpt_dir / name).stat().st_size if (ckpt_dir / name).is_file() else None
        if have is None or have < size:
            return f"{ckpt_dir / name} " + ("is missing" if have is None else f"has {have} bytes of the {size} needed")
    return None


def find_resumable_checkpoint(ckpt_root: Path) -> tuple[Path | None, dict | None]:
    """The newest intact checkpoint and its trainer state ((None, None) if there are none): `latest`'s, else the older
    step_* dirs newest first, each damaged one skipped with a line saying why. None intact is an error."""
    ckpt_root, skipped = Path(ckpt_root), []
    done = _complete_checkpoints(ckpt_root)[::-1]
    if (ckpt_root / "latest").is_file() and (target := ckpt_root / (ckpt_root / "latest").read_text().strip()) in done:
        done = [target] + [p for p in done if int(p.name[5:]) < int(target.name[5:])]
    for ckpt in done:
        if (problem := checkpoint_problem(ckpt)) is None:
            for name, why in skipped:
                print0(f"resume: skipped the damaged checkpoint {name} ({why}); using {ckpt.name}")
            return ckpt, read_json(ckpt / "trainer_state.json")
        skipped.append((ckpt.name, problem))
    if skipped:
        raise CheckpointError(f"{ckpt_root} holds no intact checkpoint: " + "; ".join(f"{n}: {w}" for n, w in skipped))
    return None, None


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, keep=2) -> Path:
    """Write step_XXXXXXX atomically: all ranks write tmp-step_XXXXXXX (DCP shards, RNG JSONs, trainer_state.json), then
    rank 0 renames it and `latest` (os.replace): a crash or a failed write leaves the old one. Prunes to `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, root = get_dist_info()[1], Path(ckpt_root)
    final, tmp = root / f"step_{step:07d}", root / f"tmp-step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:   # DCP agrees over ranks: a write that fails on one is a CheckpointException on all
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        _, key, pos, has_gauss, gauss = np.random.get_state()     # this rank's RNG states as JSON-able lists
        rng = {"python": random.getstate(), "numpy": [key.tolist(), pos, has_gauss, gauss],
               "torch": torch.get_rng_state().tolist(),
               **({"cuda": torch.cuda.get_rng_state().tolist()} if torch.cuda.is_available() else {})}
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng))
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    except (Exception, CheckpointException) as e:
        raise write_error("checkpoint", tmp, e) from e
    barrier()  # every rank has written its part before the directory becomes visible
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        _prune(root, keep, final)
    barrier()
    return final


def _complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """step_* dirs that were renamed into place (trainer_state.json is written before the rename), oldest first."""
    return sorted((p for p in Path(ckpt_root).glob("step_*") if p.name[5:].isdigit()
                   and (p / "trainer_state.json").is_file()), key=lambda p: int(p.name[5:]))


def _prune(ckpt_root: Path, keep: int, current: Path) -> None:
    """Keep `current` and the keep - 1 newest checkpoints before it; delete older ones and tmp-* debris. Later steps
    stay (a run resumed from an older checkpoint rewrites them in turn). All are one run's: train.py refuses a fresh
    start in an --out that holds checkpoints."""
    older = [p for p in _complete_checkpoints(ckpt_root) if int(p.name[5:]) < int(current.name[5:])]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob("tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def nonfinite(tensors: dict, device) -> list[str]:
    """The names of the tensors holding NaN/inf, the same on every rank: each rank checks its own shards, then one
    all-reduce (no gather), so all ranks stop together."""
    local = {k: float(not torch.isfinite(v.to_local() if hasattr(v, "to_local") else v).all())
             for k, v in tensors.items() if torch.is_tensor(v)}
    return [k for k, v in all_reduce_sum(local, device).items() if v]


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state in place; return trainer_state. Only on the world size that
    wrote it (train.py checks): DCP could reshard the weights, not the data order or the per-rank RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    ckpt_dir, rank = Path(ckpt_dir), get_dist_info()[1]
    trainer_state, rng_file = read_json(ckpt_dir / "trainer_state.json"), ckpt_dir / f"rng_rank{rank}.json"
    try:   # an older checkpoint kept its RNG state as a pickle (rng_rank*.pt), which is never loaded
        rng = json.loads(rng_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {rng_file} ({type(e).__name__}); a checkpoint written before the RNG "
                         f"states were JSON cannot be resumed (a pickle can run code)") from None
    reader = safe_reader(ckpt_dir)                           # checks .metadata before DCP reads anything
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    if bad := nonfinite(state["model"], next(model.parameters()).device):
        raise CheckpointError(f"{ckpt_dir}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
                              f"has NaN/inf values; remove this checkpoint to resume from the one before")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    key, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return trainer_state


def write_error(what: str, target: Path, e: BaseException) -> OSError:
    """One line: the path and the first OSError behind e (DCP hides it in a CheckpointException and torch.save's
    'unexpected pos' error); the half-written target is removed."""
    shutil.rmtree(target, ignore_errors=True)
    todo = [e]
    while todo and not isinstance(todo[0], OSError):
        x = todo.pop(0)
        todo += [c for c in (x.__cause__, x.__context__, *(f for f, _ in getattr(x, "failures", {}).values())) if c]
    cause = todo[0] if todo else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return OSError(f"cannot write {what} to {target}: {cause}")


# -----------------------------------------------------------------------------
# Hugging Face export


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) fp32 state dict onto rank 0's CPU; other ranks get {}. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_master() else {}


def export_hf(model: nn.Module, config, tokenizer, out_dir: Path, files: dict[str, str] | None = None) -> Path:
    """Write out_dir in Hugging Face format (config.json, *.safetensors, tokenizer files, `files`: {name: text}). A
    collective (the gather); rank 0 writes into a tmp dir, then renames it: a reader never sees half an export."""
    out_dir = Path(out_dir)
    sd, tmp = full_state_dict(model), out_dir.with_name(out_dir.name + ".tmp")
    if is_master():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_hf_state_dict(sd, config, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
        except Exception as e:
            raise write_error("export", tmp, e) from e
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
    return out_dir
