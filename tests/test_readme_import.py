"""The README's "Bring your own model" recipes run as written and do what the text says."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from pipeline.cli import main
from pipeline.config.spec import ModelSpec, TilingSpec
from retinanet import load_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def section() -> str:
    return README.read_text().split("## Bring your own model", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow  # full-size ResNet-50 RetinaNets imported and run
def test_readme_import_recipes_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v1 = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in v1.items()}, "label_dict": {"Tree": 0}},
               "deepforest.ckpt")
    torch.save(retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3).state_dict(),
               "retinanet_weights.pt")
    torch.save(v1, "weights16.pt")
    bash = re.search(r"```bash\n(.*?)```", section(), flags=re.S).group(1)
    commands = [line for line in bash.splitlines() if line.startswith("pipeline import")]
    assert len(commands) == 3
    for command in commands:
        result = CliRunner().invoke(main, shlex.split(command)[1:], catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)

    trees, info = load_checkpoint("models/trees.pt")
    assert info["class_names"] == ["Tree"]
    assert (trees.config.score_threshold, trees.config.nms_threshold, trees.config.detections_per_image,
            trees.config.min_size, trees.config.max_size) == (0.1, 0.05, 300, 800, 1333)
    assert trees.config.image_mean[0] == pytest.approx(123.675)  # "0.485 becomes 123.675"
    vehicles, info = load_checkpoint("models/vehicles.pt")
    assert info["class_names"] == ["car", "truck", "bus"] and vehicles.config.head_group_norm  # v2 found
    ships, _ = load_checkpoint("models/ships16.pt")
    assert ships.config.image_mean[0] == pytest.approx(0.485 * 65535)


def test_readme_job_snippet_is_a_valid_model_section():
    snippet = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section(), flags=re.S).group(1))
    model = ModelSpec(**snippet["model"])
    assert (model.score_threshold, model.nms_threshold, model.detections_per_chip) == (None, None, None)
    assert TilingSpec(**snippet["tiling"]).chip_size == 400
