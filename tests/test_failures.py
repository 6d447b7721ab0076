"""A Serve replica killed under load; the service recovers.

Processes are killed with SIGKILL, as a crashed or preempted machine would leave them: no
clean shutdown, no warning. (A training worker killed mid-run is in ``test_train_job.py``, a
whole node lost during scoring in ``test_cluster.py``.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
import requests

from tests.conftest import free_port, subset, tiny_checkpoint

pytestmark = pytest.mark.slow


def alive_actors(class_prefix: str) -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix) and a["Pid"]]


@pytest.fixture
def two_replicas(ray_local, tmp_path):
    from ray import serve

    from agecore.config import ServeConfig
    from ray_jobs.serve import age_app

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = age_app(ServeConfig(checkpoint=str(ckpt), replicas=2, num_cpus=0.25, threads=1, max_body_mb=1.0))
    serve.run(app, name="failover", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_service_recovers_from_a_killed_replica(two_replicas, faces_root):
    from ray import serve

    image = (faces_root / "final_files" / subset(faces_root, 1)["file_name"][0]).read_bytes()
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()
    clients = 4

    def client() -> None:
        with requests.Session() as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{two_replicas}/v1/age?detect_faces=false", data=image, headers={"content-type": "image/jpeg"},
                                  timeout=30)
                    outcomes.append((time.monotonic(), "ok" if r.status_code == 200 else str(r.status_code)))
                except requests.RequestException as e:
                    outcomes.append((time.monotonic(), type(e).__name__))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    replicas = alive_actors("ServeReplica:failover")
    assert len(replicas) == 2
    killed_at = time.monotonic()
    os.kill(replicas[0]["Pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while len(alive_actors("ServeReplica:failover")) < 2 or time.monotonic() < killed_at + 5:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    time.sleep(3)  # traffic on the replaced replica set
    stop.set()
    for t in threads:
        t.join(timeout=60)

    before = [o for t, o in outcomes if t < killed_at]
    after = [o for t, o in outcomes if t >= killed_at]
    failed = Counter(o for o in after if o != "ok")
    assert before and all(o == "ok" for o in before)
    # at most the requests in flight on the killed replica may fail (one per client at the time)
    assert sum(failed.values()) <= clients, failed
    assert after[-clients * 3:] == ["ok"] * len(after[-clients * 3:])
    # the controller marks the application RUNNING again once its health checks see the new replica
    deadline = time.monotonic() + 60
    while (status := serve.status().applications["failover"].status) != "RUNNING":
        assert time.monotonic() < deadline, f"application still {status} a minute after the replica came back"
        time.sleep(1)
    assert len(alive_actors("ServeReplica:failover")) == 2
    print(f"replica killed under load: {len(after)} requests after the kill, failed: {dict(failed) or 'none'}")
