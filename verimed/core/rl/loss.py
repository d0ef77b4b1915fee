"""The off-policy-corrected GRPO loss (decoupled PPO) and its metrics (DESIGN §3).

Pure torch functions; no Ray. Run by the learner per packed micro-batch
(rewards and advantages: :mod:`verimed.core.rl.advantages`):

    loss, metrics = policy_loss(logp, prox, mu, adv_tok, mask, cu_seqlens, cfg.grpo,
                                num_sequences_global=S, num_tokens_global=T,
                                max_response_len=L)
    summary = reduce_metrics([metrics, ...])  # over micro-batches (and ranks)

Shapes: T packed tokens, S sequences, cu_seqlens [S+1] token offsets of each
sequence (sequences never straddle micro-batches).
"""
from __future__ import annotations

import torch

from verimed.core.config import GRPOConfig

# ------------------------------------------------------------ token level (torch)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for exp/log maths; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """seg[t] = s for cu_seqlens[s] <= t < cu_seqlens[s+1]; [T] int64 (requires cu_seqlens[-1] == T)."""
    counts = cu_seqlens.diff().long()
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)
    if int(cu_seqlens[0]) != 0 or seg.numel() != num_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to T={num_tokens}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    return seg


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[s] = sum_{t: seg[t] = s} values[t]; [S]. Differentiable."""
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, seg, values)


def behaviour_weight(proximal_logprobs, behaviour_logprobs, mode: str, cap: float = 2.0, mask_low: float = 0.5, mask_high: float = 2.0):
    """Behaviour importance weight of decoupled PPO, w = exp(log pi_prox - log mu), [T] -> ([T] w', [T] bool keep, [T] bool flagged).

    "cap":  w' = min(w, cap) (truncated IS), keep all, flagged = w > cap.
    "mask": w' = w, keep = low <= w <= high (tokens outside get no loss), flagged = ~keep.
    "none": w' = w. No gradient flows through w (neither policy depends on theta).
    """
    w = torch.exp(_wide(proximal_logprobs - behaviour_logprobs).detach())
    if mode == "cap":
        flagged = w > cap
        return w.clamp(max=cap), torch.ones_like(flagged), flagged
    if mode == "mask":
        keep = (w >= mask_low) & (w <= mask_high)
        return w, keep, ~keep
    if mode == "none":
        return w, torch.ones_like(w, dtype=torch.bool), torch.zeros_like(w, dtype=torch.bool)
    raise ValueError(f"is_mode must be cap|mask|none, got {mode!r}")


def m2po_keep(log_w: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2PO second-moment trust mask, [T] -> [T] bool.

    Drop the tokens with the largest m_t = (log w_t)^2 until the mean of m over
    the kept tokens of ``mask`` is <= threshold: sort m ascending, keep the
    longest prefix whose running mean is <= threshold (ties broken by order).
    """
    m = torch.where(mask, log_w.detach().float() ** 2, torch.inf)
    order = torch.argsort(m, stable=True)
    m_sorted = m[order]
    n_valid = int(mask.sum())
    prefix = torch.arange(1, m.numel() + 1, device=m.device)
    running = torch.cumsum(torch.where(torch.isfinite(m_sorted), m_sorted, 0.0), 0) / prefix
    ok = (running <= threshold) & (prefix <= n_valid)
    keep_sorted = torch.cumprod(ok.long(), 0).bool()  # a prefix: stop at the first failure
    keep = torch.zeros_like(mask)
    keep[order] = keep_sorted
    return keep & mask


def importance_ratio(logprobs, proximal_logprobs, mask, cu_seqlens, kind: str) -> torch.Tensor:
    """u = pi_theta / pi_prox, [T].

    "token": u_t = exp(logp_t - prox_t).
    "gspo":  u_t = exp(sum_{t' in s} m_t' (logp - prox)_t' / sum_{t' in s} m_t') for t in sequence s
             (GSPO's length-normalised sequence ratio, gradient through every token of s).
    """
    log_ratio = logprobs - proximal_logprobs.detach()
    if kind == "token":
        return torch.exp(log_ratio)
    if kind != "gspo":
        raise ValueError(f"ratio must be token|gspo, got {kind!r}")
    seg = segment_ids(cu_seqlens, logprobs.numel())
    n_seq = cu_seqlens.numel() - 1
    m = mask.to(log_ratio.dtype)
    seq_lr = segment_sum(log_ratio * m, seg, n_seq) / segment_sum(m, seg, n_seq).clamp_min(1.0)
    return torch.exp(seq_lr[seg])


def clipped_surrogate(ratio, advantages, eps_low: float, eps_high: float):
    """Clip-higher PPO term, [T] -> (l[T], clipped_low[T] bool, clipped_high[T] bool).

    l_t = -min(u_t A_t, clip(u_t, 1 - eps_low, 1 + eps_high) A_t); a token is
    clipped low when A < 0 and u < 1 - eps_low, high when A > 0 and u > 1 + eps_high
    (exactly the tokens whose gradient the clip removes).
    """
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return loss, low.detach(), high.detach()


def kl_penalty(logprobs, reference_logprobs, estimator: str) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate, [T]; d = log pi_ref - log pi_theta.

    k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1 (Schulman's unbiased, >= 0 estimator).
    """
    d = reference_logprobs.detach() - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator must be k1|k2|k3, got {estimator!r}")


def aggregate(token_loss, mask, cu_seqlens, mode: str, *, num_sequences_global: int, num_tokens_global: float, max_response_len: int):
    """Scalar loss from per-token losses [T] with GLOBAL normalisers (sum over micro-batches = batch loss).

    "paper":               sum_t m_t l_t / (num_sequences_global * max_response_len)   (= mean over prompts of 1/(G l_max) sum_i sum_t)
    "token-mean":          sum_t m_t l_t / num_tokens_global                             (DAPO)
    "seq-mean-token-mean": sum_s (sum_{t in s} m_t l_t / sum_{t in s} m_t) / num_sequences_global
    ``mask`` here is the loss mask (response tokens); corrections that drop tokens
    zero their l_t but never change a normaliser.
    """
    m = mask.to(token_loss.dtype)
    total = (token_loss * m).sum()
    if mode == "paper":
        return total / (num_sequences_global * max_response_len)
    if mode == "token-mean":
        return total / num_tokens_global
    if mode == "seq-mean-token-mean":
        seg = segment_ids(cu_seqlens, token_loss.numel())
        n_seq = cu_seqlens.numel() - 1
        per_seq = segment_sum(token_loss * m, seg, n_seq) / segment_sum(m, seg, n_seq).clamp_min(1.0)
        return per_seq.sum() / num_sequences_global
    raise ValueError(f"aggregation must be paper|token-mean|seq-mean-token-mean, got {mode!r}")


def _check_token_inputs(named: dict[str, torch.Tensor | None]) -> None:
    shape = named["logprobs"].shape
    if len(shape) != 1:
        raise ValueError(f"policy_loss: logprobs must be a packed [T] tensor, got {tuple(shape)}")
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} like logprobs")


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cfg: GRPOConfig,
    *,
    num_sequences_global: int,
    num_tokens_global: float,
    max_response_len: int,
    reference_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    m2po_keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled-PPO GRPO loss of one packed micro-batch (DESIGN §3) and summable metrics.

    All token tensors are [T]; cu_seqlens [S+1] (needed by "gspo" and
    "seq-mean-token-mean"). Per token, with mu = behaviour, prox = proximal:

        w   = behaviour_weight(exp(prox - mu))            capped / band-masked (cfg.is_mode)
        u   = exp(logp - prox)  (or GSPO's sequence ratio, cfg.ratio)
        l_t = -w min(u A, clip(u, 1 - eps_low, 1 + eps_high) A)     on kept tokens, else 0
            + kl_coef * KL_est(logp, ref)                           (cfg.kl_coef > 0)

    Tokens are dropped by the IS band mask and by M2PO (cfg.m2po_threshold > 0, on
    log w): ``m2po_keep_mask`` [T] bool is that mask computed over the whole batch
    (:func:`m2po_keep` on every token of every micro-batch and rank — the learner
    passes it, so the mask does not depend on packing); None computes it over
    this call's tokens only. The loss is ``aggregate`` of l with the GLOBAL normalisers, so summing
    the losses of all micro-batches of a step gives the batch loss. Gradient flows
    only through ``logprobs``. With mu = prox (fresh samples), w = 1 and this is
    on-policy GRPO of the same variant.

    Metrics are 0-d tensors that add across micro-batches and ranks, except keys
    ending in ``_min`` / ``_max``; combine them with :func:`reduce_metrics`.
    """
    _check_token_inputs(dict(logprobs=logprobs, proximal_logprobs=proximal_logprobs, behaviour_logprobs=behaviour_logprobs,
                             advantages=advantages, loss_mask=loss_mask, reference_logprobs=reference_logprobs, entropy=entropy,
                             m2po_keep_mask=m2po_keep_mask))
    if cfg.kl_coef > 0 and reference_logprobs is None:
        raise ValueError("policy_loss: grpo.kl_coef > 0 needs reference_logprobs")
    if num_sequences_global < 1 or num_tokens_global <= 0 or max_response_len < 1:
        raise ValueError(f"policy_loss: global normalisers must be positive, got num_sequences_global={num_sequences_global}, "
                         f"num_tokens_global={num_tokens_global}, max_response_len={max_response_len}")
    mask = loss_mask.bool()
    adv = advantages.detach().to(logprobs.dtype)
    proximal_logprobs = proximal_logprobs.detach()
    log_w = _wide(proximal_logprobs - behaviour_logprobs.detach())
    w, keep, flagged = behaviour_weight(proximal_logprobs, behaviour_logprobs, cfg.is_mode, cfg.is_cap, cfg.is_mask_low, cfg.is_mask_high)
    if cfg.m2po_threshold <= 0:
        m2_keep = torch.ones_like(mask)
    elif m2po_keep_mask is not None:
        m2_keep = m2po_keep_mask.bool()
    else:
        m2_keep = m2po_keep(log_w, mask & keep, cfg.m2po_threshold)
    active = mask & keep & m2_keep

    ratio = importance_ratio(logprobs, proximal_logprobs, mask, cu_seqlens, cfg.ratio)
    surrogate, low, high = clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high)
    token_loss = torch.where(active, w.to(surrogate.dtype) * surrogate, 0.0)
    kl = None
    if reference_logprobs is not None:
        kl = kl_penalty(logprobs, reference_logprobs, cfg.kl_estimator)
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl
    loss = aggregate(token_loss, mask, cu_seqlens, cfg.aggregation, num_sequences_global=num_sequences_global,
                     num_tokens_global=num_tokens_global, max_response_len=max_response_len)

    with torch.no_grad():
        mf = mask.float()
        raw_w = torch.exp(log_w)
        metrics = {
            "loss": loss.detach().float(),
            "tokens": mf.sum(),
            "sequences": torch.tensor(float(cu_seqlens.numel() - 1), device=mf.device),
            "clip_low_count": (low & active).float().sum(),
            "clip_high_count": (high & active).float().sum(),
            "is_flagged_count": (flagged & mask).float().sum(),
            "m2po_masked_count": (mask & keep & ~m2_keep).float().sum(),
            "behaviour_kl_sum": ((raw_w - 1.0 - log_w) * mf).sum(),  # k3 of KL(mu || pi_prox), tokens ~ mu
            "importance_weight_sum": (raw_w * mf).sum(),
            "importance_weight_max": torch.where(mask, raw_w, -torch.inf).max() if mask.numel() else torch.tensor(-torch.inf),
            "ratio_sum": (ratio.detach().float() * mf).sum(),
            "advantage_sum": (adv.float() * mf).sum(),
            "advantage_sq_sum": (adv.float() ** 2 * mf).sum(),
            "advantage_min": torch.where(mask, adv.float(), torch.inf).min() if mask.numel() else torch.tensor(torch.inf),
            "advantage_max": torch.where(mask, adv.float(), -torch.inf).max() if mask.numel() else torch.tensor(-torch.inf),
        }
        if entropy is not None:
            metrics["entropy_sum"] = (entropy.detach().float() * mf).sum()
        if kl is not None:
            metrics["kl_sum"] = (kl.detach().float() * mf).sum()
            metrics["kl_max"] = torch.where(mask, kl.detach().float(), -torch.inf).max() if mask.numel() else torch.tensor(-torch.inf)
    return loss, metrics


_RATIOS = {  # derived metric -> (numerator sum, denominator count)
    "clip_low_frac": ("clip_low_count", "tokens"),
    "clip_high_frac": ("clip_high_count", "tokens"),
    "is_flagged_frac": ("is_flagged_count", "tokens"),
    "m2po_masked_frac": ("m2po_masked_count", "tokens"),
    "behaviour_kl": ("behaviour_kl_sum", "tokens"),
    "importance_weight_mean": ("importance_weight_sum", "tokens"),
    "ratio_mean": ("ratio_sum", "tokens"),
    "advantage_mean": ("advantage_sum", "tokens"),
    "entropy": ("entropy_sum", "tokens"),
    "kl": ("kl_sum", "tokens"),
}


def reduce_metrics(metric_dicts: list[dict[str, torch.Tensor | float]]) -> dict[str, float]:
    """Combine per-micro-batch metrics: sum every key, min/max for ``*_min``/``*_max``; add derived means.

    Derived: clip_low_frac, clip_high_frac, clip_frac, is_flagged_frac,
    m2po_masked_frac, behaviour_kl, importance_weight_mean, ratio_mean,
    advantage_mean, advantage_std, entropy, kl (per loss token). Across ranks,
    all-reduce the raw keys (SUM, MIN, MAX alike) before calling this.
    """
    out: dict[str, float] = {}
    for metrics in metric_dicts:
        for key, value in metrics.items():
            v = float(value)
            if key not in out:
                out[key] = v
            elif key.endswith("_min"):
                out[key] = min(out[key], v)
            elif key.endswith("_max"):
                out[key] = max(out[key], v)
            else:
                out[key] += v
    tokens = out.get("tokens", 0.0)
    for name, (num, den) in _RATIOS.items():
        if num in out and den in out:
            out[name] = out[num] / tokens if tokens > 0 else 0.0
    if "clip_low_frac" in out:
        out["clip_frac"] = out["clip_low_frac"] + out["clip_high_frac"]
    if "advantage_sq_sum" in out and tokens > 0:
        var = out["advantage_sq_sum"] / tokens - out["advantage_mean"] ** 2
        out["advantage_std"] = max(var, 0.0) ** 0.5
    return out


def interpolate_proximal(
    behaviour_logprobs: torch.Tensor,
    current_logprobs: torch.Tensor,
    token_versions: torch.Tensor,
    current_version: float,
    proximal_version: float | None = None,
) -> torch.Tensor:
    """AReaL's log-linear proximal approximation (skips the recompute forward), [T] -> [T].

        alpha_t   = clamp((v_prox - v_t) / (v_theta - v_t), 0, 1)   (alpha_t = 1 when v_t = v_theta)
        log prox_t = log mu_t + alpha_t (log pi_theta_t - log mu_t)

    v_t = token_versions (the policy version that sampled token t), v_theta =
    ``current_version`` (the weights that produced ``current_logprobs``), v_prox =
    ``proximal_version`` (default v_theta - 1: the proximal policy is one update
    behind, as in AReaL). Tokens from v_prox or older move toward pi_theta by the
    fraction of versions elapsed. The learner passes v_prox = the batch-start
    version v and v_theta = v + m/M for its m-th of M minibatch steps (fractional
    versions), so the first minibatch gets prox = current exactly. Detached.
    """
    v_prox = current_version - 1 if proximal_version is None else proximal_version
    if proximal_version is not None and proximal_version > current_version:
        raise ValueError(f"proximal_version {proximal_version} is newer than current_version {current_version}")
    if token_versions.shape != behaviour_logprobs.shape or current_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError("interpolate_proximal: behaviour_logprobs, current_logprobs and token_versions must share one [T] shape")
    if token_versions.numel() and int(token_versions.max()) > current_version:
        raise ValueError(f"interpolate_proximal: a token has version {int(token_versions.max())} > current_version {current_version}")
    v_t = token_versions.to(torch.float64)
    gap = current_version - v_t
    alpha = torch.where(gap > 0, (v_prox - v_t) / gap.clamp_min(1.0), 1.0).clamp(0.0, 1.0)
    mu = behaviour_logprobs.detach()
    return mu + alpha.to(mu.dtype) * (current_logprobs.detach() - mu)
