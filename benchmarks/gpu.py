"""GPU figures of the library path that Ray Train workers and scoring actors run, on one GPU (no Ray needed).

    python benchmarks/gpu.py [--backbone resnet50] [--checkpoint runs/train/best --faces DIR]

1. full fine-tuning: images/s of ``agecore.training.train_epoch`` over uint8 batches in host memory
   (what ``iter_torch_batches`` hands a worker), with augmentation on the GPU, bf16 autocast and
   channels_last, at 224 px; beside it, images/s of the same augmentation on one CPU thread, the
   rate it would cap training at if it ran where the batch arrives;
2. inference: images/s of ``Predictor.predict_arrays`` (flip TTA, so two forward passes) in bf16 and fp32;
3. with ``--checkpoint`` and ``--faces`` (a folder with labels.csv + final_files/): the checkpoint's MAE
   on those faces through the predictor, CPU fp32 against GPU fp32 and GPU bf16 (the GPU default),
   and its inference rate in both precisions.

The backbone starts from random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecore.augment import augment
from agecore.checkpoint import save_checkpoint
from agecore.config import ModelConfig, TrainConfig
from agecore.images import load_image
from agecore.model import create_model, default_preprocessing, trainable_module
from agecore.predictor import Predictor
from agecore.training import Schedule, batch_inputs, loss_fn, make_optimizer, train_epoch


def host_batches(n: int, batch: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).pin_memory()
    ages = (torch.rand(batch, generator=g) * 90 + 1).pin_memory()
    for _ in range(n):
        yield {"image": images, "age": ages}


def train_rate(backbone: str, batch: int, steps: int, size: int = 224) -> float:
    device = torch.device("cuda")
    model_cfg = ModelConfig(backbone=backbone, pretrained="none")
    prep = default_preprocessing(backbone)
    cfg = TrainConfig(mode="finetune", batch_size=batch)
    model = create_model(model_cfg).to(device, memory_format=torch.channels_last)
    module = trainable_module(model, "finetune", None)
    optimizer = make_optimizer(module, cfg)
    schedule = Schedule(optimizer, cfg, steps)
    generator = torch.Generator().manual_seed(0)

    def inputs(b):
        return batch_inputs(b, "finetune", prep, True, cfg, generator, device)

    args = (optimizer, schedule, loss_fn("l1"), inputs, device, True)
    train_epoch(module, host_batches(5, batch, size), *args)  # warm-up: cuDNN picks its kernels
    torch.cuda.synchronize()
    result = train_epoch(module, host_batches(steps, batch, size), *args)
    torch.cuda.synchronize()
    return result.count / result.seconds


def cpu_augment_rate(batch: int, size: int = 224) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = next(host_batches(1, batch, size))["image"]
    cfg, g = TrainConfig(), torch.Generator().manual_seed(0)
    augment(images, cfg, g)
    start = time.perf_counter()
    for _ in range(3):
        augment(images, cfg, g)
    rate = 3 * batch / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def infer_rate(predictor: Predictor, arrays: np.ndarray, repeats: int = 3) -> float:
    predictor.predict_arrays(arrays[: predictor.batch_size])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_arrays(arrays)
    torch.cuda.synchronize()
    return repeats * len(arrays) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint for the precision check")
    p.add_argument("--faces", default=None, help="labels.csv + final_files/ to measure its MAE on")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    rate = train_rate(args.backbone, args.batch_size, args.steps)
    print(f"train  {args.backbone} finetune, batch {args.batch_size}, 224 px, bf16, GPU augmentation: "
          f"{rate:,.0f} images/s")
    print(f"augmentation alone on 1 CPU thread, batch {args.batch_size}: {cpu_augment_rate(args.batch_size):,.0f} "
          "images/s")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig(backbone=args.backbone, pretrained="none")
        ckpt = save_checkpoint(Path(tmp) / "ckpt", create_model(cfg).eval(), cfg,
                               default_preprocessing(args.backbone), train_cfg={"tta_flip": True})
        arrays = np.random.default_rng(0).integers(0, 256, (2048, 224, 224, 3), dtype=np.uint8)
        for precision in ("bf16", "fp32"):
            for batch in (64, 256):
                pred = Predictor(ckpt, "cuda", precision=precision, batch_size=batch)
                print(f"infer  {args.backbone} {precision} batch {batch} (flip TTA: 2 forwards/image): "
                      f"{infer_rate(pred, arrays):,.0f} images/s")

    if args.checkpoint and args.faces:
        faces = Path(args.faces)
        labels = pd.read_csv(faces / "labels.csv")
        paths = [str(faces / "final_files" / n) for n in labels["file_name"]]
        y = labels["real_age"].to_numpy(np.float32)
        cpu = Predictor(args.checkpoint, "cpu")
        size, interp = cpu.prep.input_size, cpu.prep.interpolation
        start = time.perf_counter()
        arrays = np.stack([load_image(x, size, interp) for x in paths])
        print(f"decoded {len(paths)} faces in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        ages = {"cpu fp32": cpu.predict_arrays(arrays)}
        print(f"cpu fp32: {len(arrays) / (time.perf_counter() - start):,.0f} images/s")
        for precision in ("fp32", "bf16"):
            pred = Predictor(args.checkpoint, "cuda", precision=precision, batch_size=256)
            ages[f"gpu {precision}"] = pred.predict_arrays(arrays)
            print(f"gpu {precision}: {infer_rate(pred, arrays):,.0f} images/s")
        for name, a in ages.items():
            print(f"{name}: MAE {np.abs(a - y).mean():.4f} on {len(y)} faces; "
                  f"mean |age - cpu fp32 age| {np.abs(a - ages['cpu fp32']).mean():.4f} years")


if __name__ == "__main__":
    main()
