"""Runtime: precision resolution, device choice, the Detector (bf16 agrees with fp32), and its
fast-path helpers that can be checked on a CPU: torch.compile fallback, host-to-device moves,
batch size from free memory, and the pipeline's batch size choice."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from retinanet import Detector, build_model, runtime
from retinanet.boxes import pairwise_iou
from retinanet.options import CPU_BATCH_SIZE
from retinanet.runtime import (
    auto_batch_size,
    batch_size_for_memory,
    resolve_device,
    resolve_precision,
    to_device,
)


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
    return (all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))
            and len(a) == len(b))


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
    from pipeline.config.spec import ModelSpec
    from pipeline.infer.predictor import resolve_batch_size
    from pipeline.tools.synth import SYNTH_CLASSES
    from retinanet import save_checkpoint

    model = build_model(num_classes=len(SYNTH_CLASSES), backbone="resnet18", head_width=16, head_depth=1)
    save_checkpoint(tmp_path / "m.pt", model, list(SYNTH_CLASSES))
    given = ModelSpec(checkpoint=str(tmp_path / "m.pt"), batch_size=3)
    assert resolve_batch_size(given, 256, gpus_per_actor=1) == 3
    auto = ModelSpec(checkpoint=str(tmp_path / "m.pt"), batch_size=None)
    assert resolve_batch_size(auto, 256, gpus_per_actor=0) == CPU_BATCH_SIZE
    # A logical GPU without CUDA behind it: the probe task runs and reports the CPU size.
    assert resolve_batch_size(auto, 256, gpus_per_actor=1) == CPU_BATCH_SIZE


# -- precision, device and bf16 agreement --------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_explicit_precisions():
    for device in (CPU, CUDA):
        assert resolve_precision("fp32", device) is None
        assert resolve_precision("bf16", device) is torch.bfloat16
        assert resolve_precision("fp16", device) is torch.float16


def test_auto_on_cpu_follows_bf16_matrix_units(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: True)
    assert resolve_precision("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    assert resolve_precision("auto", CPU) is None


def test_auto_on_cuda_prefers_bf16_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) is torch.float16


def test_unknown_precision_lists_choices():
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'bf16', 'fp16'\), got 'int8'"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx512f avx512_bf16 amx_tile", True),
    ("fpu sse avx512f amx_bf16 amx_tile", True),
    ("fpu sse avx2 avx512f avx512_vnni", False),
    (None, False),
])
def test_cpu_flag_detection(monkeypatch, flags, expected):
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if flags is None:
            raise OSError("no /proc here")
        return io.StringIO(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)
    assert runtime.cpu_has_bf16_matmul.__wrapped__() is expected


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (CUDA if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested but torch sees no CUDA device"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def spread_model():
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone="resnet18", head_width=64, head_depth=2, fpn_channels=64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # spread scores (the default init ties them), but keep box deltas small (std ~0.2, like a
        # trained model) rather than random boxes many times the anchor size that all overlap:
        # then NMS among them is chaotic and any rounding reshuffles which boxes survive
        for head in (model.cls_head, model.box_head):
            for p in head.parameters():
                if p.ndim == 4:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.04)
        model.box_head.predictor.weight.mul_(0.005 / 0.04)
    return model.eval()


@pytest.fixture(scope="module")
def images192():
    return torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(3))


def test_fp32_detector_matches_plain_model(spread_model, images192):
    with torch.no_grad():
        expected = spread_model(images192)
    detector = Detector(spread_model, device="cpu", precision="fp32")
    assert detector.precision == "fp32" and detector.autocast_dtype is None
    assert detector.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = detector(images192)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 10
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(g["labels"], e["labels"])


def test_bf16_detections_agree_with_fp32(spread_model, images192):
    fp32 = Detector(spread_model, device="cpu", precision="fp32")(images192)
    bf16_detector = Detector(spread_model, device="cpu", precision="bf16")
    assert bf16_detector.precision == "bf16"
    seen_dtypes = []
    hook = bf16_detector.model.cls_head.predictor.register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    try:
        bf16 = bf16_detector(images192)
    finally:
        hook.remove()
    assert seen_dtypes == [torch.bfloat16] * 5  # the head ran under autocast on all five levels
    matched = total = 0
    for a, b in zip(fp32, bf16):
        assert b["boxes"].dtype == torch.float32 and b["scores"].dtype == torch.float32
        confident = a["scores"] > 0.3
        if not confident.any():
            continue
        iou = pairwise_iou(a["boxes"][confident], b["boxes"])          # (n_fp32, n_bf16)
        same_label = a["labels"][confident][:, None] == b["labels"][None, :]
        matched += int(((iou > 0.9) & same_label).any(dim=1).sum())
        total += int(confident.sum())
    assert total >= 20
    assert matched >= 0.9 * total, f"{matched}/{total} fp32 detections found again in bf16"


@pytest.mark.parametrize("actors, cpus_per_actor, cluster_cpus, expected", [
    (1, 1.0, 16.0, 15),   # one GPU actor on a 16-core node: every spare core reads
    (2, 1.0, 2.0, 2),     # CPU actors holding every core: one read per actor (no CPU slot, see run_job)
    (1, 2.0, 2.0, 1),
    (4, 2.0, 64.0, 56),
    (8, 1.0, 8.0, 8),
])
def test_default_read_tasks(actors, cpus_per_actor, cluster_cpus, expected):
    from pipeline.run.graph import default_read_tasks

    assert default_read_tasks(actors, cpus_per_actor, cluster_cpus) == expected


def test_in_flight_bytes_counts_pixels_and_packed_masks():
    from pipeline.run.graph import in_flight_bytes

    assert in_flight_bytes(4, 1, 4, 3, 512, 1) == 16 * (786432 + 32768)
    # uint16 bands cost twice the pixels; a chip width not divisible by 8 rounds its mask rows up
    assert in_flight_bytes(1, 1, 1, 4, 100, 2) == 4 * 100 * 100 * 2 + 100 * 13


@pytest.mark.parametrize("batch_size, n_chips, actors, parallel, expected", [
    (1, 10000, 2, 1, 8),    # CPU: one chip per forward, eight per Ray call
    (64, 10000, 2, 1, 64),  # GPU batches are already large
    (1, 18, 2, 1, 3),       # a small job still spreads over both actors
    (4, 18, 2, 1, 4),
    (1, 0, 1, 1, 1),
    (1, 10000, 1, 2, 8),    # two OpenVINO streams: eight chips keep both busy
    (1, 10000, 1, 16, 16),  # a 16-CPU actor may run 16 streams: a chip for each
    (2, 10000, 1, 16, 32),
    (1, 40, 1, 16, 16),     # a small job: whole rounds still (four calls of 10 would idle 6 streams)
    (1, 25, 1, 2, 8),       # 7 would end each run with one of two streams idle
    (4, 22, 1, 1, 8),       # whole forward passes: not 6 (a pass of 4, then one of 2)
])
def test_transport_batch(batch_size, n_chips, actors, parallel, expected):
    from pipeline.run.graph import transport_batch

    assert transport_batch(batch_size, n_chips, actors, parallel) == expected


def test_chips_of_several_dtypes_stack_without_losing_values():
    """Chips travel as raw bytes in their file's dtype; a batch that mixes scenes of two
    dtypes stacks into the dtype that holds both, every value intact (Ray Data's own
    tensor columns would cast uint16 chips into a uint8 batch)."""
    from pipeline.infer.predictor import stack_chip_pixels

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    wide = rng.integers(0, 65536, (3, 8, 8), dtype=np.uint16)
    real = rng.normal(size=(3, 8, 8)).astype(np.float32)
    stacked = stack_chip_pixels([small.tobytes(), wide.tobytes()], ["uint8", "uint16"], 8)
    assert stacked.dtype == np.uint16 and stacked.shape == (2, 3, 8, 8)
    assert np.array_equal(stacked[0], small) and np.array_equal(stacked[1], wide)
    assert stack_chip_pixels([small.tobytes()], ["uint8"], 8).dtype == np.uint8
    mixed = stack_chip_pixels([wide.tobytes(), real.tobytes()], ["uint16", "float32"], 8)
    assert mixed.dtype == np.float32 and np.array_equal(mixed[0], wide) and np.array_equal(mixed[1], real)


def test_head_blocks_hold_whole_runs_of_chips():
    from pipeline.run.graph import head_blocks

    # never a block of 9 (a run of 8 and a run of 1) nor one under a run (it would wait)
    assert head_blocks(50, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 50)]
    assert head_blocks(8, 8) == [(0, 8)] and head_blocks(5, 8) == [(0, 5)]
    assert head_blocks(16, 8) == [(0, 8), (8, 16)]
    blocks = head_blocks(20000, 8)  # 2,500 runs in at most 1,000 blocks: 3 runs a block
    assert len(blocks) <= 1000 and {stop - start for start, stop in blocks[:-1]} == {24}
    assert blocks[0][0] == 0 and blocks[-1][1] == 20000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert len(head_blocks(8000, 8, max_blocks=1000)) == 1000
    assert {stop - start for start, stop in head_blocks(8001, 8, max_blocks=1000)[:-1]} == {16}
