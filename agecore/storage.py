"""Job inputs and outputs on a local path or a URI (``s3://``, ``gs://``, ``file://``: what pyarrow opens).

Bulk data (Parquet shards, scores) is read and written by Ray Data straight from and to the URI;
the small files around it (reports, plots, checkpoints) are written to a local folder and copied
to the URI when the step is done, and URIs read as inputs (a checkpoint) are copied to a local
folder first.

>>> join("s3://bucket/runs", "train-1", "best")
's3://bucket/runs/train-1/best'
>>> is_remote("file:///tmp/runs"), is_remote("/tmp/runs")
(True, False)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs

from agecore.errors import InvalidInput, MissingInput


def is_remote(path: str | os.PathLike) -> bool:
    """A URI (``file://`` included): opened through pyarrow, never as a local ``Path``."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is; a local path made absolute (jobs hand paths to processes with other working dirs)."""
    return str(path) if is_remote(path) else str(Path(path).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def filesystem(path: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    if is_remote(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def read_text(path: str | os.PathLike) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def read_json(path: str | os.PathLike, label: str | None = None) -> dict[str, Any]:
    """A JSON object from a path or URI; ``label`` names the file in the error (default: the path)."""
    label = label or str(path)
    if not exists(path):
        raise MissingInput(f"{label}: no such file")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{label}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise InvalidInput(f"{label}: holds {type(data).__name__}, not a JSON object")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a folder and everything in it, if it exists."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(inner)


def upload(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a local folder's files into ``dest`` (created if missing), replacing files of the same name."""
    fs, inner = filesystem(dest)
    fs.create_dir(inner, recursive=True)
    pyarrow.fs.copy_files(str(Path(local).resolve()), inner, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


@contextlib.contextmanager
def output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """The local folder to write ``out``'s files to: ``out`` itself, or a staging folder for a URI,
    uploaded when the block ends without an error."""
    if not is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="agecore-out-") as tmp:
        yield Path(tmp)
        upload(tmp, out)


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder holding ``path``'s files: ``path`` itself, or a downloaded copy of a URI."""
    if not is_remote(path):
        yield Path(path)
        return
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        raise MissingInput(f"{path}: no such folder")
    with tempfile.TemporaryDirectory(prefix="agecore-in-") as tmp:
        pyarrow.fs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(tmp)
