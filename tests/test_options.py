"""The stages' options come from the config dataclasses: every field, its default, its choices, its help."""

import dataclasses
import json
import typing

import pytest

from agecore.config import LOSSES, MODES, SCHEDULES, ModelConfig, PrepareConfig, TrainConfig
from agecore.errors import InvalidInput, MissingInput
from ray_jobs import prepare as prepare_job
from ray_jobs import train as train_job
from ray_jobs import tune as tune_job
from ray_jobs.train import MODEL_FIELDS_NOT_OPTIONS, configs_from_args, parse_args

REQUIRED = ["--prepared", "runs/prepared", "--out", "runs/train"]


def actions(parser):
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def option_fields(exclude=()):
    model = [f for f in dataclasses.fields(ModelConfig) if f.name not in (*MODEL_FIELDS_NOT_OPTIONS, *exclude)]
    return [*model, *(f for f in dataclasses.fields(TrainConfig) if f.name not in exclude)]


def test_train_has_an_option_per_field_with_its_default_and_help():
    options = actions(train_job.build_parser())
    for f in option_fields():
        assert options[f.name].default == f.default, f.name
        assert f.metadata["help"] and f.metadata["help"] in options[f.name].help, f.name
    assert all(a.help for a in options.values()), [d for d, a in options.items() if not a.help]
    assert options["mode"].choices == MODES and options["loss"].choices == LOSSES
    assert options["schedule"].choices == SCHEDULES
    # the names the docs and scripts use keep their meaning
    args = parse_args([*REQUIRED, "--no-tta", "--gpu", "--mode", "partial", "--pretrained-file", "w.pth",
                       "--random-crop-scale", "0.5", "1", "--batch-size", "8"])
    model_cfg, cfg = configs_from_args(args)
    assert (cfg.tta_flip, cfg.gpu, cfg.mode, cfg.random_crop_scale, cfg.batch_size) == (False, True, "partial",
                                                                                          (0.5, 1.0), 8)
    assert model_cfg.pretrained == "file" and model_cfg.pretrained_file.endswith("/w.pth")
    assert configs_from_args(parse_args(REQUIRED)) == (ModelConfig(), TrainConfig())


def test_prepare_has_an_option_per_field():
    options = actions(prepare_job.build_parser())
    for f in dataclasses.fields(PrepareConfig):
        expected = None if f.name == "image_size" else f.default  # image_size: the backbone's, unless given
        assert options[f.name].default == (None if expected is dataclasses.MISSING else expected), f.name
        assert options[f.name].required == (f.default is dataclasses.MISSING), f.name
    assert options["format"].choices == typing.get_args(typing.get_type_hints(PrepareConfig)["format"])
    assert all(a.help for a in options.values())


def test_tune_takes_every_training_option_with_trains_defaults_but_its_own():
    train_options, options = actions(train_job.build_parser()), actions(tune_job.build_parser())
    for f in option_fields(exclude=tune_job.SEARCHED):
        expected = tune_job.TUNE_DEFAULTS.get(f.name, (f.default,))[0]
        assert options[f.name].default == expected, f.name
    assert set(train_options) - set(options) == {"lr", "dropout", "no_attach"}
    assert all(a.help for a in options.values())
    assert "so that a trial's epoch takes seconds" in options["mode"].help


def test_config_file_reruns_a_run_and_later_options_override_it(tmp_path):
    model_cfg, cfg = configs_from_args(parse_args([*REQUIRED, "--mode", "frozen", "--lr", "0.002", "--no-pretrained",
                                                   "--hidden", "32", "--no-flip"]))
    # what `age train` writes to OUT/config.json
    saved = {"prepared": "/data/prepared", "model": model_cfg.to_dict(), "train": cfg.to_dict(),
             "preprocessing": {"input_size": 64}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    args = parse_args(["--config", str(path), "--out", "runs/rerun"])
    assert args.prepared == "/data/prepared" and configs_from_args(args) == (model_cfg, cfg)
    args = parse_args(["--config", str(path), "--out", "runs/rerun", "--lr", "0.01", "--flip",
                       "--pretrained-file", "w.pth"])
    rerun_model, rerun = configs_from_args(args)
    assert rerun == dataclasses.replace(cfg, lr=0.01, flip=True)
    assert rerun_model.pretrained == "file" and rerun_model.hidden == 32


def test_bad_options_exit_with_status_2_or_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*REQUIRED, "--mode", "bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(MissingInput, match=r"no-such\.json"):
        parse_args(["--config", str(tmp_path / "no-such.json"), "--out", "x"])
    (tmp_path / "other.json").write_text('{"model": {}}')
    with pytest.raises(InvalidInput, match=r"not a training run's config\.json"):
        parse_args(["--config", str(tmp_path / "other.json"), "--out", "x"])
    with pytest.raises(InvalidInput, match="lr_range"):
        tune_job.SearchConfig(lr_range=(0.0, 0.1))
