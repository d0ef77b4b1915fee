"""The learner: an FSDP2-sharded policy trained with the off-policy-corrected GRPO loss.

Ray-free; :mod:`verimed.actors.learner` wraps one :class:`Learner` per rank.
Each rank takes every ``world_size``-th sequence of a :class:`TrainBatch`,
builds micro-batches by packing sequences under a token budget, and computes
per-token log-probs with :func:`verimed.kernels.fused_logprob` (the N×V logits
never exist in full). Losses are normalised by *global* batch constants, so
micro-batch and rank contributions add up to the full-batch loss.

The caller initialises ``torch.distributed`` (gloo on CPU, NCCL on GPU) first.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from verimed.core import grpo
from verimed.core.config import Config
from verimed.core.models import load_causal_lm
from verimed.core.types import TrainBatch
from verimed.kernels import fused_logprob


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> str:
    """Join the learners' default process group; NCCL when CUDA is there, else gloo."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return backend


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy first-fit-decreasing packing of sequence indices into micro-batches.

    A micro-batch is padded to its longest sequence, so its cost is
    ``len(members) * max_len``; that must stay within ``token_budget`` (a
    sequence longer than the budget gets a micro-batch of its own).
    Sorting by length keeps padding small.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        for batch in batches:
            # batch[0] is its longest member (decreasing order).
            if (len(batch) + 1) * lengths[batch[0]] <= token_budget:
                batch.append(i)
                break
        else:
            batches.append([i])
    return batches


class FusedPolicy(torch.nn.Module):
    """An HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    Wrapping it as the FSDP root puts the embedding, final norm and (tied)
    LM head in one FSDP group that is unsharded during this forward, so the
    kernel sees full weights and their gradients take FSDP's normal path.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, rows, targets, temperature: float):
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [b, L, H]
        flat = hidden.reshape(-1, hidden.shape[-1])[rows]  # [N, H]: positions that predict a target
        return fused_logprob(flat, self.lm.lm_head.weight, targets, temperature)


class Learner:
    """One learner rank: model (FSDP2), optimizer, schedule, policy version."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        model = load_causal_lm(model_path, cfg.model.dtype if self.device.type == "cpu" else "float32")
        model.config.use_cache = False
        self.hf_config = model.config
        if cfg.trainer.activation_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = self._shard(FusedPolicy(model.to(self.device)))
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.version = 0

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            return model
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.device.type == "cuda" else MixedPrecisionPolicy()
        for layer in model.lm.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.trainer
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, self.cfg.run.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # ------------------------------------------------------------ log-probs

    def _forward_logprobs(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (logprob, entropy) of packed ``seqs``: position t predicts token t.

        Returns two float32 tensors [sum(len)] aligned with the packed tokens;
        position 0 of each sequence (no prediction) holds 0.
        """
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows = torch.cat([torch.arange(len(s) - 1) + i * width for i, s in enumerate(seqs)]).to(self.device)
        targets = torch.cat([torch.from_numpy(s[1:].astype(np.int64)) for s in seqs]).to(self.device)
        logprob, entropy = self.model(ids, mask, rows, targets, self.cfg.rollout.temperature)
        # Re-insert a 0 at each sequence start to align with the packed layout.
        out_lp, out_ent, offset = [], [], 0
        zero = torch.zeros(1, device=self.device)
        for s in seqs:
            n = len(s) - 1
            out_lp += [zero, logprob[offset : offset + n]]
            out_ent += [zero, entropy[offset : offset + n]]
            offset += n
        return torch.cat(out_lp), torch.cat(out_ent)

    @torch.no_grad()
    def score(self, token_ids: list[int]) -> np.ndarray:
        """Log-probs [len-1] of ``token_ids[1:]`` (parity with the engines)."""
        logprob, _ = self._forward_logprobs([np.asarray(token_ids)])
        return logprob[1:].float().cpu().numpy()

    # ------------------------------------------------------------ training

    def _my_sequences(self, batch: TrainBatch) -> Iterator[int]:
        num = len(batch.cu_seqlens.numpy()) - 1
        return iter(range(self.rank, num, self.world_size))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch``; returns reduced loss metrics."""
        start = time.perf_counter()
        cu = batch.cu_seqlens.numpy()
        arrays = {k: getattr(batch, k).numpy() for k in ("input_ids", "loss_mask", "behaviour_logprobs", "advantages", "versions")}
        ref = batch.reference_logprobs.numpy() if batch.reference_logprobs is not None else None
        mine = list(self._my_sequences(batch))
        micro = [[mine[i] for i in mb] for mb in pack_micro_batches([int(cu[s + 1] - cu[s]) for s in mine], self.cfg.trainer.micro_batch_tokens)]
        num_micro = self._max_over_ranks(len(micro))
        num_seqs = len(cu) - 1
        num_tokens = float(arrays["loss_mask"].sum())
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: list[dict[str, torch.Tensor]] = []
        for k in range(num_micro):
            # Every rank runs the same number of forward/backward passes (FSDP
            # collectives); a rank out of sequences reruns one with weight 0.
            seqs, weight = (micro[k], 1.0) if k < len(micro) else (micro[0] if micro else [mine[0] if mine else 0], 0.0)
            loss, m = self._micro_loss(seqs, cu, arrays, ref, batch, num_seqs, num_tokens)
            # FSDP averages gradients over ranks; losses are already globally normalised sums.
            (loss * weight * self.world_size).backward()
            if weight:
                metrics.append(m)
        grad_norm = self._clip_and_step()
        self.version += 1
        # "loss" is the sum of micro-batch losses = the batch loss (global normalisers).
        out = {f"loss/{'policy' if k == 'loss' else k}": v for k, v in (grpo.reduce_metrics(metrics) if metrics else {}).items()}
        out.update({"train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0],
                    "train/step_seconds": time.perf_counter() - start, "train/version": float(self.version)})
        return out

    def _micro_loss(self, seqs, cu, arrays, ref, batch: TrainBatch, num_seqs: int, num_tokens: float):
        spans = [(int(cu[s]), int(cu[s + 1])) for s in seqs]
        gather = lambda a: torch.from_numpy(np.concatenate([a[b:e] for b, e in spans]).astype(np.float32)).to(self.device)
        logprobs, entropy = self._forward_logprobs([arrays["input_ids"][b:e] for b, e in spans])
        behaviour = gather(arrays["behaviour_logprobs"])
        if self.cfg.grpo.proximal == "interpolate":
            versions = torch.from_numpy(np.concatenate([arrays["versions"][b:e] for b, e in spans])).to(self.device)
            proximal = grpo.interpolate_proximal(behaviour, logprobs.detach(), versions, self.version)
        else:
            # One optimizer step per batch: pi_prox is the policy before this step, i.e.
            # exactly the current parameters, so a recompute pass equals logprobs.detach().
            proximal = logprobs.detach()
        lengths = torch.tensor([e - b for b, e in spans])
        local_cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(self.device)
        loss, metrics = grpo.policy_loss(
            logprobs, proximal, behaviour, gather(arrays["advantages"]), gather(arrays["loss_mask"]), local_cu, self.cfg.grpo,
            num_sequences_global=num_seqs, num_tokens_global=num_tokens, max_response_len=batch.max_response_len,
            reference_logprobs=gather(ref) if ref is not None else None, entropy=entropy,
        )
        return loss, metrics

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
        self.scheduler.step()
        return norm

    def _max_over_ranks(self, value: int) -> int:
        if not dist.is_initialized() or self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------ weights

    def full_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Full (unsharded) parameters in checkpoint names; collective across ranks."""
        out = []
        for name, param in self.model.named_parameters():
            name = name.removeprefix("lm.")
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            out.append((name, tensor.detach()))
        return out

    def save_hf(self, out_dir: str, tokenizer_path: str) -> None:
        """Export the policy as a Hugging Face directory (rank 0 writes)."""
        from verimed.core.models import load_tokenizer

        state = {name: t.cpu() for name, t in self.full_named_parameters()}
        if self.rank != 0:
            return
        model = load_causal_lm(tokenizer_path, "float32")
        model.load_state_dict(state, strict=False)
        model.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(tokenizer_path).save_pretrained(out_dir)
