"""Inference precision on the local CPU: a checkpoint's MAE and speed in fp32 and in bf16, in one run.

    python benchmarks/precision.py --checkpoint runs/train/best --prepared runs/prepared [--split val]

The predictor runs bf16 by default where the CPU has it natively (AVX512-BF16 or AMX), if that keeps
MAE within 0.05 years of fp32: this prints what decides it. For each precision: MAE on the split's
faces (decoded from their files by the shared preprocessing), the mean and largest change of an age
against fp32, and images/s of ``Predictor.predict_arrays`` (frozen graph, the checkpoint's flip TTA,
chunk size timed as usual) in one process with the default torch threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from agecore.images import load_image
from agecore.predictor import Predictor, native_bf16
from agecore.prepare import split_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prepared", required=True, help="a prepared folder (age prepare --out)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="first N faces of the split only")
    args = p.parse_args()

    rows = pd.read_parquet(split_dir(args.prepared, args.split), columns=["path", "age"]).iloc[: args.limit]
    fp32 = Predictor(args.checkpoint, "cpu", precision="fp32")
    size, interp = fp32.prep.input_size, fp32.prep.interpolation
    start = time.perf_counter()
    arrays = np.stack([load_image(x, size, interp) for x in rows["path"]])
    print(f"decoded {len(arrays)} faces of {args.prepared} ({args.split}) in {time.perf_counter() - start:.1f} s")
    caps = torch.cpu
    print(f"CPU: AVX512-BF16 {caps._is_avx512_bf16_supported()}, AMX {caps._is_amx_tile_supported()}; "
          f"the predictor's default here: {'bf16' if native_bf16(torch.device('cpu')) else 'fp32'}; "
          f"torch threads {torch.get_num_threads()}")

    truth = rows["age"].to_numpy(np.float32)
    ages = {}
    print("| precision | MAE | mean abs change vs fp32 | largest change | images/s | chunk |")
    print("|---|---:|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        predictor = fp32 if precision == "fp32" else Predictor(args.checkpoint, "cpu", precision=precision)
        predictor.predict_arrays(arrays[:32])  # warm-up
        start = time.perf_counter()
        ages[precision] = predictor.predict_arrays(arrays)
        rate = len(arrays) / (time.perf_counter() - start)
        change = np.abs(ages[precision] - ages["fp32"])
        print(f"| {precision} | {np.abs(ages[precision] - truth).mean():.4f} | {change.mean():.4f} | "
              f"{change.max():.3f} | {rate:.1f} | {predictor.batch_size} |")
    delta = np.abs(ages["bf16"] - truth).mean() - np.abs(ages["fp32"] - truth).mean()
    print(f"\nbf16 MAE - fp32 MAE: {delta:+.4f} years (bound: 0.05)")


if __name__ == "__main__":
    main()
