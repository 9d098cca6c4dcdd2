"""Ray for a run or a training: join `compute.address`, join the local head that
`pipeline ray up` keeps, or start a local Ray of our own.

Only Ray's public means: ``ray.init``'s arguments, the ``ray start`` command's flags and
the environment variables Ray documents (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH`` for
token authentication). A local Ray's start is on a run's critical path (its daemons, a
raylet registering, Ray Data's helper actors); for frequent local runs, `pipeline ray up`
starts a long-lived head once (``ray start --head --block`` in a session of its own, its
pid and address in :func:`head_file`) and every run with ``compute.address: null`` joins
it while it lives; `pipeline ray down` signals that one process, which stops what it started.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from pipeline.errors import ClusterError
from pipeline.io.objstore import cache_dir
from retinanet.files import write_atomically

# What a machine joining a cluster with token authentication needs (Ray 2.60: the token alone,
# without the mode, is not sent).
TOKEN_ADVICE = ("set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN or in the file "
                "RAY_AUTH_TOKEN_PATH names (default ~/.ray/auth_token)")
# A GCS method for the token probe (token_refused); the head checks the token before the method.
PROBE_METHOD = "/ray.rpc.InternalKVGcsService/InternalKVGet"
HEAD_START_TIMEOUT_S = 60.0
HEAD_TEMP_PREFIX = "pipeline-ray-"  # the local head's temp dir, under the system's


def ray_init_options(address: str | None, quiet: bool, dashboard: bool = False, num_cpus: int | None = None) -> dict:
    """Keyword arguments for ``ray.init``: quiet keeps the workers' and raylets' lines off the console.

    The same whether Ray is ours or joined: a joined cluster forwards its raylets' error
    lines too (a full /tmp, for one), which belong in Ray's logs, not in a nightly run's output.
    A local Ray starts without the dashboard unless `dashboard` (a training: Ray Train polls
    the State API it serves), with `num_cpus` CPUs (None: the machine's).
    Example: (None, True, False, 2) -> {"log_to_driver": False, "include_dashboard": False,
    "num_cpus": 2, "logging_level": logging.ERROR}.
    """
    options: dict = {"log_to_driver": not quiet}
    if address is None:
        options["include_dashboard"] = dashboard
        if num_cpus:
            options["num_cpus"] = num_cpus
    if quiet:  # Ray's own Python log lines (start-up, token notice, Ray Data plans) only with --verbose
        options["logging_level"] = logging.ERROR
    return options


def connect_ray(address: str | None, quiet: bool = True, dashboard: bool = False, num_cpus: int | None = None,
                log: Optional[Callable[[str], None]] = None):
    """Join `address`; with None, join the head `pipeline ray up` keeps when one lives
    (:func:`live_head`; `num_cpus` is then the head's), else start a local Ray in this
    process. Nothing when Ray is already up. `log` hears which. See
    :func:`ray_init_options` for `quiet`, `dashboard` and `num_cpus` (benchmarks pin it)."""
    head = live_head() if address is None else None
    if head and "ray" not in sys.modules:  # before Ray's first import: its native code reads them then
        os.environ.update(head_join_environment(head))
    elif head and any(os.environ.get(k) != v for k, v in head_join_environment(head).items()):
        if log:  # Ray imported already (a Python caller) without the head's token: it could not join
            log(f"a local Ray head is up at {head['address']}, but Ray was imported before its token was set; "
                "starting a Ray of this process instead")
        head = None
    import ray

    if ray.is_initialized():
        return ray
    if quiet:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read when Ray Data configures its loggers
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # Ray Data's advice for a small job (fewer blocks than read tasks) is no news to a user.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    if head:
        if log:
            log(f"joining the local Ray head at {head['address']} (pipeline ray up; pipeline ray down stops it)")
        address = head["address"]
    problem = head_unreachable(address)
    if problem:  # ray.init would retry for minutes before saying so
        raise ClusterError(f"compute.address {address}: no Ray head answers there ({problem}); "
                           "start the cluster (ray start --head) or correct the address")
    refused = token_refused(address)
    if refused:  # ray.init would retry for ~20 s, a native warning line each second
        raise ClusterError(f"compute.address {address}: the Ray head refused this machine's authentication "
                           f"token ({refused}); {TOKEN_ADVICE}")
    options = ray_init_options(address, quiet, dashboard, num_cpus)
    try:
        # "local": a new Ray of our own; address=None would join any Ray started on this
        # machine with `ray start` (someone else's cluster on a shared host).
        ray.init(address=address or "local", **options)
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


def auth_token() -> str | None:
    """This machine's Ray token as Ray's documented variables give it: None unless
    ``RAY_AUTH_MODE=token``; else ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
    names, or ``~/.ray/auth_token`` ('' where none is found)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def token_refused(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Ray's reason when the head at a ``HOST:PORT`` address refuses this process's
    authentication token, else None: accepted, or not asked (null, ``auto`` and ``ray://``
    addresses, a head that does not answer within ``timeout_s``).

    One gRPC request to the head's GCS with the token as Ray sends it (a Bearer
    ``authorization`` header) and an empty body: the head checks the token before the
    request, so a refused token answers UNAUTHENTICATED with Ray's reason, and an accepted
    one anything else. Example reason: "InvalidAuthToken: Authentication token is missing
    or incorrect"
    """
    if address is None or address == "auto" or address.startswith("ray://"):
        return None
    import grpc  # Ray's own dependency

    token = auth_token()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PROBE_METHOD, request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return (err.details() or "UNAUTHENTICATED").split(" Ensure that")[0].strip().rstrip(".")
    return None


# The long-lived local head (`pipeline ray up` / `down` / `status`).

def head_file() -> Path:
    """Where `pipeline ray up` records its head: pid, address, token file, CPUs, GPUs."""
    return cache_dir() / "ray" / "local-head.json"


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's: it exists
        return True


def recorded_head() -> dict | None:
    """The head :func:`head_file` names, alive or not; None without a readable record."""
    with contextlib.suppress(OSError, ValueError):
        head = json.loads(head_file().read_text(encoding="utf-8"))
        if isinstance(head, dict) and {"pid", "address"} <= head.keys():
            return head
    return None


def head_process_alive(head: dict) -> bool:
    """Whether the recorded `ray start` process of `head` lives: its pid, with the recorded
    port in its command line where /proc tells (a pid the system gave to another process since
    is not the head)."""
    pid = int(head["pid"])
    if not process_alive(pid):
        return False
    port = head["address"].rpartition(":")[2]
    try:
        return f"--port={port}" in psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's: not our head
        return False


def live_head() -> dict | None:
    """The recorded head when its `ray start` process lives and its port answers, else None."""
    head = recorded_head()
    if head and head_process_alive(head) and head_unreachable(head["address"], timeout_s=1) is None:
        return head
    return None


def head_join_environment(head: dict) -> dict[str, str]:
    """The documented variables with which a process joins `head` (token authentication)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(head["token_path"])} if head.get("token_path") else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def head_command(port: int, num_cpus: int | None, num_gpus: int | None, temp_dir: str) -> list[str]:
    """``ray start``'s public flags for the local head: this machine only, no dashboard, no
    usage stats, blocking (so that one process, the one `pipeline ray down` signals, owns it),
    its files in a temp dir of its own, its dashboard agent on a port the kernel picks. Ray
    records the address of a head it starts in its temp dir; in Ray's default one, every plain
    ``ray.init()`` on the machine (another user's test session) would join this head.
    Example: (6380, 2, None, "/tmp/pipeline-ray-x") -> [.../ray, "start", "--head", "--block", ..., "--num-cpus=2"]."""
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={port}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               # Not Ray's fixed 52365: a local Ray that a run (or a test session) starts beside
               # this head would find it taken, and its agent retried for seconds.
               "--dashboard-agent-listen-port=0"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    return command


def start_head(num_cpus: int | None = None, num_gpus: int | None = None,
               timeout_s: float = HEAD_START_TIMEOUT_S) -> dict:
    """Start the long-lived local head (`pipeline ray up`) -> its record (:func:`head_file`).

    ``ray start --head --block`` runs in a session of its own, with token authentication
    and a token of its own (a file beside the record), so that only this user's runs join
    it; its output goes to ``head.log`` beside the record. Waits until the head answers a
    Ray driver. ClusterError when one lives already or the head does not come up."""
    running = live_head()
    if running:
        raise ClusterError(f"a local Ray head is already up at {running['address']} (pid {running['pid']}); "
                           "pipeline ray down stops it")
    folder = head_file().parent
    folder.mkdir(parents=True, exist_ok=True)
    token_path = folder / "local-head-token"
    token_path.unlink(missing_ok=True)
    with os.fdopen(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:  # this user's only
        out.write(secrets.token_hex(32))
    port = free_port()
    # Short: Ray's sockets live under it (a Unix socket path has ~107 characters at most).
    temp_dir = tempfile.mkdtemp(prefix=HEAD_TEMP_PREFIX)
    head: dict[str, Any] = {"pid": 0, "address": f"127.0.0.1:{port}", "token_path": str(token_path),
                            "num_cpus": num_cpus, "num_gpus": num_gpus, "log": str(folder / "head.log"),
                            "temp_dir": temp_dir}
    env = dict(os.environ, **head_join_environment(head))
    with open(head["log"], "wb") as out:
        process = subprocess.Popen(head_command(port, num_cpus, num_gpus, temp_dir), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head["pid"] = process.pid
    deadline = time.monotonic() + timeout_s
    while head_unreachable(head["address"], timeout_s=1) is not None:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_session(process.pid, 10)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise ClusterError(f"ray start --head did not come up (exit {process.poll()}); see {head['log']}")
        time.sleep(0.1)
    record = json.dumps(head, indent=1)
    write_atomically(head_file(), lambda tmp: tmp.write_text(record, encoding="utf-8"))
    return head


def stop_process_session(pid: int, timeout_s: float) -> bool:
    """SIGTERM to `pid` (a `ray start --block`, which then stops the processes it started),
    waiting up to `timeout_s`; then SIGKILL to what is left of its session (its process
    group: `pid` leads it) -> whether it ended on SIGTERM. Touches no other process."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child (a test's, `start_head`'s failure): reaped
        if not session_alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return False


def session_alive(pid: int) -> bool:
    """Whether any process of the process group `pid` leads is still alive (not a zombie)."""
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile, or not ours to ask
            if os.getpgid(process.pid) == pid and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def stop_head(timeout_s: float = 60.0) -> dict | None:
    """Stop the recorded local head (`pipeline ray down`) -> its record, None where none was
    recorded. Signals only the recorded `ray start` process and its session; the record goes."""
    head = recorded_head()
    if head is None:
        return None
    if head_process_alive(head):
        stop_process_session(int(head["pid"]), timeout_s)
    temp_dir = str(head.get("temp_dir") or "")
    if Path(temp_dir).name.startswith(HEAD_TEMP_PREFIX):  # the head's own logs and sockets
        shutil.rmtree(temp_dir, ignore_errors=True)
    head_file().unlink(missing_ok=True)
    return head
