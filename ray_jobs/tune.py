"""Search dropout and learning rate with Ray Tune over the same Ray Train loop as ``age train``.

    python -m ray_jobs.tune --prepared runs/prepared --out runs/tune --samples 24 --mode frozen \\
        --backbone tf_efficientnet_lite0 --pretrained-file lite0.pth

Each trial is a ``TorchTrainer`` run (``ray_jobs.train.make_trainer``); ASHA stops poor trials
early on validation MAE. Outputs under OUT: ``trials.csv`` (config, best validation MAE, epochs
run, status, error), ``tune.png``, and ``best/``, the winning checkpoint, which ``age score``
and ``serve_config.yaml`` take as it is. A failed trial is recorded, not fatal; ``--resume``
continues an interrupted search.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from agecore import plots, storage
from agecore.config import MODES, ModelConfig, TrainConfig
from ray_jobs.common import setup_logging
from ray_jobs.train import RunSetup, export_best, make_trainer, setup_run

log = logging.getLogger("ray_jobs.tune")

SEARCH_NAME = "search"


def run_trial(config: dict[str, Any], setup: RunSetup, trials_dir: str) -> None:
    """One trial: the shared setup with this trial's values, a Ray Train run in ``trials_dir/trial_ID``.

    Nothing may follow ``fit()`` here: Tune stops a trial as soon as its last report reaches ASHA's
    ``max_t`` (or ASHA cuts it), so the trial's best checkpoint is exported by the driver afterwards.
    """
    model_cfg = ModelConfig.from_dict({**setup.model_cfg.to_dict(), "dropout": config["dropout"]})
    overrides = {k: config[k] for k in ("lr", "weight_decay", "batch_size") if k in config}
    cfg = TrainConfig.from_dict({**setup.cfg.to_dict(), **overrides})
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(setup, trials_dir, name=f"trial_{trial_id}", model_cfg=model_cfg, cfg=cfg,
                           callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error


def search_space(args: argparse.Namespace) -> dict[str, Any]:
    space: dict[str, Any] = {
        "dropout": tune.grid_search(args.dropouts) if args.dropouts else tune.uniform(*args.dropout_range),
        "lr": tune.grid_search(args.lrs) if args.lrs else tune.loguniform(*args.lr_range),
    }
    if args.weight_decay_range:
        space["weight_decay"] = tune.loguniform(*args.weight_decay_range)
    if args.batch_sizes:
        space["batch_size"] = tune.choice(args.batch_sizes)
    return space


def summarize(results: tune.ResultGrid, out: Path, trials_dir: str) -> pd.DataFrame:
    """trials.csv, tune.png and best/ from a finished (or partly failed) search."""
    rows = []
    for r in results:
        history = r.metrics_dataframe
        row = {**{f"config/{k}": v for k, v in (r.config or {}).items()}}
        row.update({
            "trial": Path(r.path).name if r.path else None,
            "status": "ERROR" if r.error else "OK",
            "best_val_mae": float(history["val_mae"].min()) if history is not None and "val_mae" in history else None,
            "epochs_run": len(history) if history is not None else 0,
            "error": str(r.error).strip().splitlines()[-1][:300] if r.error else "",
        })
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("best_val_mae", na_position="last").reset_index(drop=True)
    table.to_csv(out / "trials.csv", index=False)
    ok = table[table["best_val_mae"].notna()]
    if ok.empty:  # the caller reports it, once trials.csv is where the user looks
        return table
    plots.tune_scatter(ok, out / "tune.png")
    winner = results.get_best_result(metric="val_mae", mode="min", scope="all", filter_nan_and_inf=True)
    export_best(ray.train.Result.from_path(_trial_folder(trials_dir, winner)), out / "best")
    (out / "best_config.json").write_text(json.dumps(winner.config, indent=2) + "\n")
    return table


def _trial_folder(trials_dir: str, result: tune.Result) -> str:
    """The Ray Train run folder (path or URI) of a trial (``run_trial`` names it after the trial id)."""
    fs, inner = storage.filesystem(trials_dir)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(inner)):
        name = info.base_name
        if name.startswith("trial_") and f"_{name.removeprefix('trial_')}_" in Path(result.path).name:
            return storage.join(trials_dir, name)  # result.path: run_trial_<id>_<n>_<config>
    raise FileNotFoundError(f"no Ray Train run folder in {trials_dir} for the trial {result.path}")


def tune_run(args: argparse.Namespace) -> pd.DataFrame:
    out = storage.absolute(args.out)  # a folder or a URI; trials' Ray Train runs are written there directly
    trials_dir = storage.join(out, "trials")
    if args.pretrained_file:
        pretrained, file = "file", str(Path(args.pretrained_file).resolve())
    else:
        pretrained, file = ("none" if args.no_pretrained else "hub"), None
    model_cfg = ModelConfig(backbone=args.backbone, pretrained=pretrained, pretrained_file=file)
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, patience=args.patience, workers=args.workers,
                      gpu=args.gpu, batch_size=args.batch_size, seed=args.seed, keep_checkpoints=1)
    setup = setup_run(args.prepared, model_cfg, cfg, cpus_per_worker=args.cpus_per_worker, address=args.address)
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = setup.cpus_per_worker * cfg.workers
    # each trial's input pipeline needs about a CPU of its own beside its workers, or trials starve each other
    concurrent = args.concurrent or max(1, int((cpus - 1) // (per_trial + 1)) if not cfg.gpu else
                                        int(ray.cluster_resources().get("GPU", 1) // cfg.workers))
    # A trial only drives its TorchTrainer, whose workers hold the resources: a trial that held a whole
    # CPU itself would leave a small machine none for its workers, and the search would hang. (Tune
    # refuses an empty request, hence a token share.)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup, trials_dir=trials_dir),
                                    {"CPU": 0.01})
    search_root = storage.absolute(args.storage_path or out)  # Tune's own state: a folder or a URI
    experiment = storage.join(search_root, SEARCH_NAME)
    if args.resume and tune.Tuner.can_restore(experiment):
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        if storage.exists(experiment):
            raise FileExistsError(f"{experiment} holds an earlier search: pass --resume, or choose another --out")
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(args),
            tune_config=tune.TuneConfig(
                metric="val_mae", mode="min", num_samples=args.samples,
                search_alg=tune.search.BasicVariantGenerator(random_state=args.seed, max_concurrent=concurrent),
                scheduler=tune.schedulers.ASHAScheduler(max_t=args.epochs, grace_period=min(args.grace, args.epochs),
                                                        reduction_factor=3),
            ),
            run_config=tune.RunConfig(name=SEARCH_NAME, storage_path=search_root),
        )
    with storage.output_dir(out) as out_path:  # trials.csv, tune.png, best/: staged, then uploaded to a URI
        table = summarize(tuner.fit(), out_path, trials_dir)
    if table["best_val_mae"].isna().all():
        raise RuntimeError(f"every trial failed; see {storage.join(out, 'trials.csv')}: {table['error'].iloc[0]}")
    best = table.iloc[0]
    log.info("%d trials (%d failed); best validation MAE %.3f with %s; checkpoint in %s",
             len(table), int((table["status"] == "ERROR").sum()), best["best_val_mae"],
             {k.removeprefix("config/"): best[k] for k in table.columns if k.startswith("config/")},
             storage.join(out, "best"))
    return table


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="age tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True, help="folder or URI: trials.csv, tune.png, best/, trials/")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--mode", default="frozen", choices=MODES)
    p.add_argument("--backbone", default=ModelConfig.backbone)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained-file", default=None)
    w.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--grace", type=int, default=2, help="epochs every trial runs before ASHA may stop it")
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dropout-range", type=float, nargs=2, default=(0.0, 0.7))
    p.add_argument("--lr-range", type=float, nargs=2, default=(1e-5, 1e-2))
    p.add_argument("--dropouts", type=float, nargs="+", default=None, help="grid of dropouts instead of the range")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="grid of learning rates instead of the range")
    p.add_argument("--weight-decay-range", type=float, nargs=2, default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--storage-path", default=None,
                   help="where Ray Tune keeps the search state (default OUT; a folder or a URI)")
    p.add_argument("--address", default=None)
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    setup_logging()
    return tune_run(args)


if __name__ == "__main__":
    main()

