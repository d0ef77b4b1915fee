"""The reference model and the KL term (verimed/core/reference.py, verimed/actors/reference.py; issue #9).

Run: .venv/bin/python -m pytest tests/test_reference.py -q   (the Ray test is marked integration)

One module fixture loads the tiny model twice (a frozen ReferenceModel and a
Learner with grpo.kl_coef = 0.1), checks reference-vs-learner log-probs at step 0,
trains two steps on a batch carrying the reference log-probs and checks again.
"""
from __future__ import annotations

import asyncio
import os

import msgspec
import numpy as np
import pytest
import torch

from verimed.core.config import Config, GRPOConfig, TrainerConfig
from verimed.core.rl.batch import build_train_batch
from verimed.core.types import Array, Group, Prompt, Sample, Turn

KL_COEF = 0.1


def make_groups(seed: int = 0, groups: int = 2, group_size: int = 2):
    """(groups, advantages): random prompts/responses, nonzero advantages, behaviour log-probs far below the policy's."""
    rng = np.random.default_rng(seed)
    out, advantages = [], []
    for g in range(groups):
        prompt_ids = rng.integers(1, 49_000, size=int(rng.integers(4, 9))).astype(np.int32)
        samples = []
        for i in range(group_size):
            r = int(rng.integers(2, 7))
            samples.append(Sample(
                uid=f"{g}/0/{i}", prompt_ids=Array.of(prompt_ids),
                response_ids=Array.of(rng.integers(1, 49_000, size=r).astype(np.int32)),
                response_logprobs=Array.of(np.full(r, -10.0, np.float32)),
                response_versions=Array.of(np.zeros(r, np.int32)), text="x"))
        prompt = Prompt(index=g, source="test", messages=[Turn(role="user", content="hi")])
        out.append(Group(prompt=prompt, samples=samples, rewards=[0.0] * group_size, rubric_scores=[0.0] * group_size))
        advantages.append(np.linspace(-1.0, 1.0, group_size))
    return out, advantages


def make_batch(seed: int = 0, groups: int = 2, group_size: int = 2):
    return build_train_batch(*make_groups(seed, groups, group_size), policy_version=0)


def learner_logprobs(learner, batch) -> np.ndarray:
    """The learner's own per-token log-probs [T], micro-batched as its train_step does."""
    from verimed.core.train.packing import pack_micro_batches

    cu, ids = batch.cu_seqlens.numpy(), batch.input_ids.numpy()
    lengths = [int(cu[s + 1] - cu[s]) for s in range(len(cu) - 1)]
    out = np.zeros(len(ids), np.float32)
    with torch.no_grad():
        for mb in pack_micro_batches(lengths, learner.cfg.trainer.micro_batch_tokens):
            lp, _ = learner._forward_logprobs([ids[cu[s] : cu[s + 1]] for s in mb], batch.temperature)
            out[np.concatenate([np.arange(cu[s], cu[s + 1]) for s in mb])] = lp.numpy()
    return out


def scored_one_by_one(learner, batch) -> np.ndarray:
    """Log-probs [T] from ``Learner.score`` (the engine-parity path), one sequence per forward."""
    cu, ids = batch.cu_seqlens.numpy(), batch.input_ids.numpy()
    parts = [np.concatenate([[0.0], learner.score(ids[cu[s] : cu[s + 1]].tolist())]) for s in range(len(cu) - 1)]
    return np.concatenate(parts).astype(np.float32)


def config(**grpo) -> Config:
    return Config(grpo=GRPOConfig(**grpo), trainer=TrainerConfig(lr=1e-4, grad_clip=0.0))


@pytest.fixture(scope="module")
def run(tiny_model_path):
    from verimed.core.train.learner import Learner
    from verimed.core.train.reference import ReferenceModel, with_reference

    torch.set_num_threads(2)
    cfg = config(kl_coef=KL_COEF)
    reference = ReferenceModel(cfg, tiny_model_path)
    learner = Learner(cfg, tiny_model_path)
    batch = make_batch()
    ref = reference.logprobs(batch)
    out = {"cfg": cfg, "batch": batch, "ref": ref, "learner_before": learner_logprobs(learner, batch),
           "scored_before": scored_one_by_one(learner, batch),
           "reference": reference, "learner": learner, "path": tiny_model_path}
    batch = with_reference(batch, ref)
    out["metrics"] = [learner.train_step(batch), learner.train_step(batch)]
    out["learner_after"] = learner_logprobs(learner, batch)
    out["ref_after"] = reference.logprobs(batch)
    return out


# ------------------------------------------------------------ parity and training


def test_reference_equals_learner_at_step_zero(run):
    ref, mine = run["ref"], run["learner_before"]
    assert ref.dtype == np.float32 and ref.shape == (len(run["batch"].input_ids),)
    cu = run["batch"].cu_seqlens.numpy()
    loss = run["batch"].loss_mask.numpy() > 0
    assert not loss[cu[:-1]].any() and loss.sum() < len(loss)  # prompts exist and carry no loss
    assert np.all(ref[~loss] == 0.0)  # only the KL's tokens are scored (no LM-head work on prompts)
    assert np.all(ref[loss] < 0.0)
    # Same split and packing (packing.rank_sequences), but the learner's forward runs with
    # autograd and the reference's in inference mode: fp32 kernels may sum in another order.
    # Log-probs of random tokens are ~-15; fp32 round-off through a 30-layer forward is a
    # few hundred ulps of that scale (a relative 1e-5 is ~170 ulps), never an absolute 1e-5.
    np.testing.assert_allclose(ref[loss], mine[loss], rtol=1e-5, atol=1e-6)
    # Another packing (one sequence per forward) changes fp32 summation order only.
    np.testing.assert_allclose(ref[loss], run["scored_before"][loss], rtol=1e-5, atol=1e-6)


def test_reference_differs_after_training_and_stays_frozen(run):
    assert np.abs(run["learner_after"] - run["ref"]).max() > 1e-3  # the learner moved
    np.testing.assert_array_equal(run["ref_after"], run["ref"])  # the reference did not


def test_kl_is_exactly_zero_at_step_zero_then_positive(run):
    first, second = run["metrics"]
    assert first["loss/kl"] == 0.0  # same weights, same packing: bit-identical log-probs
    assert second["loss/kl"] > 0.0
    assert np.isfinite(second["loss/policy"])


def test_micro_batching_does_not_change_reference_logprobs(run):
    from verimed.core.train.reference import ReferenceModel

    reference = run["reference"]
    tiny = msgspec.structs.replace(run["cfg"], trainer=TrainerConfig(micro_batch_tokens=8))
    small_budget = ReferenceModel.__new__(ReferenceModel)
    small_budget.__dict__.update(reference.__dict__, cfg=tiny)  # same weights, budget 8 tokens: one sequence per micro-batch
    np.testing.assert_allclose(small_budget.logprobs(run["batch"]), run["ref"], atol=1e-5, rtol=1e-5)


def test_reference_parameters_are_frozen(run):
    params = list(run["reference"].model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not run["reference"].model.training


# ------------------------------------------------------------ helpers


def test_with_reference_checks_the_length():
    from verimed.core.train.reference import with_reference

    batch = make_batch(groups=1, group_size=2)
    t = len(batch.input_ids)
    out = with_reference(batch, np.arange(t, dtype=np.float64))
    assert out.reference_logprobs.numpy().dtype == np.float32 and out.input_ids == batch.input_ids
    with pytest.raises(ValueError, match="tokens"):
        with_reference(batch, np.zeros(t + 1))


def test_kl_coef_needs_reference_logprobs():
    from verimed.core.rl import loss as grpo

    x = torch.zeros(4)
    with pytest.raises(ValueError, match="reference_logprobs"):
        grpo.policy_loss(x, x, x, x, torch.ones(4), torch.tensor([0, 4]), GRPOConfig(kl_coef=0.1),
                         num_sequences_global=1, num_tokens_global=4.0, max_response_len=4)


def test_reference_needed_follows_kl_coef_and_stages():
    from verimed.core.config import StageConfig, reference_needed

    assert not reference_needed(Config())  # the default: no KL, no reference actor
    assert reference_needed(config(kl_coef=0.05))
    plain = StageConfig(name="rule", kind="rule", steps=1)
    off = StageConfig(name="off", kind="rule", steps=1, grpo={"kl_coef": 0.0})
    on = StageConfig(name="on", kind="rubric", steps=1, grpo={"kl_coef": 0.02})
    assert not reference_needed(Config(stages=[plain, off]))
    assert reference_needed(Config(stages=[plain, on]))
    # A stage that says nothing inherits grpo.kl_coef; an explicit 0 turns it off there only.
    assert reference_needed(msgspec.structs.replace(config(kl_coef=0.3), stages=[off, plain]))
    assert not reference_needed(msgspec.structs.replace(config(kl_coef=0.3), stages=[off]))


def test_plan_and_run_agree_on_the_reference(tmp_path, capsys):
    """``verimed plan`` places a reference exactly when the run starts one (one rule, both sides):
    here the KL term is switched on by a stage only, which the plan used to miss."""
    import argparse

    from verimed.cli import plan as plan_cli

    parser = argparse.ArgumentParser()
    plan_cli.add_plan_arguments(parser)
    for kl, placed in ((0.1, True), (0.0, False)):
        cfg_file = tmp_path / f"kl_{kl}.yaml"
        cfg_file.write_text(f"run: {{steps: 2}}\nstages:\n  - {{name: a, kind: rule, steps: 1}}\n"
                            f"  - {{name: b, kind: rubric, steps: 1, grpo: {{kl_coef: {kl}}}}}\n")
        args = parser.parse_args([str(cfg_file), "--cluster-resources", "1x0gpu,cpus_per_node=8"])
        assert plan_cli.run_plan(args) == 0
        assert ("reference[0]" in capsys.readouterr().out) == placed


def test_reference_needed_reads_stage_configs():
    stages = pytest.importorskip("verimed.core.config.stages")
    from types import SimpleNamespace as NS

    from verimed.core.config import reference_needed

    rl = stages.StageConfig(name="rule", kind="rule", steps=2)
    kl = stages.StageConfig(name="consult", kind="multiturn", steps=2, grpo={"kl_coef": 0.05})
    assert not reference_needed(NS(grpo=GRPOConfig(), stages=[rl]))
    assert reference_needed(NS(grpo=GRPOConfig(), stages=[rl, kl]))


def test_reference_model_path_defaults_to_the_initial_policy(tiny_model_path):
    from types import SimpleNamespace as NS

    from verimed.core.train.reference import reference_model_path

    assert reference_model_path(Config(), "/base") == "/base"
    assert reference_model_path(NS(grpo=NS(reference_path=tiny_model_path)), "/base") == tiny_model_path


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_zero_at_equal_policies_and_aggregate_like_the_loss(estimator):
    from verimed.core.rl import loss as grpo

    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    mask, cu = torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 4])
    common = dict(num_sequences_global=1, num_tokens_global=3.0, max_response_len=3)
    cfg = GRPOConfig(kl_coef=0.5, kl_estimator=estimator, aggregation="token-mean")
    _, m = grpo.policy_loss(lp, lp, lp, torch.zeros(4), mask, cu, cfg, reference_logprobs=lp.clone(), **common)
    assert float(m["kl_sum"]) == 0.0
    ref = lp + torch.tensor([5.0, 0.3, -0.2, 0.1])  # token 0 is masked: its KL must not count
    loss, m = grpo.policy_loss(lp, lp, lp, torch.zeros(4), mask, cu, cfg, reference_logprobs=ref, **common)
    kl = grpo.kl_penalty(lp, ref, estimator)
    torch.testing.assert_close(loss, 0.5 * kl[1:].sum() / 3.0)


# ------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_reference_group_scores_batches_and_reports_the_wait(ray_cluster, run):
    from verimed.actors.reference import ReferenceGroup

    cfg, batch = run["cfg"], run["batch"]
    groups, advantages = make_groups()  # the groups `batch` was packed from

    async def go():
        group = ReferenceGroup(cfg, run["path"])
        await group.ready()
        whole, wait_whole = await group.attach(batch, [group.submit(batch)])
        # Per-group submission (as groups finish): the concatenation is the batch's array.
        pending = [group.submit(build_train_batch([g], [a], 0)) for g, a in zip(groups, advantages)]
        split, _ = await group.attach(batch, pending)
        assert all(p.done_at is not None and p.done_at >= p.submitted_at for p in pending)
        return whole, wait_whole, split, await group.stats()

    whole, wait_whole, split, stats = asyncio.run(go())
    # Another process, the same packing: fp32 log-probs of ~-15 agree to a relative 1e-5 (~170 ulps).
    np.testing.assert_allclose(whole.reference_logprobs.numpy(), run["ref"], rtol=1e-5, atol=1e-6)
    # Per-group batches pack differently: fp32 summation-order noise only.
    np.testing.assert_allclose(split.reference_logprobs.numpy(), run["ref"], rtol=1e-5, atol=1e-6)
    assert wait_whole > 0.0 and stats["reference/calls"] == 1.0 + len(groups)


@pytest.mark.integration
def test_sharded_reference_matches_the_single_replica(ray_cluster, run):
    """Two replicas shard the model with FSDP2 (gloo) and split the sequences; ranks with fewer
    micro-batches run dummy forwards so the collectives stay matched."""
    from verimed.actors.reference import ReferenceGroup
    from verimed.core.cluster.planner import PlacementConfig, RoleSpec

    cfg = msgspec.structs.replace(run["cfg"], trainer=TrainerConfig(micro_batch_tokens=8),
                                  placement=PlacementConfig(reference=RoleSpec(replicas=2)))
    batch = make_batch(groups=1, group_size=3)  # 3 sequences: rank 0 scores two, rank 1 one

    async def go():
        group = ReferenceGroup(cfg, run["path"], actor_options=[{"num_cpus": 0}] * 2)
        await group.ready()
        out, _ = await group.attach(batch, [group.submit(batch)])
        return out.reference_logprobs.numpy(), await group.stats()

    expected = run["reference"].logprobs(batch)
    got, stats = asyncio.run(go())
    assert stats["reference/sharded"] == 1.0
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
