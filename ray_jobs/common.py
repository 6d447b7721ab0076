"""What every job shares: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import argparse
import logging
import os

import ray
import ray.data

from agecore.predictor import PRECISIONS


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="inference precision (default: bf16 where the device runs it natively: GPUs, CPUs "
                             "with AVX512-BF16 or AMX; fp32 elsewhere)")


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS``; with neither, start a local Ray on this machine.

    A local Ray keeps its dashboard on 127.0.0.1: nothing is exposed beyond this host. The dashboard
    is not optional: it serves the State API, through which Ray Train releases the CPUs of a run
    whose controller was killed (every Tune trial that ASHA stops). Without it those placement
    groups leak and, on a small machine, the next trial waits for CPUs forever.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=True)
    logging.getLogger(__name__).info("Ray resources: %s", ray.cluster_resources())


def read_parquet(path: str, *, num_cpus: float | None = None) -> ray.data.Dataset:
    """``ray.data.read_parquet`` through Ray Data's single-operator Parquet reader.

    Ray 2.60 reads Parquet by default as a ListFiles task followed by ReadFiles tasks, and the
    ListFiles task always asks for a whole CPU. Measured here (2 CPUs, two training workers holding
    one): a pass over a 60-row split took 2.2-3.2 s that way against 0.3 s with the single reader,
    and training runs such passes every epoch (the partial-mode training test went from 125-138 s
    to 79-101 s). Worse, on nodes whose free CPU is under one, as when training workers hold
    1.5 of a node's 2 CPUs, the listing task never starts and the run hangs. ``num_cpus`` sizes the
    read tasks so that they fit beside such workers.
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
    them and the pipeline stalls). A pipeline without such tasks (scoring: paths in, rows back to the
    driver) takes one single-thread actor per CPU (``cpus_per_actor=1``), the faster layout on CPUs:
    25.2 against 22.0 images/s for two processes of one thread against one of two here
    (benchmarks/score.py). On GPUs, one actor per GPU.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1), int(resources.get("GPU", 0))
    if gpu:
        if not gpus:
            raise RuntimeError("--gpu asked for, but the Ray cluster has no GPU")
        n = actors or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_gpus": 1, "num_cpus": 1}, 0
    n = actors or max(1, int(cpus // cpus_per_actor))
    threads = max(1, int(cpus // n))
    return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": 1}, threads
