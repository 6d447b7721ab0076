"""Checkpoint files through ``agecore.checkpoint`` alone: the history beside the metrics, resuming, export."""

import json

import pytest
import torch

from agecore.checkpoint import (
    HISTORY,
    META,
    TRAIN_STATE,
    WEIGHTS,
    copy_checkpoint,
    read_history,
    read_meta,
    restore,
    save_checkpoint,
)
from agecore.config import ModelConfig, Preprocessing
from agecore.errors import InvalidInput, MissingInput
from agecore.model import create_model
from tests.conftest import tiny_checkpoint

TINY = ModelConfig(backbone="test_resnet", pretrained="none", hidden=16)
PREP = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
ROWS = [{"epoch": 0, "train_mae": 9.5, "val_mae": 8.25}, {"epoch": 1, "train_mae": 7.0, "val_mae": 7.5}]


def training_checkpoint(path, history, seed=0):
    torch.manual_seed(seed)
    model = create_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"optimizer": optimizer.state_dict(), "schedule": {"step_count": 12}, "early_stopping": {"bad_epochs": 1}}
    metrics = {**history[-1], "best_val_mae": 7.5, "stopped": False}
    save_checkpoint(path, model, TINY, PREP, metrics=metrics, epoch=history[-1]["epoch"], train_state=state,
                    history=history)
    return model


def test_metrics_hold_this_epoch_and_the_history_every_epoch(tmp_path):
    training_checkpoint(tmp_path, ROWS)
    meta = json.loads((tmp_path / META).read_text())
    assert "history" not in meta["metrics"] and meta["metrics"]["val_mae"] == 7.5 and meta["epoch"] == 1
    assert read_history(tmp_path) == ROWS
    assert json.loads((tmp_path / HISTORY).read_text()) == {"epochs": ROWS}


def test_a_checkpoint_without_history_has_none(tmp_path):
    assert read_history(tiny_checkpoint(tmp_path / "ck")) == []


def test_a_history_file_that_is_not_one_is_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ck")
    (ckpt / HISTORY).write_text('{"rows": []}')
    with pytest.raises(InvalidInput, match=r"history\.json: no list of epochs"):
        read_history(ckpt)


def test_restore_gives_weights_train_state_and_history_and_resuming_continues_it(tmp_path):
    trained = training_checkpoint(tmp_path / "e1", ROWS, seed=0)
    fresh = create_model(TINY)  # other weights until restored
    x = torch.randn(2, 3, 64, 64)
    trained.eval()
    fresh.eval()
    assert not torch.allclose(fresh(x), trained(x))
    saved = restore(tmp_path / "e1", fresh)
    assert torch.allclose(fresh(x), trained(x))
    assert saved.epoch == 1 and saved.history == ROWS
    assert saved.train_state["schedule"] == {"step_count": 12} and "state" in saved.train_state["optimizer"]
    # the next epoch's checkpoint carries the restored rows and its own
    row = {"epoch": 2, "train_mae": 6.0, "val_mae": 7.0}
    save_checkpoint(tmp_path / "e2", fresh, TINY, PREP, metrics=row, epoch=2, train_state=saved.train_state,
                    history=[*saved.history, row])
    assert [r["epoch"] for r in read_history(tmp_path / "e2")] == [0, 1, 2]
    assert read_history(tmp_path / "e2")[:2] == ROWS


def test_restore_needs_a_train_state(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ck")
    with pytest.raises(MissingInput, match=r"train_state\.pt is missing"):
        restore(ckpt, create_model(TINY))


def test_restore_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(MissingInput, match="not an agecore checkpoint"):
        restore(tmp_path, create_model(TINY))


def test_export_keeps_the_history_and_drops_the_train_state(tmp_path):
    training_checkpoint(tmp_path / "run", ROWS)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "stale.txt").write_text("from an earlier export")
    best = copy_checkpoint(tmp_path / "run", tmp_path / "best")
    assert sorted(p.name for p in best.iterdir()) == sorted([WEIGHTS, META, HISTORY])
    assert read_history(best) == ROWS and read_meta(best)["epoch"] == 1
    assert (copy_checkpoint(tmp_path / "run", tmp_path / "full", train_state=True) / TRAIN_STATE).is_file()
