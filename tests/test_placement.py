"""Placement planning (verimed/core/placement.py), the shipped cluster configs, and a Ray smoke test.

Everything but the last test runs without Ray. The Ray test is marked
``integration`` (a 2-CPU local cluster, ~10 s).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from verimed.cli.plan import add_plan_arguments, local_cluster, run_plan
from verimed.core.cluster.planner import ClusterResources, PlacementConfig, PlacementError, RoleSpec, format_plan, plan
from verimed.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = sorted((REPO / "configs" / "cluster").glob("*.yaml"))


def gpu_role(replicas: int, gpus: int = 1, tp: int = 1, **kw) -> RoleSpec:
    return RoleSpec(replicas=replicas, gpus_per_replica=gpus, tensor_parallel_size=tp, **kw)


def placement(**roles) -> PlacementConfig:
    return msgspec.convert({k: msgspec.to_builtins(v) for k, v in roles.items()}, PlacementConfig)


# ------------------------------------------------------------------- planning


def test_cpu_default_plan():
    p = plan(PlacementConfig(), kl_enabled=False, cluster=ClusterResources.parse("1x0gpu,cpus_per_node=2"))
    assert [g.name for g in p.groups] == ["verimed-learner", "verimed-rollout"]
    assert [b.ray_resources() for g in p.groups for b in g.bundles] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert (p.total_gpus, p.total_cpus) == (0, 2.0)
    helpers = [a for a in p.actors if a.role in ("simulator", "verifier", "rubric_generator")]
    assert len(helpers) == 3 and all(a.group is None and a.num_cpus == 0 for a in helpers)
    assert not p.actors_of("reference")


def test_reference_only_with_kl_and_a_cpu_reference_needs_a_cpu():
    cluster = ClusterResources.parse("1x0gpu,cpus_per_node=2")
    assert plan(PlacementConfig(), kl_enabled=False, cluster=cluster).actors_of("reference") == []
    # The laptop default runs the reference as a 0-CPU actor sharing the cores.
    assert [a.num_cpus for a in plan(PlacementConfig(), kl_enabled=True, cluster=cluster).actors_of("reference")] == [0]
    one_cpu = msgspec.structs.replace(PlacementConfig(), reference=RoleSpec(cpus_per_replica=1))
    p = plan(one_cpu, kl_enabled=True, cluster=ClusterResources.parse("1x0gpu,cpus_per_node=3"))
    assert [a.group for a in p.actors_of("reference")] == ["verimed-reference"]
    with pytest.raises(PlacementError, match=r"needs 3 CPUs \(learner 1 \+ rollout 1 \+ reference 1\)"):
        plan(one_cpu, kl_enabled=True, cluster=cluster)


def test_colocated_reference_shares_learner_gpus():
    cfg = placement(learner=gpu_role(2, cpus_per_replica=4),
                    reference=gpu_role(2, cpus_per_replica=2, colocate_with="learner"))
    p = plan(cfg, kl_enabled=True, cluster=ClusterResources.parse("1x4gpu"))
    learner_group = p.group("verimed-learner")
    assert [(b.gpus, b.cpus) for b in learner_group.bundles] == [(1, 6.0), (1, 6.0)]
    assert "verimed-reference" not in [g.name for g in p.groups]
    for role in ("learner", "reference"):
        assert [(a.group, a.bundle, a.num_gpus) for a in p.actors_of(role)] == [
            ("verimed-learner", 0, 0.5), ("verimed-learner", 1, 0.5)]
    assert p.total_gpus == 2 + 0  # rollout is CPU-only here
    # Without KL the learner bundles lose the reference CPUs and the GPU is not shared.
    p = plan(cfg, kl_enabled=False, cluster=ClusterResources.parse("1x4gpu"))
    assert [a.num_gpus for a in p.actors_of("learner")] == [1.0, 1.0]
    assert p.group("verimed-learner").bundles[0].cpus == 4.0


def test_guest_on_a_resourceless_host_gets_renumbered_bundles():
    cfg = placement(simulator_engine=RoleSpec(replicas=2, cpus_per_replica=0),
                    verifier_engine=RoleSpec(replicas=1, cpus_per_replica=1, colocate_with="simulator_engine"))
    p = plan(cfg, kl_enabled=False, cluster=ClusterResources.parse("1x0gpu,cpus_per_node=3"))
    assert [(b.gpus, b.cpus) for b in p.group("verimed-simulator_engine").bundles] == [(0, 1.0)]
    assert [(a.group, a.bundle) for a in p.actors_of("simulator_engine")] == [("verimed-simulator_engine", 0), (None, None)]
    assert [(a.group, a.bundle) for a in p.actors_of("verifier_engine")] == [("verimed-simulator_engine", 0)]


def test_tensor_parallel_replica_is_one_bundle_on_one_node():
    cfg = placement(rollout=gpu_role(2, gpus=4, tp=4))
    p = plan(cfg, kl_enabled=False, cluster=ClusterResources.parse("2x4gpu"))
    assert [(b.gpus, b.node) for b in p.group("verimed-rollout").bundles] == [(4, 0), (4, 1)]
    assert [(a.num_gpus, a.tensor_parallel_size) for a in p.actors_of("rollout")] == [(4.0, 4), (4.0, 4)]
    with pytest.raises(PlacementError, match=r"rollout needs 16 GPUs in 2 bundles of \(8 GPUs, 1 CPU\) and no node "
                                              r"holds one bundle, the cluster has 4 nodes × \(4 GPUs"):
        plan(placement(rollout=gpu_role(2, gpus=8, tp=8)), kl_enabled=False, cluster=ClusterResources.parse("4x4gpu"))
    with pytest.raises(PlacementError, match=r"needs 16 GPUs \(rollout 16 in 2 bundles of 8\), the cluster has "
                                              r"1 node × \(8 GPUs, CPUs unchecked\) = 8 GPUs"):
        plan(placement(rollout=gpu_role(2, gpus=8, tp=8)), kl_enabled=False, cluster=ClusterResources.parse("1x8gpu"))


def test_strict_strategies():
    packed = placement(learner=gpu_role(4, strategy="STRICT_PACK"))
    p = plan(packed, kl_enabled=False, cluster=ClusterResources.parse("3x4gpu"))
    assert {b.node for b in p.group("verimed-learner").bundles} == {0}
    with pytest.raises(PlacementError, match=r"all on one node \(STRICT_PACK\)"):
        plan(packed, kl_enabled=False, cluster=ClusterResources.parse("4x2gpu"))
    spread = placement(verifier_engine=gpu_role(3, strategy="STRICT_SPREAD"))
    p = plan(spread, kl_enabled=False, cluster=ClusterResources.parse("3x8gpu"))
    assert sorted(b.node for b in p.group("verimed-verifier_engine").bundles) == [0, 1, 2]
    with pytest.raises(PlacementError, match="STRICT_SPREAD over 3 bundles"):
        plan(spread, kl_enabled=False, cluster=ClusterResources.parse("2x8gpu"))


def test_totals_fit_but_bundles_do_not_pack():
    # 3 × 5 GPUs = 15 <= 16, but two 8-GPU nodes hold only one 5-GPU bundle each.
    cfg = placement(rollout=gpu_role(3, gpus=5, tp=5))
    with pytest.raises(PlacementError, match=r"totals fit, but first-fit-decreasing packing found no node for "
                                              r"rollout bundle 2 \(5 GPUs, 1 CPU\)"):
        plan(cfg, kl_enabled=False, cluster=ClusterResources.parse("2x8gpu"))


@pytest.mark.parametrize(("roles", "message"), [
    ({"rollout": {"tensor_parallel_size": 2, "gpus_per_replica": 1}}, "tensor_parallel_size 2 needs gpus_per_replica 2"),
    ({"learner": {"replicas": 0}}, "learner.replicas must be >= 1"),
    ({"rollout": {"colocate_with": "rollout"}}, "names itself"),
    ({"learner": {"colocate_with": "rollout"}, "reference": {"colocate_with": "learner"}}, "is itself colocated"),
    ({"learner": {"replicas": 1}, "reference": {"replicas": 2, "colocate_with": "learner"}}, "only 1"),
    ({"learner": {"gpus_per_replica": 2, "tensor_parallel_size": 2},
      "reference": {"gpus_per_replica": 1, "colocate_with": "learner"}}, "sharing GPUs needs gpus_per_replica 1"),
    ({"rollout": {"colocate_with": "trainer"}}, "Invalid enum value 'trainer'"),
    ({"rollout": {"replica": 2}}, "unknown field `replica`"),
    ({"verifier": {"gpus_per_replica": 4}}, "the verifier actor is a client and uses no GPU"),
    ({"simulator": {"replicas": 2}}, "the controller starts one simulator actor"),
])
def test_config_mistakes_are_refused(roles, message):
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.convert(roles, PlacementConfig)


def test_colocating_with_an_unplanned_reference_is_refused():
    cfg = placement(verifier=RoleSpec(cpus_per_replica=1, colocate_with="reference"))
    with pytest.raises(PlacementError, match="reference is not placed"):
        plan(cfg, kl_enabled=False, cluster=ClusterResources.parse("1x0gpu"))
    assert plan(cfg, kl_enabled=True, cluster=ClusterResources.parse("1x0gpu")).group("verimed-reference")


# -------------------------------------------------------------------- cluster


def test_cluster_resources_parsing(tmp_path):
    c = ClusterResources.parse("8x8gpu")
    assert (len(c.nodes), c.total_gpus, c.total_cpus) == (8, 64, None)
    c = ClusterResources.parse("nodes=2,gpus_per_node=8,cpus_per_node=96")
    assert (c.total_gpus, c.total_cpus) == (16, 192.0)
    assert c.describe() == "2 nodes × (8 GPUs, 96 CPUs) = 16 GPUs"
    uniform = tmp_path / "uniform.json"
    uniform.write_text(json.dumps({"nodes": 2, "gpus_per_node": 4}))
    assert ClusterResources.parse(str(uniform)) == ClusterResources.parse("2x4gpu")
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"nodes": [{"gpus": 8, "cpus": 64}, {"gpus": 0, "cpus": 16}]}))
    c = ClusterResources.parse(str(mixed))
    assert (c.total_gpus, c.total_cpus) == (8, 80.0)
    assert "1 node × (8 GPUs, 64 CPUs) + 1 node × (0 GPUs, 16 CPUs)" in c.describe()
    for bad in ("8x8", "gpus=8", "nodes=0"):
        with pytest.raises(ValueError):
            ClusterResources.parse(bad)


def test_local_cluster_uses_ray_num_cpus():
    cfg = load_config(None, ["run.ray_num_cpus=3"])
    c = local_cluster(cfg)
    assert len(c.nodes) == 1 and c.total_cpus == 3.0


# ------------------------------------------------------------ shipped configs

TOO_SMALL = {  # file -> (a cluster it must not fit, a fragment of the error)
    "cpu-default.yaml": ("1x0gpu,cpus_per_node=1", "the plan needs 2 CPUs (learner 1 + rollout 1)"),
    "node-8gpu.yaml": ("1x4gpu", "the plan needs 8 GPUs (learner 4 + rollout 3 + verifier_engine 1)"),
    "m2-32b-8x8.yaml": ("7x8gpu,cpus_per_node=96", "the plan needs 64 GPUs (learner 24 + rollout 24 in 6 bundles of 4"),
}


def intended_cluster(path: Path) -> str:
    match = re.search(r"^# plan-cluster: (\S+)$", path.read_text(), re.M)
    assert match, f"{path.name} needs a '# plan-cluster: SPEC' comment naming the cluster it is written for"
    return match.group(1)


def test_every_cluster_config_is_tested():
    assert {p.name for p in CLUSTER_CONFIGS} == set(TOO_SMALL)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_plans_on_its_cluster_and_not_on_a_smaller_one(path, capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    assert run_plan(parser.parse_args([str(path), "--cluster-resources", intended_cluster(path)])) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "learner[0" in out
    small, fragment = TOO_SMALL[path.name]
    assert run_plan(parser.parse_args([str(path), "--cluster-resources", small])) == 1
    assert fragment in capsys.readouterr().err


def test_m2_config_uses_all_64_gpus_with_separate_engines():
    cfg = load_config(REPO / "configs/cluster/m2-32b-8x8.yaml")
    pl = cfg.placement
    p = plan(pl, kl_enabled=cfg.grpo.kl_coef > 0, cluster=ClusterResources.parse("8x8gpu,cpus_per_node=96"))
    assert p.total_gpus == 64
    gpus = {g.role: sum(b.gpus for b in g.bundles) for g in p.groups}
    assert gpus == {"learner": 24, "rollout": 24, "simulator_engine": 8, "verifier_engine": 8, "simulator": 0,
                    "verifier": 0, "rubric_generator": 0}
    text = format_plan(p)
    assert "64 GPUs" in text and "rollout[0-1]" in text


PLANNED_CONFIGS = CLUSTER_CONFIGS + sorted((REPO / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", PLANNED_CONFIGS, ids=lambda p: p.name)
def test_every_gpu_bundle_holds_exactly_the_actors_the_controller_starts_on_it(path):
    """What the config promises is what is started: every planned actor is started, every started
    actor is planned, each GPU bundle's GPUs are asked for by GPU-using actors exactly once over."""
    from verimed.core.cluster.roles import started_actors
    from verimed.core.config import reference_needed
    from verimed.core.config.placement import GPU_ROLES

    cfg = load_config(path)
    kl = reference_needed(cfg)
    p = plan(cfg.placement, kl_enabled=kl, cluster=ClusterResources.parse(intended_cluster(path)))
    assert sorted((a.role, a.replica) for a in p.actors) == sorted(started_actors(cfg, kl_enabled=kl))
    for g in p.groups:
        for i, bundle in enumerate(g.bundles):
            users = [a for a in p.actors if (a.group, a.bundle) == (g.name, i) and a.num_gpus]
            assert all(a.role in GPU_ROLES for a in users), f"{g.name}[{i}]: {users} hold GPUs they never use"
            assert sum(a.num_gpus for a in users) == bundle.gpus, f"{g.name}[{i}]: {bundle.gpus} GPUs, users {users}"
            assert all(a.tensor_parallel_size == a.num_gpus for a in users if len(users) == 1)


def test_cpu_default_config_is_the_default():
    from verimed.core.config import Config

    cfg = load_config(REPO / "configs/cluster/cpu-default.yaml")
    pl = cfg.placement
    assert pl == PlacementConfig()
    assert cfg == Config()


def test_core_imports_neither_ray_nor_torch():
    code = ("import sys, verimed.core.cluster.planner, verimed.core.rl.staleness; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------ Ray


@pytest.mark.integration
def test_ray_places_actors_on_the_cpu_default_plan(monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    from verimed.actors.placement import (
        actor_options,
        cluster_resources_from_ray,
        create_placement_groups,
        remove_placement_groups,
    )

    @ray.remote
    class Where:
        def placement_group(self):
            return ray.get_runtime_context().get_placement_group_id()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cluster = cluster_resources_from_ray()
        assert cluster.total_cpus == 2.0
        p = plan(PlacementConfig(), kl_enabled=False, cluster=cluster)
        placements = create_placement_groups(p, timeout_s=60)
        learner = Where.options(**actor_options(p, placements, "learner", 0)).remote()
        helper = Where.options(**actor_options(p, placements, "verifier", 0)).remote()
        assert ray.get(learner.placement_group.remote()) == placements["learner"][0][0].id.hex()
        assert ray.get(helper.placement_group.remote()) is None  # num_cpus=0, unplaced
        remove_placement_groups(placements)
    finally:
        ray.shutdown()
