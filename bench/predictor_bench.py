"""Host-side cost of one predictor batch: what the actor does around the model's forward.

    python bench/predictor_bench.py [--chips 64] [--chip 512] [--reps 9]

A GPU predictor's forward of 64 RGB chips of 512² took ~0.13 s on one H200 (BENCHMARKS.md,
"One H200"), and the actor's host work runs between forwards: every millisecond of it is
a millisecond the GPU waits. This times that work on one block as a read task makes it
(pixels as a binary column of raw bytes, a bit-packed valid mask per chip), with 100
detections per chip to check against the mask:

  reference: Ray Data's numpy batch (each chip's bytes copied into a Python bytes object),
             numpy.stack, each chip's mask unpacked to H x W bools, the centres looked up;
  ours:      the Arrow block's buffers viewed in place (pipeline.infer.predictor.chip_batch_columns),
             numpy.stack, each centre's bit read from the packed mask.

Both variants run round-robin in this process, each call on a block of its own; medians
are printed with the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_block(n: int, chip: int, seed: int = 0):
    from ray.data.block import BlockAccessor

    rng = np.random.default_rng(seed)
    valid = np.ones((n, chip, chip), dtype=bool)
    valid[:, :, chip - chip // 5:] = False  # edge chips: a strip of padding
    batch = {"chip_id": np.array([f"s/r0c{i}" for i in range(n)], dtype=object),
             "pixels": np.array([rng.integers(0, 255, 3 * chip * chip, dtype=np.uint8).tobytes() for _ in range(n)],
                                dtype=object),
             "pixel_dtype": np.array(["uint8"] * n, dtype=object),
             "valid": np.packbits(valid, axis=-1)}
    return BlockAccessor.batch_to_block(batch)


def reference(block, chip: int, boxes: np.ndarray) -> tuple[tuple, int]:
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    pixels = np.stack([np.frombuffer(b, np.uint8).reshape(-1, chip, chip) for b in batch["pixels"]])
    kept = 0
    for packed in batch["valid"]:
        valid = np.unpackbits(packed, axis=-1, count=chip).astype(bool)
        cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, chip - 1)
        cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, chip - 1)
        kept += int(valid[cy, cx].sum())
    return pixels.shape, kept


def ours(block, chip: int, boxes: np.ndarray) -> tuple[tuple, int]:
    from pipeline.infer.predictor import centres_on_valid_pixels, chip_batch_columns, stack_chip_pixels

    batch = chip_batch_columns(block)
    pixels = stack_chip_pixels(batch["pixels"], list(batch["pixel_dtype"]), chip)
    kept = sum(int(centres_on_valid_pixels(boxes, packed, chip).sum()) for packed in batch["valid"])
    return pixels.shape, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", type=int, default=64)
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    # A fresh block for every call, as each batch reaches the actor in new memory: a block
    # used twice would time warm caches and reused allocations.
    blocks = [make_block(args.chips, args.chip, seed) for seed in range(2 * args.reps + 1)]
    block = blocks.pop()
    corners = np.random.default_rng(1).uniform(0, args.chip, (100, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)
    assert reference(block, args.chip, boxes) == ours(block, args.chip, boxes)  # the same pixels' shape, centres kept
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for _ in range(args.reps):
        for name, fn in (("reference", reference), ("ours", ours)):
            block = blocks.pop()
            start = time.perf_counter()
            fn(block, args.chip, boxes)
            times[name].append(time.perf_counter() - start)
    ref, new = (statistics.median(times[k]) * 1e3 for k in ("reference", "ours"))
    print(f"one block of {args.chips} chips of {args.chip}² (uint8 RGB), 100 detections per chip, "
          f"median of {args.reps}:")
    print(f"  reference (Ray's numpy batch, unpacked masks): {ref:7.1f} ms")
    print(f"  ours (Arrow views, packed-bit lookups):        {new:7.1f} ms")
    print(f"  ratio ours / reference: {new / ref:.2f}")


if __name__ == "__main__":
    main()
