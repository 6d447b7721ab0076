"""What Ray Serve's HTTP path costs without the model: latency and CPU per request.

    python benchmarks/serve_overhead.py [--images ../shared/data/faces/final_files]
    python benchmarks/serve_overhead.py --checkpoint runs/train/best --replicas 2   # the real service

Deploys a model-free stand-in of the AgeService ingress (FastAPI on Serve, one replica of one CPU; it
reads the posted image, decodes and resizes it with ``agecore.images.load_image`` and answers a fixed
age), drives it with ``serve_load.py``'s closed-loop clients on 127.0.0.1 and reads /proc (Linux) for
the CPU seconds each kind of process used. The figures bound the real service on the same machine:
its peak is at most CPUs / (model CPU-s per image + the path's CPU-s per request), and its latency at
one client at least the forward pass plus the path's p50 here.

With ``--checkpoint`` the same measurement runs against the real service (``ray_jobs.serve``, with
``--replicas`` fixed replicas), to show where its CPU goes.
"""

# No `from __future__ import annotations`: Serve's class-based ingress does not resolve string
# annotations such as "Request" (see ray_jobs/serve/app.py).
import argparse
import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import aiohttp
import ray
from fastapi import FastAPI, Request
from ray import serve
from serve_load import closed_loop, face_bodies  # benchmarks/serve_load.py, beside this file

from agecore.images import load_image
from ray_jobs.serve import age_app, parse_args

app = FastAPI()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(app)
class NoModel:
    @app.post("/v1/age")
    async def age(self, request: Request) -> dict:
        start = time.perf_counter()
        load_image(await request.body(), 224)
        return {"age": 30.0, "seconds": time.perf_counter() - start}


def process_kind(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "load generator"
    for prefix, kind in (("ray::ProxyActor", "HTTP proxy"), ("ray::ServeReplica", "replica"),
                         ("ray::ServeController", "Serve controller")):
        if title.startswith(prefix):
            return kind
    return "rest of Ray"


def cpu_seconds() -> Counter:
    """CPU seconds (user + system) so far of every process, summed by kind."""
    ticks, seconds = os.sysconf("SC_CLK_TCK"), Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            title = (entry / "cmdline").read_text().split("\0")[0]
        except OSError:  # the process ended meanwhile
            continue
        seconds[process_kind(int(entry.name), title)] += (int(fields[11]) + int(fields[12])) / ticks
    return seconds


async def measure(url: str, bodies: list[bytes], concurrency: list[int], seconds: float) -> None:
    kinds = ["load generator", "HTTP proxy", "replica", "Serve controller", "rest of Ray"]
    print(f"| clients | answers/s | p50 ms | {' | '.join(kinds)} | total |")
    print("|---:|---:|---:|" + "---:|" * (len(kinds) + 1))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(concurrency))) as session:
        await closed_loop(session, url, bodies, max(concurrency), 3)  # warm-up
        for clients in concurrency:
            before = cpu_seconds()
            phase = await closed_loop(session, url, bodies, clients, seconds)
            used = cpu_seconds() - before
            if phase.errors:
                raise SystemExit(f"{clients} clients: {sum(phase.errors.values())} requests failed: {dict(phase.errors)}")
            n = max(1, len(phase.latencies))
            per_request = [used[k] / n * 1000 for k in kinds]
            print(f"| {clients} | {phase.rate:.1f} | {phase.percentile(50):.1f} | "
                  + " | ".join(f"{ms:.1f}" for ms in per_request) + f" | {sum(per_request):.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="../shared/data/faces/final_files", help="folder of face images to post")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--phase-seconds", type=float, default=15.0)
    p.add_argument("--checkpoint", default=None, help="measure the real service with this checkpoint instead")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the real service (with --checkpoint)")
    args = p.parse_args()
    bodies = face_bodies(args.images, args.num_images)

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    if args.checkpoint:
        app = age_app(parse_args({"checkpoint": args.checkpoint, "replicas": args.replicas}))
        serve.run(app, name="age", route_prefix="/")
        what = f"The service with {args.checkpoint}, {args.replicas} replica(s)"
    else:
        serve.run(NoModel.bind(), name="no-model", route_prefix="/")
        what = "Serve's HTTP path without the model"
    print(f"\n{what}, {os.cpu_count()} CPUs shared with the load generator; CPU ms per answered request by process:\n")
    try:
        asyncio.run(measure(f"http://127.0.0.1:{args.port}/v1/age?detect_faces=false", bodies, args.concurrency, args.phase_seconds))
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
