"""A real two-node Ray cluster on this machine: jobs submitted with ``ray job submit``, a node lost.

The head and a worker node are separate ``ray start`` processes, each with its own temp dir,
port set and resources, joined over TCP as on a real cluster; token authentication is on,
as it is by default for Ray clusters. The jobs are the product's own entry points, shipped
with ``--working-dir`` exactly as the README tells users to.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from ray_jobs.train import RUN_NAME
from tests.conftest import free_port, make_labels_dir, subset

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["min_workers"] == 0 < types["gpu_worker"]["max_workers"]
    # the schema is strict: a misspelt key is refused, so the check above means something
    with pytest.raises(Exception, match="max_workerz"):
        validate_config({**config, "max_workerz": 3})


def _process_tree(root_marker: str) -> list[int]:
    """PIDs of the processes whose command line names ``root_marker``, and all their descendants."""
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if root_marker in cmdline:
            roots.append(int(entry.name))
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_node(temp_dir: str) -> None:
    """Stop one node of a cluster on this machine (``ray stop`` would stop every node here)."""
    for pid in _process_tree(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Cluster:
    env: dict[str, str]
    address: str
    dashboard: str
    head_dir: str
    worker_dir: str

    def submit(self, *args: str, wait: bool = True, timeout: float = 600) -> str:
        """``ray job submit --working-dir REPO -- python -m ...``; returns the job id."""
        job_id = f"test_{secrets.token_hex(4)}"
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--submission-id", job_id,
               "--working-dir", str(REPO), "--no-wait", "--", sys.executable, *args]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)
        if wait:
            self.wait(job_id, timeout)
        return job_id

    # Job state and logs are polled through the Jobs REST API that the CLI itself calls: each
    # `ray job status` would start a Python that imports Ray, about a CPU-second on this machine.
    def _get(self, route: str) -> dict:
        r = requests.get(f"{self.dashboard}/api/jobs/{route}", timeout=30,
                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        r.raise_for_status()
        return r.json()

    def _state(self, resource: str) -> list[dict]:
        """Every actor or node of the cluster, dead ones included (the State API's REST route)."""
        r = requests.get(f"{self.dashboard}/api/v0/{resource}", params={"limit": 10000, "detail": "true"}, timeout=30,
                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def actors(self) -> list[dict]:
        return self._state("actors")

    def nodes(self) -> list[dict]:
        return self._state("nodes")

    def alive_nodes(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self.nodes())

    def status(self, job_id: str) -> str:
        return self._get(job_id)["status"]

    def logs(self, job_id: str) -> str:
        return self._get(f"{job_id}/logs")["logs"]

    def wait(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s:\n{self.logs(job_id)[-3000:]}")
            time.sleep(1)
        assert state == "SUCCEEDED", f"job {job_id} {state}:\n{self.logs(job_id)[-3000:]}"


@pytest.fixture(scope="module")
def cluster():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    # short paths: Ray's socket paths live under the temp dir and Unix limits them to ~107 bytes
    head_dir, worker_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp")
    gcs, dash = free_port(), free_port()
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", "--include-dashboard=true", f"--temp-dir={head_dir}",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--temp-dir={worker_dir}",
                        '--resources={"second_node": 1}', f"--dashboard-agent-listen-port={free_port()}"],
                       env=env, check=True, capture_output=True, timeout=180)
        yield Cluster(env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", head_dir, worker_dir)
    finally:
        stop_node(worker_dir)
        stop_node(head_dir)
        for folder in (worker_dir, head_dir):  # the nodes' session logs
            shutil.rmtree(folder, ignore_errors=True)


def _predictors_alive_on(cluster: Cluster, job_id: str) -> set[str]:
    """The nodes on which a model actor (Ray Data's ``MapWorker(MapBatches(...))``) of a job has loaded."""
    ray_job = cluster._get(job_id)["job_id"]  # the Ray job of the submission: None until its driver runs
    return {a["node_id"] for a in cluster.actors()
            if a["job_id"] == ray_job and a["class_name"].startswith("MapWorker(") and a["state"] == "ALIVE"}


@pytest.mark.slow
@pytest.mark.cluster
def test_jobs_on_two_nodes_and_scoring_survives_a_lost_node(cluster, faces_root, tmp_path):
    assert cluster.alive_nodes() == 2
    data = make_labels_dir(faces_root, tmp_path / "data", 160)
    prepared, run = tmp_path / "prepared", tmp_path / "train"
    # outputs and inputs as URIs, through pyarrow as s3:// ones would be (file:// here: no object store)
    cluster.submit("-m", "ray_jobs.prepare", "--data", f"file://{data}", "--out", f"file://{prepared}", "--image-size", "64",
                   timeout=300)
    summary = json.loads((prepared / "report" / "summary.json").read_text())
    assert summary["accepted"] == 160 and summary["rejected"] == 0

    # two DDP workers of 1.5 CPUs cannot share a 2-CPU node: one runs on each node. The one on the worker
    # node is killed (SIGKILL, as a lost machine leaves it) once the first epoch is saved: Ray Train
    # starts the group again from that checkpoint and the run finishes every epoch exactly once.
    job = cluster.submit("-m", "ray_jobs.train", "--prepared", f"file://{prepared}", "--out", f"file://{run}",
                         "--backbone", "test_resnet", "--no-pretrained", "--mode", "finetune", "--workers", "2",
                         "--cpus-per-worker", "1.5", "--epochs", "2", "--batch-size", "32", "--no-attach", wait=False)
    deadline = time.monotonic() + 300
    while not list((run / RUN_NAME).glob("checkpoint_*")):
        assert cluster.status(job) in ("PENDING", "RUNNING") and time.monotonic() < deadline, cluster.logs(job)[-3000:]
        time.sleep(0.2)
    killed = [pid for pid in _process_tree(cluster.worker_dir) if "RayTrainWorker" in _cmdline(pid)]
    assert len(killed) == 1, killed
    os.kill(killed[0], signal.SIGKILL)
    cluster.wait(job, timeout=400)
    history = pd.read_csv(run / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1]  # nothing lost, nothing done twice
    assert (history["nodes"] == 2).all()
    assert json.loads((run / "best" / "checkpoint.json").read_text())["train"]["mode"] == "finetune"
    workers = [a for a in cluster.actors() if a["class_name"] == "RayTrainWorker"]
    assert killed[0] in {a["pid"] for a in workers}
    assert len(workers) >= 4, "the worker group was not started again"

    # score a collection while the worker node is stopped under it: every row is still written, once
    photos = tmp_path / "photos"
    photos.mkdir()
    names = subset(faces_root, 2000)["file_name"].tolist()
    for name in names:
        os.symlink(faces_root / "final_files" / name, photos / name)
    scores = tmp_path / "scores"
    job = cluster.submit("-m", "ray_jobs.score", "--detect-faces", "false", "--checkpoint", f"file://{run}/best",
                         "--input", f"file://{photos}",
                         "--out", f"file://{scores}", "--batch-size", "16", "--concurrency", "3", wait=False)
    # the node is lost once the job's predictor actors have loaded on both nodes: batches are in flight on it
    deadline = time.monotonic() + 180
    while len(_predictors_alive_on(cluster, job)) < 2:
        assert cluster.status(job) in ("PENDING", "RUNNING") and time.monotonic() < deadline, cluster.logs(job)[-3000:]
        time.sleep(0.5)
    stop_node(cluster.worker_dir)
    assert cluster.status(job) == "RUNNING", "the job ended before the node was lost: nothing was tested"
    cluster.wait(job, timeout=400)
    table = pq.read_table(scores).to_pandas()
    assert len(table) == len(names) and table["path"].is_unique
    assert table["predicted_age"].notna().all(), table[table["predicted_age"].isna()].head()
    # the node was lost for good: the GCS marks it dead once its health checks fail, which may take
    # longer than the rest of a fast job
    deadline = time.monotonic() + 120
    while cluster.alive_nodes() != 1:
        assert time.monotonic() < deadline, "the stopped node is still alive"
        time.sleep(1)
