"""Stand-in log-probs that an emulated engine and an emulated learner compute identically.

An emulated policy has no weights, yet the real weight-sync parity check (learner ``score`` vs
engine ``score`` on fixed tokens) must pass exactly when the engine serves the learner's version
and fail when it lags. So the log-prob of a token is a pure hash of (policy version, previous
token, token): both sides agree bit for bit on the same version, and a version apart they differ
by O(1) nats (far above any parity tolerance).
"""
from __future__ import annotations

import numpy as np

# log p ranges over [-(LOGP_FLOOR + LOGP_SPAN), -LOGP_FLOOR]: plausible sampled-token log-probs.
LOGP_FLOOR = 0.05
LOGP_SPAN = 4.0

_K_VERSION = np.uint64(0x9E3779B97F4A7C15)
_K_PREV = np.uint64(0xC2B2AE3D27D4EB4F)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def pair_logprobs(prev: np.ndarray, tokens: np.ndarray, versions: np.ndarray | int) -> np.ndarray:
    """float32 [n]: log p(token | prev token) at ``versions`` (one per token, or one for all):

        h  = splitmix64((v + 1)·K_v  xor  (prev + 1)·K_p  xor  token)
        lp = -(LOGP_FLOOR + LOGP_SPAN · (h >> 11) / 2^53)
    """
    prev = np.asarray(prev, dtype=np.int64).astype(np.uint64)
    tokens = np.asarray(tokens, dtype=np.int64).astype(np.uint64)
    v = np.broadcast_to(np.asarray(versions, dtype=np.int64), tokens.shape).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(((v + np.uint64(1)) * _K_VERSION) ^ ((prev + np.uint64(1)) * _K_PREV) ^ tokens)
    unit = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
    return (-(LOGP_FLOOR + LOGP_SPAN * unit)).astype(np.float32)


def sequence_logprobs(token_ids, version: int) -> np.ndarray:
    """float32 [len-1]: log-probs of ``token_ids[1:]`` at ``version`` (what ``score`` returns)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 1:
        raise ValueError(f"sequence_logprobs: needs a non-empty 1-D token sequence, got shape {ids.shape}")
    return pair_logprobs(ids[:-1], ids[1:], version)


def packed_logprobs(input_ids: np.ndarray, cu_seqlens: np.ndarray, version: int) -> np.ndarray:
    """float32 [T] over a packed batch: position t holds log p(token t | token t-1) at ``version``,
    0 at the first token of each sequence (nothing predicts it) — the TrainBatch layout."""
    ids = np.asarray(input_ids, dtype=np.int64)
    out = np.zeros(len(ids), dtype=np.float32)
    if len(ids) > 1:
        out[1:] = pair_logprobs(ids[:-1], ids[1:], version)
    starts = np.asarray(cu_seqlens, dtype=np.int64)[:-1]
    out[starts[starts < len(ids)]] = 0.0
    return out
