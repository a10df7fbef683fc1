"""What a Ray cluster can provide: the nodes alive now plus, when an autoscaler manages it, the
largest of each node type it can launch. Sizing work by `ray.cluster_resources()` alone refuses
everything on the documented cluster (cluster.yaml: a head with `CPU: 0`, every worker type at
`min_workers: 0`), where nothing but the head is alive until something asks.

Ray 2.60 tells a driver the autoscaler's node types through two channels, read in this order:

1. The GCS cluster config (`ray._private.state.state.get_cluster_config()`): node groups with
   their resources and max count, which an autoscaler reports to the GCS (Ray Data's and Ray
   Train's own feasibility checks read it).
2. The cluster launcher's config on the head, `~/ray_bootstrap_config.yaml`, which `ray up` writes
   (its node types' resources filled in from the instance types) and the autoscaler runs from; a
   `ray job submit` driver runs on the head. Ray Tune takes the same file as the sign of an
   autoscaling cluster (ray.tune.execution.cluster_info).

Neither: a fixed cluster, and only the nodes alive now count.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
UNLIMITED = sys.maxsize  # a node group with max_count -1
# Ray keeps resources in fixed point (1e-4): 0.3 / 0.1 is 2.9999999999999996, which is 3.
EPS = 1e-6


@dataclass(frozen=True)
class NodeKind:
    """`count` nodes of one shape: an alive node (count 1) or a node type (its max_workers)."""

    name: str
    resources: dict[str, float]
    count: int

    def holds(self, bundle: dict[str, float]) -> int:
        """How many `bundle`s one node of this kind holds (UNLIMITED for a bundle that asks nothing)."""
        asked = [(k, v) for k, v in bundle.items() if v > 0]
        if not asked:
            return UNLIMITED
        return min(math.floor(self.resources.get(k, 0) / v + EPS) for k, v in asked)

    def describe(self) -> str:
        shown = ", ".join(
            f"{k}: {v:g}" for k, v in sorted(self.resources.items()) if k not in ("memory", "object_store_memory") and not k.startswith("node:")
        )
        times = "" if self.count == 1 else f" x {'unlimited' if self.count >= UNLIMITED else self.count}"
        return f"{self.name}{times} {{{shown}}}"


@dataclass(frozen=True)
class Capacity:
    alive: tuple[NodeKind, ...]  # the nodes alive now, one kind each
    types: tuple[NodeKind, ...] = ()  # node types an autoscaler can launch; none on a fixed cluster
    max_launched: int = UNLIMITED  # at most this many launched nodes in all (the config's max_workers)
    source: str = ""  # where the node types were read

    def bundles(self, bundle: dict[str, float]) -> int:
        """How many `bundle`s (one actor, one training worker) this cluster can ever hold at once:
        every alive node's share plus the launchable types', fullest types first within the
        launch limit. An upper bound: an alive worker may be one of a type's max_workers."""
        total = sum(kind.holds(bundle) * kind.count for kind in self.alive)
        left = self.max_launched
        for kind in sorted(self.types, key=lambda k: -k.holds(bundle)):
            nodes = min(kind.count, left)
            total += kind.holds(bundle) * nodes
            left -= nodes
        return min(total, UNLIMITED)

    def describe(self) -> str:
        alive = "; ".join(k.describe() for k in self.alive) or "none"
        if not self.types:
            return f"nodes alive: {alive}; no autoscaler node types found (a fixed cluster)"
        cap = "" if self.max_launched >= UNLIMITED else f", at most {self.max_launched} in all"
        return f"nodes alive: {alive}; node types the autoscaler can launch ({self.source}{cap}): " + "; ".join(k.describe() for k in self.types)


def capacity() -> Capacity:
    """This Ray cluster's capacity (Ray must be initialised)."""
    import ray

    alive = tuple(
        NodeKind(f"node {n['NodeManagerAddress']}" + (" (head)" if "node:__internal_head__" in n["Resources"] else ""), dict(n["Resources"]), 1)
        for n in ray.nodes()
        if n["Alive"]
    )
    types, cap, source = from_gcs()
    if not types:
        types, cap, source = from_bootstrap(Path(BOOTSTRAP_CONFIG).expanduser())
    return Capacity(alive, types, cap, source)


def from_gcs() -> tuple[tuple[NodeKind, ...], int, str]:
    """Node types an autoscaler reported to the GCS; () if none did."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return (), UNLIMITED, ""
    types = tuple(
        NodeKind(g.name, {k: float(v) for k, v in g.resources.items()}, UNLIMITED if g.max_count == -1 else g.max_count)
        for g in config.node_group_configs
        if g.resources and g.max_count != 0
    )
    return types, UNLIMITED, "reported to the GCS"


def from_bootstrap(path: Path) -> tuple[tuple[NodeKind, ...], int, str]:
    """Worker node types of a cluster launcher config (`ray up`'s bootstrap file); () if there is none."""
    import yaml
    from ray.autoscaler._private.util import fill_node_type_min_max_workers

    if not path.is_file():
        return (), UNLIMITED, ""
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return (), UNLIMITED, ""
    config.setdefault("max_workers", 2)  # Ray's schema default
    fill_node_type_min_max_workers(config)  # Ray's own defaults: a type's max_workers is the global one
    types = tuple(
        NodeKind(name, {k: float(v) for k, v in t.get("resources", {}).items()}, int(t["max_workers"]))
        for name, t in config["available_node_types"].items()
        # The head is alive already; a type without resources is one the autoscaler cannot plan with.
        if name != config.get("head_node_type") and t.get("resources") and t["max_workers"] > 0
    )
    return types, int(config["max_workers"]), str(path)
