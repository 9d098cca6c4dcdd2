"""Scale-out: a job on two nodes (ray.cluster_utils.Cluster, two raylets on this machine)
plans, reads and predicts on both, and commits the same rows as the same job on one node.

Runs in a child process: a multi-node Cluster needs its own Ray head, separate from the
test session's local instance. The child reports what ran where, and the rows, as JSON.
"""
from __future__ import annotations

import textwrap

import pytest
from children import run_child

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(420)]  # ray: a cluster in a child process

CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.run.graph import run_job
    from pipeline.chips.planning import PLAN_BATCH
    from pipeline.config.spec import JobSpec
    from pipeline.tools.synth import SYNTH_CLASSES, synthesize
    from pipeline.table.state import read_committed
    from retinanet import build_model, save_checkpoint

    root = Path(sys.argv[1])
    # The driver plans the first PLAN_BATCH scenes; the other 4 batches are Ray tasks.
    synthesize(root / "scenes", scenes=5 * PLAN_BATCH, size=256, seed=4)
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone="resnet18", fpn_channels=16, head_width=16, head_depth=1,
                        image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3)
    save_checkpoint(root / "model.pt", model, list(SYNTH_CLASSES))

    # One logical GPU per node and one per actor: the two predictor actors must sit on two nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    def spec(table, actors):
        return JobSpec.model_validate({
            "name": "two-nodes", "inputs": {"paths": [str(root / "scenes" / "*.tif")]},
            "tiling": {"chip_size": 256, "overlap": 0, "min_valid_fraction": 0.0},
            "model": {"checkpoint": str(root / "model.pt"), "score_threshold": 0.3, "precision": "fp32",
                      "backend": "torch"},
            "compute": {"address": cluster.address, "actors": actors, "gpus_per_actor": 1, "cpus_per_actor": 1},
            "output": {"table": str(root / table), "crs": "EPSG:4326"}})

    def rows(table):
        t = read_committed(root / table).to_pydict()
        return sorted(zip(t["scene_id"], t["label"], [round(v, 3) for v in t["px_xmin"]],
                          [round(v, 3) for v in t["score"]]))

    spread = run_job(spec("spread", 2), log=lambda m: None)
    single = run_job(spec("single", 1), log=lambda m: None)
    print(json.dumps({"nodes": spread["nodes"], "cluster": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                      "exit_codes": [spread["exit_code"], single["exit_code"]],
                      "scenes": [len(spread["scenes_ok"]), len(single["scenes_ok"])],
                      "spread": rows("spread"), "single": rows("single")}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_planning_reading_and_predicting_run_on_both_nodes(tmp_path):
    result, _ = run_child(CHILD, tmp_path)
    assert result["exit_codes"] == [0, 0] and result["scenes"] == [40, 40], result
    nodes = set(result["cluster"])
    assert len(nodes) == 2
    for stage in ("plan", "read", "predict"):
        assert set(result["nodes"][stage]) == nodes, (stage, result["nodes"])
    assert sum(result["nodes"]["plan"].values()) == 40  # each scene planned once
    assert sum(result["nodes"]["read"].values()) == sum(result["nodes"]["predict"].values()) == 40
    # Where the work ran changes nothing in the table.
    assert result["spread"] == result["single"] and result["spread"], result["spread"][:5]
