"""Checkpoints: atomic run checkpoints, sharded learner state, controller state, HF export.

Layout of a run directory::

    RUN_DIR/checkpoints/
      step-000004/
        learner/                 torch.distributed.checkpoint (DCP), one shard file per rank:
          .metadata, __*_*.distcp  model + optimizer (sharded), scheduler + version
          rng-rank00000.pt       per-rank RNG states (torch, CUDA, numpy, python)
        controller.msgpack       :class:`ControllerState` (msgspec msgpack)
      latest                     text file naming the newest complete step directory

A checkpoint is written into a temporary sibling directory and renamed into
place only when every writer returned (:func:`atomic_checkpoint_dir`), then
``latest`` is replaced atomically: a crash mid-save leaves the previous
checkpoint and pointer untouched. Resume reads ``latest_checkpoint(run_dir)``.

``verimed export RUN_DIR OUT_DIR`` turns the newest (or a given) checkpoint's
model shards into a Hugging Face directory that transformers and vLLM load.

torch is imported inside functions: the CLI imports this module before parsing.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgspec

from verimed.core.rl.staleness import LedgerState
from verimed.core.tasks.schedule import ScheduleState
from verimed.core.types import Group

CHECKPOINTS = "checkpoints"
LATEST = "latest"
LEARNER_SUBDIR = "learner"
CONTROLLER_FILE = "controller.msgpack"


class CheckpointError(ValueError):
    """A checkpoint or run directory is missing or malformed; the message says which."""


# ------------------------------------------------------------------ run-level layout


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)  # atomic on POSIX: readers see the old or the new pointer
    _fsync_dir(root)


@contextlib.contextmanager
def atomic_checkpoint_dir(run_dir: str | Path, step: int, keep: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on a clean exit it becomes ``RUN_DIR/checkpoints/step-XXXXXX``.

    Then ``latest`` is repointed to it and, with ``keep``, only the ``keep``
    newest step directories are kept. On an exception the temporary directory
    is removed and nothing else changes (the previous checkpoint stays the
    latest). Leftover temporaries of a crashed process are removed on entry
    (one writer per run: the controller).
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old copy
        old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    _write_pointer(root, final.name)
    if keep is not None:
        for old_step in sorted(_step_dirs(root))[:-keep]:
            if old_step != final:
                shutil.rmtree(old_step, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``latest`` pointer, else the highest step), or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            return named
    steps = sorted(_step_dirs(root))
    return steps[-1] if steps else None


# ------------------------------------------------------------------ controller state


class ControllerState(msgspec.Struct, frozen=True, kw_only=True):
    """What the controller needs to continue a run exactly (saved next to the learner shards).

    Produced and consumed by ``actors/controller.py``. ``buffered_groups`` are
    finished groups not yet trained on, with their per-sample advantages
    (``buffered_advantages[i][j]`` for sample j of group i) and draw;
    ``in_flight`` are the draws started but not finished (re-run on resume, so
    the consumed uids have no gaps).
    """

    version: int  # policy version (learner steps done)
    schedule: ScheduleState  # global draw counter and each stage's sampler position
    ledger: LedgerState  # consumed sample uids
    buffered_groups: list[Group] = []
    buffered_advantages: list[list[float]] = []
    buffered_draws: list[tuple[int, int, str, int]] = []  # the Draw of each buffered group (stale: runs again)
    in_flight: list[tuple[int, int, str, int]] = []  # Draw(draw, stage, source, item)


def save_controller_state(directory: str | Path, state: ControllerState) -> Path:
    if len(state.buffered_groups) != len(state.buffered_advantages):
        raise ValueError(f"{len(state.buffered_groups)} buffered groups but {len(state.buffered_advantages)} advantage lists")
    path = Path(directory) / CONTROLLER_FILE
    with open(path, "wb") as f:
        f.write(msgspec.msgpack.encode(state))
        f.flush()
        os.fsync(f.fileno())
    return path


def load_controller_state(directory: str | Path) -> ControllerState:
    path = Path(directory) / CONTROLLER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no controller state in this checkpoint")
    try:
        return msgspec.msgpack.decode(path.read_bytes(), type=ControllerState)
    except msgspec.DecodeError as exc:
        raise CheckpointError(f"{path}: unreadable controller state ({exc})") from None


# ------------------------------------------------------------------ learner state (DCP)


def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DISK_MARGIN = 1.05  # DCP metadata, RNG states and zip headers on top of the tensor bytes


def save_trainer_state(path: str | Path, model, optimizer, extra: dict[str, Any], rank: int) -> None:
    """DCP save of ``{"model", "optim", "trainer": extra}`` plus this rank's RNG; collective over ranks.

    ``extra`` (scheduler state dict, version) is small and identical on every
    rank; DCP stores it once. The model/optimizer shards are written in
    parallel by their owners and can be reloaded at another world size.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": extra}
    # A full disk makes torch's zip writer fail with "unexpected pos N vs M"; say what happened
    # instead, before writing anything. Every rank checks and all agree, so none is left
    # waiting in DCP's collective while another raises.
    needed, free = _local_bytes(state), shutil.disk_usage(path).free
    fits = free >= needed * DISK_MARGIN
    if not _all_ranks_agree(fits):
        short = f"needs ~{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free" if not fits else "another rank is short"
        raise CheckpointError(f"{path}: not enough disk space for the learner checkpoint (rank {rank} {short}); "
                              "the previous checkpoint is kept")
    try:
        dcp.save(state, checkpoint_id=str(path))
        torch.save(capture_rng(), path / f"rng-rank{rank:05d}.pt")
    except Exception as exc:
        free = shutil.disk_usage(path).free
        raise CheckpointError(f"{path}: writing the learner checkpoint failed ({free / 2**30:.2f} GiB free): {exc}; "
                              "the previous checkpoint is kept") from exc


def _local_bytes(tree) -> int:
    """Bytes of the tensors this rank writes (a DTensor counts its local shard only)."""
    import torch

    if isinstance(tree, dict):
        return sum(_local_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_local_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0


def _all_ranks_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank of the default process group (or there is none)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_trainer_state(path: str | Path, model, optimizer, rank: int, extra_template: dict[str, Any]) -> dict[str, Any]:
    """Load what :func:`save_trainer_state` wrote into ``model``/``optimizer``; returns ``extra``.

    ``extra_template`` has the structure of the saved ``extra`` (e.g. a fresh
    scheduler's state dict): DCP loads exactly the leaves it names.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a learner checkpoint (no DCP .metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": extra_template}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-rank{rank:05d}.pt"
    if rng.is_file():  # absent when resuming at a larger world size: that rank keeps its seed
        restore_rng(torch.load(rng, weights_only=False))
    return state["trainer"]


# ------------------------------------------------------------------ Hugging Face export


def write_hf(state: dict[str, Any], base_model_path: str, out_dir: str | Path, dtype: str) -> None:
    """Write ``state`` (checkpoint names -> tensors) as an HF directory shaped like ``base_model_path``.

    Every parameter of the base architecture must be present (a tied LM head
    follows the embedding); the tokenizer and generation config are copied.
    """
    import torch

    from verimed.core.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(base_model_path, "float32")
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"export: parameters differ from {base_model_path}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in expected:
            params[name].copy_(state[name])
    model.to(getattr(torch, dtype))
    model.config.use_cache = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_model_path).save_pretrained(out_dir)


def read_model_shards(learner_dir: str | Path, base_model_path: str) -> dict[str, Any]:
    """Full model tensors (checkpoint names) from a DCP learner checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp

    from verimed.core.models import load_causal_lm

    learner_dir = Path(learner_dir)
    if not (learner_dir / ".metadata").is_file():
        raise CheckpointError(f"{learner_dir}: not a learner checkpoint (no DCP .metadata)")
    model = load_causal_lm(base_model_path, "float32")
    saved = set(dcp.FileSystemReader(str(learner_dir)).read_metadata().state_dict_metadata)
    # Keys as the learner saved them (FusedPolicy names its HF model "lm"); a
    # tied LM head may be stored under the embedding's name only.
    wanted = {f"lm.{name}": t for name, t in model.state_dict().items()}
    state = {"model": {key: t for key, t in wanted.items() if f"model.{key}" in saved}}
    dcp.load(state, checkpoint_id=str(learner_dir))  # no process group: DCP reads every shard here
    return {name.removeprefix("lm."): t for name, t in state["model"].items()}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (newest checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if (path / LEARNER_SUBDIR / ".metadata").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return found


def export_hf(path: str | Path, out_dir: str | Path, base_model_path: str, dtype: str = "float32") -> Path:
    """Export the policy of a checkpoint (or a run's newest one) as a Hugging Face directory."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"export dtype must be float32, bfloat16 or float16, got {dtype!r}")
    ckpt = resolve_checkpoint(path)
    state = read_model_shards(ckpt / LEARNER_SUBDIR, base_model_path)
    write_hf(state, base_model_path, out_dir, dtype)
    return ckpt
