"""Fine-tune the age regressor with Ray Train: data-parallel workers fed by Ray Data.

    python -m ray_jobs.train --prepared runs/prepared --out runs/train-1
    python -m ray_jobs.train --prepared runs/prepared --out runs/train-2 \\
        --backbone tf_efficientnet_lite0 --pretrained-file lite0.pth --mode partial
    python -m ray_jobs.train --config runs/train-2/config.json --out runs/train-3 --lr 1e-3

Modes: ``finetune`` trains the whole network on images (GPUs); ``partial`` runs the lower
stages once, caches their output, and fine-tunes the top stages and the head (the CPU
recipe); ``frozen`` caches pooled embeddings and trains the head alone (seconds an epoch).

Outputs under OUT: ``best/`` (the checkpoint with the lowest validation MAE), ``metrics.csv``,
``curves.png``, ``config.json``, and Ray Train's own run folder ``ray_train/``. ``--config`` takes
a run's ``config.json`` as the defaults: that run again, with any option given overriding it.

Each worker runs ``train_loop_per_worker``: restore, then per epoch train and validate, reduce the
metrics across ranks, and report a checkpoint (``agecore.checkpoint``; its ``history.json`` holds
the epochs so far). The set-up a run shares with a search (feature cache, datasets, initial
weights) is ``ray_jobs.run_setup``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue
from torch import nn

from agecore import plots, storage
from agecore.checkpoint import copy_checkpoint, read_history, read_meta, restore, save_checkpoint
from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.errors import InvalidInput
from agecore.model import create_model, trainable_module
from agecore.training import (
    EarlyStopping,
    EpochResult,
    Schedule,
    batch_inputs,
    evaluate_epoch,
    loss_fn,
    make_optimizer,
    seed_everything,
    train_epoch,
)
from ray_jobs.common import add_address_argument, setup_logging
from ray_jobs.options import add_config_arguments, config_from_args, parse_with_config
from ray_jobs.progress import EpochProgress, send
from ray_jobs.run_setup import RunSetup, setup_run

log = logging.getLogger("ray_jobs.train")

RUN_NAME = "ray_train"
# set from the weights options, or from the prepared set's ages (``ray_jobs.run_setup.setup_run``)
MODEL_FIELDS_NOT_OPTIONS = ("pretrained", "pretrained_file", "target_mean", "target_scale")


# ---- inside each Ray Train worker -----------------------------------------------------------------


def _count_nodes() -> int:
    """Distinct Ray nodes among the workers (by node ID: nodes sharing one IP still count apart)."""
    node_id = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    ids: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ids, node_id)
    return len(set(ids))


@dataclass
class Worker:
    """One Ray Train worker's run: configs, the network, the optimisation state and the history so far."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    prep: Preprocessing
    rank: int
    world_size: int
    device: torch.device
    model: nn.Module  # the whole network: what every checkpoint holds
    module: nn.Module  # the part that trains; DDP-wrapped once restored
    shards: dict[str, Any]  # this rank's share of "train", and all of "val"
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    stopper: EarlyStopping
    progress: Queue | None = None  # the driver's EpochProgress, fed by rank 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def columns(self) -> list[str]:
        return ["image", "age"] if self.cfg.mode == "finetune" else ["features", "age"]


def _optimisation(module: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Schedule]:
    """The optimiser over the trained part, and its learning-rate schedule (``train_epoch`` steps it)."""
    optimizer = make_optimizer(module, cfg)
    return optimizer, Schedule(optimizer, cfg, steps_per_epoch)


def _train_state(w: Worker) -> dict[str, Any]:
    """What a checkpoint keeps for resuming, besides the weights and the history."""
    return {"optimizer": w.optimizer.state_dict(), "schedule": w.schedule.state_dict(),
            "early_stopping": w.stopper.state_dict()}


def _start_worker(config: dict[str, Any]) -> Worker:
    """Seed this rank, build the network from the driver's initial weights, and its optimiser."""
    model_cfg = ModelConfig.from_dict(config["model"])
    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    if not cfg.gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    model = create_model(dataclasses.replace(model_cfg, pretrained="none", pretrained_file=None))
    model.load_state_dict(ray.get(config["initial_weights"]))
    module = trainable_module(model, cfg.mode, cfg.cut_stage)
    # channels_last: oneDNN and cuDNN convolutions both run faster on it
    model.to(device, memory_format=torch.channels_last)
    shards = {s: ray.train.get_dataset_shard(s) for s in ("train", "val")}
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (cfg.batch_size * world_size)))
    optimizer, schedule = _optimisation(module, cfg, steps_per_epoch)
    return Worker(model_cfg, cfg, Preprocessing.from_dict(config["preprocessing"]), rank, world_size, device,
                  model, module, shards, steps_per_epoch, optimizer, schedule,
                  EarlyStopping(cfg.patience, cfg.min_delta), config.get("progress"))


def _restore(w: Worker) -> bool:
    """Continue from Ray Train's latest checkpoint (after a failure, or with --resume): nothing finished is lost."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as d:
        saved = restore(d, w.model, w.device)
    w.optimizer.load_state_dict(saved.train_state["optimizer"])
    w.schedule.load_state_dict(saved.train_state["schedule"])
    w.stopper.load_state_dict(saved.train_state["early_stopping"])
    w.history, w.start_epoch = saved.history, saved.epoch + 1
    return True


def _step_progress(w: Worker, epoch: int) -> Callable[[int, float], None] | None:
    """Rank 0's running training MAE, sent to the driver's progress display."""
    if w.rank != 0 or w.progress is None:
        return None

    def on_progress(step: int, mae: float) -> None:
        send(w.progress, {"kind": "step", "epoch": epoch, "step": step, "steps": w.steps_per_epoch, "train_mae": mae})

    return on_progress


def _run_epoch(
    w: Worker, epoch: int, criterion: nn.Module, generator: torch.Generator
) -> tuple[EpochResult, EpochResult | None]:
    """Train on this rank's shard; validate on rank 0 (``None`` elsewhere)."""
    def inputs_for(train: bool) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
        return lambda batch: batch_inputs(batch, w.cfg.mode, w.prep, train, w.cfg, generator, w.device)

    batch_size = w.cfg.batch_size
    train_batches = w.shards["train"].iter_torch_batches(
        batch_size=batch_size, local_shuffle_buffer_size=batch_size * 8, drop_last=True,
        local_shuffle_seed=w.cfg.seed + epoch * 1000 + w.rank,
    )
    tr = train_epoch(w.module, ({k: b[k] for k in w.columns} for b in train_batches), w.optimizer, w.schedule,
                     criterion, inputs_for(True), w.device, w.amp, on_progress=_step_progress(w, epoch))
    if w.rank != 0:
        return tr, None
    # Validation runs on rank 0 over the whole (unsplit) validation set, on the unwrapped module so
    # that no collective is involved; ``_reduce_metrics`` carries its result to every rank.
    val_batches = w.shards["val"].iter_torch_batches(batch_size=batch_size * 2)
    va = evaluate_epoch(getattr(w.module, "module", w.module), ({k: b[k] for k in w.columns} for b in val_batches),
                        inputs_for(False), w.device, w.amp)
    return tr, va


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _reduce_metrics(
    w: Worker, epoch: int, lr: float, nodes: int, tr: EpochResult, va: EpochResult | None
) -> dict[str, Any]:
    """The epoch's metrics row, its sums added up across the ranks (validation: rank 0's alone)."""
    va_sum, va_n, va_w5, va_sec = (va.abs_err_sum, va.count, va.cs5_count, va.seconds) if va else (0.0, 0.0, 0.0, 0.0)
    tr_sum, tr_n, tr_sec, va_sum, va_n, va_w5 = _all_reduce(
        [tr.abs_err_sum, tr.count, tr.seconds, va_sum, va_n, va_w5], w.device
    )
    return {
        "epoch": epoch,
        "train_mae": tr_sum / max(tr_n, 1),
        "val_mae": va_sum / max(va_n, 1),
        "val_cs5": va_w5 / max(va_n, 1),
        "lr": lr,
        "images_per_second": tr_n / max(tr_sec / w.world_size, 1e-9),
        "epoch_seconds": tr.seconds + va_sec,
        "workers": w.world_size,
        "nodes": nodes,
    }


def _report_checkpoint(w: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Report the epoch's metrics to Ray Train, with rank 0's checkpoint of it (its history beside it)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            save_checkpoint(tmp, w.model, w.model_cfg, w.prep, train_cfg=w.cfg.to_dict(), metrics=metrics,
                            epoch=epoch, train_state=_train_state(w), history=w.history)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Restore, then each epoch: train and validate, reduce the metrics across ranks, report a checkpoint."""
    w = _start_worker(config)
    if _restore(w) and w.stopper.should_stop:
        return
    w.module = ray.train.torch.prepare_model(w.module, parallel_strategy_kwargs={"find_unused_parameters": False})
    generator = torch.Generator().manual_seed(w.cfg.seed * 1000 + w.rank)
    criterion = loss_fn(w.cfg.loss)
    nodes = _count_nodes()
    for epoch in range(w.start_epoch, w.cfg.epochs):
        lr = w.optimizer.param_groups[0]["lr"]
        row = _reduce_metrics(w, epoch, lr, nodes, *_run_epoch(w, epoch, criterion, generator))
        w.history.append(row)
        w.stopper.update(row["val_mae"])
        # the lowest so far, which best/ holds; the stopper's best is its last counted improvement
        best_val_mae = min(r["val_mae"] for r in w.history)
        metrics = {**row, "best_val_mae": best_val_mae, "stopped": w.stopper.should_stop}
        if w.rank == 0:
            send(w.progress, {"kind": "epoch", "row": metrics})
        _report_checkpoint(w, epoch, metrics)
        if w.stopper.should_stop:
            break


# ---- on the driver -----------------------------------------------------------------------------


def make_trainer(
    setup: RunSetup,
    storage_path: str,
    name: str = RUN_NAME,
    model_cfg: ModelConfig | None = None,
    cfg: TrainConfig | None = None,
    callbacks: list | None = None,
    progress: Queue | None = None,
) -> TorchTrainer:
    """A TorchTrainer over ``setup``; ``model_cfg``/``cfg`` replace its configs (a tuning trial's values).

    ``progress`` is the queue of an ``EpochProgress`` that draws the epochs on the driver.
    """
    model_cfg = model_cfg or setup.model_cfg
    cfg = cfg or setup.cfg
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model_cfg.to_dict(), "train": cfg.to_dict(), "preprocessing": setup.prep.to_dict(),
            "initial_weights": setup.initial_weights, "train_rows": setup.train_rows, "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": setup.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_mae",
                checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            callbacks=callbacks,
        ),
        datasets=setup.datasets,
        # only training data is sharded; validation is read whole by rank 0, so no row is dropped to even shards
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def train(
    prepared: str,
    out: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    attach: bool = True,
    cpus_per_worker: float | None = None,
    storage_path: str | None = None,
    cache_dir: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Train; write best/, metrics.csv, curves.png and summary.json under ``out``; return the best metrics.

    With ``attach``, the best checkpoint is scored on the validation split through the shared
    ``Predictor`` and the error quantiles per age band are stored beside it (``calibration.json``).
    """
    start = time.perf_counter()
    out, prepared = storage.absolute(out), storage.absolute(prepared)
    run_dir = storage.absolute(storage_path or out)  # Ray Train's own folder: local, shared or a URI
    if storage.exists(storage.join(run_dir, RUN_NAME)) and not resume:
        raise FileExistsError(f"{storage.join(run_dir, RUN_NAME)} holds a previous run: pass --resume to continue "
                              "it, or choose another --out")
    setup = setup_run(prepared, model_cfg, cfg, cpus_per_worker=cpus_per_worker, cache_dir=cache_dir, address=address)
    with storage.output_dir(out) as out_path:  # OUT itself, or a staging folder uploaded to a URI at the end
        (out_path / "config.json").write_text(json.dumps(
            {"prepared": prepared, "model": setup.model_cfg.to_dict(), "train": setup.cfg.to_dict(),
             "preprocessing": setup.prep.to_dict()}, indent=2) + "\n")
        with EpochProgress(setup.cfg.epochs) as progress:
            result = make_trainer(setup, run_dir, progress=progress.queue).fit()
        best = finish(result, out_path)
        if attach:
            from ray_jobs.evaluate import evaluate

            report = evaluate(str(out_path / "best"), prepared, str(out_path / "val-eval"), split="val", attach=True)
            best["val_mae_predictor"] = report["metrics"]["mae"]
        best["wall_seconds"] = round(time.perf_counter() - start, 1)
        (out_path / "summary.json").write_text(json.dumps(best, indent=2) + "\n")
    log.info("outputs in %s", out)
    return best


def export_best(result: ray.train.Result, best: Path) -> None:
    """Copy the run's checkpoint with the lowest validation MAE to ``best``, less the optimiser state."""
    with result.get_best_checkpoint("val_mae", "min").as_directory() as d:  # inference needs no optimiser state
        copy_checkpoint(d, best)


def finish(result: ray.train.Result, out: Path) -> dict[str, Any]:
    """Copy the best checkpoint to OUT/best; write and draw the per-epoch metrics from the latest one's history."""
    if result.error:
        raise result.error
    best = out / "best"
    export_best(result, best)
    with result.checkpoint.as_directory() as latest:
        history = pd.DataFrame(read_history(latest))
    history.to_csv(out / "metrics.csv", index=False)
    plots.learning_curves(history, out / "curves.png")
    meta = read_meta(best)
    log.info("best validation MAE %.3f at epoch %d of %d run", meta["metrics"]["val_mae"], meta["epoch"], len(history))
    return dict(meta["metrics"])


def add_training_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """``--config``, ``--prepared`` and an option per ``ModelConfig``/``TrainConfig`` field, less ``exclude``.

    The weights are one setting with two options: ``--pretrained-file FILE`` or ``--no-pretrained``
    (neither: the hub's). Both write ``args.weights``, so a ``--config`` file's choice can be overridden.
    """
    parser.add_argument("--config", metavar="CONFIG_JSON",
                        help="a run's config.json: its settings become the defaults; options given override them")
    parser.add_argument("--prepared", required=True, help="output folder of `age prepare`")
    model = parser.add_argument_group("model")
    add_config_arguments(model, ModelConfig, exclude=(*MODEL_FIELDS_NOT_OPTIONS, *exclude))
    weights = model.add_mutually_exclusive_group()
    weights.add_argument("--pretrained-file", dest="weights", default=None, metavar="FILE",
                         help=ModelConfig.__dataclass_fields__["pretrained_file"].metadata["help"])
    weights.add_argument("--no-pretrained", dest="weights", action="store_const", const=False,
                         help="start from random weights (much worse)")
    add_config_arguments(parser.add_argument_group("training"), TrainConfig, exclude=exclude,
                         rename={"tta_flip": "tta"})


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the run's Ray pieces live and what each worker reserves."""
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs each worker reserves (default: all but one CPU, shared by the workers, at most 4)")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder or URI (default: PREPARED/cache)")
    add_address_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    """``age train``'s options: the configs' fields, then the run's own."""
    p = argparse.ArgumentParser(prog="age train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder or URI: best/, metrics.csv, curves.png, config.json")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in OUT from its last checkpoint, with its saved optimiser and "
                          "learning-rate schedule (a new --lr, --schedule or --warmup-epochs does not apply; "
                          "--epochs and the early stop do)")
    run.add_argument("--no-attach", action="store_true",
                     help="skip scoring best/ on the validation split (error quantiles for age verification)")
    run.add_argument("--storage-path", default=None,
                     help="where Ray Train keeps checkpoints (default: OUT; a folder or a URI)")
    add_ray_arguments(run)
    return p


def defaults_from_run(saved: dict[str, Any]) -> dict[str, Any]:
    """The option values that rerun the run whose ``config.json`` is ``saved``."""
    missing = [k for k in ("prepared", "model", "train") if k not in saved]
    if missing:
        raise InvalidInput(f"--config: not a training run's config.json (no {', '.join(missing)})")
    model_cfg, cfg = ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
    weights = {"hub": None, "file": model_cfg.pretrained_file, "none": False}[model_cfg.pretrained]
    return {**model_cfg.to_dict(), **cfg.to_dict(), "prepared": saved["prepared"], "weights": weights}


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The configs the parsed options describe (``args.weights``: None hub, False none, else a file)."""
    if args.weights is None or args.weights is False:
        pretrained, file = ("hub" if args.weights is None else "none"), None
    else:
        pretrained, file = "file", str(Path(args.weights).resolve())
    return (config_from_args(ModelConfig, args, pretrained=pretrained, pretrained_file=file),
            config_from_args(TrainConfig, args))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``age train``'s options, read over a ``--config`` file where one is given."""
    return parse_with_config(build_parser(), argv, defaults_from_run)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    model_cfg, cfg = configs_from_args(args)
    return train(args.prepared, args.out, model_cfg, cfg, resume=args.resume, attach=not args.no_attach,
                 cpus_per_worker=args.cpus_per_worker,
                 storage_path=args.storage_path, cache_dir=args.cache_dir, address=args.address)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("train")
