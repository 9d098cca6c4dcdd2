"""Running a RetinaNet fast: device, precision (bf16/fp16 autocast), memory layout, and on
CUDA pinned host memory with asynchronous copies, optional torch.compile, and a batch size
chosen from free GPU memory."""
from __future__ import annotations

import contextlib
import copy
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from retinanet.options import CPU_BATCH_SIZE, PRECISIONS

if TYPE_CHECKING:
    from retinanet.model import RetinaNet

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Without them bf16 autocast on CPU is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None meaning plain fp32.

    'auto': bf16 on CUDA devices that support it and on CPUs with bf16 matrix units, else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16_matmul() else None


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """The precision an autocast dtype stands for (None: no autocast, fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]


def fold_batch_norm(model: ModuleT) -> ModuleT:
    """A copy of an inference model with every batch norm that directly follows a
    convolution folded into that convolution's weights and bias (and replaced by Identity),
    so inference runs one op instead of two: 1.3-1.7x on the R50 trunk on CPU.

    A pair is a Conv2d child immediately followed, in registration order, by a
    FrozenBatchNorm2d or an eval-mode BatchNorm2d child of the same parent: the layout of
    torchvision's ResNet blocks (conv1, bn1, conv2, bn2, ...) and of every Sequential
    (Conv2dNormActivation). Group norm (v2 heads) is left as it is. Uses
    torch.nn.utils.fusion.fuse_conv_bn_weights; the original model is not modified.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    from torchvision.ops.misc import FrozenBatchNorm2d

    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not isinstance(conv, nn.Conv2d):
                continue
            if isinstance(bn, FrozenBatchNorm2d) or (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                mean, var = bn.running_mean, bn.running_var
                assert mean is not None and var is not None  # a batch norm tracking running stats has them
                if conv.out_channels == mean.numel():
                    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, mean, var, bn.eps, bn.weight,
                                                        bn.bias)
                    conv.weight, conv.bias = weight, bias
                    setattr(parent, bn_name, nn.Identity())
    return folded


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """Move a batch to `device`; CPU -> CUDA goes through pinned (page-locked) host memory
    with a non-blocking copy, so the host thread queues the copy and the forward's kernels
    behind it instead of waiting for the transfer. Other moves are plain `.to`."""
    if device.type == "cuda" and images.device.type == "cpu":
        if not images.is_pinned():
            images = images.pin_memory()  # from PyTorch's caching host allocator: reused across batches
        return images.to(device, non_blocking=True)
    return images.to(device)


class StagedCopies:
    """Host batches onto the device one step ahead of the forward that needs them.

    ``for images in StagedCopies(device).each(batches): model(images)`` hands over each
    batch on `device` in its own dtype (raw uint8/uint16 chips travel 4x/2x smaller than
    float32; the model normalises them there). On CUDA the copy of batch k+1 is queued on
    one side stream, through a pinned staging buffer and a non-blocking copy, before batch
    k is handed over, so it runs while batch k's forward does; the forward's stream waits
    on the copy's event before touching it. Two staging buffers alternate: a buffer is
    refilled only after the copy that last read it has finished. On the CPU the batches are
    handed over as they are (no copy, no stream): the same loop, tested there.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._buffers: list[Tensor | None] = [None, None]  # pinned, reused while chip shape and dtype stay
        self._copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer's last copy ended
        self._turn = 0

    def _pinned(self, batch: Tensor) -> tuple[Tensor, int]:
        """The batch copied into the next pinned staging buffer -> (that copy, the buffer's index)."""
        turn, self._turn = self._turn, 1 - self._turn
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # that buffer's previous copy has read it
        buffer = self._buffers[turn]
        if (buffer is None or buffer.shape[1:] != batch.shape[1:] or buffer.dtype != batch.dtype
                or len(buffer) < len(batch)):  # pinning is slow: a call's shorter last pass uses the front rows
            buffer = self._buffers[turn] = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        staged = buffer[:len(batch)]
        staged.copy_(batch)
        return staged, turn

    def _start(self, batch: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        if not self.cuda:
            return batch.to(self.device), None
        buffer, turn = self._pinned(batch)
        with torch.cuda.stream(self.stream):
            on_device = buffer.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._copied[turn] = done
        return on_device, done

    def each(self, batches):
        """Yield each host batch on the device, the next one's copy already under way."""
        pending = None
        for batch in batches:
            started = self._start(batch)
            if pending is not None:
                yield self._hand_over(*pending)
            pending = started
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, images: Tensor, done) -> Tensor:
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            images.record_stream(stream)  # allocated on the copy stream, used on this one
        return images


def detections_to_host(detections: list[dict[str, Tensor]]) -> list[dict[str, np.ndarray]]:
    """A batch's detections (the model's list of per-image dicts) as numpy arrays, through
    one device->host copy: boxes (N, 4) float32, scores (N,) float32 and labels (N,) int64
    packed into one (sum N, 6) float32 tensor, copied, and cut per image on the host (one
    synchronisation per batch instead of three per image). Labels stay exact in float32
    below 2**24 classes. The arrays equal each tensor's own ``.cpu().numpy()``."""
    counts = [len(d["boxes"]) for d in detections]
    if not detections:
        return []
    packed = torch.cat([torch.cat([d["boxes"].float(), d["scores"].float()[:, None], d["labels"].float()[:, None]],
                                  dim=1) for d in detections]).cpu().numpy()
    out = []
    for part in np.split(packed, np.cumsum(counts)[:-1]):
        out.append({"boxes": np.ascontiguousarray(part[:, :4]), "scores": np.ascontiguousarray(part[:, 4]),
                    "labels": part[:, 5].astype(np.int64)})
    return out


class Detector:
    """A RetinaNet prepared for batch inference: eval mode, device, channels_last, autocast.

    `detector(images)` takes a (B, C, H, W) float tensor on any device and returns the
    model's per-image detections (float32 boxes and scores) on that device.
    Autocast covers the backbone, FPN and heads; decoding and NMS run in float32.

    On CUDA, host batches are copied through pinned memory without blocking (see
    `to_device`) and cuDNN picks its fastest kernels for the (fixed) chip size.
    compile=True wraps the model in torch.compile; if compiling or running the compiled
    model fails, the detector warns once and runs eagerly from then on (an input the eager
    model rejects too still raises its own error). `compiled` says which one is in use.
    """

    def __init__(self, model: nn.Module, device: str = "auto", precision: str = "auto",
                 channels_last: bool = True, compile: bool = False):
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed chip sizes: tune once per shape, then reuse
        self._compiled = None
        if compile:
            try:
                self._compiled = torch.compile(self.model)
            except Exception as err:  # noqa: BLE001 - e.g. an unsupported platform: eager still works
                self._fall_back(err)

    @property
    def precision(self) -> str:
        return precision_name(self.autocast_dtype)

    @property
    def compiled(self) -> bool:
        """True while the torch.compile'd model is the one being run."""
        return self._compiled is not None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _fall_back(self, err: Exception) -> None:
        self._compiled = None
        first_line = (str(err).splitlines() or [""])[0]
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {first_line}); running the model eagerly",
                      RuntimeWarning, stacklevel=3)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> list[dict[str, Tensor]]:
        images = to_device(images, self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if self._compiled is None:
                return self.model(images)
            try:
                return self._compiled(images)
            except Exception as err:  # noqa: BLE001 - decide below whether compile or the input is at fault
                detections = self.model(images)  # raises the input's own error if eager fails too
                self._fall_back(err)
                return detections


def batch_size_for_memory(free_bytes: int, fixed_bytes: float, per_chip_bytes: float,
                          fraction: float = 0.8, max_batch: int = 256) -> int:
    """Largest batch whose estimated peak fits in `fraction` of `free_bytes`, in [1, max_batch].

    peak(batch) = fixed_bytes + batch * per_chip_bytes. Example: 80 GB free, fraction 0.8,
    fixed 1 GB, 0.5 GB per chip -> (64 - 1) / 0.5 = 126 chips.
    """
    if per_chip_bytes <= 0:
        return max_batch
    fits = int((free_bytes * fraction - max(fixed_bytes, 0.0)) // per_chip_bytes)
    return max(1, min(max_batch, fits))


def _peak_bytes(detector: Detector, batch: int, chip_size: int, in_channels: int) -> int:
    """Peak CUDA memory allocated beyond the current allocation while detecting one batch of zeros."""
    device = detector.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    detector(torch.zeros(batch, in_channels, chip_size, chip_size, device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_batch_size(model: RetinaNet, chip_size: int, device: str = "auto", precision: str = "auto",
                    fraction: float = 0.8, max_batch: int = 256) -> int:
    """A batch size for `model` on `device`, for square chips of `chip_size` pixels.

    CPU: CPU_BATCH_SIZE. CUDA: two probe batches (2 and 4 chips) give the memory per chip
    and the fixed part (cuDNN workspaces, postprocessing), and the batch is the largest that
    fits in `fraction` of the memory torch.cuda.mem_get_info reports free (see
    `batch_size_for_memory`). Leaves `model` on `device`, in eval mode.
    """
    detector = Detector(model, device=device, precision=precision)
    if detector.device.type != "cuda":
        return CPU_BATCH_SIZE
    in_channels = model.config.in_channels
    _peak_bytes(detector, 1, chip_size, in_channels)  # warm-up: cuDNN autotuning allocates workspaces
    small, large = _peak_bytes(detector, 2, chip_size, in_channels), _peak_bytes(detector, 4, chip_size, in_channels)
    per_chip = max(large - small, 1) / 2
    fixed = small - 2 * per_chip
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(detector.device)
    return batch_size_for_memory(free, fixed, per_chip, fraction, max_batch)
