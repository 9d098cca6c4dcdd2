"""Detector's fast-path helpers that can be checked on a CPU: torch.compile fallback,
host-to-device moves, batch size from free memory, and the pipeline's batch size choice."""
from __future__ import annotations

import warnings

import pytest
import torch

from retinanet import Detector, build_model
from retinanet.runtime import CPU_BATCH_SIZE, auto_batch_size, batch_size_for_memory, to_device


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(num_classes=2, backbone="resnet18", head_width=16, head_depth=1,
                       image_mean=(128.0,) * 3, image_std=(64.0,) * 3, prior_probability=0.3)


@pytest.fixture()
def images():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 255


def broken_compile(model, *args, **kwargs):
    """Stands in for torch.compile: wraps fine, fails when the compiled model is called."""
    def run(*a, **k):
        raise RuntimeError("backend compiler failed\nlong inductor log")
    return run


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels")) and len(a) == len(b)


def test_compiled_model_that_fails_falls_back_to_eager_once(tiny_model, images, monkeypatch):
    eager = Detector(tiny_model, device="cpu", precision="fp32")(images)
    monkeypatch.setattr(torch, "compile", broken_compile)
    detector = Detector(tiny_model, device="cpu", precision="fp32", compile=True)
    assert detector.compiled
    with pytest.warns(RuntimeWarning, match="torch.compile failed \\(RuntimeError: backend compiler failed\\)"):
        first = detector(images)
    assert not detector.compiled and same(first, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: eager from now on
        assert same(detector(images), eager)


def test_compile_that_fails_to_wrap_runs_eagerly(tiny_model, images, monkeypatch):
    def refuse(model, *a, **k):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="not supported on this platform"):
        detector = Detector(tiny_model, device="cpu", precision="fp32", compile=True)
    assert not detector.compiled
    assert same(detector(images), Detector(tiny_model, device="cpu", precision="fp32")(images))


def test_compile_fallback_does_not_hide_an_input_error(tiny_model, monkeypatch):
    monkeypatch.setattr(torch, "compile", broken_compile)
    detector = Detector(tiny_model, device="cpu", precision="fp32", compile=True)
    with pytest.raises(ValueError, match="model expects 3 bands"):
        detector(torch.zeros(1, 4, 64, 64))
    assert detector.compiled, "a bad input is no reason to give up the compiled model"


def test_compile_off_by_default(tiny_model):
    assert not Detector(tiny_model, device="cpu").compiled


def test_to_device_on_cpu_moves_nothing():
    x = torch.rand(2, 3, 8, 8)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.parametrize("free, fixed, per_chip, fraction, cap, expected", [
    (80e9, 1e9, 0.5e9, 0.8, 256, 126),   # (64 GB - 1 GB) / 0.5 GB
    (80e9, 1e9, 0.5e9, 0.8, 64, 64),     # capped
    (2e9, 1.5e9, 0.5e9, 0.8, 256, 1),    # 1.6 GB usable < fixed + one chip: still 1
    (10e9, 0.0, 1e9, 0.5, 256, 5),       # 5 GB / 1 GB
    (10e9, 1e9, 0.0, 0.8, 32, 32),       # no per-chip growth measured: the cap
])
def test_batch_size_for_memory(free, fixed, per_chip, fraction, cap, expected):
    assert batch_size_for_memory(int(free), fixed, per_chip, fraction, cap) == expected


def test_auto_batch_size_on_cpu(tiny_model):
    assert auto_batch_size(tiny_model, 256, device="cpu") == CPU_BATCH_SIZE


def test_resolve_batch_size(tmp_path, ray_session):
    from pipeline.predictor import resolve_batch_size
    from pipeline.spec import ModelSpec
    from pipeline.synth import SYNTH_CLASSES
    from retinanet import save_checkpoint

    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", head_width=16, head_depth=1)
    save_checkpoint(tmp_path / "m.pt", model, list(SYNTH_CLASSES))
    given = ModelSpec(checkpoint=str(tmp_path / "m.pt"), batch_size=3)
    assert resolve_batch_size(given, 256, gpus_per_actor=1) == 3
    auto = ModelSpec(checkpoint=str(tmp_path / "m.pt"), batch_size=None)
    assert resolve_batch_size(auto, 256, gpus_per_actor=0) == CPU_BATCH_SIZE
    # A logical GPU without CUDA behind it: the probe task runs and reports the CPU size.
    assert resolve_batch_size(auto, 256, gpus_per_actor=1) == CPU_BATCH_SIZE
