"""Bulk age scoring of an image collection with Ray Data: one output row per input (or per face), always.

    python -m ray_jobs.score --checkpoint runs/train/best --input photos/ --out runs/scores
    python -m ray_jobs.score --checkpoint runs/train/best --input s3://bucket/faces/ --out s3://bucket/scores
    python -m ray_jobs.score --checkpoint runs/train/best --input party/ --out runs/faces --detect-faces

``--input`` is a folder (searched recursively by image extension), a manifest CSV/Parquet with
a ``path`` column, or a URI that pyarrow opens. ``--out`` is a Parquet data set (a folder of
part files) with ``path``, ``predicted_age`` (null where the image is unusable) and ``error``.

The inputs should be face crops like the training images. For uncropped photos,
``--detect-faces`` finds the faces first (MTCNN, from facenet-pytorch), aligns each by its five
landmarks like the training crops (``agecore.faces``) and writes one row per face instead, adding ``face`` (index, left to right), ``box`` (x1, y1, x2, y2 in pixels) and
``face_score``; a photo without a face gets one row with error ``no_face: ...``.

Resumable: parts are written atomically as results stream in; a rerun over the same input and
output scores only the paths no part holds yet, so no row is lost or written twice. With
``--detect-faces`` all the rows of a photo go into the same part, so a path in a part is complete.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray

from agecore import storage
from agecore.checkpoint import read_calibration, read_meta
from agecore.datasets import list_images
from agecore.faces import require_mtcnn
from agecore.predictor import BatchPredictor
from ray_jobs.common import (
    add_calibration_argument,
    add_precision_argument,
    init_ray,
    model_actor_options,
    setup_logging,
)

log = logging.getLogger("ray_jobs.score")

SCHEMA = pa.schema([("path", pa.string()), ("predicted_age", pa.float32()), ("error", pa.string())])
FACES_SCHEMA = pa.schema([("path", pa.string()), ("face", pa.int32()), ("box", pa.list_(pa.float32())),
                          ("face_score", pa.float32()), ("predicted_age", pa.float32()), ("error", pa.string())])
DEFAULT_BATCH_SIZE = 64  # paths per predictor call
# Each predictor actor gets at least this many blocks, so that no actor sits idle for long at the end.
MIN_BLOCKS_PER_ACTOR = 8


def _parts(out: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    fs, root = storage.filesystem(out)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return fs, []
    return fs, [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(root))
                if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")]


def done_paths(out: str, schema: pa.Schema | None = None) -> set[str]:
    """Paths already scored by previous runs into ``out`` (read from the part files' path column).

    With ``schema``, a part written with other columns (with and without ``--detect-faces``) is
    refused: the two kinds of rows do not mix in one data set.
    """
    fs, parts = _parts(out)
    done: set[str] = set()
    for part in parts:
        if schema is not None and pq.read_schema(part, filesystem=fs).names != schema.names:
            raise ValueError(f"{out} holds parts with other columns ({part}); it was written "
                             f"{'without' if 'face' in schema.names else 'with'} --detect-faces: use another --out")
        done.update(pq.read_table(part, columns=["path"], filesystem=fs).column("path").to_pylist())
    return done


def _write_part(fs: pyarrow.fs.FileSystem, root: str, rows: pd.DataFrame, index: int, schema: pa.Schema) -> None:
    """Write-then-rename, so an interrupted run never leaves half a part behind."""
    name = f"part-{int(time.time())}-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = f"{root}/.tmp-{name}"
    table = pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
    # The schema above defines a part. The pandas dtypes Ray's blocks happened to have (e.g.
    # 'list<item: double>[pyarrow]' for boxes) are left out: pandas cannot read that name back.
    pq.write_table(table.replace_schema_metadata(None), tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}")


def _whole_photos(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of face rows so that no photo's rows are split between two batches.

    A part must hold all the rows of each path in it, or a rerun would take a half-written
    photo for done. A photo's rows are adjacent (one predictor call emits them together), so
    holding back the last photo of each batch until the next one arrives is enough.
    """
    carry = None
    for batch in batches:
        if carry is not None:
            batch = pd.concat([carry, batch], ignore_index=True)
        paths = batch["path"].to_numpy()
        cut = len(paths)
        while cut and paths[cut - 1] == paths[-1]:
            cut -= 1
        carry = batch.iloc[cut:]
        if cut:
            yield batch.iloc[:cut]
    if carry is not None and len(carry):
        yield carry


def block_rows(images: int, batch_size: int, actors: int) -> int:
    """Rows in each block (one predictor call): ``batch_size``, or fewer so that each actor gets at
    least ``MIN_BLOCKS_PER_ACTOR`` blocks.

    Ray Data hands whole blocks to actors, so the last block leaves the others idle while it runs;
    with few blocks per actor that tail is a large share of the job. Measured (ResNet50, 2 CPUs):
    400 images in one block kept one of the two actors idle for the whole run: 2.3 images/s, against
    3.6 in 16 blocks of 25.

    >>> block_rows(5000, 64, 2), block_rows(400, 64, 2), block_rows(10, 64, 4)
    (64, 25, 1)
    """
    return max(1, min(batch_size, -(-images // (actors * MIN_BLOCKS_PER_ACTOR))))


def path_blocks(paths: list[str], batch_size: int, actors: int) -> tuple[ray.data.Dataset, int]:
    """The paths as a data set of blocks of ``block_rows`` rows each, and that row count.

    Cut here, in the driver, rather than by a repartition: a shuffle task lost with a node could not
    be retried while the surviving predictor actors held every CPU (seen: a deadlock).
    """
    rows = block_rows(len(paths), batch_size, actors)
    blocks = np.array_split(np.array(paths, dtype=object), -(-len(paths) // rows))
    return ray.data.from_pandas([pd.DataFrame({"path": b}) for b in blocks]), rows


def _open_output(out: str, schema: pa.Schema) -> tuple[pyarrow.fs.FileSystem, str, set[str]]:
    """The output folder, created, less the parts an interrupted run did not finish; and the paths already done."""
    fs, root = storage.filesystem(out)
    fs.create_dir(root, recursive=True)
    for stale in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if stale.base_name.startswith(".tmp-"):  # a part an interrupted run did not finish writing
            fs.delete_file(stale.path)
    return fs, root, done_paths(out, schema)


def _predictions(
    todo: list[str], checkpoint: str, batch_size: int, concurrency: int | None, gpu: bool, detect_faces: bool,
    precision: str | None, calibration: str | None = None,
) -> tuple[ray.data.Dataset, int, int]:
    """The scored rows of ``todo`` (lazy), and the predictor actors and threads that compute them."""
    # nothing but the predictor actors runs on the cluster here: one single-thread actor per CPU
    options, threads = model_actor_options(gpu, concurrency, cpus_per_actor=1)
    actors = options["compute"].min_size
    ds, rows = path_blocks(todo, batch_size, actors)
    scored = ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"checkpoint": storage.absolute(checkpoint), "threads": threads or None,
                               "device": "cuda" if gpu else "cpu", "detect_faces": detect_faces,
                               "precision": precision, "calibration": calibration},
        batch_size=rows, batch_format="numpy", **options,
    )
    return scored, actors, threads


def _tally(batch: pd.DataFrame, detect_faces: bool) -> Counter:
    """Images written and unusable in a part; with ``detect_faces``, faces found and photos without one."""
    if not detect_faces:
        return Counter(written=len(batch), failed=int((batch["error"] != "").sum()))
    # rows are faces here; a photo without a face is not an unusable image
    is_no_face = batch["error"].str.startswith("no_face:")
    return Counter(written=batch["path"].nunique(), failed=int(((batch["error"] != "") & ~is_no_face).sum()),
                   faces=int(batch["face"].notna().sum()), no_face=int(is_no_face.sum()))


def _summary(input: str, paths: list[str], todo: list[str], counts: Counter, actors: int, threads: int,
             seconds: float, detect_faces: bool) -> dict:
    """What ``score`` returns and logs: the images seen, skipped, scored and unusable, and the speed."""
    written = counts["written"]
    summary = {"input": input, "images": len(paths), "skipped_already_scored": len(paths) - len(todo),
               "scored_now": written, "unusable_now": counts["failed"], "actors": actors, "threads": threads,
               "seconds": round(seconds, 1),
               "images_per_second": round(written / seconds, 1) if written else None}
    if detect_faces:
        summary.update(faces_found_now=counts["faces"], images_without_face_now=counts["no_face"])
    return summary


def score(checkpoint: str, input: str, out: str, batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int | None = None,
          gpu: bool = False, rows_per_part: int = 5000, address: str | None = None,
          detect_faces: bool = False, precision: str | None = None, calibration: str | None = None) -> dict:
    """Score the images of ``input`` that no part in ``out`` holds yet; returns what the run did.

    ``calibration`` names a calibration stored in the checkpoint (``age calibrate``): every age is corrected.
    """
    read_meta(checkpoint)  # a wrong checkpoint path fails here, before any work
    read_calibration(checkpoint, calibration)  # and so does a calibration it does not hold
    if detect_faces:
        require_mtcnn()  # and so does a missing face detector
    schema = FACES_SCHEMA if detect_faces else SCHEMA
    paths = list_images(input)
    fs, root, done = _open_output(out, schema)
    todo = [p for p in dict.fromkeys(paths) if p not in done]
    log.info("%d images in %s; %d already scored in %s; %d to score", len(paths), input, len(done), out, len(todo))
    start, counts = time.perf_counter(), Counter()
    actors = threads = 0
    if todo:
        init_ray(address)
        scored, actors, threads = _predictions(todo, checkpoint, batch_size, concurrency, gpu, detect_faces,
                                               precision, calibration)
        batches = scored.iter_batches(batch_size=rows_per_part, batch_format="pandas")
        for i, batch in enumerate(_whole_photos(batches) if detect_faces else batches):
            _write_part(fs, root, batch, i, schema)
            counts.update(_tally(batch, detect_faces))
            log.info("scored %d / %d (%.1f images/s)", counts["written"], len(todo),
                     counts["written"] / (time.perf_counter() - start))
    summary = _summary(input, paths, todo, counts, actors, threads, time.perf_counter() - start, detect_faces)
    log.info("done: %s", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (a training run's best/)")
    p.add_argument("--input", required=True, help="folder, manifest .csv/.parquet with path, or URI")
    p.add_argument("--out", required=True, help="output Parquet folder (local or URI)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per predictor call; fewer on small inputs, so that every actor gets 8 calls or more")
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors (default: one per CPU, one thread each, or one per GPU)")
    p.add_argument("--gpu", action="store_true", help="one GPU per predictor actor")
    add_precision_argument(p)
    p.add_argument("--detect-faces", action="store_true",
                   help="uncropped photos: find the faces (MTCNN) and write one row per face")
    add_calibration_argument(p)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    return score(args.checkpoint, args.input, args.out, args.batch_size, args.concurrency, args.gpu,
                 address=args.address, detect_faces=args.detect_faces, precision=args.precision,
                 calibration=args.calibration)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("score")
