"""Throughput of the pieces the CPU paths are built from, EfficientNet-Lite0 at 224 px, on the local CPU.

    python benchmarks/cpu_paths.py [--threads 2]

Prints images/s of (1) the lower stages (blocks 0-4) eager, frozen TorchScript at batch 16 and 32,
and bf16 autocast; (2) one training step of the upper part (blocks 5-6, head) on cached activations,
contiguous against channels_last, for cuts after stage 5 and 6. These figures chose the defaults:
frozen TorchScript for the feature cache, channels_last for training, cut after stage 5.
"""

from __future__ import annotations

import argparse
import time

import torch

from agecore.config import ModelConfig
from agecore.model import create_model, split_model


def rate(fn, batch: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        fn(batch)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(batch)
    return len(batch) * repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained="none")).eval()
    lower, _ = split_model(model, 5)
    lower = lower.eval().to(memory_format=torch.channels_last)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    print("| lower stages (cache) | images/s |\n|---|---:|")
    print(f"| eager, batch 32 | {rate(lower, images(32), 3):.1f} |")
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(lower, images(16)))
    print(f"| frozen TorchScript, batch 16 | {rate(frozen, images(16), 5):.1f} |")
    print(f"| frozen TorchScript, batch 32 | {rate(frozen, images(32), 3):.1f} |")

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lower(x)

    print(f"| eager bf16 autocast, batch 32 | {rate(bf16, images(32), 2):.1f} |")

    print("\n| upper part training step, batch 64 | images/s |\n|---|---:|")
    for cut in (5, 6):
        low, up = split_model(model, cut)
        with torch.no_grad():
            feats = low.eval()(torch.randn(64, 3, 224, 224))
        optimizer = torch.optim.AdamW(up.parameters(), 1e-4)
        up.train()
        for channels_last in (False, True):
            x = feats.contiguous(memory_format=torch.channels_last) if channels_last else feats.contiguous()
            net = up.to(memory_format=torch.channels_last) if channels_last else up
            start = time.perf_counter()
            for _ in range(3):
                loss = net(x).abs().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            layout = "channels_last" if channels_last else "contiguous"
            print(f"| cut after stage {cut} {tuple(feats.shape[1:])}, {layout} | {64 * 3 / (time.perf_counter() - start):.1f} |")


if __name__ == "__main__":
    main()
