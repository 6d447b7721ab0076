"""`age serve` and serve_config.yaml take the same keys, and refuse user errors before Ray starts (no Ray here)."""

import argparse
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
    from ray_jobs.serve import ServeArgs

    args = ServeArgs.parse(config_args())
    assert args.checkpoint == "runs/faces/train/best" and args.max_body_mb == 10 and args.replicas == "auto"
    parser = argparse.ArgumentParser()
    ServeArgs.add_arguments(parser)
    options = {a.dest for a in parser._actions if a.dest != "help"}
    assert options == set(ServeArgs.model_fields) and set(config_args()) <= options
    cli = vars(parser.parse_args(["--checkpoint", "x", "--replicas", "2", "--threads", "1"]))
    assert ServeArgs.parse(cli) == ServeArgs(checkpoint="x", replicas=2, threads=1)  # same defaults elsewhere


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"checkpoint": "x", "precision": "fp16"}, "precision must be fp32 or bf16"),
        ({"checkpoint": "x", "replicas": 0}, "replicas"),
        ({"checkpoint": "x", "max_body_mb": -1}, "max_body_mb"),
        ({"checkpoint": "x", "max_batch": 4}, "max_batch"),
        ({}, "checkpoint"),
    ],
)
def test_a_bad_arg_is_a_user_error_naming_it(args, named):
    from ray_jobs.serve import ServeArgs

    with pytest.raises(InvalidInput, match=named):
        ServeArgs.parse(args)


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
