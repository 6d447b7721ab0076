"""What every job shares: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import ray
import ray.data

from agecore.config import PRECISION_HELP, PRECISIONS
from agecore.errors import InvalidInput

# Loggers of the libraries under the jobs: their notices and Python's warnings say little to a user,
# so a quiet job sends them to its log file only.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune", "py.warnings", "torch", "timm",
                   "urllib3", "filelock", "fsspec", "huggingface_hub")


def setup_logging(verbose: bool = False, log_file: str | Path | None = None) -> None:
    """The jobs' own messages on the terminal; with ``log_file``, everything at DEBUG in that file too.

    A job with a log file is quiet: its own INFO lines, Ray's own loggers, Python's warnings and what
    Ray prints by itself (its core worker's and raylet's warnings) go to the file alone, unless
    ``verbose``; the terminal keeps warnings and what the job prints for its user.
    """
    quiet = log_file is not None and not verbose
    if quiet:
        _ray_output_to(log_file)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [console]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if log_file is None:
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [to_file, console] if verbose else [to_file]
        library.propagate = False


def _ray_output_to(log_file: str | Path) -> None:
    """Send what Ray writes on its own to ``log_file``, and keep the job's messages on the terminal.

    Ray's C++ core worker logs its warnings to descriptor 2 of the driver (which the processes that
    ``ray.init`` starts inherit), and the driver prints the raylet's warnings through ``sys.stdout``.
    Descriptor 2 and ``sys.stdout`` go to the log; ``sys.stderr``, through which the jobs write their
    messages and progress, stays on the terminal.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    sys.stdout.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout = os.fdopen(os.dup(2), "w", buffering=1)  # the log, through the descriptor opened on it


# Where a local Ray started on this host keeps the logs of its processes (Serve's in its serve/ folder)
LOCAL_RAY_LOGS = "/tmp/ray/session_latest/logs"

# Rows in one call of a model actor (Ray Data's map_batches) where a job does not say: enough to keep
# the network's chunks full, few enough that every actor of a small job gets several calls.
PREDICT_BATCH_ROWS = 64


def add_address_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)


def init_ray(address: str | None = None, *, quiet: bool = False, metrics_port: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS``; with neither, start a local Ray on this host.

    A local Ray keeps its dashboard on 127.0.0.1: nothing is exposed beyond this host. The dashboard
    is not optional: it serves the State API, through which Ray Train releases the CPUs of a run
    whose controller was killed (every Tune trial that ASHA stops). Without it those placement
    groups leak and, on a small machine, the next trial waits for CPUs forever.

    ``quiet`` keeps the output of Ray's workers and Ray Data's progress tables off the terminal
    (they stay in Ray's session logs, whose folder is logged); the jobs draw their own progress.
    ``metrics_port`` is where a local Ray serves Prometheus metrics (default: a free port).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=not quiet,
                 _metrics_export_port=metrics_port)
    if quiet:  # one bar per Ray Data pass, on a terminal only: piped into a file, bars are noise
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.enable_operator_progress_bars = False
    log = logging.getLogger(__name__)
    log.info("Ray resources: %s", ray.cluster_resources())
    if quiet:
        log.info("the output of Ray's workers is in Ray's session logs (a local Ray: %s)", LOCAL_RAY_LOGS)


def read_parquet(path: str, *, num_cpus: float | None = None) -> ray.data.Dataset:
    """``ray.data.read_parquet`` through Ray Data's single-operator Parquet reader.

    Ray's default reader starts with a ListFiles task that asks for a whole CPU: slow for the small
    per-epoch passes of training, and never scheduled on a node whose training workers leave less
    than one CPU free (the run hangs). ``num_cpus`` sizes the read tasks to fit beside such workers.
    """
    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = previous


def model_actor_options(gpu: bool = False, actors: int | None = None, cpus_per_actor: int = 2) -> tuple[dict, int]:
    """``map_batches`` options for model actors, and the torch threads each should use.

    On CPUs each actor asks Ray for one CPU but runs ``cpus_per_actor`` threads, so that on a small
    machine CPUs are left for Ray Data's read and write tasks (a pool that takes every CPU starves
    them and the pipeline stalls). A pipeline without such tasks (scoring: paths in, and write tasks
    that ask for no CPU) takes one single-thread actor per CPU (``cpus_per_actor=1``), the faster
    layout on CPUs (docs/benchmarks.md, ``benchmarks/score.py``). On GPUs, one actor per GPU.

    Without ``actors`` the pool is sized by the cluster as it is now; ``actors`` asks for that many,
    which an autoscaling cluster starts nodes for.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1), int(resources.get("GPU", 0))
    if gpu:
        if not gpus and not actors:
            raise InvalidInput("--gpu: the Ray cluster has no GPU now; on an autoscaling cluster, ask for GPU "
                               "actors with --concurrency N and it starts GPU nodes for them")
        n = actors or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_gpus": 1, "num_cpus": 1}, 0
    n = actors or max(1, int(cpus // cpus_per_actor))
    threads = max(1, int(cpus // n))
    return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": 1}, threads
