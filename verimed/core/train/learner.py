"""The learner: an FSDP2-sharded policy trained with the off-policy-corrected GRPO loss.

Ray-free; :mod:`verimed.actors.learner` wraps one :class:`Learner` per rank.
Each rank takes whole groups of a :class:`TrainBatch` (round robin) and packs
them into micro-batches of at most ``trainer.micro_batch_tokens`` tokens
(:mod:`verimed.core.train.packing`); the forward is the fused-head policy of
:mod:`verimed.core.train.policy`. Losses are normalised by *global* batch constants, so micro-batch and rank
contributions add up to the full-batch loss.

Sharding: ``fully_shard`` on every transformer block, then on the root
(:class:`FusedPolicy`, which holds embedding, final norm and the tied LM head). A sharded
model is built on the meta device and each rank materialises only its shards, filled from
the checkpoint that rank 0 alone reads (``broadcast_from_rank0``).
GPU: bf16 parameters in compute, fp32 gradient reduction; CPU: fp32 throughout.
The caller initialises ``torch.distributed`` (gloo on CPU, NCCL on GPU) first.
A single CPU rank (or no process group: the single-process reference of
``tests/test_learner.py``) is left unsharded — one rank has nothing to shard,
as torchtitan also skips FSDP there — with its parameters in one flat buffer
(:func:`flatten_parameters`), so weight sync sends views with no pack copy.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from verimed.core.config import Config, GRPOConfig
from verimed.core.models import empty_causal_lm, load_causal_lm
from verimed.core.rl import loss as grpo
from verimed.core.train.distributed import max_over_ranks
from verimed.core.train.packing import group_micro_batches, minibatch_groups, rank_sequences
from verimed.core.train.policy import FusedPolicy, batch_logprobs, packed_logprobs
from verimed.core.types import TrainBatch


def flatten_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Move every parameter of ``module`` into one buffer, back to back in ``named_parameters()`` order.

    Parameters keep their identity (``param.data`` becomes a view of the
    buffer), so tied weights stay tied and an optimizer built afterwards
    sees the same objects. Weight sync then broadcasts bucket-sized views of
    the buffer instead of packing copies (on a CPU-bound transport a pack copy
    costs about as much as the transfer). Needs one dtype and one device.
    """
    params = [p for _, p in module.named_parameters()]
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) != 1:
        raise ValueError(f"flatten_parameters needs one dtype and device, got {sorted(map(str, kinds))}")
    dtype, device = kinds.pop()
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
    offset = 0
    for p in params:
        view = flat[offset : offset + p.numel()].view(p.shape)
        view.copy_(p.data)
        p.data = view
        offset += p.numel()
    return flat


def materialise(module: torch.nn.Module, device: torch.device) -> None:
    """Give a meta-built ``module`` (or this rank's shards of it) real, uninitialised storage on ``device``.

    ``to_empty`` leaves every buffer uninitialised too, so the computed ones (the
    rotary ``inv_freq``, built for real on CPU by ``empty_causal_lm``) are put back.
    """
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # to_empty gives a plain model's tied weights storage of their own (seen)


@torch.no_grad()
def init_random_weights(module: torch.nn.Module, std: float) -> None:
    """Random weights the way HF initialises a decoder: matrices ~ N(0, std²), biases 0, norm scales 1.

    Works on plain tensors and on FSDP2's sharded DTensors (each rank draws its
    own shard). Tied weights are one parameter, drawn once.
    """
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # RMSNorm / LayerNorm scales


class Learner:
    """One learner rank: model (FSDP2), optimizer, schedule, policy version."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1, random_init: bool = False):
        """``random_init``: the architecture of ``model_path``'s config.json with random weights
        (:func:`init_random_weights`) and no checkpoint read — benchmarks of large models
        (``bench/gpu_learner.py``), like vLLM's dummy load format."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        # GPU: fp32 master weights (bf16 compute through FSDP mixed precision); CPU: the configured dtype.
        dtype = cfg.model.dtype if self.device.type == "cpu" else "float32"
        sharded = dist.is_initialized() and not (self.world_size == 1 and self.device.type == "cpu")
        # Sharded: build on the meta device and materialise only this rank's shard (torchtitan's
        # way); the full model is read once, on rank 0's CPU, never onto every GPU.
        if sharded or random_init:
            model = empty_causal_lm(model_path, dtype)
        else:
            model = load_causal_lm(model_path, dtype).to(self.device)
        if random_init and not sharded:
            materialise(model, self.device)
            init_random_weights(model, getattr(model.config, "initializer_range", 0.02))
        model.config.use_cache = False
        self.hf_config = model.config
        if cfg.trainer.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._shard(FusedPolicy(model, self.device), sharded)
        if sharded:
            materialise(self.model, self.device)
            if random_init:
                init_random_weights(self.model, getattr(model.config, "initializer_range", 0.02))
            else:
                self._load_shards(model_path, dtype)
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.version = 0
        self.last_grad_norm = 0.0

    def _shard(self, model: FusedPolicy, sharded: bool) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not sharded:
            flatten_parameters(model)
            return model
        if self.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for layer in model.lm.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def _load_shards(self, model_path: str, dtype: str) -> None:
        """Fill this rank's (materialised) shards from the checkpoint.

        Rank 0 reads the full state dict on CPU; ``broadcast_from_rank0`` sends it
        tensor by tensor and every rank keeps only its own shard.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {}
        if self.rank == 0:
            full = {f"lm.{k}": v for k, v in load_causal_lm(model_path, dtype).state_dict().items()}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``run.steps``."""
        t = self.cfg.trainer
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, self.cfg.run.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # ------------------------------------------------------------ log-probs

    def _forward_logprobs(self, seqs: list[np.ndarray], temperature: float,
                          wanted: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_logprobs(self.model, seqs, temperature, self.device, wanted)

    @torch.no_grad()
    def score(self, token_ids: list[int], temperature: float = 1.0) -> np.ndarray:
        """Log-probs [len-1] of ``token_ids[1:]`` at ``temperature`` (parity with the engines); collective."""
        logprob, _ = self._forward_logprobs([np.asarray(token_ids)], temperature)
        return logprob[1:].float().cpu().numpy()

    # ------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch, grpo_cfg: GRPOConfig | None = None) -> dict[str, float]:
        """``trainer.minibatches`` optimizer steps on ``batch`` (one policy version); loss metrics
        reduced over micro-batches and ranks, per minibatch under ``loss/mb{m}/`` when M > 1.

        The batch's groups are split into M contiguous minibatches, groups whole
        (:func:`verimed.core.train.packing.minibatch_groups`); each is one optimizer step
        with its own loss normalisers. pi_prox is the policy at the start of the batch
        (DESIGN §3): with ``proximal: recompute`` and M > 1 one extra no-grad forward
        scores the batch first; with M = 1 the first (only) minibatch runs on exactly
        those weights, so pi_prox = logprobs.detach() and u = 1: the clip never binds.
        ``interpolate`` (AReaL) needs no extra forward. The M2PO mask is computed once
        over the whole batch (every micro-batch and rank) from pi_prox.
        ``grpo_cfg``: the current stage's GRPO settings (default ``cfg.grpo``).
        """
        start = time.perf_counter()
        grpo_cfg = grpo_cfg or self.cfg.grpo
        chunks = minibatch_groups(batch.num_groups, self.cfg.trainer.minibatches)
        arrays = {k: getattr(batch, k).numpy() for k in ("input_ids", "loss_mask", "behaviour_logprobs", "advantages", "versions")}
        if batch.reference_logprobs is not None:
            arrays["reference"] = batch.reference_logprobs.numpy()
        self.model.train()
        if (grpo_cfg.proximal == "recompute" and len(chunks) > 1) or grpo_cfg.m2po_threshold > 0:
            arrays["proximal"] = self._proximal(batch)
        if grpo_cfg.m2po_threshold > 0:
            prox, mu = torch.from_numpy(arrays["proximal"]), torch.tensor(arrays["behaviour_logprobs"])
            _, in_band, _ = grpo.behaviour_weight(prox, mu, grpo_cfg.is_mode, grpo_cfg.is_cap, grpo_cfg.is_mask_low,
                                                   grpo_cfg.is_mask_high)
            keep = grpo.m2po_keep(prox - mu, torch.from_numpy(arrays["loss_mask"] > 0) & in_band, grpo_cfg.m2po_threshold)
            arrays["m2po_keep"] = keep.numpy().astype(np.float32)
        out: dict[str, float] = {}
        everyone: list[dict[str, float]] = []
        grad_norms = []
        for m, groups in enumerate(chunks):
            metrics = self._minibatch(batch, arrays, groups, grpo_cfg, self.version + m / len(chunks))
            grad_norms.append(self.last_grad_norm)
            everyone += metrics
            if len(chunks) > 1:
                out.update({f"loss/mb{m}/{k}": v for k, v in grpo.reduce_metrics(metrics).items()
                            if k in ("loss", "clip_frac", "clip_low_frac", "clip_high_frac", "ratio_mean")})
        self.scheduler.step()  # the learning-rate schedule counts policy versions, not minibatches
        self.version += 1
        reduced = grpo.reduce_metrics(everyone)
        # A minibatch's loss is the sum of its micro-batch (and rank) losses; report their mean over minibatches.
        reduced["loss"] /= len(chunks)
        out.update({f"loss/{'policy' if k == 'loss' else k}": v for k, v in reduced.items()})
        # The largest minibatch gradient norm (a non-finite one wins: it is what skipped an update).
        worst = next((g for g in grad_norms if not math.isfinite(g)), max(grad_norms))
        out.update({"train/grad_norm": worst, "train/lr": self.scheduler.get_last_lr()[0],
                    "train/minibatches": float(len(chunks)),
                    # Every packed token, prompts included: what the emulated learner's time formula counts
                    # (bench/fit_profile.py fits learner tokens/s from it).
                    "train/packed_tokens": float(len(batch.input_ids)),
                    "train/step_seconds": time.perf_counter() - start, "train/version": float(self.version)})
        return out

    def _proximal(self, batch: TrainBatch) -> np.ndarray:
        """pi_prox: log-probs float32 [T] of the whole batch under the step-start weights (collective)."""
        return batch_logprobs(self.model, batch, rank_sequences(batch, self.rank, self.world_size),
                              self.cfg.trainer.micro_batch_tokens, self.device, self.world_size)

    def _minibatch(self, batch: TrainBatch, arrays: dict[str, np.ndarray], groups: list[int], grpo_cfg: GRPOConfig,
                   current_version: float) -> list[dict[str, float]]:
        """One optimizer step on the sequences of ``groups``; returns every rank's micro-batch metrics."""
        cu = batch.cu_seqlens.numpy()
        seqs = [s for s, g in enumerate(batch.group_ids.numpy()) if int(g) in set(groups)]
        num_seqs = len(seqs)
        num_tokens = float(sum(arrays["loss_mask"][cu[s] : cu[s + 1]].sum() for s in seqs))
        mine = rank_sequences(batch, self.rank, self.world_size, groups)
        micro = group_micro_batches(mine, batch, self.cfg.trainer.micro_batch_tokens,
                                    getattr(self.model, "segment_attention", False))
        num_micro = max_over_ranks(len(micro), self.world_size, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: list[dict[str, float]] = []
        for k in range(num_micro):
            # Every rank runs the same number of forward/backward passes (FSDP
            # collectives); a rank out of sequences reruns one with weight 0.
            chunk, weight = (micro[k], 1.0) if k < len(micro) else ([mine[0] if mine else seqs[0]], 0.0)
            loss, m = self._micro_loss(chunk, cu, arrays, batch, max(num_seqs, 1), max(num_tokens, 1.0), grpo_cfg,
                                       current_version)
            # FSDP averages gradients over ranks, while the per-rank losses are
            # partial sums of one globally normalised loss: scale back to a sum.
            (loss * weight * self.world_size).backward()
            if weight:
                metrics.append({key: float(v) for key, v in m.items()})
        self.last_grad_norm = self._clip_and_step()
        return self._gather_metrics(metrics)

    def _micro_loss(self, seqs, cu, arrays, batch: TrainBatch, num_seqs: int, num_tokens: float, grpo_cfg: GRPOConfig,
                    current_version: float):
        spans = [(int(cu[s]), int(cu[s + 1])) for s in seqs]
        gather = lambda a: torch.from_numpy(np.concatenate([a[b:e] for b, e in spans]).astype(np.float32)).to(self.device)
        mask = np.concatenate([arrays["loss_mask"][b:e] for b, e in spans]) > 0
        logprobs, entropy = self._forward_logprobs([arrays["input_ids"][b:e] for b, e in spans], batch.temperature, mask)
        behaviour = gather(arrays["behaviour_logprobs"])
        if grpo_cfg.proximal == "interpolate":
            # AReaL's log-linear interpolation: pi_theta = weights after m of M minibatch
            # steps (version v + m/M), pi_prox = the batch-start weights (version v).
            versions = torch.from_numpy(np.concatenate([arrays["versions"][b:e] for b, e in spans])).to(self.device)
            proximal = grpo.interpolate_proximal(behaviour, logprobs.detach(), versions, current_version, self.version)
        elif "proximal" in arrays:
            proximal = gather(arrays["proximal"])  # the recompute pass at the start of the batch
        else:
            # M = 1: this forward runs on the batch-start weights, so it IS the recompute.
            proximal = logprobs.detach()
        lengths = torch.tensor([e - b for b, e in spans])
        local_cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(self.device)
        return grpo.policy_loss(
            logprobs, proximal, behaviour, gather(arrays["advantages"]), gather(arrays["loss_mask"]), local_cu, grpo_cfg,
            num_sequences_global=num_seqs, num_tokens_global=num_tokens, max_response_len=batch.max_response_len,
            reference_logprobs=gather(arrays["reference"]) if "reference" in arrays else None, entropy=entropy,
            m2po_keep_mask=gather(arrays["m2po_keep"]) > 0 if "m2po_keep" in arrays else None,
        )

    def _gather_metrics(self, metrics: list[dict[str, float]]) -> list[dict[str, float]]:
        """Every rank's raw micro-batch metrics (small dicts), for one global reduction."""
        if not dist.is_initialized() or self.world_size == 1:
            return metrics
        everyone: list[list[dict[str, float]] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, metrics)
        return [m for rank_metrics in everyone for m in (rank_metrics or [])]

    def _clip_and_step(self) -> float:
        clip = self.cfg.trainer.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        if not math.isfinite(norm):
            # A NaN/inf gradient must not corrupt the weights: skip this update.
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.optimizer.step()
        return norm

    # ------------------------------------------------------------ weights

    def named_parameter_shapes(self) -> list[tuple[str, torch.Tensor]]:
        """(checkpoint name, parameter) without gathering: a DTensor reports its global shape and dtype."""
        return [(name.removeprefix("lm."), param) for name, param in self.model.named_parameters()]

    def iter_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) parameters in checkpoint names, one at a time; collective across ranks.

        Every rank must consume the whole iterator in the same order (each
        ``full_tensor()`` is an all-gather); only one full tensor is alive per
        step, so a sync never needs the whole unsharded model in memory.
        """
        for name, param in self.model.named_parameters():
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            yield name.removeprefix("lm."), tensor.detach()

    def full_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """All full parameters at once (collective); tests and small models."""
        return list(self.iter_full_parameters())

    def save_hf(self, out_dir: str, base_model_path: str) -> None:
        """Export the policy as a Hugging Face directory (collective; rank 0 writes)."""
        from verimed.core.train.checkpoint import write_hf

        # Every rank takes part in each all-gather (the whole iterator is consumed), but only
        # rank 0 keeps a CPU copy: the full model is never held by every rank.
        state = {name: t.cpu() for name, t in self.iter_full_parameters() if self.rank == 0}
        if self.rank == 0:
            write_hf(state, base_model_path, out_dir, self.cfg.model.dtype)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        """Sharded save (torch.distributed.checkpoint) of model, optimizer, scheduler, version, RNG; collective."""
        from verimed.core.train.checkpoint import save_trainer_state

        save_trainer_state(path, self.model, self.optimizer, self._trainer_extra(), self.rank)

    def _trainer_extra(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "version": self.version}

    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (any world size for model/optimizer); collective."""
        from verimed.core.train.checkpoint import load_trainer_state

        extra = load_trainer_state(path, self.model, self.optimizer, self.rank, self._trainer_extra())
        self.scheduler.load_state_dict(extra["scheduler"])
        self.version = int(extra["version"])
