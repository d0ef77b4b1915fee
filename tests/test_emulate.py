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
    path = _write(tmp_path, _profile_text(**{"step_s: 0.02": "step_s: -1"}))
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
    p = load_profile("cpu-smollm2")  # step_s 0.02, step_s_per_seq 0.0055, prefill 2000 tok/s
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

from verimed.core.emulate.engine import EmulatedEngine, EmulationError  # noqa: E402
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
        ticks, progress = engine.ticks, [len(s.versions) for s in engine._sequences]
        await asyncio.sleep(0.2)  # many ticks' worth of wall time
        held = (engine.ticks == ticks and [len(s.versions) for s in engine._sequences] == progress and not task.done())
        engine.resume()
        outs = await task
        return held, outs

    held, outs = asyncio.run(scenario())
    assert held
    assert all(len(o.token_ids) >= 1 for o in outs)


def test_response_length_is_capped_and_stop_ends_with_eos(tokenizer):
    engine = EmulatedEngine(load_profile("cpu-smollm2"), tokenizer, time_scale=1000.0)  # mean 56, std 12
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
