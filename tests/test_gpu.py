"""The library's GPU path: mixed-precision training steps, the feature cache and the predictor on CUDA.

Skipped without CUDA (see conftest). These need no Ray: they run agecore's pieces as the Ray Train
workers and Ray Data actors run them, on one GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.model import create_model, trainable_module
from agecore.training import (
    FeatureExtractor,
    Schedule,
    batch_inputs,
    evaluate_epoch,
    loss_fn,
    make_optimizer,
    train_epoch,
)

pytestmark = pytest.mark.gpu

CFG = ModelConfig(backbone="resnet18", pretrained="none", hidden=32, dropout=0.0)
PREP = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)


def _batches(n_batches: int, batch: int = 32, seed: int = 0):
    """Grey squares whose brightness is the age: a task a CNN learns in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        age = torch.randint(1, 90, (batch,), generator=g).float()
        level = (age * 2.5).to(torch.uint8).view(-1, 1, 1, 1)
        yield {"image": level.expand(batch, 64, 64, 3).contiguous(), "age": age}


def test_finetune_steps_learn_in_bf16_on_cuda():
    device = torch.device("cuda")
    cfg = TrainConfig(mode="finetune", epochs=3, lr=3e-3, batch_size=32, warmup_epochs=0.0, color_jitter=0.0,
                      random_crop_scale=(1.0, 1.0), rotate_degrees=0.0, degrade=0.0)  # brightness is the label
    model = create_model(CFG).to(device, memory_format=torch.channels_last)
    module = trainable_module(model, "finetune", None)
    optimizer = make_optimizer(module, cfg)
    schedule = Schedule(optimizer, cfg, steps_per_epoch=40)
    generator = torch.Generator().manual_seed(0)

    def inputs(train):
        return lambda b: batch_inputs(b, "finetune", PREP, train, cfg, generator, device)

    before = evaluate_epoch(module, _batches(4, seed=1), inputs(False), device, amp=True)
    for epoch in range(cfg.epochs):
        result = train_epoch(module, _batches(40, seed=10 + epoch), optimizer, schedule, loss_fn("l1"),
                             inputs(True), device, amp=True)
        assert np.isfinite(result.mae) and result.count == 40 * 32
    after = evaluate_epoch(module, _batches(4, seed=1), inputs(False), device, amp=True)
    assert all(p.device.type == "cuda" for p in module.parameters())
    assert after.mae < 0.5 * before.mae, (before.mae, after.mae)


def test_augmentation_and_every_degradation_run_on_the_gpu(monkeypatch):
    from agecore import augment

    for family in ("COLOUR_P", "BLUR_P", "LOW_RES_P", "NOISE_P", "JPEG_P"):  # all of them, every face
        monkeypatch.setattr(augment, family, 1.0)
    device = torch.device("cuda")
    cfg = TrainConfig(mode="finetune", degrade=1.0)
    batch = next(_batches(1))
    x = batch_inputs(batch, "finetune", PREP, True, cfg, torch.Generator().manual_seed(0), device)[0]
    assert x.device.type == "cuda" and x.shape == (32, 3, 64, 64) and torch.isfinite(x).all()


def test_feature_cache_on_cuda_matches_cpu():
    torch.manual_seed(0)
    weights = create_model(CFG).state_dict()
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
             "age": np.arange(8, dtype=np.float32)}
    degraded = TrainConfig()  # the third view: spoilt on the GPU (its JPEG codec differs: compared by shape)
    cpu = FeatureExtractor(CFG, PREP, 3, device="cpu", weights=weights, degraded=degraded)(dict(batch))["features"]
    gpu = FeatureExtractor(CFG, PREP, 3, device="cuda", weights=weights, degraded=degraded)(dict(batch))["features"]
    assert gpu.shape == cpu.shape and gpu.shape[1] == 3 and gpu.dtype == np.float16
    scale = np.abs(cpu[:, :2].astype(np.float32)).mean()
    assert np.abs(gpu[:, :2].astype(np.float32) - cpu[:, :2].astype(np.float32)).mean() < 0.02 * scale


def test_predictor_bf16_on_cuda_agrees_with_fp32(tmp_path, faces_root):
    """Mixed precision is the GPU default only if it moves ages by less than 0.05 years on real faces."""
    import pandas as pd

    from agecore.checkpoint import save_checkpoint
    from agecore.predictor import Predictor

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model(CFG).eval(), CFG, PREP, train_cfg={"tta_flip": True})
    names = pd.read_csv(faces_root / "labels.csv")["file_name"].head(64)
    paths = [str(faces_root / "final_files" / n) for n in names]
    fp32_cpu, err = Predictor(ckpt, "cpu").predict_paths(paths)
    assert not any(err)
    gpu = Predictor(ckpt, "cuda")
    assert gpu.precision == "bf16"
    bf16, _ = gpu.predict_paths(paths)
    fp32_gpu, _ = Predictor(ckpt, "cuda", precision="fp32").predict_paths(paths)
    assert np.abs(fp32_gpu - fp32_cpu).max() < 0.01
    assert np.abs(bf16 - fp32_cpu).mean() < 0.05
