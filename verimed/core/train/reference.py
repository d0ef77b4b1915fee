"""The frozen reference policy: per-token reference log-probs for the KL term (DESIGN §2.8, §3).

Ray-free; :mod:`verimed.actors.reference` wraps one :class:`ReferenceModel` per
replica. The model is a frozen copy of the initial policy (or any HF
checkpoint), in eval and inference mode; with ``world_size > 1`` and
``torch.distributed`` initialised its replicas shard it with FSDP2 and each
scores the same whole groups a learner rank would (:func:`~verimed.core.train.packing.rank_sequences`).
The forward goes through the learner's :class:`~verimed.core.train.policy.FusedPolicy`, so log-probs come from
the fused kernel (the N×V logits never exist in full), micro-batched by the same
token budget and packing as the learner — which makes reference and learner
log-probs bit-identical at step 0 on the same device and dtype:

    ref = ReferenceModel(cfg, model_path)
    batch = with_reference(batch, ref.logprobs(batch))   # float32 [T], packed layout
    learner.train_step(batch)                            # KL term when grpo.kl_coef > 0

:func:`verimed.core.config.reference_needed` decides whether the reference is
started at all (``kl_coef > 0`` in ``grpo`` or in any stage): with no KL term it costs nothing.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from verimed.core.config import Config
from verimed.core.models import load_causal_lm
from verimed.core.train.packing import rank_sequences
from verimed.core.train.policy import FusedPolicy, batch_logprobs
from verimed.core.types import Array, TrainBatch

# Keep a colocated reference resident on the GPU only if its weights take at most
# this fraction of the free device memory at start-up; otherwise park it on the CPU
# between calls so the learner gets the memory back.
RESIDENT_FRACTION = 0.2


# ------------------------------------------------------------ config helpers


def reference_model_path(cfg: Any, policy_path: str) -> str:
    """The reference checkpoint: ``grpo.reference_path`` when the config names one, else the initial policy.

    ``policy_path`` must be the run's *initial* policy (the base model), not a
    checkpoint resumed mid-run, so the KL anchor stays the same across restarts.
    """
    path = getattr(cfg.grpo, "reference_path", None)
    if not path:
        return policy_path
    from verimed.core.models import resolve_model_path

    return resolve_model_path(path)


def with_reference(batch: TrainBatch, reference_logprobs: np.ndarray) -> TrainBatch:
    """``batch`` carrying ``reference_logprobs`` (float32 [T], aligned with ``batch.input_ids``)."""
    ref = np.asarray(reference_logprobs, dtype=np.float32)
    if ref.shape != (len(batch.input_ids),):
        raise ValueError(f"reference log-probs have shape {ref.shape}, the batch has {len(batch.input_ids)} tokens")
    return msgspec.structs.replace(batch, reference_logprobs=Array.of(ref))


# ------------------------------------------------------------ the forward


class ReferenceModel:
    """The frozen reference policy of one replica (FSDP2 rank when sharded)."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1, *, offload: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"reference rank {rank} outside world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        # On GPU the learner computes in bf16 (FSDP mixed precision); a frozen model
        # needs no fp32 master copy, so bf16 weights are both cheaper and the same numerics.
        lm = load_causal_lm(model_path, cfg.model.dtype if not cuda else "bfloat16")
        lm.config.use_cache = False
        lm.requires_grad_(False)
        self.param_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        self.sharded = world_size > 1 and dist.is_initialized()
        self.model = self._shard(FusedPolicy(lm.to(self.device)).eval())
        self.offload_between_calls = self._decide_offload(offload)
        self.on_device = True
        if self.offload_between_calls:
            self.offload()
        self.calls, self.seconds = 0, 0.0

    def _shard(self, model: FusedPolicy) -> torch.nn.Module:
        if not self.sharded:
            return model
        from torch.distributed.fsdp import fully_shard

        # Inference only: params are already in the compute dtype, no mixed-precision policy.
        for layer in model.lm.model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        return model

    def _decide_offload(self, offload: bool | None) -> bool:
        """Park weights on the CPU between calls? Only a GPU reference sharing the learner's GPU needs to."""
        if self.device.type != "cuda":
            return False
        if offload is not None:
            return offload
        if getattr(self.cfg.placement.reference, "colocate_with", None) != "learner":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.param_bytes / max(1, self.world_size) > RESIDENT_FRACTION * free

    # ------------------------------------------------------------ placement

    def offload(self) -> None:
        """Move the weights to host memory (no-op on CPU); the next call brings them back."""
        if self.device.type == "cpu" or not self.on_device:
            return
        self.model.to("cpu")
        self.on_device = False
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Bring the weights back to the device (no-op on CPU or when resident)."""
        if self.device.type == "cpu" or self.on_device:
            return
        self.model.to(self.device)
        self.on_device = True

    @contextlib.contextmanager
    def _loaded(self) -> Iterator[None]:
        self.onload()
        try:
            yield
        finally:
            if self.offload_between_calls:
                self.offload()

    # ------------------------------------------------------------ log-probs

    def logprobs(self, batch: TrainBatch) -> np.ndarray:
        """Reference log-probs float32 [T] of ``batch``'s loss tokens in its packed layout (0 elsewhere).

        Collective when sharded: every replica must call it with the same batch;
        each scores its own sequences and an all-reduce assembles the full array.
        """
        start = time.perf_counter()
        with torch.inference_mode(), self._loaded():
            out = batch_logprobs(self.model, batch, rank_sequences(batch, self.rank, self.world_size),
                                 self.cfg.trainer.micro_batch_tokens, self.device, self.world_size)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return out
