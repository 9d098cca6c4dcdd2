"""Models by name: `pipeline import torchvision:...` and `pipeline import hf:...` read their
owners' caches (torch's hub folder, the Hugging Face hub cache) as the owners' libraries
fill them, and the imported model predicts as torchvision / DeepForest would.

No network: each test writes the cache itself (a freshly built torchvision RetinaNet's
weights under the file name of the real weights' URL; a hub cache folder in DeepForest's
release layout) and reads it offline. The oracle is torchvision's own RetinaNet on the same
weights with the source's settings (DeepForest's RetinaNetHub is torchvision's RetinaNet
with DeepForest's thresholds).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
import yaml
from click.testing import CliRunner
from real_data import real
from safetensors.torch import save as safetensors_bytes
from test_import import assert_same_boxes, cli, detecting, osbs_pixels, ours_says, torchvision_says
from torchvision.models import get_model_weights, get_weight, resnet18, resnet50
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from pipeline.cli import main
from retinanet import build_model, load_checkpoint
from retinanet.backbones import IMAGENET_WEIGHTS, imagenet_weights_state
from retinanet.hub import KNOWN_NAMES, NamedSourceError, NotCachedError, import_named
from retinanet.options import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
SHA = "4b6ac0a1c0ffee0ddba11f00dfeedc0de5ca1ab1"  # a snapshot's commit (40 hex digits)
COCO = {"retinanet_resnet50_fpn": (retinanet_resnet50_fpn, "RetinaNet_ResNet50_FPN_Weights.COCO_V1"),
        "retinanet_resnet50_fpn_v2": (retinanet_resnet50_fpn_v2, "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")}


def torch_cache_file(torch_home: Path, weights_name: str) -> Path:
    """Where torch's hub keeps a download: $TORCH_HOME/hub/checkpoints/<last part of the URL>."""
    return torch_home / "hub" / "checkpoints" / get_weight(weights_name).url.rsplit("/", 1)[1]


def write_hub_release(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """A Hugging Face hub cache as huggingface_hub writes it: models--owner--name/ with
    blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<revision> = commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / SHA
    for sub in ("blobs", "refs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(SHA)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return folder


def deepforest_release(tv, layout: str) -> dict[str, bytes]:
    """The files of a DeepForest release of torchvision model `tv`.

    "v2": DeepForest 2's RetinaNetHub.save_pretrained: config.json of its init arguments
    (update_config) and model.safetensors with torchvision's keys. "v1": DeepForest 1.4's
    Lightning module pushed whole: config.json of the module's init arguments and weights
    keyed model.* (DeepForest 2 strips that prefix when it loads them). "bin": the v2
    layout with the weights as pytorch_model.bin, which huggingface_hub's mixin reads when
    there is no safetensors file."""
    state = {k: v.contiguous() for k, v in tv.state_dict().items()}
    if layout == "v1":
        config = {"config_args": None, "config_file": "deepforest_config.yml", "existing_train_dataloader": None,
                  "existing_val_dataloader": None, "label_dict": {"Tree": 0}, "model": None, "num_classes": 1,
                  "transforms": None}
        return {"config.json": json.dumps(config).encode(),
                "model.safetensors": safetensors_bytes({f"model.{k}": v for k, v in state.items()})}
    config = {"num_classes": 1, "nms_thresh": 0.05, "score_thresh": 0.1, "label_dict": {"Tree": 0},
              "detections_per_img": 300, "topk_candidates": 1000}
    if layout == "bin":
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        return {"config.json": json.dumps(config).encode(), "pytorch_model.bin": buffer.getvalue()}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": safetensors_bytes(state)}


@pytest.fixture(scope="module")
def deepforest_tv():
    """torchvision's RetinaNet as DeepForest runs it (score 0.1, NMS 0.05), weights that find trees."""
    torch.manual_seed(0)
    tv = detecting(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1), cls_bias=1.6)
    tv.nms_thresh, tv.score_thresh = 0.05, 0.1
    return tv


def pipeline_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a fresh process: the libraries read their cache variables as they start."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


# ------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("builder", sorted(COCO))
@pytest.mark.slow  # full-size ResNet-50 RetinaNets built and run
def test_torchvision_coco_from_torchs_cache_predicts_as_torchvision(tmp_path, monkeypatch, builder):
    build, weights_name = COCO[builder]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    v2 = builder.endswith("v2")
    # 173 (v1) and 11 (v2) detections of 8 and 7 classes on OSBS_029 (set by trying)
    tv = detecting(build(weights=None, weights_backbone=None, num_classes=91), cls_bias=-1.0 if v2 else -0.6,
                   seed=4, std=0.02 if v2 else 0.013)
    cached = torch_cache_file(tmp_path / "torch", weights_name)
    cached.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), cached)

    code, out = cli("import", f"torchvision:{builder}", "--out", tmp_path / "coco.pt", "--offline")
    assert code == 0, out
    model, info = load_checkpoint(tmp_path / "coco.pt")
    categories = get_weight(weights_name).meta["categories"]
    # label id = COCO category id: every index keeps torchvision's category, the unused
    # ids' "N/A" placeholders get unique names
    assert len(info["class_names"]) == 91 and len(set(info["class_names"])) == 91
    assert [n for n, c in zip(info["class_names"], categories) if n != c] == \
        [f"N/A {i}" for i, c in enumerate(categories) if c == "N/A"]
    assert info["class_names"][1] == "person" and info["class_names"][90] == "toothbrush"
    cfg = model.config
    assert (cfg.min_size, cfg.max_size, cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image,
            cfg.topk_candidates) == (800, 1333, 0.05, 0.5, 300, 1000)
    assert info["metadata"]["imported_from"]["weights"] == weights_name
    expected = torchvision_says(tv, osbs_pixels())
    assert len(expected["boxes"]) >= 10 and len(set(expected["labels"].tolist())) > 1
    got = ours_says(model, osbs_pixels())
    # one anchor can pass the threshold for several classes (the same box, other labels):
    # boxes are matched within each label
    assert sorted(got["labels"].tolist()) == sorted(expected["labels"].tolist())
    for label in set(expected["labels"].tolist()):
        assert_same_boxes(*({k: v[d["labels"] == label] for k, v in d.items()} for d in (expected, got)))


def test_torchvision_not_cached_offline_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, out = cli("import", "torchvision:retinanet_resnet50_fpn_v2", "--out", tmp_path / "m.pt", "--offline")
    expected = torch_cache_file(tmp_path / "torch", "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")
    assert code == 2
    assert f"not in torch's cache ({expected}" in out and "TORCH_HOME" in out
    assert "get_weight('RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1').get_state_dict()" in out
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow  # a CLI process whose download attempt fails through a dead proxy (5-12 s); offline twin above
def test_torchvision_download_that_fails_says_where_and_how(tmp_path):
    """Online but the download fails (here: a proxy on a closed local port, so nothing
    leaves the machine): the same advice, with the reason."""
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "",
             "NO_PROXY": "", "TORCH_HOME": str(tmp_path / "torch")}
    done = pipeline_cli(["import", "torchvision:retinanet_resnet50_fpn", "--out", str(tmp_path / "m.pt")], proxy,
                        tmp_path)
    assert done.returncode == 2, done.stderr
    assert "the download failed (URLError" in done.stderr and "retinanet_resnet50_fpn_coco-eeacb38b.pth" in done.stderr
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_unknown_names_are_refused_with_the_known_ones(tmp_path):
    for name in ("timm:resnet50", "torchvision:fasterrcnn_resnet50_fpn"):
        code, out = cli("import", name, "--out", tmp_path / "m.pt")
        assert code == 2 and name in out
        assert all(known in out for known in ("torchvision:retinanet_resnet50_fpn_v2", "hf:weecology/deepforest-tree"))
    assert "hf:weecology/deepforest-tree" in KNOWN_NAMES
    code, out = cli("import", "missing.pt", "--out", tmp_path / "m.pt")  # a plain path stays a file
    assert code == 2 and "missing.pt: file not found" in out


# ------------------------------------------------------------------ Hugging Face hub (DeepForest)


@pytest.mark.parametrize("layout", ["v2", "v1", "bin"])
@pytest.mark.slow  # full-size ResNet-50 RetinaNets built and run
def test_deepforest_release_from_the_hub_cache_predicts_as_deepforest(tmp_path, deepforest_tv, layout):
    write_hub_release(tmp_path / "hub", "weecology/deepforest-tree", deepforest_release(deepforest_tv, layout))
    imported = import_named("hf:weecology/deepforest-tree", offline=True, hub_cache=str(tmp_path / "hub"))
    assert imported.class_names == ["Tree"]
    cfg = imported.model.config
    assert (cfg.min_size, cfg.max_size, cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image,
            cfg.topk_candidates) == (800, 1333, 0.1, 0.05, 300, 1000)
    source = imported.metadata["imported_from"]
    assert (source["kind"], source["repo"], source["revision"], source["commit"]) == \
        ("deepforest", "weecology/deepforest-tree", "main", SHA)
    expected = torchvision_says(deepforest_tv, osbs_pixels())
    assert len(expected["boxes"]) >= 20
    assert_same_boxes(expected, ours_says(imported.model, osbs_pixels()))


@pytest.mark.slow  # full-size ResNet-50 RetinaNets built and run
def test_a_release_with_several_labels_and_a_revision(tmp_path):
    torch.manual_seed(1)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    files = deepforest_release(tv, "v2")
    label_dict = {"Great Egret": 1, "Anhinga": 0, "Wood Stork": 2}  # ids, not the order of the keys
    files["config.json"] = json.dumps({"num_classes": 3, "label_dict": label_dict}).encode()
    write_hub_release(tmp_path / "hub", "weecology/everglades-bird-species-detector", files, revision="v1.0")
    imported = import_named("hf:weecology/everglades-bird-species-detector@v1.0", offline=True,
                            hub_cache=str(tmp_path / "hub"))
    assert imported.class_names == ["Anhinga", "Great Egret", "Wood Stork"]


def test_hub_repos_without_a_retinanet_are_refused(tmp_path):
    hub = tmp_path / "hub"
    # a DeepForest crop model: a classifier (ResNet-50), config without a detector's label_dict
    write_hub_release(hub, "weecology/cropmodel-deadtrees",
                      {"config.json": json.dumps({"cropmodel": {"architecture": "resnet50"}}).encode(),
                       "model.safetensors": safetensors_bytes({"model.fc.bias": torch.zeros(2)})})
    with pytest.raises(NamedSourceError, match=r"hf:weecology/cropmodel-deadtrees: not a DeepForest RetinaNet "
                                               r"release: its config.json has no label_dict \(keys: \['cropmodel'\]"):
        import_named("hf:weecology/cropmodel-deadtrees", offline=True, hub_cache=str(hub))
    # labels but a classifier's weights
    classifier = {f"model.{k}": v for k, v in resnet50(weights=None).state_dict().items()}
    write_hub_release(hub, "someone/tree-classifier",
                      {"config.json": json.dumps({"label_dict": {"Alive": 0, "Dead": 1}}).encode(),
                       "model.safetensors": safetensors_bytes(classifier)})
    with pytest.raises(NamedSourceError,
                       match=r"hf:someone/tree-classifier: holds no RetinaNet \(.*not a torchvision RetinaNet"):
        import_named("hf:someone/tree-classifier", offline=True, hub_cache=str(hub))
    # a config and no weights at all
    write_hub_release(hub, "someone/empty", {"config.json": json.dumps({"label_dict": {"Tree": 0}}).encode()})
    with pytest.raises(NamedSourceError, match=r"hf:someone/empty: holds no weights file \(model.safetensors or "
                                               r"pytorch_model.bin\)"):
        import_named("hf:someone/empty", offline=True, hub_cache=str(hub))


def test_hub_release_not_cached_offline_says_where_and_how(tmp_path):
    with pytest.raises(NotCachedError) as err:
        import_named("hf:weecology/deepforest-tree", offline=True, hub_cache=str(tmp_path / "hub"))
    message = str(err.value)
    assert f"not in the Hugging Face cache ({tmp_path / 'hub' / 'models--weecology--deepforest-tree'}" in message
    assert "HF_HUB_CACHE" in message and "hf download weecology/deepforest-tree --revision main" in message


@pytest.mark.slow  # full-size ResNet-50 RetinaNets built and run
def test_hub_environment_is_honoured_by_the_cli(tmp_path, deepforest_tv):
    """HF_HUB_CACHE and HF_HUB_OFFLINE, as a user sets them, through `pipeline import`."""
    write_hub_release(tmp_path / "hub", "weecology/deepforest-tree", deepforest_release(deepforest_tv, "v2"))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = pipeline_cli(["import", "hf:weecology/deepforest-tree", "--out", str(tmp_path / "trees.pt")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "classes Tree" in done.stdout and "score > 0.1, NMS IoU 0.05" in done.stdout
    done = pipeline_cli(["import", "hf:weecology/deepforest-bird", "--out", str(tmp_path / "birds.pt")], env,
                        tmp_path)
    assert done.returncode == 2
    assert "models--weecology--deepforest-bird" in done.stderr
    assert "hf download weecology/deepforest-bird" in done.stderr


# ------------------------------------------------------------------ the README's recipe


def readme_recipe() -> tuple[list[list[str]], str]:
    """The `pipeline` commands and the job file of README's "Models by name" recipe."""
    section = (ROOT / "README.md").read_text().split("### Models by name", 1)[1].split("\n### ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    job = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.startswith("pipeline ")]
    return commands, job


def test_readme_neon_recipe_runs_as_written(tmp_path, monkeypatch, deepforest_tv, ray_session):
    """`pipeline import hf:weecology/deepforest-tree` on a hub cache in the release's layout
    (offline), then `pipeline run` of the README's job on the NEON tile OSBS_029."""
    commands, job = readme_recipe()
    assert [c[:2] for c in commands] == [["pipeline", "import"], ["pipeline", "run"]]
    assert commands[0][2] == "hf:weecology/deepforest-tree"
    write_hub_release(tmp_path / "hub", "weecology/deepforest-tree", deepforest_release(deepforest_tv, "v2"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "OSBS_029.tif").symlink_to(real("OSBS_029.tif"))
    (work / "neon_trees.yaml").write_text(job)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = pipeline_cli(commands[0][1:], env, work)
    assert done.returncode == 0, done.stderr
    monkeypatch.chdir(work)
    result = CliRunner().invoke(main, commands[1][1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = duckdb.sql(f"SELECT label, score, scene_id FROM read_parquet('{work}/out/trees/date=*/*.parquet', "
                      "hive_partitioning = true)").fetchall()
    assert len(rows) >= 20
    assert {label for label, _, _ in rows} == {"Tree"} and {scene for _, _, scene in rows} == {"OSBS_029"}
    assert min(score for _, score, _ in rows) > 0.1  # DeepForest's score threshold, from the import


# ------------------------------------------------------------------ ImageNet backbones for training


def test_every_backbone_names_its_imagenet_weights():
    assert set(IMAGENET_WEIGHTS) == set(BACKBONES)
    for name in BACKBONES:
        weights = get_weight(IMAGENET_WEIGHTS[name])
        assert type(weights) is get_model_weights(name) and len(weights.meta["categories"]) == 1000
    with pytest.raises(NamedSourceError, match=r"lenet: torchvision has no ImageNet weights for it here; "
                                               r"backbones with them: resnet18, "):
        imagenet_weights_state("lenet")


def test_imagenet_backbone_from_torchs_cache_with_a_fourth_band(tmp_path, monkeypatch):
    """backbone_weights="imagenet" loads torchvision's file from torch's cache (a random ResNet-18
    stands in for the download); a fourth band starts from the mean RGB filter, all bands scaled
    by 3/4 (adapt_first_conv's rule)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    reference = resnet18(weights=None).state_dict()
    cached = torch_cache_file(tmp_path / "torch", "ResNet18_Weights.IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    model = build_model(num_classes=1, backbone="resnet18", backbone_weights="imagenet", in_channels=4,
                        image_mean=(0.0,) * 4, image_std=(1.0,) * 4, head_width=16, head_depth=1)
    body = model.backbone.body
    assert torch.equal(body.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])
    assert torch.equal(body.bn1.running_mean, reference["bn1.running_mean"])
    rgb = reference["conv1.weight"]
    torch.testing.assert_close(body.conv1.weight[:, :3], rgb * 3 / 4)
    torch.testing.assert_close(body.conv1.weight[:, 3:], rgb.mean(dim=1, keepdim=True) * 3 / 4)
    assert "backbone_weights" not in model.config.to_dict()  # a checkpoint does not refer to the cache


def test_imagenet_weights_not_cached_offline_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(NotCachedError) as err:
        imagenet_weights_state("resnet50", offline=True)
    message = str(err.value)
    assert message.startswith("backbone_weights: imagenet for resnet50: not in torch's cache (")
    assert str(torch_cache_file(tmp_path / "torch", "ResNet50_Weights.IMAGENET1K_V2")) in message
    assert "get_weight('ResNet50_Weights.IMAGENET1K_V2').get_state_dict()" in message


def test_train_job_backbone_weights_imagenet(tmp_path, monkeypatch):
    """train.backbone_weights: imagenet is a name, not a path next to the job file, and the
    training checks find the weights in torch's cache."""
    from pipeline.config.spec import load_job
    from pipeline.train.driver import check_trainable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = torch_cache_file(tmp_path / "torch", "ResNet18_Weights.IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    torch.save(resnet18(weights=None).state_dict(), cached)
    job = {"name": "trees", "inputs": {"paths": [str(real("OSBS_029.tif"))]},
           "model": {"checkpoint": str(tmp_path / "trees.pt")}, "output": {"table": str(tmp_path / "table")},
           "train": {"scenes": [str(real("OSBS_029.tif"))], "labels": [str(real("OSBS_029.csv"))],
                     "classes": ["Tree"], "backbone": "resnet18", "backbone_weights": "imagenet",
                     "output_dir": str(tmp_path / "run")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(tmp_path / "job.yaml")
    assert spec.train.backbone_weights == "imagenet"
    check_trainable(spec)  # raises ConfigError listing problems; none here
    job["train"]["backbone_weights"] = "w.pth"  # any other value stays a file beside the job
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert load_job(tmp_path / "job.yaml").train.backbone_weights == str(tmp_path / "w.pth")
