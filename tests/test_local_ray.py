"""A local Ray as `pipeline run` and `pipeline train` start it (pipeline.compute.cluster)."""
from __future__ import annotations

import time

from tests.children import run_child


def test_node_registered_sees_a_live_node_and_gives_up_on_an_unknown_one(ray_session):
    from pipeline.compute.cluster import node_registered

    context = ray_session.get_runtime_context()
    started = time.monotonic()
    assert node_registered(context.gcs_address, context.get_node_id(), timeout_s=10)
    assert time.monotonic() - started < 5
    assert not node_registered(context.gcs_address, "ab" * 28, timeout_s=0.3)


WAITING_DRIVER = """
import json
import ray._private.services as services
import pipeline.compute.cluster as cluster

ray_lookup, waits = services.get_node, []
ours = cluster.node_registered
cluster.node_registered = lambda *args: waits.append(ours(*args)) or waits[-1]
cluster.connect_ray(None)
print(json.dumps({"waits": waits, "restored": services.get_node is ray_lookup,
                  "nodes": len(cluster.connect_ray(None).nodes())}))
"""


def test_a_local_ray_starts_through_the_fine_registration_wait():
    """ray.init still looks its raylet up through the function we wrap (a Ray upgrade that
    stopped would silently bring back the 1-second steps), and the wrap is undone after."""
    result, _ = run_child(WAITING_DRIVER, timeout=120)
    assert result == {"waits": [True], "restored": True, "nodes": 1}


STATE_API_DRIVER = """
import json, os, sys
import ray
from ray._private.node import Node
from pipeline.compute.cluster import connect_ray
from ray.util.state import get_actor

starters = (Node.start_monitor, Node.start_api_server)
connect_ray(None, quiet=True, dashboard=sys.argv[1] == "dashboard")
children = []  # the head's Python processes ray.init started, by script (from /proc)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat, args = open(f"/proc/{pid}/stat").read(), open(f"/proc/{pid}/cmdline").read().split("\\0")
    except OSError:
        continue
    if int(stat[stat.rfind(")") + 2:].split()[1]) == os.getpid():
        children += [os.path.basename(a) for a in args if a.endswith(".py")]

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

actor = Idle.remote()
ray.get(actor.ping.remote())
try:
    # The address named: with the test session's Ray on the same machine, the State API
    # would not know which of the two to ask.
    state = get_actor(actor._actor_id.hex(), address=ray.get_runtime_context().gcs_address, timeout=20).state
except Exception as err:
    state = type(err).__name__
print(json.dumps({"state": state, "head": sorted({"monitor.py", "dashboard.py", "log_monitor.py"} & set(children)),
                  "restored": (Node.start_monitor, Node.start_api_server) == starters}))
"""


def test_a_local_ray_for_training_answers_the_state_api_that_ray_train_polls():
    """Ray Train's placement-group cleaner asks the State API whether its controller lives,
    every few seconds; a local Ray without the dashboard, which serves that API, made
    `pipeline train` print 'Failed to query Ray Train Controller actor state' dozens of times.
    A run's local Ray goes without the API server, the autoscaler's monitor and (quiet) the
    log monitor too (Python processes of ~80-120 MB each that nothing in a run talks to); a
    training's keeps them."""
    with_dashboard, _ = run_child(STATE_API_DRIVER, "dashboard", timeout=180)
    without, _ = run_child(STATE_API_DRIVER, "none", timeout=180)
    assert with_dashboard == {"state": "ALIVE", "head": ["dashboard.py", "log_monitor.py", "monitor.py"],
                              "restored": True}
    assert without["state"] != "ALIVE"  # what `pipeline run` starts: nothing there polls it
    assert without["head"] == [] and without["restored"]


# Child code: the dashboard agent's arguments in the command line of this Ray's raylet (/proc);
# the agent's own command line is overwritten by its process title.
AGENT_COMMAND_OF_THIS_RAY = """
def agent_command(session):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline").read().split("\\0")
        except OSError:
            continue
        if f"--session_dir={session}" in args:
            found += [a for a in args if a.startswith("--dashboard_agent")]
    return found
"""

AGENT_PORT_DRIVER = """
import contextlib, json, os, re, socket
import ray
from ray._private.node import Node
from pipeline.compute.cluster import connect_ray
""" + AGENT_COMMAND_OF_THIS_RAY + """
start_raylet = Node.start_raylet
taken = socket.socket()  # Ray's fixed agent port held, as another Ray on the machine holds it
with contextlib.suppress(OSError):  # already taken (the test session's own Ray): as good
    taken.bind(("", 52365))
    taken.listen()
connect_ray(None, quiet=True)
session = ray._private.worker._global_node.get_session_dir_path()
agents = re.findall(r"--listen-port=(\\d+)", " ".join(agent_command(session)))
log = open(os.path.join(session, "logs", "dashboard_agent.log")).read()
print(json.dumps({"agent_ports": agents, "retried": "Failed to bind" in log,
                  "nodes": len([n for n in ray.nodes() if n["Alive"]]), "restored": Node.start_raylet == start_raylet}))
"""


def test_a_runs_local_ray_does_not_wait_for_a_port_another_ray_holds():
    """Ray gives a local Ray's dashboard agent the fixed port 52365; with another Ray on the
    machine the agent retried binding it for ~3 s before the raylet was ready. A run's agent
    takes a free port (nothing in a run calls it); the patch is undone after."""
    result, _ = run_child(AGENT_PORT_DRIVER, timeout=120)
    assert result == {"agent_ports": ["0"], "retried": False, "nodes": 1, "restored": True}


def test_a_run_keeps_the_log_monitor_only_when_its_workers_lines_are_shown():
    from pipeline.compute.cluster import unused_head_processes

    assert unused_head_processes(dashboard=False, quiet=True) == ("start_monitor", "start_api_server",
                                                                  "start_log_monitor")
    assert unused_head_processes(dashboard=False, quiet=False) == ("start_monitor", "start_api_server")
    assert unused_head_processes(dashboard=True, quiet=True) == ()


VERBOSE_DRIVER = """
import json, sys, time
from pipeline.compute.cluster import connect_ray

ray = connect_ray(None, quiet=False)

@ray.remote(num_cpus=0)
def speak():
    print("a worker line for the console", file=sys.stderr, flush=True)

ray.get(speak.remote())
time.sleep(2)  # the log monitor forwards what it finds at each poll
print(json.dumps({"done": True}))
"""


def test_a_verbose_run_still_shows_its_workers_lines():
    """`pipeline run --verbose` keeps Ray's log monitor, which forwards the workers' lines."""
    _, err = run_child(VERBOSE_DRIVER, timeout=120)
    assert "a worker line for the console" in err


IDLE_WORKER_DRIVER = """
import json, os, time
import ray
from pipeline.compute.cluster import connect_ray

connect_ray(None)

@ray.remote(num_cpus=ray.cluster_resources()["CPU"])
class Predictor:  # holds every CPU, as the CPU predictor actor of a default local run does
    def ready(self):
        return True

@ray.remote(num_cpus=0)  # as the chip-reading tasks: no CPU slot
def read_task():
    return os.getpid()

holder = Predictor.remote()
ray.get(holder.ready.remote())
first = ray.get(read_task.remote())
time.sleep(2.5)  # a read task's worker waits seconds for the next run of chips (Ray ends idle ones after 1 s)
print(json.dumps({"same worker": ray.get(read_task.remote()) == first}))
"""


def test_a_local_ray_keeps_the_idle_read_worker_while_the_actors_hold_every_cpu():
    """Ray keeps as many idle workers as the node has *unclaimed* CPUs and ends the others
    after a second idle; with the predictor holding every CPU that was none, so every chip
    read started a fresh Python process: 1-2 s of CPU each, taken from the predictor
    (15 % of a 2-core node's chips/s)."""
    result, _ = run_child(IDLE_WORKER_DRIVER, timeout=180)
    assert result == {"same worker": True}


BUDGET_DRIVER = """
import json, time
import ray
from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import STANDARD_RESOURCE_TYPES
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import DefaultAutoscalingCoordinator
from pipeline.compute.cluster import connect_ray
from pipeline.run.local_data import node_budgets, ray_started_here, use_local_answers

connect_ray(None, num_cpus=2)
rays = DefaultAutoscalingCoordinator(requester_id="probe")  # Ray's own coordinator, before ours
rays.request_resources([], expire_after_s=60, request_remaining=STANDARD_RESOURCE_TYPES)
deadline, reserved = time.monotonic() + 60, {}
while not reserved and time.monotonic() < deadline:
    reserved = rays.get_reserved_resources()
    time.sleep(0.05)
rays.cancel_request()
ray.kill(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"))

use_local_answers()
use_local_answers()  # a second run in the same process: installed once
ours = DefaultAutoscalingCoordinator(requester_id="run")


class Double:  # an actor pool stage, as the predictor's
    def __call__(self, batch):
        return {"id": batch["id"] * 2}


rows = ray.data.range(8, override_num_blocks=4).map_batches(
    Double, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
helpers = []  # Ray Data's detached helper actors that exist now
for name, namespace in [("AutoscalingCoordinator", "AutoscalingCoordinator"),
                        ("datasets_stats_actor", "_dataset_stats_actor"),
                        ("ActorLocationTracker", "ActorLocationTracker")]:
    try:
        ray.get_actor(name, namespace=namespace)
        helpers.append(name)
    except ValueError:
        pass
from ray.data._internal.execution import streaming_executor

print(json.dumps({"here": ray_started_here(), "rays": reserved, "ours": ours.get_reserved_resources(),
                  "nodes": node_budgets(ray.nodes()), "rows": sorted(r["id"] for r in rows), "helpers": helpers,
                  "metadata": type(streaming_executor.make_metadata_fetcher()).__name__}))
"""


def test_ray_data_on_a_ray_started_here_runs_without_its_helper_actors():
    """Ray Data launched nothing until its autoscaling coordinator, a detached actor booting a
    worker process of its own, answered what the executor may use, and booted two more (its
    stats actor, its actor-location tracker): ~2.7 CPU-s of every local run's start-up on 2
    cores. On a Ray started in this process (one node, no autoscaler, no dashboard) the
    answers are known; the budget's oracle is Ray's own coordinator, asked on the same Ray."""
    result, _ = run_child(BUDGET_DRIVER, timeout=180)
    assert result["here"] is True
    assert result["rays"] and result["ours"] == result["rays"] == result["nodes"]
    assert result["rows"] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert result["helpers"] == []  # nor the stats actor or the location tracker: one node, no dashboard
    assert result["metadata"] == "InlineMetadataFetcher"  # blocks' metadata in the node's own store


def test_a_joined_cluster_keeps_ray_datas_helpers(ray_session):
    """Only a Ray started in this process is budgeted from its nodes: a joined cluster's
    coordinator shares its nodes between datasets and asks its autoscaler for more, and block
    metadata from other nodes is fetched by Ray Data's thread. Metrics go to Ray Data's stats
    actor wherever a dashboard may show them."""
    from unittest import mock

    from ray._private import worker

    from pipeline.run.local_data import metrics_unread, ray_started_here, use_local_answers

    use_local_answers()
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import DefaultAutoscalingCoordinator

    assert ray_started_here()  # the session's Ray: ray.init started it in this process
    joined = mock.Mock(head=False)  # what a driver that joined a cluster holds
    rays = mock.Mock(return_value={"a node": {"CPU": 64.0}})
    coordinator = DefaultAutoscalingCoordinator(requester_id="joined")
    coordinator.__dict__["_autoscaling_coordinator"] = mock.Mock(
        get_reserved_resources=mock.Mock(remote=rays))  # Ray's actor handle, as Ray's tests inject it
    from ray.data._internal.execution import streaming_executor

    with mock.patch.object(worker, "_global_node", joined):
        assert not ray_started_here() and not metrics_unread()
        coordinator.get_reserved_resources()
        assert type(streaming_executor.make_metadata_fetcher()).__name__ == "ThreadedMetadataFetcher"
    rays.assert_called_once_with("joined")  # asked Ray's coordinator, not the nodes
    with mock.patch.object(worker, "_global_node", mock.Mock(head=True, webui_url="127.0.0.1:8265")):
        assert ray_started_here() and not metrics_unread()  # a dashboard shows Ray Data's metrics


def test_node_budgets_count_the_alive_nodes_standard_resources():
    from pipeline.run.local_data import node_budgets

    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.5, "GPU": 0.0, "memory": 8.0,
                                                          "object_store_memory": 4.0, "node:10.0.0.1": 1.0,
                                                          "accelerator_type:T4": 1.0}},
             {"NodeID": "b", "Alive": False, "Resources": {"CPU": 16.0}},
             {"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0, "memory": 8.0, "object_store_memory": 4.0,
                                                             "node:__internal_head__": 1.0}}]
    # whole units, as Ray's coordinator shares them; a head without CPU or GPU is left out
    assert node_budgets(nodes) == {"a": {"CPU": 2.0, "memory": 8.0, "object_store_memory": 4.0}}


DEPENDENCY_DRIVER = """
import json, os, sys
if len(sys.argv) > 1:
    sys.modules[sys.argv[1]] = None  # installed, but does not import
import ray
from pipeline.compute.cluster import connect_ray
""" + AGENT_COMMAND_OF_THIS_RAY + """
imported_before = "aiohttp" in sys.modules
connect_ray(None)
agent = agent_command(ray._private.worker._global_node.get_session_dir_path())
print(json.dumps({"imported before": imported_before, "aiohttp imported": "aiohttp" in sys.modules,
                  "minimal agent": any("--minimal" in a for a in agent), "agent found": bool(agent)}))
"""


def test_a_local_ray_remembers_rays_answer_on_the_dashboards_packages(tmp_path):
    """Ray decides whether its dashboard agent runs minimal by importing aiohttp, OpenTelemetry's
    Prometheus exporter and the rest in the driver: 0.5 s on every local start, for modules
    nothing in a run uses. The first start in an environment asks Ray and keeps the answer;
    later starts answer from it. A package that is installed but does not import gets Ray's
    own answer (a minimal agent), not a full agent that would fail to start."""
    import json
    import os

    env = {**os.environ, "RETINANET_PIPELINE_CACHE": str(tmp_path / "cache")}
    first = run_child_env(DEPENDENCY_DRIVER, env)
    second = run_child_env(DEPENDENCY_DRIVER, env)
    assert first == {"imported before": False, "aiohttp imported": True, "minimal agent": False, "agent found": True}
    assert second == {"imported before": False, "aiohttp imported": False, "minimal agent": False,
                      "agent found": True}
    (answer,) = (tmp_path / "cache" / "ray").glob("dashboard-dependencies-*.json")
    assert json.loads(answer.read_text()) == {"missing": None}

    broken = {**env, "RETINANET_PIPELINE_CACHE": str(tmp_path / "broken")}
    hidden = run_child_env(DEPENDENCY_DRIVER, broken, "prometheus_client")
    assert hidden["minimal agent"] is True and hidden["agent found"]  # as Ray's own check decides
    (answer,) = (tmp_path / "broken" / "ray").glob("dashboard-dependencies-*.json")
    assert "prometheus_client" in json.loads(answer.read_text())["missing"]


def run_child_env(code: str, env: dict, *args) -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_environment_key_changes_with_the_installed_packages(tmp_path, monkeypatch):
    import sys

    from pipeline.compute.cluster import environment_key

    before = environment_key()
    assert environment_key() == before
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    assert environment_key() == before  # a folder without distributions
    (tmp_path / "somepackage-1.0.dist-info").mkdir()
    upgraded = environment_key()
    assert upgraded != before
    (tmp_path / "somepackage-1.0.dist-info").rename(tmp_path / "somepackage-1.1.dist-info")
    assert environment_key() not in (before, upgraded)

