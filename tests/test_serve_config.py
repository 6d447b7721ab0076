"""`age serve` and serve_config.yaml take the same keys, and refuse user errors before Ray starts (no Ray here)."""

import dataclasses
import socket
from pathlib import Path

import pytest
import yaml

from agecore.errors import InvalidInput, MissingInput, UserError
from tests.conftest import tiny_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def config_args() -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())
    (app,) = [a for a in cfg["applications"] if a["import_path"] == "ray_jobs.serve:build_app"]
    return app["args"]


def test_the_config_serves_what_the_quickstart_trains_and_its_args_are_the_cli_options():
    from agecore.config import ServeConfig
    from ray_jobs.options import config_from_args
    from ray_jobs.serve import parse_args
    from ray_jobs.serve.app import build_parser

    config = parse_args(config_args())
    assert config == ServeConfig(checkpoint="runs/faces/train/best")  # every key it sets is the default
    parser = build_parser()
    options = {a.dest for a in parser._actions} - {"help", "host", "port", "metrics_port", "log_file", "verbose"}
    assert options == {f.name for f in dataclasses.fields(ServeConfig)} and set(config_args()) <= options
    cli = parser.parse_args(["--checkpoint", "x", "--replicas", "2", "--threads", "1"])
    assert config_from_args(ServeConfig, cli) == ServeConfig(checkpoint="x", replicas=2, threads=1)


def test_the_deployment_options_come_from_the_config_alone():
    from agecore.config import ServeConfig

    auto = ServeConfig(checkpoint="x", min_replicas=2, max_replicas=6, target_ongoing_requests=4, num_gpus=1)
    assert auto.deployment_options() == {
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 4},
        "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1}}
    fixed = ServeConfig(checkpoint="x", replicas=3).deployment_options()
    assert fixed["num_replicas"] == 3 and fixed["autoscaling_config"] is None


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"checkpoint": "x", "precision": "fp16"}, "precision must be one of"),
        ({"checkpoint": "x", "replicas": 0}, "replicas"),
        ({"checkpoint": "x", "max_body_mb": -1}, "max_body_mb"),
        ({"checkpoint": "x", "min_replicas": 5}, "min_replicas"),
        ({"checkpoint": "x", "max_batch": 4}, "max_batch"),
        ({}, "checkpoint"),
    ],
)
def test_a_bad_arg_is_a_user_error_naming_it(args, named):
    from ray_jobs.serve import parse_args

    with pytest.raises(InvalidInput, match=named):
        parse_args(args)


def _no_ray(monkeypatch) -> None:
    """Fail the test if the job gets as far as starting (or joining) Ray: another test's may be running."""
    import ray_jobs.common

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray_jobs.common, "init_ray", started)


def test_age_serve_refuses_a_folder_that_is_not_a_checkpoint_before_ray_starts(tmp_path, monkeypatch):
    from ray_jobs.serve import main

    _no_ray(monkeypatch)
    with pytest.raises(MissingInput, match=str(tmp_path)):
        main(["--checkpoint", str(tmp_path)])


def test_age_serve_refuses_a_port_in_use_before_ray_starts(tmp_path, monkeypatch):
    from ray_jobs.serve import main

    _no_ray(monkeypatch)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InvalidInput, match=f"--port {port}: .* in use") as e:
            main(["--checkpoint", str(ckpt), "--port", str(port)])
    assert isinstance(e.value, UserError)


def test_the_age_command_prints_the_error_in_a_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "serve", "--checkpoint", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"age serve: error: {tmp_path} is not an agecore checkpoint" in r.stderr


def test_a_replica_imports_no_plotting_library(tmp_path):
    """What a replica loads (the deployment's module, a predictor on a checkpoint) leaves matplotlib out."""
    import subprocess
    import sys

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    code = ("import sys; from ray_jobs.serve.app import AgeService; from agecore.predictor import Predictor; "
            f"Predictor({str(ckpt)!r}, 'cpu', batch_size=1).predict_faces; "
            "from agecore.checkpoint import read_calibration; read_calibration(" + repr(str(ckpt)) + "); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'agecore')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout
    assert "matplotlib" not in loaded and "agecore.plots" not in loaded and "agecore.evaluate" not in loaded, loaded
    assert "agecore.predictor" in loaded  # the probe did load what a replica loads
