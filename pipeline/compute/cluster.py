"""Ray for a run or a training: join `compute.address`, or start a local Ray of our own.

A local Ray's start is on every run's critical path (3-4 s of the demo run's start-up on 2
cores), so a run starts it without the dashboard and the head processes it does not use
(:func:`unused_head_processes`), with a fine-grained wait for its raylet instead of
Ray's 1-second steps (:func:`fine_registration_wait`), and with its dashboard agent on a
free port, so that another Ray on the machine does not hold it up (:func:`agent_on_a_free_port`).
Ray Data's own helpers on such a Ray: :mod:`pipeline.run.local_data`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import time
import warnings

from pipeline.errors import ClusterError
from pipeline.io.objstore import cache_dir
from retinanet.files import write_atomically

REGISTRATION_POLL_S = 0.02
# What a machine joining a cluster with token authentication needs (Ray 2.60: the token alone,
# without the mode, is not sent).
TOKEN_ADVICE = ("set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN or in the file "
                "RAY_AUTH_TOKEN_PATH names (default ~/.ray/auth_token)")
# Any cluster id for the token probe (token_refused): the head checks the token before it.
PROBE_CLUSTER_ID = "00" * 28


def ray_init_options(address: str | None, quiet: bool, dashboard: bool = False, num_cpus: int | None = None) -> dict:
    """Keyword arguments for ``ray.init``: quiet keeps the workers' and raylets' lines off the console.

    The same whether Ray is ours or joined: a joined cluster forwards its raylets' error
    lines too (a full /tmp, for one), which belong in Ray's logs, not in a nightly run's output.
    A local Ray starts without the dashboard unless `dashboard`: it serves Ray's State API,
    which inference does not use and Ray Train polls (its placement-group cleaner).

    A local Ray has `num_cpus` CPUs (None: the machine's) and keeps up to one idle worker
    process per CPU. Ray's default
    is one per CPU no task or actor holds, and a CPU run's predictor holds them all: the
    read task's worker (reads hold no CPU) was ended after each second idle and every run
    of chips started a new Python process, 1-2 s of CPU taken from the predictor (a 4096²
    scene on 2 cores: 0.73 -> 0.63 s of predictor time per chip, BENCHMARKS.md).
    """
    options: dict = {"log_to_driver": not quiet}
    if address is None:
        options["include_dashboard"] = dashboard
        options["_system_config"] = {"num_workers_soft_limit": num_cpus or os.cpu_count() or 1}
        if num_cpus:
            options["num_cpus"] = num_cpus
    if quiet:  # Ray's own Python log lines (start-up, token notice, Ray Data plans) only with --verbose
        options["logging_level"] = logging.ERROR
    return options


def connect_ray(address: str | None, quiet: bool = True, dashboard: bool = False, num_cpus: int | None = None):
    """Join `address` (None: start a local Ray in this process) unless Ray is already up;
    see :func:`ray_init_options` for `quiet`, `dashboard` and `num_cpus` (benchmarks pin it)."""
    import ray

    if not ray.is_initialized():
        if quiet:
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read when Ray Data configures its loggers
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            # Ray Data's advice for a small job (fewer blocks than read tasks) is no news to a user.
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
        problem = head_unreachable(address)
        if problem:  # ray.init would retry for minutes before saying so
            raise ClusterError(f"compute.address {address}: no Ray head answers there ({problem}); "
                               "start the cluster (ray start --head) or correct the address")
        refused = token_refused(address)
        if refused:  # ray.init would retry for ~15 s, a native warning line each second
            raise ClusterError(f"compute.address {address}: the Ray head refused this machine's authentication "
                               f"token ({refused}); {TOKEN_ADVICE}")
        options = ray_init_options(address, quiet, dashboard, num_cpus)
        try:
            if address is None:
                # "local": a new Ray of our own; address=None would join any Ray started on
                # this machine with `ray start` (someone else's cluster on a shared host).
                with (fine_registration_wait(), dashboard_dependencies_remembered(),
                      without_head_processes(unused_head_processes(dashboard, quiet)),
                      agent_on_a_free_port(not dashboard)):
                    ray.init(address="local", **options)
            else:
                ray.init(address=address, **options)
        except ConnectionError as err:
            if address is None:
                raise
            raise ClusterError(f"compute.address {address}: could not join the Ray cluster ({err}); "
                               f"if the cluster uses token authentication: {TOKEN_ADVICE}") from err
    return ray


def head_unreachable(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Why no TCP connection opens to a ``HOST:PORT`` or ``ray://HOST:PORT`` address
    within ``timeout_s``, or None when one does (or for null and ``auto``, which name no port)."""
    if address is None or address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def token_refused(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Ray's reason when the head at a ``HOST:PORT`` address refuses this process's
    authentication token, else None: accepted, or not asked (null, ``auto`` and ``ray://``
    addresses, a head that does not answer within ``timeout_s``).

    One request to the head's GCS with a made-up cluster id: the head checks the token
    first, so a refused token answers InvalidAuthToken and an accepted one WrongClusterID.
    Example reason: "InvalidAuthToken: Authentication token is missing or incorrect. Note:
    RAY_AUTH_MODE is currently 'disabled' (not 'token')"
    """
    if address is None or address == "auto" or address.startswith("ray://"):
        return None
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; its stub omits it

    try:
        GcsClient(address=address, cluster_id=PROBE_CLUSTER_ID).internal_kv_get(b"", None, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - only a refused token is an answer here
        message = str(err)
        if "InvalidAuthToken" in message:
            return message.removeprefix("RPC error: ").split(" Ensure that")[0].strip().rstrip(".")
    return None


def node_registered(gcs_address: str, node_id: str, timeout_s: float) -> bool:
    """Wait until the GCS at `gcs_address` lists node `node_id` (hex) as alive, asking every
    REGISTRATION_POLL_S -> whether it did within `timeout_s`. Any error reads as "not yet"."""
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; its stub omits it

    deadline = time.monotonic() + timeout_s
    client = None
    while True:
        with contextlib.suppress(Exception):  # the GCS may still be starting
            client = client or GcsClient(address=gcs_address)
            if any(node.hex() == node_id for node in client.get_all_node_info(timeout=1)):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(REGISTRATION_POLL_S)


@contextlib.contextmanager
def replaced(owner, replacements: dict):
    """While inside, the attributes of `owner` (a class or module of Ray's) named in
    `replacements` are the ones given, and Ray's own again after. Nothing is replaced where
    `owner` is None or lacks one of them as a callable: another Ray layout runs as Ray does."""
    originals = {name: getattr(owner, name, None) for name in replacements}
    if owner is None or not all(callable(original) for original in originals.values()):
        yield
        return
    for name, replacement in replacements.items():
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


def ray_attribute(module: str, name: str | None = None):
    """One of Ray's modules (``ray._private.services``), or the attribute `name` of it (read
    now: ``_global_node`` changes with ``ray.init``); None where Ray lays it out otherwise."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    return found if name is None else getattr(found, name, None)


def fine_registration_wait(timeout_s: float = 30.0):
    """While a local Ray starts, wait for its raylet's registration at 20 ms steps.

    ``ray.init`` asks the GCS for the raylet it just started and, when that has not
    registered yet, asks again one second later (a fixed step in Ray's C++ GCS client). The
    raylet registers ~1.05 s after it starts here, so ``ray.init`` waited 2 s where 1.1 s
    would do: 0.9 s of every local run's start-up. Ray's own lookup runs right after ours,
    so an unexpected Ray (a node that never shows) falls back to Ray's behaviour, errors included.
    """
    services = ray_attribute("ray._private.services")
    ray_lookup = getattr(services, "get_node", None)

    def get_node(gcs_address, node_id):
        node_registered(gcs_address, node_id, timeout_s)
        return ray_lookup(gcs_address, node_id)  # type: ignore[misc]  # replaced only where callable

    return replaced(services, {"get_node": get_node})


def environment_key() -> str:
    """A digest of this Python environment: the interpreter and every installed distribution
    with its version (the ``*.dist-info`` folders on ``sys.path``, ~15 ms to list). Installing,
    upgrading or removing any package changes it."""
    names = sorted(entry.name for folder in sys.path if os.path.isdir(folder)
                   for entry in os.scandir(folder) if entry.name.endswith(".dist-info"))
    return hashlib.blake2b("\n".join([sys.executable, *names]).encode(), digest_size=8).hexdigest()


def dashboard_dependencies_remembered():
    """While a local Ray starts, Ray's check for the dashboard's optional packages (which
    decides whether its agent runs in minimal mode) answers from its own earlier answer in
    this environment (:func:`environment_key`), kept in the cache folder.

    Ray's check imports them all (aiohttp, OpenTelemetry's Prometheus exporter, ...) in the
    driver: 0.5 s of CPU inside ``ray.init`` before the raylet starts, on every run, for
    modules nothing else in a run uses. The first start in an environment runs Ray's check
    and keeps its answer; an installed package that does not import (a missing dependency
    of aiohttp, say) is answered as Ray answers it, so the agent starts minimal as before.
    """
    utils = ray_attribute("ray._private.utils")
    rays_check = getattr(utils, "get_dashboard_dependency_error", None)
    if not callable(rays_check):  # another Ray layout: Ray's own check
        return contextlib.nullcontext()
    path = cache_dir() / "ray" / f"dashboard-dependencies-{environment_key()}.json"

    def get_dashboard_dependency_error():
        with contextlib.suppress(OSError, ValueError, KeyError):
            missing = json.loads(path.read_text(encoding="utf-8"))["missing"]
            return None if missing is None else ImportError(missing)
        error = rays_check()
        with contextlib.suppress(OSError):  # a read-only cache: Ray's check again next time
            answer = json.dumps({"missing": None if error is None else str(error)})
            write_atomically(path, lambda tmp: tmp.write_text(answer, encoding="utf-8"))
        return error

    return replaced(utils, {"get_dashboard_dependency_error": get_dashboard_dependency_error})


def unused_head_processes(dashboard: bool, quiet: bool) -> tuple[str, ...]:
    """The methods of Ray's Node that start the head processes a local Ray goes without:
    none for a training (``dashboard``); for a run, those nothing in it talks to:

    - ``start_monitor``, the autoscaler's monitor (monitor.py): a local Ray has no node
      provider, so it only watches, and writes the report `ray status` prints;
    - ``start_api_server`` (dashboard.py), which Ray starts even with
      ``include_dashboard=False``: the State API, job submission and `ray list`. Ray Train
      polls the State API, so a training keeps it, and keeps the others too;
    - ``start_log_monitor`` when ``quiet``: it tails the workers' log files to forward
      their lines to a driver that, with ``log_to_driver=False``, does not listen.

    Each is a Python process booting on the cores the predictor starts on: without the first
    two, the demo run's start-up went 11.6 -> 9.0 s and its peak RSS 2.29 -> 2.07 GB on 2
    cores (BENCHMARKS.md). Example: (False, True) -> all three; (True, True) -> ().
    """
    if dashboard:
        return ()
    return ("start_monitor", "start_api_server") + (("start_log_monitor",) if quiet else ())


def agent_on_a_free_port(enabled: bool):
    """While a local Ray starts (``enabled``), its raylet's dashboard agent listens on a port
    the kernel picks instead of Ray's fixed 52365, which ``ray.init`` has no switch for.

    With another Ray on the machine (a cluster's head, a second run, the test suite's) that
    port is taken, and the agent retries for ~3 s before the raylet is ready: a run beside a
    head started 8.8 s after the command instead of 5.5 s (BENCHMARKS.md). Only the dashboard
    and the API server call the agent there, and a run starts neither
    (:func:`unused_head_processes`); a training keeps the fixed port for its dashboard."""
    node_class = ray_attribute("ray._private.node", "Node")
    start_raylet = getattr(node_class, "start_raylet", None)
    if not enabled:
        return contextlib.nullcontext()

    def start_raylet_with_a_free_agent_port(self, *args, **kwargs):
        params = getattr(self, "_ray_params", None)
        if hasattr(params, "dashboard_agent_listen_port"):  # else another layout: Ray's own port
            params.dashboard_agent_listen_port = 0
        return start_raylet(self, *args, **kwargs)  # type: ignore[misc]  # replaced only where callable

    return replaced(node_class, {"start_raylet": start_raylet_with_a_free_agent_port})


def without_head_processes(methods: tuple[str, ...]):
    """While a local Ray starts, the Node `methods` that start head processes do nothing
    (:func:`unused_head_processes`). Ray's public ``ray.init`` has no switch for these
    (``ray start`` has ``--no-monitor`` only). A Ray layout without one of them starts as
    Ray does."""
    def skip(self, **_):
        return None

    return replaced(ray_attribute("ray._private.node", "Node"), dict.fromkeys(methods, skip))

