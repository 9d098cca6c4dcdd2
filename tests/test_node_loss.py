"""Fault: a worker node removed mid-job (ray.cluster_utils.Cluster, two raylets on this machine).

Runs in a child process because a multi-node Cluster needs its own Ray head, separate from
the test session's local instance. The child reports rows as JSON; the test compares them
with a clean run on the same cluster.
"""
from __future__ import annotations

import textwrap

import pytest
from children import run_child

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(420)]  # ray: a cluster in a child process

CHILD = textwrap.dedent('''
    import json, sys, threading, time
    from pathlib import Path
    import torch
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.run.graph import run_job
    from pipeline.infer.predictor import FaultPlan
    from pipeline.config.spec import JobSpec
    from pipeline.tools.synth import SYNTH_CLASSES, synthesize
    from pipeline.table.state import read_committed
    from retinanet import build_model, save_checkpoint

    root = Path(sys.argv[1])
    synthesize(root / "scenes", scenes=4, size=600, seed=9)
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone="resnet18", head_width=32, head_depth=1,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3)
    save_checkpoint(root / "model.pt", model, list(SYNTH_CLASSES))

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)

    def spec(table):
        return JobSpec.model_validate({
            "name": "node-loss", "inputs": {"paths": [str(root / "scenes" / "*.tif")]},
            "tiling": {"chip_size": 256, "overlap": 32, "min_valid_fraction": 0.05},
            "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "batch_size": 2,
                      "precision": "fp32"},
            "compute": {"address": cluster.address, "actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1},
            "output": {"table": str(root / table), "crs": "EPSG:4326"}})

    def rows(table):
        t = read_committed(root / table).to_pydict()
        return sorted(zip(t["scene_id"], t["label"], [round(v, 3) for v in t["px_xmin"]],
                          [round(v, 3) for v in t["score"]]))

    # The only GPUs live on worker nodes, so the predictor actor must run there.
    first = cluster.add_node(num_cpus=1, num_gpus=1)
    clean = run_job(spec("clean"), log=lambda m: None)

    # The predictor stalls on one chip of the second scene; the node goes while it is in flight.
    faults = FaultPlan(stall=["synth_001/r1c1"], stall_seconds=30.0, marker_dir=str(root))

    # run_job streams in a thread; the main thread changes the cluster (Ray's Node wants
    # the main thread for its signal handlers).
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        report=run_job(spec("killed"), log=lambda m: None, faults=faults)))
    runner.start()
    marker = root / "stalled-synth_001_r1c1"
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    cluster.add_node(num_cpus=1, num_gpus=1)  # the survivor that takes over
    cluster.wait_for_nodes()
    cluster.remove_node(first, allow_graceful=False)
    runner.join()
    killed = outcome["report"]
    print(json.dumps({"clean": rows("clean"), "killed": rows("killed"),
                      "exit_codes": [clean["exit_code"], killed["exit_code"]],
                      "workers": killed["workers"], "chips": killed["chips_read"],
                      "stalled_pid": int(marker.read_text())}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_worker_node_removed_mid_job_loses_and_duplicates_nothing(tmp_path):
    result, stderr = run_child(CHILD, tmp_path)
    assert result["exit_codes"] == [0, 0], result
    assert result["killed"] == result["clean"] and result["clean"], result
    # The removed node's actor died mid-job with the stalled chip: another actor on the
    # surviving node finished the work. (Which chips the dead actor's earlier calls still
    # delivered depends on the order Ray handed them out; a chip whose output was lost with
    # the node is recomputed by the survivor.)
    survivors = {w: n for w, n in result["workers"].items() if f"pid={result['stalled_pid']} " not in w}
    assert survivors and sum(result["workers"].values()) == result["chips"], (result, stderr[-3000:])
