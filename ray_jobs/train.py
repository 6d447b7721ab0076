"""Fine-tune the age regressor with Ray Train: data-parallel workers fed by Ray Data.

    python -m ray_jobs.train --prepared runs/prepared --out runs/train-1
    python -m ray_jobs.train --prepared runs/prepared --out runs/train-2 \\
        --backbone tf_efficientnet_lite0 --pretrained-file lite0.pth --mode partial
    python -m ray_jobs.train --config runs/train-2/config.json --out runs/train-3 --lr 1e-3

Modes: ``finetune`` trains the whole network on images (GPUs); ``partial`` runs the lower
stages once, caches their output, and fine-tunes the top stages and the head (the CPU
default); ``frozen`` caches pooled embeddings and trains the head alone (seconds an epoch).

Outputs under OUT: ``best/`` (the checkpoint with the lowest validation MAE), ``metrics.csv``,
``curves.png``, ``config.json``, and Ray Train's own run folder ``ray_train/``. ``--config`` takes
a run's ``config.json`` as the defaults: that run again, with any option given overriding it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pa_ds
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from agecore import plots, storage
from agecore.checkpoint import TRAIN_STATE, load_train_state, read_meta, save_checkpoint
from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.errors import InvalidInput
from agecore.faces import template_from_prepared
from agecore.model import (
    create_model,
    default_cut_stage,
    default_preprocessing,
    split_model,
    trainable_module,
)
from agecore.prepare import read_prepare_info, split_dir
from agecore.training import (
    EarlyStopping,
    FeatureExtractor,
    Schedule,
    batch_inputs,
    evaluate_epoch,
    loss_fn,
    make_optimizer,
    seed_everything,
    train_epoch,
)
from ray_jobs.common import init_ray, model_actor_options, read_parquet, setup_logging
from ray_jobs.options import add_config_arguments, config_from_args, parse_with_config
from ray_jobs.progress import EpochProgress, send

log = logging.getLogger("ray_jobs.train")

RUN_NAME = "ray_train"
# set from the weights options, or from the prepared set's ages (``setup_run``)
MODEL_FIELDS_NOT_OPTIONS = ("pretrained", "pretrained_file", "target_mean", "target_scale")


# ---- inside each Ray Train worker -----------------------------------------------------------------


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _count_nodes() -> int:
    """Distinct Ray nodes among the workers (by node ID: nodes sharing one IP still count apart)."""
    node_id = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    ids: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ids, node_id)
    return len(set(ids))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    model_cfg = ModelConfig.from_dict(config["model"])
    cfg = TrainConfig.from_dict(config["train"])
    prep = Preprocessing.from_dict(config["preprocessing"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seed_everything(cfg.seed + rank)
    if not cfg.gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    amp = device.type == "cuda"

    model = create_model(ModelConfig.from_dict({**config["model"], "pretrained": "none", "pretrained_file": None}))
    model.load_state_dict(ray.get(config["initial_weights"]))
    module = trainable_module(model, cfg.mode, cfg.cut_stage)
    # channels_last pays on CPUs too: 50 against 33 images/s training EfficientNet-Lite0's top stages
    model.to(device, memory_format=torch.channels_last)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (cfg.batch_size * ctx.get_world_size())))
    optimizer = make_optimizer(module.parameters(), cfg)
    schedule = Schedule(optimizer, cfg, steps_per_epoch)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    history: list[dict[str, Any]] = []
    start_epoch = 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a failure or with --resume: nothing finished is lost
        with checkpoint.as_directory() as d:
            import safetensors.torch

            model.load_state_dict(safetensors.torch.load_file(Path(d) / "model.safetensors", device=str(device)))
            state = load_train_state(d)
            meta = read_meta(d)
        assert state is not None, "checkpoint has no train_state.pt"
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        stopper.load_state_dict(state["early_stopping"])
        history = meta["metrics"]["history"]
        start_epoch = meta["epoch"] + 1
        if stopper.should_stop:
            return

    module = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": False})
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    criterion = loss_fn(cfg.loss)
    columns = ["image", "age"] if cfg.mode == "finetune" else ["features", "age"]
    nodes = _count_nodes()

    def inputs_for(train: bool):
        return lambda batch: batch_inputs(batch, cfg.mode, prep, train, cfg, generator, device)

    for epoch in range(start_epoch, cfg.epochs):
        lr = schedule.lr
        train_batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.batch_size * 8, drop_last=True,
            local_shuffle_seed=cfg.seed + epoch * 1000 + rank,
        )
        on_progress = None
        if rank == 0 and config.get("progress") is not None:
            def on_progress(step: int, mae: float, epoch: int = epoch) -> None:
                send(config["progress"], {"kind": "step", "epoch": epoch, "step": step, "steps": steps_per_epoch,
                                          "train_mae": mae})
        tr = train_epoch(module, ({k: b[k] for k in columns} for b in train_batches), optimizer, schedule,
                         criterion, inputs_for(True), device, amp, on_progress=on_progress)
        # Validation runs on rank 0 over the whole (unsplit) validation set, on the unwrapped module so
        # that no collective is involved; the sums below carry its result to every rank.
        va_sum = va_n = va_w5 = va_sec = 0.0
        if rank == 0:
            val_batches = val_shard.iter_torch_batches(batch_size=cfg.batch_size * 2)
            va = evaluate_epoch(getattr(module, "module", module), ({k: b[k] for k in columns} for b in val_batches),
                                inputs_for(False), device, amp)
            va_sum, va_n, va_w5, va_sec = va.abs_err_sum, va.count, va.within5, va.seconds
        tr_sum, tr_n, tr_sec, va_sum, va_n, va_w5 = _all_reduce(
            [tr.abs_err_sum, tr.count, tr.seconds, va_sum, va_n, va_w5], device
        )
        row = {
            "epoch": epoch,
            "train_mae": tr_sum / max(tr_n, 1),
            "val_mae": va_sum / max(va_n, 1),
            "val_cs5": va_w5 / max(va_n, 1),
            "lr": lr,
            "images_per_s": tr_n / max(tr_sec / ctx.get_world_size(), 1e-9),
            "epoch_seconds": tr.seconds + va_sec,
            "workers": ctx.get_world_size(),
            "nodes": nodes,
        }
        history.append(row)
        stopper.update(row["val_mae"])
        schedule.epoch_end(row["val_mae"])
        metrics = {**row, "best_val_mae": stopper.best, "stopped": stopper.should_stop}
        if rank == 0:
            send(config.get("progress"), {"kind": "epoch", "row": metrics})
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    tmp, model, model_cfg, prep, train_cfg=cfg.to_dict(),
                    metrics={**metrics, "history": history}, epoch=epoch,
                    train_state={"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                 "early_stopping": stopper.state_dict()},
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if stopper.should_stop:
            break


# ---- on the driver -----------------------------------------------------------------------------


def _cache_key(prepared: str, prep: Preprocessing, cut_stage: int | None, weights: dict[str, torch.Tensor]) -> str:
    """Changes with the prepared set, the preprocessing, the cut, or any weight of the network."""
    h = hashlib.sha1(json.dumps({"prepared": read_prepare_info(prepared), "prep": prep.to_dict(), "cut": cut_stage},
                                sort_keys=True).encode())
    for name, tensor in weights.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def build_feature_cache(
    prepared: str, model_cfg: ModelConfig, prep: Preprocessing, cut_stage: int | None,
    model: torch.nn.Module, cache_root: str | None = None,
) -> dict[str, str]:
    """Run the lower network once over train and val (both views); reused while its inputs are unchanged.

    ``model`` is the network that training starts from, so the cached activations come from exactly
    the lower part that the checkpoint will hold (random weights included); the cache key hashes
    that lower part's weights, so runs that differ only above the cut share one cache.
    """
    lower = split_model(model, cut_stage)[0]
    # a folder or a URI that every node reaches: Ray Data's tasks write it wherever they run
    root = storage.join(cache_root or storage.join(prepared, "cache"),
                        _cache_key(prepared, prep, cut_stage, lower.state_dict()))
    paths = {split: storage.join(root, f"split={split}") for split in ("train", "val")}
    complete = storage.join(root, "_COMPLETE")
    if storage.exists(complete):
        log.info("feature cache: reusing %s", root)
        return paths
    start = time.perf_counter()
    storage.delete_dir(root)  # what an interrupted build left behind
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    options, threads = model_actor_options(gpu)
    # both splits in one pass: one pool of model actors to start, not one per split
    parts = [
        read_parquet(split_dir(prepared, split)).select_columns(["image", "age"])
        .add_column("split", lambda t, split=split: pa.array([split] * t.num_rows), batch_format="pyarrow")
        for split in paths
    ]
    parts[0].union(*parts[1:]).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"model_cfg": model_cfg, "prep": prep, "cut_stage": cut_stage, "weights": weights,
                               "threads": threads, "device": "cuda" if gpu else "cpu"},
        batch_size=16, batch_format="numpy", **options,
    ).write_parquet(root, partition_cols=["split"])
    storage.write_text(complete, "")  # last: a cache without it is rebuilt
    log.info("feature cache: %s in %.0f s", root, time.perf_counter() - start)
    return paths


def _fragments(path: str) -> list[pa_ds.Fragment]:
    fs, inner = storage.filesystem(path)
    return list(pa_ds.dataset(inner, filesystem=fs, format="parquet").get_fragments())


def resolve_cut(model_cfg: ModelConfig, cfg: TrainConfig, model: torch.nn.Module) -> TrainConfig:
    if cfg.mode == "partial" and cfg.cut_stage is None:
        return TrainConfig.from_dict({**cfg.to_dict(), "cut_stage": default_cut_stage(model.backbone)})
    return cfg


@dataclass(frozen=True)
class RunSetup:
    """Everything trials of one prepared set share: configs, datasets (or feature cache), initial weights."""

    prepared: str
    model_cfg: ModelConfig
    cfg: TrainConfig
    prep: Preprocessing
    datasets: dict[str, ray.data.Dataset]
    initial_weights: ray.ObjectRef
    train_rows: int
    cpus_per_worker: float


def setup_run(
    prepared: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    cpus_per_worker: float | None = None,
    cache_dir: str | None = None,
    address: str | None = None,
) -> RunSetup:
    """Resolve the configs against the prepared set, load the pretrained weights once, build the inputs."""
    info = read_prepare_info(prepared)
    ages = info["splits"]["train"]
    # regress standardised ages; the scaling travels in the checkpoint's model config
    model_cfg = dataclasses.replace(model_cfg, target_mean=round(ages["mean"], 2),
                                    target_scale=round(max(ages["std"], 1.0), 2))
    default_prep = default_preprocessing(model_cfg.backbone)
    # the landmark layout of the training crops, onto which detected faces are aligned at inference
    prep = Preprocessing(info["image_size"], default_prep.mean, default_prep.std, info["interpolation"],
                         face_template=template_from_prepared(prepared))
    with torch.random.fork_rng():  # one seed, one initial network: reproducible, and the feature cache is reused
        torch.manual_seed(cfg.seed)
        model = create_model(model_cfg)  # fails here, at the start, if the weights cannot be had
    cfg = resolve_cut(model_cfg, cfg, model)

    init_ray(address)
    if cfg.mode == "finetune":
        data = {s: split_dir(prepared, s) for s in ("train", "val")}
        columns = ["image", "age"]
    else:
        data = build_feature_cache(prepared, model_cfg, prep, cfg.cut_stage if cfg.mode == "partial" else None,
                                   model, cache_dir)
        columns = ["features", "age"]
    if cfg.mode == "frozen":
        # pooled embeddings are small (15,745 faces: about 80 MB); held in the object store, an epoch
        # no longer re-reads Parquet, which otherwise costs more than training the head does
        datasets = {s: ray.data.from_arrow([f.to_table(columns=columns) for f in _fragments(p)])
                    for s, p in data.items()}
    else:
        # reads are light (the shards hold decoded arrays): a quarter CPU each fits them beside
        # workers that leave less than a CPU free on a node
        datasets = {s: read_parquet(p, num_cpus=0.25).select_columns(columns) for s, p in data.items()}
    datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.seed)
    cpus = ray.cluster_resources().get("CPU", 1)
    if cpus_per_worker is None:  # leave a CPU for Ray Data, or the workers starve the input pipeline
        cpus_per_worker = 1.0 if cfg.gpu else max(0.25, min(4.0, (cpus - 1) / cfg.workers))
    weights = ray.put({k: v.cpu() for k, v in model.state_dict().items()})
    return RunSetup(str(prepared), model_cfg, cfg, prep, datasets, weights, info["counts"]["train"], cpus_per_worker)


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
    best_ckpt, _ = min(result.best_checkpoints, key=lambda cm: cm[1]["val_mae"])
    shutil.rmtree(best, ignore_errors=True)
    with best_ckpt.as_directory() as d:  # inference needs no optimiser state
        shutil.copytree(d, best, ignore=shutil.ignore_patterns(TRAIN_STATE))


def finish(result: ray.train.Result, out: Path) -> dict[str, Any]:
    """Copy the best checkpoint to OUT/best and draw the per-epoch metrics from the latest one."""
    if result.error:
        raise result.error
    best = out / "best"
    export_best(result, best)
    with result.checkpoint.as_directory() as latest:
        history = pd.DataFrame(read_meta(latest)["metrics"]["history"])
    history.to_csv(out / "metrics.csv", index=False)
    plots.learning_curves(history, out / "curves.png")
    meta = read_meta(best)
    log.info("best validation MAE %.3f at epoch %d of %d run", meta["metrics"]["val_mae"], meta["epoch"], len(history))
    return {k: v for k, v in meta["metrics"].items() if k != "history"}


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
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    """``age train``'s options: the configs' fields, then the run's own."""
    p = argparse.ArgumentParser(prog="age train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder or URI: best/, metrics.csv, curves.png, config.json")
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
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
