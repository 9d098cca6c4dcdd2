"""Ray Data on a Ray started in this process, without the helper actors a cluster needs.

Ray Data's executor creates three detached helper actors on first use, each a worker
process of its own that boots and imports Ray Data (0.6-1 CPU-s and 120-190 MB each here):

- the autoscaling coordinator, which shares a cluster's nodes between datasets and asks
  the autoscaler for more. The executor launches nothing until it has answered what it
  may use;
- the stats actor, which gathers the executor's metrics for the dashboard and Prometheus;
- the actor-location tracker, which the actor pool asks, waiting for the answer, where its
  actors are (to keep work off draining nodes).

And it hands each finished block's metadata to a fetch thread that polls in 0.1-s waits, so
that fetching it from a remote node never holds up the scheduling loop.

On a cluster they live on between runs, and their answers matter. On a Ray that ``ray.init``
started in this process (a run's own local Ray, the test suite's) there is one node, no
autoscaler and, as in a run, one dataset at a time, so each answer is known without asking:
the budget is the node, the actors are all on it, and, where no dashboard runs (a run's
local Ray starts without one), nothing reads the metrics; and a block's metadata is in the
node's own object store, read inline (Ray Data's inline mode) as soon as the block is done.
Without the three actors, the demo run starts sooner and smaller, and with the inline reads
its first predictions reach the driver sooner (BENCHMARKS.md).

:func:`use_local_answers` installs these answers call by call: wherever the connected Ray is
not one started here, Ray's own code runs. A Ray layout without these internals runs as Ray does.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from pipeline.compute.cluster import ray_attribute

# What Ray Data's executor budgets with (Ray's STANDARD_RESOURCE_TYPES), per node.
BUDGETED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
# The resource that marks Ray's head node.
HEAD_NODE_RESOURCE = "node:__internal_head__"
_installed = False


def ray_started_here() -> bool:
    """Whether this process's Ray is one that ``ray.init`` started here (its head runs under
    this process: one node, no autoscaler that could add any) rather than a cluster joined."""
    return bool(getattr(this_ray(), "head", False))


def metrics_unread() -> bool:
    """Whether nothing reads Ray Data's metrics: a Ray started here without a dashboard."""
    return ray_started_here() and not getattr(this_ray(), "webui_url", None)


def this_ray():
    """Ray's node object of this process (None before ``ray.init``)."""
    return ray_attribute("ray._private.worker", "_global_node")


def node_budgets(nodes: list[dict]) -> dict[str, dict[str, float]]:
    """What Ray Data's autoscaling coordinator reserves for the one dataset on a cluster that
    cannot grow, from ``ray.nodes()`` entries: each alive node's CPU, GPU, memory and object
    store in whole units, by node id, leaving out a head node with neither CPU nor GPU (its
    object store is not usable), as the coordinator does. Example: [{"NodeID": "ab", "Alive":
    True, "Resources": {"CPU": 2.5, "GPU": 0.0, "node:10.0.0.1": 1.0}}] -> {"ab": {"CPU": 2.0}}."""
    def usable(node: dict) -> bool:
        resources = node["Resources"]
        head_without_compute = HEAD_NODE_RESOURCE in resources and not (resources.get("CPU") or resources.get("GPU"))
        return bool(node.get("Alive")) and not head_without_compute

    return {node["NodeID"]: {name: float(amount // 1) for name, amount in node["Resources"].items()
                             if name in BUDGETED_RESOURCES and amount // 1}
            for node in nodes if usable(node)}


class _Unrecorded:
    """A remote method whose calls go nowhere."""

    @staticmethod
    def remote(*args, **kwargs) -> None:
        return None


class OneNodeActorLocations:
    """Stands in for the handle of Ray Data's actor-location tracker on a Ray of one node:
    each pool actor reports its node to it on start, and nothing needs to keep that."""

    update_actor_location = _Unrecorded()


def _reserved_resources(self) -> dict[str, dict[str, float]]:
    import ray

    return node_budgets(ray.nodes())


def _nothing(*args, **kwargs) -> None:
    return None


def use_local_answers() -> None:
    """Install the local answers (see the module's docstring); idempotent. Called before a
    run's stream starts, after Ray Data is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    _answer_where(ray_attribute("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
                                "DefaultAutoscalingCoordinator"),
                  {"request_resources": _nothing,  # no autoscaler to ask
                   "cancel_request": _nothing, "get_reserved_resources": _reserved_resources}, ray_started_here)
    _answer_where(ray_attribute("ray.data._internal.stats", "_StatsManager"),
                  dict.fromkeys(("register_dataset_to_stats_actor", "update_execution_metrics",
                                 "update_iteration_metrics"), _nothing), metrics_unread)
    _answer_where(ray_attribute("ray.data._internal.execution.operators.actor_pool_map_operator"),
                  {"get_or_create_actor_location_tracker": lambda: OneNodeActorLocations(),
                   # no locations known: the pool keeps the node each actor reported when ready
                   "get_actor_locations": lambda logical_actor_ids: {}}, ray_started_here)
    inline = ray_attribute("ray.data._internal.execution.metadata_fetcher", "InlineMetadataFetcher")
    if inline is not None:
        _answer_where(ray_attribute("ray.data._internal.execution.streaming_executor"),
                      {"make_metadata_fetcher": inline}, ray_started_here)


def _answer_where(owner, ours: dict[str, Callable], applies: Callable[[], bool]) -> None:
    """Each attribute of `owner` named in `ours` runs ours where ``applies()`` and Ray's own
    otherwise. Nothing changes where `owner` is None or lacks one of them."""
    if owner is None or not all(callable(getattr(owner, name, None)) for name in ours):
        return
    for name, function in ours.items():
        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        rays = getattr(owner, name)
        either = _either(function, rays, applies)
        setattr(owner, name, staticmethod(either) if static else either)


def _either(ours: Callable, rays: Callable, applies: Callable[[], bool]) -> Callable:
    @functools.wraps(rays)
    def either(*args, **kwargs):
        return (ours if applies() else rays)(*args, **kwargs)
    return either
