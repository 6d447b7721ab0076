import json

import numpy as np
import pandas as pd
import pytest

from agecore.config import CalibrateConfig, PrepareConfig
from agecore.datasets import (
    assign_splits,
    detect_format,
    read_records,
    resolve_duplicates,
    validate_labels,
)
from agecore.errors import InvalidInput
from agecore.metrics import age_band
from agecore.prepare import resolve_split
from tests.conftest import make_labels_dir


def test_labels_csv_reader_keeps_utkface_attributes(faces_root, tmp_path):
    root = make_labels_dir(faces_root, tmp_path / "ref", 40)
    df, fmt = read_records(str(root))
    assert fmt == "labels-csv" and len(df) == 40
    assert df["path"].map(lambda p: p.startswith(str(root.resolve()))).all()
    assert df["gender"].notna().mean() > 0.9 and set(df["race"].dropna()) <= {0, 1, 2, 3, 4}


def test_utkface_reader_copes_with_malformed_names(tmp_path):
    names = {
        "25_1_3_20170104231305129.jpg.chip.jpg": ("25", 1, 3),
        "39_1_20170116174525125.jpg.chip.jpg": ("39", None, None),  # a missing field
        "55_0_0_20170116232725357jpg.chip.jpg": ("55", 0, 0),  # a missing dot
        "61_1_0_20170109150557335 .jpg.chip.jpg": ("61", 1, 0),  # a space before .jpg
        "nolabel.jpg": (None, None, None),
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert detect_format(str(tmp_path)) == "utkface"
    df, _ = read_records(str(tmp_path), "utkface")
    got = {p.rsplit("/", 1)[1]: r for p, r in zip(df["path"], df.itertuples(), strict=True)}
    for name, (age, gender, race) in names.items():
        row = got[name]
        if age is None:
            assert "no age" in row.age
        else:
            assert row.age == age
            assert (pd.isna(row.gender) and gender is None) or row.gender == gender
            assert (pd.isna(row.race) and race is None) or row.race == race
    ok, bad = validate_labels(df)
    assert len(ok) == 4 and bad["reason"].tolist() == ["bad_label"]


def test_local_only_paths_given_a_uri_are_refused_by_name():
    with pytest.raises(InvalidInput, match=r"s3://bucket/faces: .*local disk.*manifest"):
        read_records("s3://bucket/faces", "utkface")
    with pytest.raises(InvalidInput, match=r"out must be a local folder.*'gs://bucket/cal'"):
        CalibrateConfig(checkpoint="ckpt", data="photos.csv", name="mine", out="gs://bucket/cal")


def test_manifest_reader_resolves_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    pd.DataFrame({"path": ["imgs/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"], "age": [3, 40, 70]}).to_csv(
        tmp_path / "m.csv", index=False)
    df, fmt = read_records(str(tmp_path / "m.csv"))
    assert fmt == "manifest"
    assert df["path"].tolist() == [str(tmp_path / "imgs" / "a.jpg"), "/abs/b.jpg", "s3://bucket/c.jpg"]
    pd.DataFrame({"file": ["a"], "age": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="path"):
        read_records(str(tmp_path / "bad.csv"))


def test_detect_format_explains_unknown_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        detect_format(str(tmp_path / "missing"))


def test_validate_labels_reasons():
    df = pd.DataFrame({"path": ["a", "b", "c", "d", "e", "a"], "age": ["30", "x", "-1", "121", "nan", "30"]})
    ok, bad = validate_labels(df)
    assert ok["path"].tolist() == ["a"] and ok["age"].dtype == np.float32
    assert dict(zip(bad["path"], bad["reason"], strict=True)) == {
        "b": "bad_label", "c": "age_out_of_range", "d": "age_out_of_range", "e": "bad_label",
        "a": "duplicate_row"}


def test_conflicting_duplicates_are_rejected_agreeing_ones_kept():
    meta = pd.DataFrame({"path": list("abcde"), "age": [20, 25, 30, 30, 50], "digest": ["x", "x", "y", "y", "z"]})
    assert sorted(resolve_duplicates(meta)["path"]) == ["a", "b"]


def test_splits_are_seeded_stratified_and_keep_copies_together():
    rng = np.random.default_rng(1)
    ages = rng.integers(0, 100, 2000)
    digests = [f"d{i // 2}" if i < 200 else f"d{i}" for i in range(2000)]  # 100 pairs of copies
    meta = pd.DataFrame({"age": ages, "digest": digests})
    a = assign_splits(meta, 0.2, 0.1, seed=3)
    assert a.equals(assign_splits(meta, 0.2, 0.1, seed=3))
    assert not a.equals(assign_splits(meta, 0.2, 0.1, seed=4))
    assert meta.assign(split=a).groupby("digest")["split"].nunique().max() == 1
    share = pd.crosstab(age_band(ages), a, normalize="index")
    assert np.allclose(share["val"], 0.2, atol=0.03) and np.allclose(share["test"], 0.1, atol=0.03)


def test_a_test_split_is_held_out_by_default():
    cfg = PrepareConfig(data="d", out="o")
    assert cfg.test_fraction == pytest.approx(0.1) and cfg.val_fraction == pytest.approx(0.15)
    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"age": rng.integers(0, 90, 1000), "digest": [f"d{i}" for i in range(1000)]})
    counts = assign_splits(meta, cfg.val_fraction, cfg.test_fraction).value_counts()
    assert counts["test"] == pytest.approx(100, abs=5) and counts["val"] == pytest.approx(150, abs=5)


def fake_prepared(root, counts: dict[str, int]):
    """The two files that say what a prepared folder holds (no shards: enough to choose a split)."""
    (root / "report").mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({"counts": counts}))
    (root / "report" / "summary.json").write_text(json.dumps({"splits": {}}))
    return root


def test_evaluation_reports_test_where_held_out_else_val(tmp_path):
    held = fake_prepared(tmp_path / "a", {"train": 70, "val": 20, "test": 10})
    assert resolve_split(held, None) == "test" and resolve_split(held, "val") == "val"
    assert resolve_split(fake_prepared(tmp_path / "b", {"train": 80, "val": 20}), None) == "val"
    with pytest.raises(InvalidInput, match=r"--split test: .* holds the splits \['train', 'val'\]"):
        resolve_split(tmp_path / "b", "test")
    assert resolve_split(tmp_path / "m.csv", None) is None
    with pytest.raises(InvalidInput, match="not a prepared folder"):
        resolve_split(tmp_path / "m.csv", "val")


def test_prepare_config_validates():
    with pytest.raises(ValueError, match="val_fraction"):
        PrepareConfig(data="d", out="o", val_fraction=0)
    with pytest.raises(ValueError, match="format"):
        PrepareConfig(data="d", out="o", format="xml")
