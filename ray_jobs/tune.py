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
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune as ray_tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from agecore import plots, storage
from agecore.config import ModelConfig, TrainConfig
from agecore.errors import InvalidInput
from ray_jobs.common import setup_logging
from ray_jobs.options import add_config_arguments, config_from_args, override_defaults, parse_with_config
from ray_jobs.run_setup import RunSetup, setup_run
from ray_jobs.train import (
    add_ray_arguments,
    add_training_arguments,
    configs_from_args,
    defaults_from_run,
    export_best,
    make_trainer,
)

log = logging.getLogger("ray_jobs.tune")

SEARCH_NAME = "search"
# the training options whose values the search draws: a fixed --lr or --dropout would be overridden
SEARCHED = ("lr", "dropout")
# what each trial's workers reserve where the caller gives nothing: small, so that trials run side by side
TRIAL_CPUS_PER_WORKER = 0.5
# `age tune`'s own defaults for training options, each with the reason a search needs it
TUNE_DEFAULTS: dict[str, tuple[Any, str]] = {
    "mode": ("frozen", "so that a trial's epoch takes seconds"),
    "epochs": (12, "also ASHA's max_t, the longest a trial runs"),
    "keep_checkpoints": (1, "a trial keeps its best checkpoint only"),
    "cpus_per_worker": (TRIAL_CPUS_PER_WORKER, "so that trials run side by side"),
}


@dataclass(frozen=True)
class SearchConfig:
    """What Ray Tune draws for each trial, how many trials, and when ASHA may stop one.

    A grid (``dropouts``, ``lrs``) replaces its range; every grid point is run ``samples`` times.
    Grid values are not checked here: a bad one fails its own trial, which is recorded.
    """

    samples: int = field(default=16, metadata={"help": "trials drawn (with a grid: runs of each grid point)"})
    dropout_range: tuple[float, float] = field(
        default=(0.0, 0.7), metadata={"help": "dropout drawn uniformly from LO HI"})
    lr_range: tuple[float, float] = field(
        default=(1e-5, 1e-2), metadata={"help": "learning rate drawn log-uniformly from LO HI"})
    dropouts: tuple[float, ...] | None = field(
        default=None, metadata={"help": "grid of dropouts instead of --dropout-range"})
    lrs: tuple[float, ...] | None = field(
        default=None, metadata={"help": "grid of learning rates instead of --lr-range"})
    weight_decay_range: tuple[float, float] | None = field(
        default=None, metadata={"help": "weight decay drawn log-uniformly from LO HI (default: --weight-decay for every trial)"})
    batch_sizes: tuple[int, ...] | None = field(
        default=None, metadata={"help": "batch sizes to choose from (default: --batch-size for every trial)"})
    grace: int = field(default=2, metadata={"help": "epochs every trial runs before ASHA may stop it"})
    concurrent: int | None = field(
        default=None, metadata={"help": "trials at once (default: as many as the CPUs or GPUs allow)"})

    def __post_init__(self) -> None:
        for name in ("dropout_range", "lr_range", "weight_decay_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] <= lo_hi[1]:
                raise InvalidInput(f"{name} must be LO <= HI, got {lo_hi}")
        for name in ("lr_range", "weight_decay_range"):  # drawn on a log scale
            if getattr(self, name) is not None and getattr(self, name)[0] <= 0:
                raise InvalidInput(f"{name} must be above 0, got {getattr(self, name)}")
        for name in ("samples", "grace", "concurrent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1, got {getattr(self, name)}")


def run_trial(config: dict[str, Any], setup: RunSetup, trials_dir: str) -> None:
    """One trial: the shared setup with this trial's values, a Ray Train run in ``trials_dir/trial_ID``.

    Nothing may follow ``fit()`` here: Tune stops a trial as soon as its last report reaches ASHA's
    ``max_t`` (or ASHA cuts it), so the trial's best checkpoint is exported by the driver afterwards.
    """
    model_cfg = ModelConfig.from_dict({**setup.model_cfg.to_dict(), "dropout": config["dropout"]})
    overrides = {k: config[k] for k in ("lr", "weight_decay", "batch_size") if k in config}
    cfg = TrainConfig.from_dict({**setup.cfg.to_dict(), **overrides})
    trial_id = ray_tune.get_context().get_trial_id()
    trainer = make_trainer(setup, trials_dir, name=f"trial_{trial_id}", model_cfg=model_cfg, cfg=cfg,
                           callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error


def search_space(search: SearchConfig) -> dict[str, Any]:
    """Tune's ``param_space``: dropout and learning rate always, weight decay and batch size on request."""
    space: dict[str, Any] = {
        "dropout": ray_tune.grid_search(list(search.dropouts)) if search.dropouts
        else ray_tune.uniform(*search.dropout_range),
        "lr": ray_tune.grid_search(list(search.lrs)) if search.lrs else ray_tune.loguniform(*search.lr_range),
    }
    if search.weight_decay_range:
        space["weight_decay"] = ray_tune.loguniform(*search.weight_decay_range)
    if search.batch_sizes:
        space["batch_size"] = ray_tune.choice(list(search.batch_sizes))
    return space


def _trial_row(r: ray_tune.Result) -> dict[str, Any]:
    """One line of trials.csv: the trial's config, best validation MAE, epochs run, status, error."""
    history = r.metrics_dataframe
    return {
        **{f"config/{k}": v for k, v in (r.config or {}).items()},
        "trial": Path(r.path).name if r.path else None,
        "status": "ERROR" if r.error else "OK",
        "best_val_mae": float(history["val_mae"].min()) if history is not None and "val_mae" in history else None,
        "epochs_run": len(history) if history is not None else 0,
        "error": str(r.error).strip().splitlines()[-1][:300] if r.error else "",
    }


def train_result(trial: ray_tune.Result, trials_dir: str) -> ray.train.Result:
    """The Ray Train run of a trial, found from the checkpoint path its ``TuneReportCallback`` reported."""
    latest = trial.metrics[CHECKPOINT_PATH_KEY]  # a path on the trials' storage filesystem
    return ray.train.Result.from_path(posixpath.dirname(latest), storage_filesystem=storage.filesystem(trials_dir)[0])


def summarize(results: ray_tune.ResultGrid, out: Path, trials_dir: str) -> pd.DataFrame:
    """trials.csv, tune.png and best/ from a finished (or partly failed) search."""
    table = pd.DataFrame([_trial_row(r) for r in results])
    table = table.sort_values("best_val_mae", na_position="last").reset_index(drop=True)
    table.to_csv(out / "trials.csv", index=False)
    ok = table[table["best_val_mae"].notna()]
    if ok.empty:  # the caller reports it, once trials.csv is where the user looks
        return table
    plots.tune_scatter(ok, out / "tune.png")
    winner = results.get_best_result(metric="val_mae", mode="min", scope="all", filter_nan_and_inf=True)
    export_best(train_result(winner, trials_dir), out / "best")
    (out / "best_config.json").write_text(json.dumps(winner.config, indent=2) + "\n")
    return table


def _concurrent_trials(setup: RunSetup, search: SearchConfig) -> int:
    """Trials at once: as given, else as many as the GPUs, or the CPUs less one per trial's input pipeline."""
    if search.concurrent:
        return search.concurrent
    resources = ray.cluster_resources()
    if setup.cfg.gpu:
        return max(1, int(resources.get("GPU", 1) // setup.cfg.workers))
    per_trial = setup.cpus_per_worker * setup.cfg.workers
    # each trial's input pipeline needs about a CPU of its own beside its workers, or trials starve each other
    return max(1, int((resources.get("CPU", 1) - 1) // (per_trial + 1)))


def _tuner(setup: RunSetup, search: SearchConfig, trials_dir: str, experiment: str, resume: bool) -> ray_tune.Tuner:
    """A new Tuner over ``setup``, or the interrupted one in ``experiment`` where ``resume`` asks for it."""
    # A trial only drives its TorchTrainer, whose workers hold the resources: a trial that held a whole
    # CPU itself would leave a small machine none for its workers, and the search would hang. (Tune
    # refuses an empty request, hence a token share.)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, setup=setup, trials_dir=trials_dir), {"CPU": 0.01})
    if resume and ray_tune.Tuner.can_restore(experiment):
        log.info("resuming the search in %s", experiment)
        return ray_tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False, restart_errored=False)
    if storage.exists(experiment):
        raise FileExistsError(f"{experiment} holds an earlier search: pass --resume, or choose another --out")
    epochs = setup.cfg.epochs
    return ray_tune.Tuner(
        trainable,
        param_space=search_space(search),
        tune_config=ray_tune.TuneConfig(
            metric="val_mae", mode="min", num_samples=search.samples,
            search_alg=ray_tune.search.BasicVariantGenerator(random_state=setup.cfg.seed,
                                                             max_concurrent=_concurrent_trials(setup, search)),
            scheduler=ray_tune.schedulers.ASHAScheduler(max_t=epochs, grace_period=min(search.grace, epochs),
                                                        reduction_factor=3),
        ),
        run_config=ray_tune.RunConfig(name=posixpath.basename(experiment), storage_path=posixpath.dirname(experiment)),
    )


def tune(
    prepared: str,
    out: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    search: SearchConfig,
    *,
    resume: bool = False,
    cpus_per_worker: float | None = TRIAL_CPUS_PER_WORKER,
    storage_path: str | None = None,
    cache_dir: str | None = None,
    address: str | None = None,
) -> pd.DataFrame:
    """Search ``search``'s space around ``model_cfg``/``cfg``; write trials.csv, tune.png and best/ under ``out``.

    Returns the trials, best first. Each trial's Ray Train run goes to ``out/trials``; Tune's own
    state to ``storage_path/search`` (default ``out``), which ``resume`` continues.
    """
    out = storage.absolute(out)  # a folder or a URI; trials' Ray Train runs are written there directly
    trials_dir = storage.join(out, "trials")
    setup = setup_run(prepared, model_cfg, cfg, cpus_per_worker=cpus_per_worker, cache_dir=cache_dir,
                      address=address)
    experiment = storage.join(storage.absolute(storage_path or out), SEARCH_NAME)
    tuner = _tuner(setup, search, trials_dir, experiment, resume)
    with storage.output_dir(out) as out_path:  # trials.csv, tune.png, best/: staged, then uploaded to a URI
        table = summarize(tuner.fit(), out_path, trials_dir)
        if table["best_val_mae"].isna().all():
            raise RuntimeError(f"every trial failed; see {storage.join(out, 'trials.csv')}: {table['error'].iloc[0]}")
        from ray_jobs.evaluate import evaluate

        # best/ is served as it is: it carries the calibration of /v1/verify, as a training run's does
        evaluate(str(out_path / "best"), prepared, str(out_path / "val-eval"), split="val", attach=True)
    best = table.iloc[0]
    log.info("%d trials (%d failed); best validation MAE %.3f with %s; checkpoint in %s",
             len(table), int((table["status"] == "ERROR").sum()), best["best_val_mae"],
             {k.removeprefix("config/"): best[k] for k in table.columns if k.startswith("config/")},
             storage.join(out, "best"))
    return table


def build_parser() -> argparse.ArgumentParser:
    """Every option of ``age train`` but the searched ones, then the search's."""
    p = argparse.ArgumentParser(prog="age tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, exclude=SEARCHED)
    add_config_arguments(p.add_argument_group("search"), SearchConfig)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="folder or URI: trials.csv, tune.png, best/, trials/")
    run.add_argument("--resume", action="store_true", help="continue the interrupted search in OUT")
    run.add_argument("--storage-path", default=None,
                     help="where Ray Tune keeps the search state (default: OUT; a folder or a URI)")
    add_ray_arguments(run)
    override_defaults(p, TUNE_DEFAULTS)
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_with_config(build_parser(), argv, defaults_from_run)
    setup_logging()
    model_cfg, cfg = configs_from_args(args)
    return tune(args.prepared, args.out, model_cfg, cfg, config_from_args(SearchConfig, args),
                resume=args.resume, cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                cache_dir=args.cache_dir, address=args.address)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("tune")
