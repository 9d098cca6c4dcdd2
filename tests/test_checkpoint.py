"""Checkpoints: round trip, and files that must be refused with a clear CheckpointError."""
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from retinanet import CheckpointError, build_model, load_checkpoint, save_checkpoint
from retinanet.checkpoint import FORMAT_NAME, FORMAT_VERSION, read_checkpoint, read_checkpoint_header

CLASSES = ["car", "ship"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(num_classes=2, backbone="resnet18", in_channels=4, image_mean=(100.0, 110.0, 120.0, 130.0),
                    image_std=(30.0, 31.0, 32.0, 33.0), head_width=64, head_depth=2, fpn_channels=64,
                    score_threshold=0.1, detections_per_image=50)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct scores, so "identical detections" means something
        for head in (m.cls_head, m.box_head):
            for p in head.parameters():
                if p.ndim == 4:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.07)
    return m.eval()


@pytest.fixture(scope="module")
def saved(model, module_tmp):
    path = module_tmp("ckpt") / "sub" / "model.pt"
    save_checkpoint(path, model, CLASSES, metadata={"epoch": 3, "note": "test"})
    return path


def test_round_trip_gives_identical_detections(model, saved):
    loaded, info = load_checkpoint(saved)
    assert not loaded.training
    assert info["class_names"] == CLASSES
    assert info["metadata"] == {"epoch": 3, "note": "test"}
    assert info["config"] == model.config
    assert loaded.config.image_mean == (100.0, 110.0, 120.0, 130.0)  # normalisation travels with it
    images = 100 + 40 * torch.rand(2, 4, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        got = loaded(images)
    assert sum(len(d["boxes"]) for d in expected) > 20
    for e, g in zip(expected, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(e[key], g[key])


def test_saved_payload_is_plain(saved):
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == FORMAT_NAME and payload["format_version"] == FORMAT_VERSION
    assert "backbone_weights" not in payload["config"]
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    assert not any(name.startswith(".") for name in os.listdir(saved.parent))  # no temp file left


def test_class_names_must_match(model, tmp_path):
    with pytest.raises(ValueError, match="1 class names for a model with 2 classes"):
        save_checkpoint(tmp_path / "x.pt", model, ["car"])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_checkpoint_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(saved, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(saved.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_bare_state_dict_is_not_a_checkpoint(model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError,
                       match=r"weights\.pt: not a retinanet-pipeline/checkpoint file \(a bare state dict"):
        load_checkpoint(path)


def test_wrong_version(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"future\.pt: checkpoint format version {FORMAT_VERSION + 1}, "
                                              rf"this library reads {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_wrong_shapes(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    payload["config"]["num_classes"] = 5  # the stored head has 2 classes
    path = tmp_path / "shapes.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"(?s)shapes\.pt: weights do not fit the stored config.*"
                                              r"size mismatch for cls_head\.predictor\.weight"):
        load_checkpoint(path)


def test_missing_weights_and_bad_config(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    del payload["state_dict"]["box_head.predictor.bias"]
    path = tmp_path / "missing.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"(?s)missing\.pt: weights do not fit.*box_head\.predictor\.bias"):
        load_checkpoint(path)
    payload = torch.load(saved, weights_only=True)
    payload["config"]["colour"] = "red"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"unknown RetinaNetConfig fields: \['colour'\]"):
        load_checkpoint(path)


class Arbitrary:
    """Any class instance: not a tensor or a plain value."""

    def __init__(self):
        self.x = 1


class RunsCommand:
    """Unpickling this would call os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def evil_payload(obj):
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": {}, "class_names": [],
            "state_dict": {}, "metadata": {"x": obj}}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = evil_payload(RunsCommand(f"touch {marker}"))
    if writer == "torch.save":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: the file holds Python objects other than tensors"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "object.pt"
    torch.save(evil_payload(Arbitrary()), path)
    with pytest.raises(CheckpointError, match=r"object\.pt: refused: .*untrusted pickle"):
        load_checkpoint(path)


def test_a_save_that_fails_midway_keeps_the_old_checkpoint_and_leaves_no_temp_file(model, saved, monkeypatch):
    before = saved.read_bytes()

    def dies_halfway(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", lambda self, data: dies_halfway(self))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, model, CLASSES)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_the_same_weights_give_the_same_file(model, tmp_path):
    """model_id and the per-node graph caches are keyed by the checkpoint's SHA-256."""
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "other-name.pt"
    save_checkpoint(first, model, CLASSES)
    save_checkpoint(second, model, CLASSES)
    assert first.read_bytes() == second.read_bytes()


def test_the_header_is_the_payload_without_tensors_and_needs_no_torch(saved):
    """The driver's reading (no torch import) against torch.load's: the same values, each
    tensor None, in a fresh interpreter that never imports torch."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from retinanet.checkpoint import read_checkpoint_header as r; "
            f"h = r({str(saved)!r}); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'rest': {k: v for k, v in h.items() "
            "if k != 'state_dict'}, 'tensors': {k: v is None for k, v in h['state_dict'].items()}}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    full = torch.load(saved, weights_only=True)
    assert out["torch"] is False
    assert out["rest"] == json.loads(json.dumps({k: v for k, v in full.items() if k != "state_dict"}))
    assert out["tensors"] == {k: True for k in full["state_dict"]}


def header_cases(saved, model, tmp_path):
    """(file, what read_checkpoint says about it) for files both readers must refuse."""
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:5000])
    bare = tmp_path / "weights.pt"
    torch.save(model.state_dict(), bare)
    future = tmp_path / "future.pt"
    payload = torch.load(saved, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, future)
    evil = tmp_path / "evil.pt"
    torch.save(evil_payload(RunsCommand(f"touch {tmp_path / 'PWNED'}")), evil)
    arbitrary = tmp_path / "object.pt"
    torch.save(evil_payload(Arbitrary()), arbitrary)
    return [tmp_path / "nope.pt", text, truncated, bare, future, evil, arbitrary]


def test_the_header_refuses_what_the_full_read_refuses_with_the_same_message(saved, model, tmp_path):
    for path in header_cases(saved, model, tmp_path):
        with pytest.raises(CheckpointError) as full:
            read_checkpoint(path)
        with pytest.raises(CheckpointError) as header:
            read_checkpoint_header(path)
        # the same reason in the same words, up to the library's own detail in parentheses
        assert str(header.value).split(" (")[0] == str(full.value).split(" (")[0], path.name
    assert not (tmp_path / "PWNED").exists()
