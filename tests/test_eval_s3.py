"""Evaluating a detection table in an S3-compatible object store (moto on 127.0.0.1):
the same figures as the same rows in a local folder, and URLs kept whole in messages."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_eval_density import commit, scene, write_truth

from pipeline.errors import InputError
from pipeline.eval.evaluate import evaluate_table
from pipeline.table.commit import RunInfo
from pipeline.table.maintenance import write_run_report

BUCKET = "eval-bucket"


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.create_bucket(Bucket=BUCKET)
    return s3_server


def test_evaluate_a_table_in_s3_equals_the_local_table(bucket, tmp_path):
    rng = np.random.default_rng(5)
    classes = ["tree", "vehicle"]
    pairs = [scene(rng, f"s{i}", 120, 2) for i in range(3)]
    write_truth(tmp_path / "truth.json", pairs, classes)
    url = f"s3://{BUCKET}/tables/t1"
    run = RunInfo("r1", "job", "h", "m", None)
    for table in (url, tmp_path / "local"):
        for _, d in pairs:
            commit(table, run, d.image_id, d.boxes, d.labels, d.scores, classes)
        write_run_report(table, "r1", {"run_id": "r1", "score_threshold": 0.3})
    remote = evaluate_table(url, [tmp_path / "truth.json"], out_dir=tmp_path / "ev")
    local = evaluate_table(tmp_path / "local", [tmp_path / "truth.json"])
    assert remote["table"] == url  # not s3:/eval-bucket/...
    assert remote["scenes"] == ["s0", "s1", "s2"] and remote["detections"] == local["detections"] > 300
    for key in ("AP", "AP50", "AP75", "AR", "per_class", "pr_curve", "score_threshold"):
        assert remote[key] == local[key], key
    assert remote["score_threshold"] == 0.3  # the run report, read from the bucket
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["table"] == url
    assert (tmp_path / "ev" / "eval_pr.png").is_file()


def test_an_empty_prefix_is_named_whole(bucket, tmp_path):
    write_truth(tmp_path / "truth.json", [scene(np.random.default_rng(0), "s0", 5, 1)], ["tree"])
    with pytest.raises(InputError, match=f"s3://{BUCKET}/tables/none: no detection table here"):
        evaluate_table(f"s3://{BUCKET}/tables/none", [tmp_path / "truth.json"])
