"""Benchmark: overlapped chip extraction vs one block-aligned pass over the same COG.

    python bench/tiling_bench.py                      # 4096^2 RGB uint8, chips 512/64
    python bench/tiling_bench.py --size 8192 --write bench/RESULTS_tiling.md

A synthetic scene (pipeline.tools.synth) is converted to real COGs with GDAL's COG driver:
GDAL's defaults (512-px tiles) with DEFLATE + predictor, the most common COG flavour;
512-px JPEG tiles, as aerial RGB is usually served; and 256-px ZSTD tiles (the layout
pipeline.tools.synth writes). When the shared real data is present, a real 2048^2 aerial
image is measured too (GDAL's COG defaults): real imagery costs more to decode than the
smooth synthetic texture, which is where the block cache pays. Then, per COG, in this run:

  block pass   every internal tile read once with rasterio (``block_windows``): the
               floor cost of decoding the scene, no overlap, no conversion (uint8);
  block f32    the same pass converting to float32, the dtype chips are delivered in;
  chips        ``pipeline.chips.tiling.iter_chips``: overlapped 512-px chips (stride 448),
               row-major, float32, padding and validity mask included;
  chips native the same with ``dtype=None`` (uint8 chips, converted where the model runs);
  chips batch  the float32 extraction read into a reused batch buffer (``out=``), as a
               model feeder fills its batch;
  no cache     each extraction again in a child process with ``GDAL_CACHEMAX=0``, so
               every tile shared by neighbouring chips is decoded again.

Figures are chips/s (a pass as the chips/s at which the same chip count would come out
if reading cost no more than that pass). Targets: chips >= 0.8x the block pass and
>= 3x the no-cache extraction. Variants are timed round-robin (one run of each per
repetition) so a noisy neighbour slows all of them alike; the figure is the median.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.chips.tiling import iter_chips, plan_chips, read_chip  # noqa: E402
from pipeline.io.raster import open_raster  # noqa: E402
from pipeline.tools.synth import synthesize  # noqa: E402

CHILD = """
import sys, time
from pipeline.chips.tiling import iter_chips
path, chip, overlap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dtype = None if sys.argv[4] == "native" else sys.argv[4]
start = time.perf_counter()
n = sum(1 for _ in iter_chips(path, chip, overlap, [1, 2, 3], 0.0, dtype=dtype))
print(n, time.perf_counter() - start)
"""

DEFAULT_LAYOUT = "COG defaults (512-px tiles), DEFLATE + predictor"
LAYOUTS = {
    DEFAULT_LAYOUT: dict(compress="DEFLATE", predictor=2),
    "512-px tiles, JPEG (aerial RGB)": dict(compress="JPEG", quality=90),
    "256-px tiles, ZSTD (pipeline synth layout)": dict(compress="ZSTD", blocksize=256),
}


# A real aerial image (DeepForest test data, 2048^2 RGB) as a decode-heavier second
# source; used when the shared real data is present.
REAL_SCENE = Path(os.environ.get("PIPELINE_REAL_DATA") or REPO.parent / "shared/data/real"
                  ) / "5b90f92da0d7280005fab355_4310.tif"


def make_cog(scene: Path, out: Path, options: dict) -> Path:
    """Copy a scene to a COG with GDAL's COG driver (overviews included)."""
    rasterio.shutil.copy(scene, out, driver="COG", overview_resampling="average", **options)
    return out


def block_pass(path: Path, dtype: str | None = None) -> float:
    """Seconds to read every tile once, all bands (optionally converting to ``dtype``)."""
    start = time.perf_counter()
    with rasterio.open(path) as ds:
        for _, window in ds.block_windows(1):
            ds.read(window=window, out_dtype=dtype)
    return time.perf_counter() - start


def chip_pass(path: Path, chip: int, overlap: int, dtype: str | None) -> tuple[int, float]:
    """(chips, seconds) of iter_chips in this process."""
    start = time.perf_counter()
    n = sum(1 for _ in iter_chips(path, chip, overlap, [1, 2, 3], 0.0, dtype=dtype))
    return n, time.perf_counter() - start


def chip_pass_batch(path: Path, chip: int, overlap: int, buffer: np.ndarray) -> tuple[int, float]:
    """(chips, seconds) of the same extraction read into a reused float32 batch (``out=``),
    as a model feeder would: no fresh 3 MB array (and its page faults) per chip. The
    buffer (B, 3, chip, chip) is allocated once per job, outside the timing."""
    start = time.perf_counter()
    plan = plan_chips(path, chip, overlap, 0.0)
    with open_raster(path) as dataset:
        for k, window in enumerate(plan.windows):
            read_chip(dataset, window, [1, 2, 3], chip, scene=plan.scene,
                      out=buffer[k % len(buffer)])
    return len(plan.windows), time.perf_counter() - start


def chip_pass_no_cache(path: Path, chip: int, overlap: int, dtype: str | None) -> tuple[int, float]:
    """(chips, seconds) of iter_chips in a child with the GDAL block cache disabled."""
    env = dict(os.environ, GDAL_CACHEMAX="0")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(chip), str(overlap),
                          dtype or "native"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    n, seconds = out.stdout.split()
    return int(n), float(seconds)


def measure(cog: Path, chip: int, overlap: int, repeat: int) -> dict:
    """Median seconds of each variant on one COG, timed round-robin."""
    buffer = np.ones((16, 3, chip, chip), dtype=np.float32)  # a model batch, touched once
    variants = {
        "block": lambda: (None, block_pass(cog)),
        "block_f32": lambda: (None, block_pass(cog, "float32")),
        "chips": lambda: chip_pass(cog, chip, overlap, "float32"),
        "chips_native": lambda: chip_pass(cog, chip, overlap, None),
        "chips_batch": lambda: chip_pass_batch(cog, chip, overlap, buffer),
        "no_cache": lambda: chip_pass_no_cache(cog, chip, overlap, "float32"),
        "no_cache_native": lambda: chip_pass_no_cache(cog, chip, overlap, None),
    }
    block_pass(cog)  # warm the OS page cache: every variant then reads from memory
    times: dict[str, list[float]] = {k: [] for k in variants}
    counts = set()
    for _ in range(repeat):
        for name, run in variants.items():
            n, seconds = run()
            times[name].append(seconds)
            if n is not None:
                counts.add(n)
    assert len(counts) == 1, counts
    result = {k: statistics.median(v) for k, v in times.items()}
    result.update(n_chips=counts.pop(), mb=cog.stat().st_size / 1e6)
    return result


def report(results: dict, args) -> str:
    stride = args.chip - args.overlap
    lines = [
        "## Tiling",
        "",
        f"`python bench/tiling_bench.py --size {args.size} --repeat {args.repeat}` on "
        f"{platform.machine()} ({os.cpu_count()} cores, shared with other jobs), rasterio "
        f"{rasterio.__version__} / GDAL {rasterio.__gdal_version__}; median of "
        f"{args.repeat} round-robin repetitions, files in the OS page cache.",
        "",
        f"Scenes: synthetic {args.size}x{args.size} RGB uint8 (`pipeline synth`) and, when "
        "the shared real data is present, a real 2048x2048 aerial RGB image, copied to COGs "
        f"with GDAL's COG driver. Chips {args.chip} px, overlap {args.overlap} (stride "
        f"{stride}); ratio = chips/s relative to the uint8 block pass of the same COG.",
        "",
        "| COG | variant | seconds | chips/s | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    verdicts = []
    for name, r in results.items():
        n = r["n_chips"]
        rows = [("block-aligned single pass, uint8 (reference)", "block"),
                ("block-aligned single pass, float32", "block_f32"),
                (f"iter_chips, {n} chips, float32", "chips"),
                (f"iter_chips, {n} chips, native uint8 (`dtype=None`)", "chips_native"),
                ("read_chip into a reused float32 batch (`out=`)", "chips_batch"),
                ("iter_chips, float32, GDAL_CACHEMAX=0", "no_cache"),
                ("iter_chips, native uint8, GDAL_CACHEMAX=0", "no_cache_native")]
        for i, (label, key) in enumerate(rows):
            cog = f"{name}, {r['mb']:.1f} MB" if i == 0 else ""
            lines.append(f"| {cog} | {label} | {r[key]:.3f} | {n / r[key]:.0f} "
                         f"| {r['block'] / r[key]:.2f} |")
        f32, native = r["block"] / r["chips"], r["block"] / r["chips_native"]
        batch = r["block"] / r["chips_batch"]
        f32_same = r["block_f32"] / r["chips"]
        cache = r["no_cache"] / r["chips"]
        cache_native = r["no_cache_native"] / r["chips_native"]
        verdicts.append(
            f"- {name}: vs the block pass (target >= 0.8): float32 chips {f32:.2f}x "
            f"({f32_same:.2f}x the float32 pass), float32 into a batch {batch:.2f}x, native "
            f"chips {native:.2f}x. Block cache "
            f"on vs GDAL_CACHEMAX=0 (target >= 3): float32 {cache:.2f}x, native "
            f"{cache_native:.2f}x.")
    return "\n".join(lines + [""] + verdicts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="scene side, pixels")
    parser.add_argument("--chip", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--write", type=Path, default=None, help="write the markdown here")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (scene,) = synthesize(Path(tmp) / "src", scenes=1, size=args.size, seed=0)
        for i, (name, options) in enumerate(LAYOUTS.items()):
            cog = make_cog(scene, Path(tmp) / f"cog_{i}.tif", options)
            results[f"synthetic {args.size}², {name}"] = measure(cog, args.chip, args.overlap,
                                                                 args.repeat)
        if REAL_SCENE.exists():
            cog = make_cog(REAL_SCENE, Path(tmp) / "real_cog.tif", LAYOUTS[DEFAULT_LAYOUT])
            results[f"real aerial 2048² ({REAL_SCENE.name}), {DEFAULT_LAYOUT}"] = measure(
                cog, args.chip, args.overlap, args.repeat)
    text = report(results, args)
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
