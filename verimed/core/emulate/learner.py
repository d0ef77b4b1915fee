"""EmulatedLearner and EmulatedReference: the learner and reference interfaces, waiting instead of computing.

The learner announces the target architecture's weights (``architecture.parameter_triples`` through
the torch-free ``describe_triples``), so the real coordinator plans and checks a sync of a 7B or 32B
model; it scores with the pseudo log-probs of its version (``pseudo``), so the real parity check
passes exactly when an engine serves that version. A step waits
``profile.learner_seconds(tokens, world)``; checkpoints are small real files holding the version, so
the real controller checkpoint and ``--resume`` work end to end.

Metrics carry the real learner's keys (``verimed/core/train/learner.py:Learner.train_step``).
Computed from the batch as the real loss does, with π_prox = the pseudo log-probs at the learner's
version and μ the behaviour log-probs: tokens, sequences, the behaviour weights
(``is_flagged_*``, ``importance_weight_*``, ``behaviour_kl``), advantages, ``kl`` (with a reference).
Emulated placeholders (no policy moves inside an emulated step): ``ratio`` ≡ 1 so the clip counts
are 0, ``loss/policy`` = −Σ m·w'·A / Σ m, ``entropy`` = −mean log π_prox, ``train/grad_norm`` = 0.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from verimed.core.config import Config, GRPOConfig
from verimed.core.emulate.architecture import parameter_triples
from verimed.core.emulate.profile import (DeviceProfile, learner_seconds, reference_seconds, score_seconds,
                                          sync_seconds)
from verimed.core.emulate.pseudo import packed_logprobs, sequence_logprobs
from verimed.core.rollout.sync_plan import bucket_plan, describe_triples
from verimed.core.types import TrainBatch, WeightVersion

CHECKPOINT_FILE = "emulated-learner-rank{rank}.json"
HF_MANIFEST = "EMULATED.json"


class EmulatedCheckpointError(ValueError):
    """An emulated learner checkpoint is missing or belongs to another run; the message names the file."""


class EmulatedLearner:
    """One emulated learner rank (the ``verimed.core.train.learner.Learner`` interface the actor uses)."""

    def __init__(self, cfg: Config, profile: DeviceProfile, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"learner rank {rank} outside world_size {world_size}")
        self.cfg, self.profile, self.rank, self.world_size = cfg, profile, rank, world_size
        self.triples = parameter_triples(profile.architecture, cfg.model.dtype)
        self.version = 0
        self.steps = 0  # optimizer steps taken (the LR schedule counts versions, as the real one)

    def _wait(self, modelled_s: float) -> float:
        time.sleep(modelled_s / self.cfg.emulation.time_scale)
        return modelled_s

    def score(self, token_ids: list[int], temperature: float = 1.0) -> np.ndarray:
        self._wait(score_seconds(self.profile, len(token_ids), self.world_size))
        return sequence_logprobs(token_ids, self.version)

    def weight_meta(self, bucket_bytes: int) -> WeightVersion:
        """What a sync carries: the target architecture in the engines' dtype; one flat buffer when unsharded."""
        return describe_triples(self.triples, self.version, bucket_bytes, flat=self.world_size == 1)

    def broadcast(self, meta: WeightVersion) -> dict[str, float]:
        """Rank 0's side of a sync: waits num_bytes / bandwidth (the engines wait the same)."""
        start = time.perf_counter()
        modelled = self._wait(sync_seconds(self.profile, meta.num_bytes))
        seconds = time.perf_counter() - start
        return {"sync/bytes": float(meta.num_bytes), "sync/seconds": seconds, "sync/modelled_seconds": modelled,
                "sync/gbps": meta.num_bytes / max(modelled, 1e-9) / 1e9, "sync/buckets": float(len(bucket_plan(meta)))}

    def train_step(self, batch: TrainBatch, grpo_cfg: GRPOConfig | None = None) -> dict[str, float]:
        """One policy version: waits the profile's time for this batch; returns the real learner's metric keys."""
        start = time.perf_counter()
        grpo_cfg = grpo_cfg or self.cfg.grpo
        minibatches = max(1, min(self.cfg.trainer.minibatches, batch.num_groups))
        recompute = int((grpo_cfg.proximal == "recompute" and minibatches > 1) or grpo_cfg.m2po_threshold > 0)
        modelled = self._wait(learner_seconds(self.profile, len(batch.input_ids), self.world_size, recompute, minibatches))
        out = {}
        # Real ranks all-reduce to the same loss metrics and LearnerGroup reads rank 0's; the other emulated
        # ranks skip the pseudo log-probs of the whole batch (0.5 s of CPU each at 8192 samples, all ranks
        # sharing one box's cores) and report the timing keys only.
        if self.rank == 0:
            metrics = emulated_loss_metrics(batch, packed_logprobs(batch.input_ids.numpy(), batch.cu_seqlens.numpy(),
                                                                   self.version), grpo_cfg)
            out = {f"loss/{'policy' if k == 'loss' else k}": v for k, v in metrics.items()}
            if minibatches > 1:
                out.update({f"loss/mb{m}/{k}": metrics[k] for m in range(minibatches)
                            for k in ("loss", "clip_frac", "clip_low_frac", "clip_high_frac", "ratio_mean")})
        self.version += 1
        self.steps += minibatches
        out.update({"train/grad_norm": 0.0, "train/lr": self.cfg.trainer.lr * lr_factor(self.cfg, self.version - 1),
                    "train/minibatches": float(minibatches), "train/packed_tokens": float(len(batch.input_ids)),
                    "train/step_seconds": time.perf_counter() - start,
                    "train/modelled_seconds": modelled, "train/version": float(self.version)})
        return out

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"version": self.version, "steps": self.steps, "rank": self.rank, "world_size": self.world_size,
                 "profile": self.profile.name, "parameters": len(self.triples)}
        (directory / CHECKPOINT_FILE.format(rank=self.rank)).write_text(json.dumps(state))

    def load_checkpoint(self, path: str) -> None:
        """Restore the version; a checkpoint of another world size restores from rank 0's file."""
        directory = Path(path)
        file = directory / CHECKPOINT_FILE.format(rank=self.rank)
        if not file.is_file():
            file = directory / CHECKPOINT_FILE.format(rank=0)
        if not file.is_file():
            raise EmulatedCheckpointError(f"{directory}: no emulated learner checkpoint ({CHECKPOINT_FILE.format(rank=0)}); "
                                          "was it written by a real (torch) learner?")
        state = json.loads(file.read_text())
        if state.get("profile") != self.profile.name:
            raise EmulatedCheckpointError(f"{file}: written with profile {state.get('profile')!r}, this run uses "
                                          f"{self.profile.name!r}")
        self.version, self.steps = int(state["version"]), int(state["steps"])

    def save_hf(self, out_dir: str, base_model_path: str) -> None:
        """A manifest instead of weights: an emulated run trains nothing."""
        if self.rank != 0:
            return
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"emulated": True, "note": "emulated run (trainer.backend: emulated): no weights were trained",
                    "profile": self.profile.name, "version": self.version, "tokenizer": base_model_path,
                    "architecture": {"parameters": len(self.triples),
                                     "bytes": describe_triples(self.triples, self.version, 2**30).num_bytes}}
        (directory / HF_MANIFEST).write_text(json.dumps(manifest, indent=2))


def lr_factor(cfg: Config, step: int) -> float:
    """The real learner's schedule (``Learner._lr_factor``): linear warm-up over w steps, then constant or
    cosine: 0.5·(1 + cos(π·min(1, (step − w) / max(1, steps − w))))."""
    t = cfg.trainer
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, cfg.run.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def emulated_loss_metrics(batch: TrainBatch, proximal: np.ndarray, cfg: GRPOConfig) -> dict[str, float]:
    """The real loss's reduced metrics (``verimed/core/rl/loss.py:reduce_metrics`` keys) on ``batch``, with
    π_prox = ``proximal`` [T] and ratio u ≡ 1 (placeholders: module docstring). Per loss token:

        log w = log π_prox − log μ,  w' = min(w, is_cap) (cap) | w·[low ≤ w ≤ high] (mask) | w (none)
        behaviour_kl = mean(w − 1 − log w),  loss = −Σ w'·A / Σ 1,  kl = mean(k3(π_prox, π_ref))
    """
    mask = batch.loss_mask.numpy() > 0
    adv = batch.advantages.numpy().astype(np.float64)[mask]
    log_w = (proximal.astype(np.float64) - batch.behaviour_logprobs.numpy())[mask]
    w = np.exp(log_w)
    if cfg.is_mode == "cap":
        flagged, kept = w > cfg.is_cap, np.minimum(w, cfg.is_cap)
    elif cfg.is_mode == "mask":
        flagged = (w < cfg.is_mask_low) | (w > cfg.is_mask_high)
        kept = np.where(flagged, 0.0, w)
    else:
        flagged, kept = np.zeros_like(w, dtype=bool), w
    n = float(mask.sum())
    mean = (lambda x: float(x.sum() / n)) if n else (lambda x: 0.0)
    out = {"loss": -mean(kept * adv), "tokens": n, "sequences": float(len(batch.cu_seqlens.numpy()) - 1),
           "clip_low_count": 0.0, "clip_high_count": 0.0, "is_flagged_count": float(flagged.sum()),
           "m2po_masked_count": 0.0, "behaviour_kl_sum": float((w - 1 - log_w).sum()),
           "importance_weight_sum": float(w.sum()), "importance_weight_max": float(w.max()) if n else -math.inf,
           "ratio_sum": n, "advantage_sum": float(adv.sum()), "advantage_sq_sum": float((adv**2).sum()),
           "advantage_min": float(adv.min()) if n else math.inf, "advantage_max": float(adv.max()) if n else -math.inf,
           "entropy_sum": float(-proximal[mask].sum())}
    if batch.reference_logprobs is not None:
        d = batch.reference_logprobs.numpy()[mask].astype(np.float64) - proximal[mask]
        kl = np.exp(d) - d - 1.0  # k3
        out.update({"kl_sum": float(kl.sum()), "kl_max": float(kl.max()) if n else -math.inf})
    for name, key in (("clip_low_frac", "clip_low_count"), ("clip_high_frac", "clip_high_count"),
                      ("is_flagged_frac", "is_flagged_count"), ("m2po_masked_frac", "m2po_masked_count"),
                      ("behaviour_kl", "behaviour_kl_sum"), ("importance_weight_mean", "importance_weight_sum"),
                      ("ratio_mean", "ratio_sum"), ("advantage_mean", "advantage_sum"), ("entropy", "entropy_sum"),
                      ("kl", "kl_sum")):
        if key in out:
            out[name] = out[key] / n if n else 0.0
    out["clip_frac"] = out["clip_low_frac"] + out["clip_high_frac"]
    out["advantage_std"] = math.sqrt(max(out["advantage_sq_sum"] / n - out["advantage_mean"] ** 2, 0.0)) if n else 0.0
    return out


class EmulatedReference:
    """One emulated reference replica (``verimed.core.train.reference.ReferenceModel``'s interface):
    log-probs of the initial policy (version 0) after the profile's forward time."""

    def __init__(self, cfg: Config, profile: DeviceProfile, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"reference rank {rank} outside world_size {world_size}")
        self.cfg, self.profile, self.rank, self.world_size = cfg, profile, rank, world_size
        self.calls, self.seconds = 0, 0.0
        self.sharded, self.offload_between_calls = world_size > 1, False

    def logprobs(self, batch: TrainBatch) -> np.ndarray:
        start = time.perf_counter()
        time.sleep(reference_seconds(self.profile, len(batch.input_ids), self.world_size) / self.cfg.emulation.time_scale)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return packed_logprobs(batch.input_ids.numpy(), batch.cu_seqlens.numpy(), 0)

    def offload(self) -> None:
        pass

    def onload(self) -> None:
        pass
