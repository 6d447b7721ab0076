"""Readers of labelled face collections, label validation and the train/val/test split.

Every reader returns a DataFrame with at least ``path`` (absolute path or URI) and
``age`` (the raw label, still a string: validation decides what is a number), plus
``gender``/``race`` where the data carry them. Rows that cannot be used are never
dropped silently: they come back as a rejects table with a reason.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs
import pyarrow.parquet as pq

from agecore import storage
from agecore.config import MAX_AGE
from agecore.errors import InvalidInput, MissingInput
from agecore.images import IMAGE_EXTENSIONS
from agecore.metrics import age_band

log = logging.getLogger(__name__)

REJECT_COLUMNS = ["path", "reason", "detail"]

# UTKFace: [age]_[gender]_[race]_[date&time].jpg.chip.jpg. Some names lose a field or a dot;
# the age is always the first field, gender and race are kept only when both are present.
_UTK = re.compile(r"^(?P<age>\d+)_(?P<gender>[01])_(?P<race>[0-4])_\d+")
_UTK_AGE = re.compile(r"^(?P<age>\d+)_")


def parse_utkface_name(name: str) -> dict[str, object] | None:
    """Age (and gender, race where present) from a UTKFace file name, or None.

    >>> parse_utkface_name("25_1_3_20170104231305129.jpg.chip.jpg")
    {'age': '25', 'gender': 1, 'race': 3}
    >>> parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg")
    {'age': '39', 'gender': None, 'race': None}
    >>> parse_utkface_name("face.jpg") is None
    True
    """
    m = _UTK.match(name)
    if m:
        return {"age": m["age"], "gender": int(m["gender"]), "race": int(m["race"])}
    m = _UTK_AGE.match(name)
    if m:
        return {"age": m["age"], "gender": None, "race": None}
    return None


def _join(root: str, name: str) -> str:
    if storage.is_remote(name) or os.path.isabs(name):
        return name
    return f"{root.rstrip('/')}/{name}" if storage.is_remote(root) else os.path.abspath(os.path.join(root, name))


def _read_table(path: str) -> pd.DataFrame:
    """A CSV (every column as text, as written) or a Parquet file or folder, local or behind a URI."""
    if path.endswith(".parquet") or (not storage.is_remote(path) and Path(path).is_dir()):
        if storage.is_remote(path):
            fs, inner = storage.filesystem(path)
            return pq.read_table(inner, filesystem=fs).to_pandas()
        return pd.read_parquet(path)
    if storage.is_remote(path):
        fs, inner = storage.filesystem(path)
        with fs.open_input_stream(inner) as f:
            return pd.read_csv(f, dtype=str, keep_default_na=False)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _with_attributes(df: pd.DataFrame, names: pd.Series) -> pd.DataFrame:
    """Keep UTKFace's gender/race columns when the file names follow that convention."""
    parsed = [parse_utkface_name(Path(n).name) for n in names]
    if names.empty or sum(p is not None for p in parsed) < 0.9 * len(parsed):
        return df
    df = df.copy()
    df["gender"] = pd.array([p["gender"] if p else None for p in parsed], dtype="Int8")
    df["race"] = pd.array([p["race"] if p else None for p in parsed], dtype="Int8")
    return df


def read_labels_csv(root: str) -> pd.DataFrame:
    """The reference layout: ``labels.csv`` (file_name,real_age) beside ``final_files/``."""
    table = _read_table(f"{root.rstrip('/')}/labels.csv")
    missing = {"file_name", "real_age"} - set(table.columns)
    if missing:
        raise InvalidInput(f"{root}/labels.csv lacks the column(s) {sorted(missing)}; it needs file_name,real_age")
    images = f"{root.rstrip('/')}/final_files"
    df = pd.DataFrame(
        {
            "path": [_join(images, str(n)) for n in table["file_name"]],
            "age": table["real_age"].astype(str).str.strip(),
        }
    )
    return _with_attributes(df, table["file_name"].astype(str))


def read_utkface(root: str) -> pd.DataFrame:
    """A local folder of UTKFace-named images (searched recursively); the label is in the name."""
    if storage.is_remote(root):
        raise InvalidInput(f"{root}: a folder of UTKFace-named images is read from a local disk; "
                           "on remote storage, list the images in a manifest (path,age)")
    paths = sorted(p for p in Path(root).rglob("*") if p.is_file() and _has_image_suffix(p.name))
    rows = []
    for p in paths:
        parsed = parse_utkface_name(p.name)
        rows.append(
            {
                "path": os.path.abspath(p),
                "age": parsed["age"] if parsed else f"<no age in file name {p.name!r}>",
                "gender": parsed["gender"] if parsed else None,
                "race": parsed["race"] if parsed else None,
            }
        )
    df = pd.DataFrame(rows, columns=["path", "age", "gender", "race"])
    return df.astype({"gender": "Int8", "race": "Int8"})


def read_manifest(path: str) -> pd.DataFrame:
    """A CSV or Parquet with ``path,age`` (paths relative to the manifest, absolute, or URIs)."""
    table = _read_table(path)
    missing = {"path", "age"} - set(table.columns)
    if missing:
        raise InvalidInput(f"manifest {path} lacks the column(s) {sorted(missing)}; it needs path,age")
    root = path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))
    df = table.copy()
    df["path"] = [_join(root, str(p)) for p in table["path"]]
    df["age"] = table["age"].astype(str).str.strip()
    for col in ("gender", "race"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int8")
    return df


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def detect_format(data: str) -> str:
    """``labels-csv`` for a folder with labels.csv, ``manifest`` for a CSV/Parquet file,
    ``utkface`` for a folder of images whose names start with the age."""
    if data.endswith((".csv", ".parquet")):
        return "manifest"
    if storage.is_remote(data):
        return "labels-csv"
    root = Path(data)
    if not root.exists():
        raise MissingInput(f"--data {data}: no such file or folder")
    if (root / "labels.csv").is_file():
        return "labels-csv"
    if root.is_dir():
        for p in root.rglob("*"):
            if p.is_file() and _has_image_suffix(p.name):
                if parse_utkface_name(p.name) is not None:
                    return "utkface"
                break
    raise InvalidInput(
        f"cannot tell the format of {data}: expected labels.csv + final_files/, a folder of UTKFace-named "
        "images ([age]_[gender]_[race]_[date].jpg), or a manifest .csv/.parquet with path,age"
    )


def read_records(data: str, fmt: str = "auto") -> tuple[pd.DataFrame, str]:
    """Read any supported layout; returns the records and the format that was used."""
    fmt = detect_format(data) if fmt == "auto" else fmt
    readers = {"labels-csv": read_labels_csv, "utkface": read_utkface, "manifest": read_manifest}
    df = readers[fmt](data)
    if df.empty:
        raise InvalidInput(f"{data} ({fmt}) lists no images")
    return df.reset_index(drop=True), fmt


def validate_labels(df: pd.DataFrame, max_age: float = MAX_AGE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split records into usable rows (``age`` as float32) and rejects with a reason.

    >>> ok, bad = validate_labels(pd.DataFrame({"path": ["a", "b", "c", "a"], "age": ["30", "x", "130", "31"]}))
    >>> ok["path"].tolist(), bad["reason"].tolist()
    (['a'], ['bad_label', 'age_out_of_range', 'duplicate_row'])
    """
    df = df.copy()
    age = pd.to_numeric(df["age"], errors="coerce")
    dup = df.duplicated("path", keep="first")
    reasons = pd.Series(pd.NA, index=df.index, dtype="object")
    details = pd.Series("", index=df.index, dtype="object")
    bad_number = age.isna() | ~np.isfinite(age.fillna(0))
    reasons[bad_number] = "bad_label"
    details[bad_number] = "age is not a number: " + df.loc[bad_number, "age"].astype(str)
    out_of_range = ~bad_number & ((age < 0) | (age > max_age))
    reasons[out_of_range] = "age_out_of_range"
    details[out_of_range] = "age " + age[out_of_range].astype(str) + f" is outside [0, {max_age:g}]"
    is_dup = dup & reasons.isna()
    reasons[is_dup] = "duplicate_row"
    details[is_dup] = "the same path is listed more than once; the first row is kept"
    bad = reasons.notna()
    rejects = pd.DataFrame({"path": df.loc[bad, "path"], "reason": reasons[bad], "detail": details[bad]})
    ok = df.loc[~bad].copy()
    ok["age"] = age[~bad].astype("float32")
    return ok.reset_index(drop=True), rejects.reset_index(drop=True)


def resolve_duplicates(meta: pd.DataFrame) -> pd.DataFrame:
    """Reject every copy of a picture whose copies carry different ages.

    ``meta`` has ``path``, ``age`` and ``digest`` (of the decoded pixels). Copies that agree
    on the age are all kept; the split keeps them together.
    """
    spread = meta.groupby("digest")["age"].transform(lambda a: a.max() - a.min())
    bad = spread > 0
    return pd.DataFrame(
        {
            "path": meta.loc[bad, "path"],
            "reason": "conflicting_duplicate",
            "detail": "identical image content is labelled with different ages",
        }
    ).reset_index(drop=True)


def assign_splits(
    meta: pd.DataFrame, val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> pd.Series:
    """Seeded split stratified by age band; copies of one picture (same ``digest``) share a split.

    >>> meta = pd.DataFrame({"age": np.arange(100) % 60, "digest": [str(i) for i in range(100)]})
    >>> assign_splits(meta, 0.2).value_counts().to_dict()
    {'train': 80, 'val': 20}
    """
    groups = meta.groupby("digest", sort=True)["age"].first()
    rng = np.random.default_rng(seed)
    split_of_group: dict[str, str] = {}
    bands = age_band(groups.to_numpy())
    for band in np.unique(bands):
        members = groups.index[bands == band].to_numpy()
        members = members[rng.permutation(len(members))]
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        for i, digest in enumerate(members):
            split_of_group[digest] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return meta["digest"].map(split_of_group).rename("split")


def list_images(source: str) -> list[str]:
    """Every image a scoring job should score: a folder (recursive, by extension, sorted), a
    manifest CSV/Parquet with a ``path`` column, or the same behind a URI."""
    if source.endswith((".csv", ".parquet")):
        table = _read_table(source)
        if "path" not in table:
            raise InvalidInput(f"manifest {source} has no 'path' column")
        root = source.rsplit("/", 1)[0] if storage.is_remote(source) else os.path.dirname(os.path.abspath(source))
        return [_join(root, str(p)) for p in table["path"]]
    if storage.is_remote(source):
        fs, inner = storage.filesystem(source)
        scheme = source.split("://", 1)[0]
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
        return sorted(f"{scheme}://{i.path}" for i in infos if i.is_file and _has_image_suffix(i.path))
    root = Path(source)
    if root.is_file():
        return [os.path.abspath(root)]
    if not root.is_dir():
        raise MissingInput(f"--input {source}: no such file or folder")
    return sorted(os.path.abspath(p) for p in root.rglob("*") if p.is_file() and _has_image_suffix(p.name))
