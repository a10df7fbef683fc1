"""Pools and trial concurrency on a cluster that scales from zero (farm.capacity): what counts is
every node the cluster can have — alive now, or a node type its autoscaler can launch — read
from the GCS cluster config an autoscaler reports, else from `ray up`'s bootstrap config."""

from types import SimpleNamespace

import pytest
from conftest import ROOT

import farm.capacity
from farm.capacity import Capacity, NodeKind, capacity
from farm.grid import load_study
from farm.label.pipeline import check_pool
from farm.schema import LabelSpec, Resources
from farm.tune import max_concurrent

CLUSTER_YAML = ROOT / "cluster.yaml"
HEAD = NodeKind("node 10.0.0.1 (head)", {"CPU": 0.0, "memory": 3e10, "node:__internal_head__": 1.0}, 1)


def documented() -> Capacity:
    """cluster.yaml as a driver on its head sees it before any worker has started."""
    types, cap, source = farm.capacity.from_bootstrap(CLUSTER_YAML)
    return Capacity((HEAD,), types, cap, source)


def trials(**resources):
    stage = SimpleNamespace(resources=Resources(**resources))
    return [SimpleNamespace(study=SimpleNamespace(stages={"sft": stage}))] * 6


# ---------------------------------------------------------------- the fitting logic


def test_cluster_yaml_node_types_are_read_with_rays_defaults():
    cap = documented()
    assert {k.name: (k.resources, k.count) for k in cap.types} == {
        "gpu_a10g": ({"CPU": 8.0, "GPU": 1.0}, 8),
        "gpu_8xa100": ({"CPU": 96.0, "GPU": 8.0}, 2),
    }  # the head (CPU: 0) is alive already, not a type to launch
    assert cap.max_launched == 10


def test_a_pool_fits_if_some_node_type_can_hold_it():
    cap = documented()
    # Study C's paper labelling pool: 4 VADER actors, none of which the CPU-less head can hold.
    [vader] = load_study(ROOT / "jobs" / "conditional.yaml", "paper")[0].study.data.labels
    assert vader.actors == 4 and cap.bundles({"CPU": 1}) > 4
    check_pool(vader, cap)
    check_pool(LabelSpec(scorer="detoxify", actors=16, cpus_per_actor=8, gpus_per_actor=1), cap)
    # GPUs: 2 nodes x 8 of gpu_8xa100, then 8 of gpu_a10g (10 nodes in all) = 24 one-GPU actors.
    assert cap.bundles({"CPU": 1, "GPU": 1}) == 24
    check_pool(LabelSpec(scorer="detoxify", actors=24, gpus_per_actor=1), cap)
    with pytest.raises(
        ValueError,
        match=r"scorer detoxify: an actor pool of 25 actors x 1 CPU, 1 GPU can never run .*"
        r"at most 24 such actors fit.*gpu_a10g x 8 \{CPU: 8, GPU: 1\}; gpu_8xa100 x 2 \{CPU: 96, GPU: 8\}",
    ):
        check_pool(LabelSpec(scorer="detoxify", actors=25, gpus_per_actor=1), cap)
    with pytest.raises(ValueError, match=r"an actor pool of 1 actors x 97 CPU can never run .*no node can hold one actor"):
        check_pool(LabelSpec(scorer="vader", cpus_per_actor=97), cap)


def test_the_global_worker_limit_and_fractions():
    types = (NodeKind("big", {"CPU": 8.0}, 5), NodeKind("small", {"CPU": 2.0}, 5))
    assert Capacity((), types, max_launched=6).bundles({"CPU": 1}) == 5 * 8 + 1 * 2  # fullest nodes first
    assert Capacity((), types).bundles({"CPU": 1}) == 50
    assert Capacity((NodeKind("n", {"CPU": 0.3}, 1),)).bundles({"CPU": 0.1}) == 3  # 0.3 / 0.1 < 3 in floats
    assert Capacity((NodeKind("n", {"CPU": 4.0}, 1),)).bundles({"CPU": 1, "GPU": 0}) == 4  # GPU 0 asks nothing


def test_trials_run_side_by_side_on_a_cluster_that_scales_from_zero():
    cap = documented()
    assert max_concurrent(trials(gpus_per_worker=1), cap) == 6  # 24 one-GPU workers; 6 trials
    assert max_concurrent(trials(num_workers=8, gpus_per_worker=1), cap) == 3  # 2 p4d + the A10Gs
    # A GPU type the config does not name fits nowhere: one trial at a time, as before.
    assert max_concurrent(trials(gpus_per_worker=1, accelerator_type="H100"), cap) == 1
    alive_only = Capacity((HEAD, NodeKind("w", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, 1)))
    assert max_concurrent(trials(gpus_per_worker=1, accelerator_type="A10G"), alive_only) == 1
    assert max_concurrent(trials(cpus_per_worker=2), alive_only) == 2


# ---------------------------------------------------------------- a real Ray with a CPU-less head


@pytest.fixture(scope="module")
def cpuless_head():
    """A local Ray whose only node has no CPU, like cluster.yaml's head before any worker starts."""
    import ray

    ray.init(address="local", num_cpus=0, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def report(ray, groups: dict) -> None:
    """What an autoscaler reports to the GCS: its node groups (name: (resources, max count))."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, (resources, count) in groups.items():
        g = config.node_group_configs.add(name=name, max_count=count)
        g.resources.update(resources)
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())


def test_capacity_of_a_live_cluster(cpuless_head, tmp_path, monkeypatch):
    ray = cpuless_head
    pool = LabelSpec(scorer="vader", actors=4)
    monkeypatch.setattr(farm.capacity, "BOOTSTRAP_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    with pytest.raises(ValueError, match=r"no node can hold one actor.*no autoscaler node types found"):
        check_pool(pool)  # a fixed cluster of one CPU-less node
    # `ray up`'s bootstrap config on the head (here cluster.yaml itself, which states every type's resources).
    (tmp_path / "ray_bootstrap_config.yaml").write_text(CLUSTER_YAML.read_text())
    assert [k.name for k in capacity().types] == ["gpu_a10g", "gpu_8xa100"]
    check_pool(pool)
    # An autoscaler that reports its node groups to the GCS is read first.
    report(ray, {"cpu_small": ({"CPU": 2}, 1)})
    got = capacity()
    assert [(k.name, k.resources, k.count) for k in got.types] == [("cpu_small", {"CPU": 2.0}, 1)]
    assert got.alive[0].resources.get("CPU", 0) == 0 and got.bundles({"CPU": 1}) == 2
    with pytest.raises(ValueError, match=r"at most 2 such actors.*cpu_small \{CPU: 2\}"):
        check_pool(pool)
    report(ray, {"cpu_many": ({"CPU": 2}, -1)})  # max_count -1: no limit
    check_pool(LabelSpec(scorer="vader", actors=1000))
    report(ray, {})  # an empty report: back to the bootstrap file
    assert [k.name for k in capacity().types] == ["gpu_a10g", "gpu_8xa100"]
