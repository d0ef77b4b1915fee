"""Cluster bring-up defects, each checked on CPU with test doubles (no GPU, no vLLM engine, no Ray cluster).

What a first multi-node GPU run would hit: the placement's tensor-parallel size
reaching vLLM, one weight-sync rank per engine worker, rendezvous hosted where
learner rank 0 runs, vLLM's token budget on GPU, and the sync group's timeout,
teardown on rejoin and routing around engines that missed a sync.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_bringup.py
"""
from __future__ import annotations

import asyncio
import os
import types
from datetime import timedelta

import pytest

from verimed.actors.learner import free_port
from verimed.core.config import load_config
from verimed.core.rollout import weight_sync as ws
from verimed.core.types import WeightVersion

TP4 = ["placement.rollout.gpus_per_replica=4", "placement.rollout.tensor_parallel_size=4"]


class _Remote:
    """``handle.method.remote(*args)`` of a Ray actor handle, as an awaitable."""

    def __init__(self, fn):
        self.remote = fn


def _handle(**methods):
    """An actor-handle double: each keyword is an async function, called through ``.remote``."""
    return types.SimpleNamespace(**{name: _Remote(fn) for name, fn in methods.items()})


# ------------------------------------------------------- 1, 5: engine arguments


def test_the_placement_tensor_parallel_size_reaches_the_engine():
    from verimed.core.rollout.engines import engine_settings, vllm_engine_args

    cfg = load_config(None, TP4)
    settings = engine_settings(cfg, "rollout", replica=2)
    assert settings["tensor_parallel_size"] == 4 and settings["seed"] == cfg.run.seed + 2
    assert vllm_engine_args("/m", "cuda", **settings)["tensor_parallel_size"] == 4
    with pytest.raises(ValueError, match="no role 'judge'"):
        engine_settings(cfg, "judge", 0)


def test_the_unchunked_prefill_token_budget_is_applied_on_cpu_only():
    from verimed.core.rollout.engines import max_num_batched_tokens, vllm_engine_args

    cfg = load_config("configs/cluster/node-8gpu.yaml")
    m, r = cfg.model, cfg.rollout
    assert max_num_batched_tokens("cpu", m.max_model_len, r.max_num_seqs) == 6144 * 256
    assert max_num_batched_tokens("cuda", m.max_model_len, r.max_num_seqs) is None  # vLLM's default
    common = dict(dtype="bfloat16", max_model_len=m.max_model_len, kv_cache_bytes=r.kv_cache_bytes,
                  max_num_seqs=r.max_num_seqs, enforce_eager=False, seed=0, tensor_parallel_size=1)
    assert "max_num_batched_tokens" not in vllm_engine_args("/m", "cuda", **common)
    assert vllm_engine_args("/m", "cpu", **common)["max_num_batched_tokens"] == 6144 * 256
    with pytest.raises(ValueError, match="max_num_seqs 0"):
        max_num_batched_tokens("cpu", 16, 0)


# ------------------------------------------------- 2, 3: ranks and rendezvous


class _Learners:
    """Learner group double: rank 0 answers its node's rendezvous address; calls are recorded."""

    def __init__(self, calls: list):
        async def rendezvous_address():
            return "10.9.8.7", 4242

        async def init_sync(*args):
            calls.append(("learner", *args))

        self.actors = [_handle(rendezvous_address=rendezvous_address, init_sync=init_sync)]

    async def weight_meta(self):
        return WeightVersion(version=0, num_bytes=0, names=[], shapes=[], dtypes=[], bucket_bytes=1)


def _engine(calls: list, index: int, workers: int):
    async def sync_workers():
        return workers

    async def init_sync(*args):
        calls.append((f"engine{index}", *args))

    async def set_expected(expected):
        return None

    return _handle(sync_workers=sync_workers, init_sync=init_sync, set_expected=set_expected)


def _coordinator(engines, learners, router=None, *overrides):
    from verimed.actors.weight_sync import WeightSyncCoordinator
    from verimed.core.models import load_tokenizer, resolve_model_path

    cfg = load_config(None, ["weight_sync.backend=gloo", "weight_sync.check_parity=false", *overrides])
    return WeightSyncCoordinator(cfg, learners, engines, load_tokenizer(resolve_model_path("smollm2")), router=router)


def test_every_tensor_parallel_worker_gets_its_own_sync_rank_at_rank_zeros_address():
    assert ws.sync_ranks([4, 2, 1]) == (8, [1, 5, 7])
    calls: list = []
    coord = _coordinator([_engine(calls, 0, 4), _engine(calls, 1, 2)], _Learners(calls))
    asyncio.run(coord.init())
    # learner rank 0's node and port, not the driver's; world = 1 + 4 + 2 workers
    assert sorted(calls) == [("engine0", "10.9.8.7", 4242, 1, 7, "gloo"), ("engine1", "10.9.8.7", 4242, 5, 7, "gloo"),
                             ("learner", "10.9.8.7", 4242, 7, "gloo")]


def test_a_worker_joins_at_its_engine_base_rank_plus_its_own_rank_and_a_rejoin_destroys_the_old_group(monkeypatch):
    from verimed.core.rollout import worker_extension as we

    made, destroyed = [], []

    class Group:
        def abort(self):
            destroyed.append(self)

    def make_group(host, port, rank, world, backend, timeout_s=120.0):
        made.append((rank, world))
        return Group()

    monkeypatch.setattr(we, "make_group", make_group)
    worker = we.WorkerExtension()
    worker.rank = 3  # vLLM's worker rank within its engine (its TP rank)
    worker.model_runner = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=None))
    worker.verimed_init_sync("h", 1, 5, 9, "gloo")
    first = worker._verimed_group
    worker.verimed_init_sync("h", 2, 5, 9, "gloo")  # rejoin
    assert made == [(8, 9), (8, 9)] and destroyed == [first]


def test_the_learners_rendezvous_at_rank_zeros_node(monkeypatch):
    from verimed.actors import learner as la

    class Handle:
        def __init__(self, rank):
            self.rank, self.setup_args = rank, None
            self.rendezvous_address = _Remote(lambda: ("ref-to-rank0-address", self.rank))
            self.setup = _Remote(lambda address: setattr(self, "setup_args", address))

    class FakeActor:
        @staticmethod
        def options(**_):
            return types.SimpleNamespace(remote=lambda cfg, path, rank, world, *rest: Handle(rank))

    monkeypatch.setattr(la, "LearnerActor", FakeActor)
    monkeypatch.setattr(la, "node_ip", lambda: pytest.fail("the driver's node IP must not be the rendezvous"))
    group = la.LearnerGroup(load_config(None, ["placement.learner.replicas=3"]), "/m")
    assert [a.setup_args for a in group.actors] == [("ref-to-rank0-address", 0)] * 3


# ---------------------------------------------- 7: timeout, teardown, routing


def test_the_nccl_group_gets_the_timeout(monkeypatch):
    seen = {}

    class FakeNCCL:
        class Options:
            _timeout = None

        def __init__(self, store, rank, size, options):
            seen.update(rank=rank, size=size, timeout=options._timeout,
                        on_error=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))

    monkeypatch.setattr(ws.dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    ws.make_group("127.0.0.1", free_port(), 0, 1, "nccl", timeout_s=7.0)
    # a timeout aborts the communicator and raises (2) rather than killing the process (3)
    assert seen == {"rank": 0, "size": 1, "timeout": timedelta(seconds=7.0), "on_error": "2"}
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


def test_learner_rank_zero_destroys_its_old_sync_group_on_rejoin(monkeypatch):
    from verimed.actors import learner as la
    from verimed.core.rollout import weight_sync  # imported inside init_sync (emulated learners never load torch)

    destroyed = []
    old = types.SimpleNamespace(abort=lambda: destroyed.append("old"))
    monkeypatch.setattr(weight_sync, "make_group", lambda *a: "new")
    actor = types.SimpleNamespace(learner=types.SimpleNamespace(rank=0), sync_group=old, emulated=False)
    la.LearnerActor.__ray_actor_class__.init_sync(actor, "h", 1, 3, "gloo")
    assert destroyed == ["old"] and actor.sync_group == "new"


def test_engines_that_missed_a_sync_are_skipped_until_they_catch_up():
    from verimed.actors.rollout import EngineRouter

    fail = {"engine": None}

    def engine(i):
        async def update_weights(meta):
            if fail["engine"] == i:
                raise RuntimeError("sync timed out")
            return {"sync/version": float(meta.version)}

        return _handle(update_weights=update_weights)

    class Learners(_Learners):
        async def broadcast(self, meta):
            return {}

    engines = [engine(i) for i in range(3)]
    router = EngineRouter(engines)
    coord = _coordinator(engines, Learners([]), router)
    coord.meta = asyncio.run(coord.learners.weight_meta())
    fail["engine"] = 1
    asyncio.run(coord.sync(1))
    assert coord.served == [1, 0, 1] and router.skip == {1}
    assert coord.needs_rejoin  # the group may be out of step after a part-way failure: rebuilt first
    coord.needs_rejoin = False  # (the rebuild itself is test_weight_sync's; this double has no group)
    router.inflight = [5, 0, 5]  # engine 1 is the least loaded, but serves version 0
    assert router.pick() != 1 and all(router.pick(f"key{k}") != 1 for k in range(20))
    fail["engine"] = None
    asyncio.run(coord.sync(2))
    assert router.skip == set() and router.pick() == 1


def test_when_every_engine_lags_the_router_still_routes():
    from verimed.actors.rollout import EngineRouter

    router = EngineRouter(["a", "b"])
    router.skip = ws.lagging_engines([-1, -1])
    assert router.skip == set() and router.pick() in (0, 1)
    router.skip = frozenset({0, 1})
    assert router.pick() in (0, 1)


# ------------------------------------------------------ 6: learner memory


def test_save_hf_keeps_the_full_weights_on_rank_zero_only(monkeypatch):
    from verimed.core.train import checkpoint
    from verimed.core.train.learner import Learner

    copies, gathered = [], []

    class Gathered:  # one full tensor of the all-gather
        def cpu(self):
            copies.append(self)
            return self

    def iter_full_parameters():
        for i in range(3):
            gathered.append(i)  # every rank must take part in every all-gather
            yield f"w{i}", Gathered()

    written = []
    monkeypatch.setattr(checkpoint, "write_hf", lambda state, *rest: written.append(len(state)))
    for rank in (1, 0):
        rank_self = types.SimpleNamespace(rank=rank, iter_full_parameters=iter_full_parameters,
                                          cfg=types.SimpleNamespace(model=types.SimpleNamespace(dtype="float32")))
        Learner.save_hf(rank_self, "/out", "/base")
        if rank == 1:
            assert gathered == [0, 1, 2] and copies == [] and written == []
    assert len(copies) == 3 and written == [3]


def test_the_sharded_reference_rendezvous_on_rank_zeros_node(monkeypatch):
    from verimed.actors import learner as la
    from verimed.actors import reference as ra

    asked, started = [], []
    monkeypatch.setattr(la, "_node_address", types.SimpleNamespace(options=lambda **o: types.SimpleNamespace(
        remote=lambda: asked.append(o) or ("ip-ref", "port-ref"))))
    monkeypatch.setattr(la, "node_ip", lambda: pytest.fail("the driver's node IP must not be the rendezvous"))
    monkeypatch.setattr(ra, "ReferenceActor", types.SimpleNamespace(options=lambda **o: types.SimpleNamespace(
        remote=lambda *args: started.append(args[2:6]))))
    cfg = load_config(None, ["placement.reference.replicas=2"])
    ra.ReferenceGroup(cfg, "/m", [{"num_cpus": 1, "scheduling_strategy": "bundle-0"}, {"num_cpus": 1}])
    assert asked == [{"scheduling_strategy": "bundle-0", "num_returns": 2}]
    assert started == [(0, 2, "ip-ref", "port-ref"), (1, 2, "ip-ref", "port-ref")]
