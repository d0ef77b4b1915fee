"""The learner: an FSDP2-sharded policy trained with the off-policy-corrected GRPO loss.

Ray-free; :mod:`verimed.actors.learner` wraps one :class:`Learner` per rank.
Each rank takes every ``world_size``-th sequence of a :class:`TrainBatch` and
packs them into micro-batches of at most ``trainer.micro_batch_tokens`` tokens.
A micro-batch is ONE row of concatenated sequences (no padding): position ids
restart at 0 at every sequence start, which transformers turns into a
block-diagonal causal mask (``find_packed_sequence_indices``; sdpa / eager /
flex, and varlen flash-attention on GPU). Per-token log-probs come from
:func:`verimed.kernels.fused_logprob` (the N×V logits never exist in full).
Losses are normalised by *global* batch constants, so micro-batch and rank
contributions add up to the full-batch loss.

Sharding: ``fully_shard`` on every transformer block, then on the root
(:class:`FusedPolicy`, which holds embedding, final norm and the tied LM head).
GPU: bf16 parameters in compute, fp32 gradient reduction; CPU: fp32 throughout.
The caller initialises ``torch.distributed`` (gloo on CPU, NCCL on GPU) first.
A single CPU rank (or no process group: the single-process reference of
``tests/test_learner.py``) is left unsharded — one rank has nothing to shard,
as torchtitan also skips FSDP there — with its parameters in one flat buffer
(:func:`flatten_parameters`), so weight sync sends views with no pack copy.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from verimed.core import grpo
from verimed.core.attention import SEGMENTS_KWARG, use_segment_attention
from verimed.core.config import Config, GRPOConfig
from verimed.core.models import load_causal_lm
from verimed.core.types import TrainBatch
from verimed.kernels import fused_logprob


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> str:
    """Join the learners' default process group; NCCL when CUDA is there, else gloo."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return backend


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequence indices into micro-batches of <= ``token_budget`` tokens.

    A micro-batch is one packed row, so its cost is ``sum(lengths[members])``
    (no padding). A sequence longer than the budget gets a micro-batch of its
    own. Returns lists of indices into ``lengths``; every index appears once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for b, batch in enumerate(batches):
            if used[b] + lengths[i] <= token_budget:
                batch.append(i)
                used[b] += lengths[i]
                break
        else:
            batches.append([i])
            used.append(lengths[i])
    return batches


class PackedRow(NamedTuple):
    """S sequences laid out as one row of R tokens (see :func:`packed_layout`)."""

    ids: np.ndarray  # int64 [R]
    position_ids: np.ndarray  # int64 [R]
    # attention segments (start, end, prefix_len, suffix_lens): rows [start, end) are one
    # causal sequence when suffix_lens is empty, else a shared prefix of prefix_len rows
    # followed by suffixes that each see the whole prefix and, causally, only themselves
    segments: list[tuple[int, int, int, tuple[int, ...]]]
    rows: np.ndarray  # int64 [N]: the row whose hidden state predicts each scored token
    tokens: np.ndarray  # int64 [N]: index of each scored token in the concatenated sequences [T]


def packed_layout(seqs: list[np.ndarray], wanted: np.ndarray | None = None, share_prefixes: bool = False) -> PackedRow:
    """Lay ``seqs`` (T tokens in all) out as one row; score token t (> its sequence start) when ``wanted[t]``.

    Without sharing the row is the concatenation (R = T), position ids restart
    at 0 per sequence and token t is predicted by row t - 1. With
    ``share_prefixes``, sequences whose tokens before their first wanted token
    (the prompt) are identical — the G samples of a GRPO group, or the G
    candidates of a dialogue slice — put that prefix in the row once, then
    each suffix (positions continuing after the prefix):

        [prompt | response_1 | ... | response_G]   R = p + sum(len_i - p)

    A response's first token is predicted by the prompt's last row (shared).
    The hidden states are the same as in the plain layout (each response sees
    exactly its own prompt and itself), so log-probs and gradients are equal
    while the prompt costs one forward/backward instead of G.
    """
    lengths = [len(x) for x in seqs]
    starts = np.cumsum([0] + lengths)
    flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
    want = np.ones(len(flat), bool) if wanted is None else np.asarray(wanted, dtype=bool)
    groups: dict[object, list[int]] = {}
    for i, seq in enumerate(seqs):
        key = prompt_key(seq, want[starts[i] : starts[i + 1]]) if share_prefixes else None
        groups.setdefault(key if key else i, []).append(i)
    ids, pos, segments, row_of = [], [], [], np.empty(len(flat), np.int64)
    width = 0
    for key, members in groups.items():
        p = key[0] if isinstance(key, tuple) and len(members) > 1 else 0
        seg_start = width
        if p:
            ids.append(seqs[members[0]][:p])
            pos.append(np.arange(p))
            for m in members:
                row_of[starts[m] : starts[m] + p] = seg_start + np.arange(p)
            width += p
        for m in members:
            n = lengths[m] - p
            ids.append(seqs[m][p:])
            pos.append(np.arange(p, lengths[m]))
            row_of[starts[m] + p : starts[m + 1]] = width + np.arange(n)
            if not p:
                segments.append((width, width + n, 0, ()))
            width += n
        if p:
            segments.append((seg_start, width, p, tuple(lengths[m] - p for m in members)))
    first = np.zeros(len(flat), bool)
    first[starts[:-1][np.asarray(lengths) > 0]] = True
    tokens = np.flatnonzero(want & ~first)
    return PackedRow(ids=np.concatenate(ids).astype(np.int64) if ids else flat, position_ids=np.concatenate(pos).astype(np.int64) if pos else flat,
                     segments=segments, rows=row_of[tokens - 1], tokens=tokens)


def prompt_key(seq: np.ndarray, wanted: np.ndarray) -> tuple[int, bytes] | None:
    """(p, the p tokens before the first wanted one): sequences with equal keys share that prompt
    in a packed row (:func:`packed_layout`). None when there is no prompt (p = 0)."""
    p = int(np.argmax(wanted)) if wanted.any() else len(wanted)
    return (p, seq[:p].tobytes()) if p else None


def group_micro_batches(seqs: list[int], batch: TrainBatch, token_budget: int, share_prompts: bool) -> list[list[int]]:
    """Micro-batches of the sequence indices ``seqs`` of ``batch``, each within ``token_budget`` row tokens.

    With ``share_prompts`` (segment attention) sequences with one
    :func:`prompt_key` (a GRPO group) cost p + Σ(len_i - p) row tokens
    (:func:`packed_layout`), so they are kept together (split into chunks when
    over budget); otherwise every sequence is a unit of its own length. Units are packed
    first-fit-decreasing (:func:`pack_micro_batches`).
    """
    cu, ids, loss_mask = batch.cu_seqlens.numpy(), batch.input_ids.numpy(), batch.loss_mask.numpy()
    sharing: dict[object, list[int]] = {}  # the sequences packed_layout will give one prompt
    for s in seqs:
        key = prompt_key(ids[cu[s] : cu[s + 1]], loss_mask[cu[s] : cu[s + 1]] > 0) if share_prompts else None
        sharing.setdefault(key if key else s, []).append(s)
    units, costs = [], []
    for key, members in sharing.items():
        p = key[0] if isinstance(key, tuple) and len(members) > 1 else 0
        chunk, cost = [], p
        for s in members:
            n = int(cu[s + 1] - cu[s]) - p
            if chunk and cost + n > token_budget:
                units.append(chunk)
                costs.append(cost)
                chunk, cost = [], p
            chunk.append(s)
            cost += n
        units.append(chunk)
        costs.append(cost)
    return [[s for u in mb for s in units[u]] for mb in pack_micro_batches(costs, token_budget)]


def segment_masks(segments: list[tuple[int, int, int, tuple[int, ...]]], device: torch.device) -> list[tuple[int, int, torch.Tensor | None]]:
    """(start, end, bool mask or None) per segment for :func:`verimed.core.attention.segment_attention`.

    None: plain causal. A shared-prefix segment of n rows gets mask[i, j] =
    j <= i and (j in the prefix or j in i's own suffix).
    """
    out = []
    for start, end, p, suffixes in segments:
        if not suffixes:
            out.append((start, end, None))
            continue
        owner = torch.cat([torch.full((p,), -1)] + [torch.full((n,), k) for k, n in enumerate(suffixes)]).to(device)
        idx = torch.arange(end - start, device=device)
        mask = (idx[None, :] <= idx[:, None]) & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
        out.append((start, end, mask))
    return out


def packed_logprobs(policy: torch.nn.Module, seqs: list[np.ndarray], temperature: float,
                    device: torch.device, wanted: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprob, entropy) of ``seqs`` packed into one row; entry t is token t's.

    ``policy`` is a :class:`FusedPolicy` (possibly FSDP-wrapped). The S sequences
    (T tokens) go through the model as one row without padding
    (:func:`packed_layout`; shared prompts computed once when the policy runs
    segment attention); the kernel sees only the rows that predict a token of
    their own sequence that is ``wanted`` (bool [T], e.g. the loss mask: prompt
    tokens then cost no LM-head work, which on the default workload is most of
    it). Returns two float32 tensors [T] in the concatenated layout, 0 at each
    sequence start and at unwanted tokens; differentiable under autograd.
    """
    share = bool(getattr(policy, "segment_attention", False)) and wanted is not None
    layout = packed_layout(seqs, wanted, share_prefixes=share)
    ids = torch.from_numpy(layout.ids).to(device)
    rows = torch.from_numpy(layout.rows).to(device)
    tokens = torch.from_numpy(layout.tokens).to(device)
    flat = torch.from_numpy(np.concatenate(seqs).astype(np.int64)).to(device)
    position_ids = torch.from_numpy(layout.position_ids).to(device)
    logprob, entropy = policy(ids[None], position_ids[None], rows, flat[tokens], temperature,
                              segment_masks(layout.segments, device))
    zeros = torch.zeros(flat.shape[0], device=device, dtype=torch.float32)
    # index_copy (out of place) keeps autograd: entry t gets the log-prob of token t.
    return zeros.index_copy(0, tokens, logprob.float()), zeros.index_copy(0, tokens, entropy.float())


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


class FusedPolicy(torch.nn.Module):
    """An HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    Wrapping it as the FSDP root puts the embedding, final norm and (tied)
    LM head in one FSDP group that is unsharded during this forward, so the
    kernel sees full weights and their gradients take FSDP's normal path.
    On CPU attention runs per packed sequence (:mod:`verimed.core.attention`).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.segment_attention = next(lm.parameters()).device.type == "cpu"
        if self.segment_attention:
            use_segment_attention(lm)

    def forward(self, input_ids, position_ids, rows, targets, temperature: float, segments=None):
        # input_ids, position_ids [1, R]; no attention mask: restarting position ids
        # make transformers build the block-diagonal causal mask (flash / sdpa on
        # GPU), and segment attention takes the segments of segment_masks().
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids,
                               **{SEGMENTS_KWARG: segments}).last_hidden_state  # [1, R, H]
        flat = hidden[0, rows]  # [N, H]: positions that predict a target
        weight = self.lm.lm_head.weight
        return fused_logprob(flat.to(weight.dtype), weight, targets, temperature)


class Learner:
    """One learner rank: model (FSDP2), optimizer, schedule, policy version."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        # GPU: fp32 master weights (bf16 compute through FSDP mixed precision); CPU: the configured dtype.
        model = load_causal_lm(model_path, cfg.model.dtype if self.device.type == "cpu" else "float32")
        model.config.use_cache = False
        self.hf_config = model.config
        if cfg.trainer.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._shard(FusedPolicy(model.to(self.device)))
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.version = 0

    def _shard(self, model: FusedPolicy) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized() or (self.world_size == 1 and self.device.type == "cpu"):
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

    def _forward_logprobs(self, seqs: list[np.ndarray], wanted: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_logprobs(self.model, seqs, self.cfg.rollout.temperature, self.device, wanted)

    @torch.no_grad()
    def score(self, token_ids: list[int]) -> np.ndarray:
        """Log-probs [len-1] of ``token_ids[1:]`` (parity with the engines); collective over ranks."""
        logprob, _ = self._forward_logprobs([np.asarray(token_ids)])
        return logprob[1:].float().cpu().numpy()

    # ------------------------------------------------------------ training

    def _my_sequences(self, batch: TrainBatch) -> list[int]:
        """This rank's sequences: whole groups (round robin), so a group's shared prompt stays on one rank."""
        return [s for s, g in enumerate(batch.group_ids.numpy()) if int(g) % self.world_size == self.rank]

    def train_step(self, batch: TrainBatch, grpo_cfg: GRPOConfig | None = None) -> dict[str, float]:
        """One optimizer step on ``batch``; returns loss metrics reduced over micro-batches and ranks.

        ``grpo_cfg``: the current stage's GRPO settings (default ``cfg.grpo``).
        """
        start = time.perf_counter()
        grpo_cfg = grpo_cfg or self.cfg.grpo
        cu = batch.cu_seqlens.numpy()
        arrays = {k: getattr(batch, k).numpy() for k in ("input_ids", "loss_mask", "behaviour_logprobs", "advantages", "versions")}
        ref = batch.reference_logprobs.numpy() if batch.reference_logprobs is not None else None
        mine = self._my_sequences(batch)
        micro = group_micro_batches(mine, batch, self.cfg.trainer.micro_batch_tokens,
                                    getattr(self.model, "segment_attention", False))
        num_micro = self._max_over_ranks(len(micro))
        num_seqs = len(cu) - 1
        num_tokens = float(arrays["loss_mask"].sum())
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: list[dict[str, torch.Tensor]] = []
        for k in range(num_micro):
            # Every rank runs the same number of forward/backward passes (FSDP
            # collectives); a rank out of sequences reruns one with weight 0.
            seqs, weight = (micro[k], 1.0) if k < len(micro) else ([mine[0] if mine else 0], 0.0)
            loss, m = self._micro_loss(seqs, cu, arrays, ref, batch, num_seqs, num_tokens, grpo_cfg)
            # FSDP averages gradients over ranks, while the per-rank losses are
            # partial sums of one globally normalised loss: scale back to a sum.
            (loss * weight * self.world_size).backward()
            if weight:
                metrics.append({key: float(v) for key, v in m.items()})
        grad_norm = self._clip_and_step()
        self.version += 1
        # "loss" is the sum of micro-batch (and rank) losses = the batch loss (global normalisers).
        reduced = grpo.reduce_metrics(self._gather_metrics(metrics))
        out = {f"loss/{'policy' if k == 'loss' else k}": v for k, v in reduced.items()}
        out.update({"train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0],
                    "train/step_seconds": time.perf_counter() - start, "train/version": float(self.version)})
        return out

    def _micro_loss(self, seqs, cu, arrays, ref, batch: TrainBatch, num_seqs: int, num_tokens: float, grpo_cfg: GRPOConfig):
        spans = [(int(cu[s]), int(cu[s + 1])) for s in seqs]
        gather = lambda a: torch.from_numpy(np.concatenate([a[b:e] for b, e in spans]).astype(np.float32)).to(self.device)
        mask = np.concatenate([arrays["loss_mask"][b:e] for b, e in spans]) > 0
        logprobs, entropy = self._forward_logprobs([arrays["input_ids"][b:e] for b, e in spans], mask)
        behaviour = gather(arrays["behaviour_logprobs"])
        if grpo_cfg.proximal == "interpolate":
            # AReaL's log-linear interpolation by versions (proximal one version behind pi_theta).
            versions = torch.from_numpy(np.concatenate([arrays["versions"][b:e] for b, e in spans])).to(self.device)
            proximal = grpo.interpolate_proximal(behaviour, logprobs.detach(), versions, self.version)
        else:
            # One optimizer step per batch: pi_prox is the policy before this step, i.e.
            # exactly the current parameters, so a recompute pass equals logprobs.detach().
            proximal = logprobs.detach()
        lengths = torch.tensor([e - b for b, e in spans])
        local_cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(self.device)
        return grpo.policy_loss(
            logprobs, proximal, behaviour, gather(arrays["advantages"]), gather(arrays["loss_mask"]), local_cu, grpo_cfg,
            num_sequences_global=num_seqs, num_tokens_global=num_tokens, max_response_len=batch.max_response_len,
            reference_logprobs=gather(ref) if ref is not None else None, entropy=entropy,
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
        self.scheduler.step()
        return norm

    def _max_over_ranks(self, value: int) -> int:
        if not dist.is_initialized() or self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

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
        from verimed.core.checkpoint import write_hf

        state = {name: t.cpu() for name, t in self.iter_full_parameters()}
        if self.rank == 0:
            write_hf(state, base_model_path, out_dir, self.cfg.model.dtype)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        """Sharded save (torch.distributed.checkpoint) of model, optimizer, scheduler, version, RNG; collective."""
        from verimed.core.checkpoint import save_trainer_state

        save_trainer_state(path, self.model, self.optimizer, self._trainer_extra(), self.rank)

    def _trainer_extra(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "version": self.version}

    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (any world size for model/optimizer); collective."""
        from verimed.core.checkpoint import load_trainer_state

        extra = load_trainer_state(path, self.model, self.optimizer, self.rank, self._trainer_extra())
        self.scheduler.load_state_dict(extra["scheduler"])
        self.version = int(extra["version"])
