"""Requests/s and latency of the Serve app under load, against the model's own ceiling, in one run.

    python benchmarks/serve_load.py --checkpoint runs/train/best [--images ../shared/data/faces/final_files]

1. before Serve starts: the scoring benchmark's ceiling (``benchmarks/score.py``: the forward pass alone on
   decoded faces, the better of one process running every CPU as threads and one single-thread process
   per CPU), and, in this process with a replica's threads, the forward time of one image (batch of 1);
2. closed-loop phases: C clients each post a face to ``/v1/age`` on 127.0.0.1, wait for the answer and
   post again, for ``--phase-seconds`` at each ``--concurrency``;
3. a soak: an open-loop client posts at ``--soak-fraction`` of the peak rate for ``--soak-seconds``
   (latency counted from each request's scheduled time, so a stalled service cannot hide), counting errors.

The app is started here from ``--config`` (its args and the AgeService deployment options) with the
checkpoint and a fixed number of replicas in place of autoscaling. The load generator runs on the same
machine, so on a small one it competes with the service for the CPUs. Prints markdown tables and checks:
peak >= 80% of the ceiling, p50 at one client <= 1.3x the single-image forward time, no errors in the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from score import machine_ceilings  # benchmarks/score.py, beside this file

from agecore.datasets import list_images
from agecore.predictor import Predictor
from ray_jobs.serve.schema import BATCH_SIZE


@dataclass
class Phase:
    name: str
    load: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests only
    in_replica: list[float] = field(default_factory=list)  # the answers' own "seconds": decode to age
    errors: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        return float(np.percentile(values, q)) * 1000 if values else float("nan")

    def row(self) -> str:
        errors = sum(self.errors.values())
        detail = f" ({', '.join(f'{k}: {v}' for k, v in self.errors.most_common(3))})" if errors else ""
        return (f"| {self.name} | {self.load} | {len(self.latencies) + errors} | {errors}{detail} | {self.rate:.1f} | "
                f"{self.percentile(50):.1f} | {self.percentile(95):.1f} | {self.percentile(99):.1f} | "
                f"{self.percentile(50, self.in_replica):.1f} |")


# -- the model alone ---------------------------------------------------------------------------------


def single_image_times(predictor: Predictor, bodies: list[bytes], seconds: float) -> tuple[np.ndarray, dict[str, float]]:
    """The decoded faces, and the ms of one image's decode + resize and of its forward pass (batch of 1)."""
    start = time.perf_counter()
    arrays = np.stack([predictor.preprocess(b) for b in bodies])
    preprocess_ms = (time.perf_counter() - start) / len(bodies) * 1000
    for _ in range(3):  # warm-up: TorchScript optimises on the first calls
        predictor.predict_arrays(arrays[:1])
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 20:
        t0 = time.perf_counter()
        predictor.predict_arrays(arrays[len(times) % len(arrays)][None])
        times.append(time.perf_counter() - t0)
    return arrays, {"single_ms": statistics.median(times) * 1000, "preprocess_ms": preprocess_ms}


def face_bodies(folder: str, count: int) -> list[bytes]:
    """The bytes of ``count`` images spread evenly over ``folder``: what the clients post, in turn."""
    paths = list_images(folder)
    if not paths:
        raise SystemExit(f"no images under {folder}")
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int)]
    return [Path(x).read_bytes() for x in paths]


# -- the load ----------------------------------------------------------------------------------------


async def post(session: aiohttp.ClientSession, url: str, body: bytes, phase: Phase, since: float) -> None:
    try:
        async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as r:
            body = await r.read()
            if r.status == 200:
                phase.latencies.append(time.perf_counter() - since)
                phase.in_replica.append(json.loads(body)["seconds"])
            else:
                phase.errors[f"HTTP {r.status}"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        phase.errors[type(e).__name__] += 1


async def closed_loop(session: aiohttp.ClientSession, url: str, bodies: list[bytes], clients: int,
                      seconds: float) -> Phase:
    phase = Phase("closed loop", f"{clients} clients")
    start = time.perf_counter()
    end = start + seconds

    async def client(i: int) -> None:
        while time.perf_counter() < end:
            await post(session, url, bodies[i % len(bodies)], phase, time.perf_counter())
            i += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    phase.seconds = time.perf_counter() - start
    return phase


async def open_loop(session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float, seconds: float,
                    max_in_flight: int) -> Phase:
    """Requests start on a fixed schedule whether or not earlier ones have been answered."""
    phase = Phase("soak (open loop)", f"{rate:.1f} req/s")
    in_flight: set[asyncio.Task] = set()
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(in_flight) >= max_in_flight:
            phase.errors["client backlog full"] += 1
            continue
        task = asyncio.create_task(post(session, url, bodies[i % len(bodies)], phase, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    phase.seconds = time.perf_counter() - start
    return phase


async def run_load(url: str, bodies: list[bytes], args: argparse.Namespace) -> tuple[list[Phase], Phase | None]:
    limit = max(max(args.concurrency), args.max_in_flight)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                     timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        for clients in (1, max(args.concurrency)):  # warm-up, not counted: batch shapes seen once
            await closed_loop(session, url, bodies, clients, 3)
        phases = []
        for clients in args.concurrency:
            phases.append(await closed_loop(session, url, bodies, clients, args.phase_seconds))
            print(phases[-1].row(), flush=True)
        peak = max(p.rate for p in phases)
        soak = None
        if args.soak_seconds > 0 and peak > 0:
            soak = await open_loop(session, url, bodies, args.soak_fraction * peak, args.soak_seconds,
                                   args.max_in_flight)
            print(soak.row(), flush=True)
    return phases, soak


# -- the service -------------------------------------------------------------------------------------


def serve_settings(config: Path) -> tuple[dict[str, Any], str, int]:
    """(app args, route prefix, port) of the config's ``ray_jobs.serve`` app."""
    cfg = yaml.safe_load(config.read_text())
    app = next(a for a in cfg["applications"] if a["import_path"] == "ray_jobs.serve:build_app")
    return dict(app.get("args", {})), app.get("route_prefix", "/"), cfg.get("http_options", {}).get("port", 8000)


def replica_threads(config: Path) -> int:
    """The torch threads a replica of the config runs: its ``args.threads``, else Ray's OMP_NUM_THREADS,
    which Ray sets to the actor's ``num_cpus``."""
    app_args, _, _ = serve_settings(config)
    return int(app_args.get("threads") or app_args.get("num_cpus", 1))


def start_service(checkpoint: str, config: Path, replicas: int, threads: int, port: int | None) -> str:
    import ray
    from ray import serve

    from ray_jobs.serve import age_app, parse_args

    app_args, prefix, config_port = serve_settings(config)
    # fixed replicas: autoscaling would change the thing being measured mid-phase
    app_args.update(checkpoint=checkpoint, threads=threads, replicas=replicas)
    # local on purpose (the load comes from this host); replica logs stay in Ray's log files
    ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)
    port = port or config_port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(age_app(parse_args(app_args)), name="age", route_prefix=prefix)
    # face crops, posted as crops: the model's path, not the face detector's
    return f"http://127.0.0.1:{port}{prefix.rstrip('/')}/v1/age?detect_faces=false"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", default="../shared/data/faces/final_files", help="folder of face images to post")
    p.add_argument("--num-images", type=int, default=64, help="distinct images posted in turn")
    p.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    p.add_argument("--port", type=int, default=None, help="default: the config's http_options.port")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per replica and for the single-image forward time (default: what the config gives a replica)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="timing of the single-image forward pass")
    p.add_argument("--ceiling-images", type=int, default=512, help="faces each ceiling process runs through")
    p.add_argument("--soak-seconds", type=float, default=300.0)
    p.add_argument("--soak-fraction", type=float, default=0.8, help="soak rate as a fraction of the peak rate")
    p.add_argument("--max-in-flight", type=int, default=256, help="open-loop cap; requests over it count as errors")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    args = p.parse_args()
    # a replica's threads as serve_config.yaml sets them: one per replica leaves the other cores to the
    # proxy, Ray and the load generator.
    threads = args.threads or replica_threads(args.config)

    bodies = face_bodies(args.images, args.num_images)

    predictor = Predictor(args.checkpoint, threads=threads)
    arrays, single = single_image_times(predictor, bodies, args.ceiling_seconds)
    identity = predictor.identity
    del predictor
    work = Path(tempfile.mkdtemp())
    try:
        ceilings = machine_ceilings(args.checkpoint, np.resize(arrays, (args.ceiling_images, *arrays.shape[1:])), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ceiling = max(ceilings.values())

    from ray import serve

    url = start_service(args.checkpoint, args.config, args.replicas, threads, args.port)
    print(f"\n{identity['backbone']} {identity['input_size']} px, flip TTA {identity['tta_flip']}, "
          f"{identity['precision']}; {args.replicas} replica(s) x {threads} torch threads; serve batch {BATCH_SIZE}; "
          f"{os.cpu_count()} CPUs shared with the load generator\n")
    print("| phase | load | requests | errors | answers/s | p50 ms | p95 ms | p99 ms | p50 in replica ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    try:
        phases, soak = asyncio.run(run_load(url, bodies, args))
    finally:
        serve.shutdown()

    peak = max(phases, key=lambda ph: ph.rate)
    p50_one = next((ph.percentile(50) for ph, c in zip(phases, args.concurrency, strict=True) if c == 1), None)
    print("\n| model alone | value |")
    print("|---|---:|")
    for layout, rate in ceilings.items():
        print(f"| forward pass on decoded faces, {layout}{' (ceiling)' if rate == ceiling else ''} "
              f"| {rate:.1f} images/s |")
    print(f"| forward pass, batch of 1, {threads} thread(s) like a replica | {single['single_ms']:.1f} ms |")
    print(f"| decode + resize one image | {single['preprocess_ms']:.1f} ms |")
    print("\n| goal | measured | met |")
    print("|---|---|---|")
    share = peak.rate / ceiling
    print(f"| peak >= 80% of the ceiling | {share:.0%} ({peak.rate:.1f} at {peak.load} / "
          f"{ceiling:.1f}) | {'yes' if share >= 0.8 else 'no'} |")
    if p50_one is not None:
        ratio = p50_one / single["single_ms"]
        print(f"| p50 at 1 client <= 1.3x one forward pass | {ratio:.2f}x ({p50_one:.1f} / {single['single_ms']:.1f} ms)"
              f" | {'yes' if ratio <= 1.3 else 'no'} |")
    if soak is not None:
        errors = sum(soak.errors.values())
        print(f"| soak: no errors at {args.soak_fraction:.0%} of peak for {args.soak_seconds:.0f} s | {errors} errors in "
              f"{len(soak.latencies) + errors} requests | {'yes' if errors == 0 else 'no'} |")


if __name__ == "__main__":
    main()
