"""Bulk age scoring of an image collection with Ray Data: one output row per input (or per face), always.

    python -m ray_jobs.score --checkpoint runs/train/best --input party/ --out runs/party
    python -m ray_jobs.score --checkpoint runs/train/best --input s3://bucket/photos/ --out s3://bucket/scores
    python -m ray_jobs.score --checkpoint runs/train/best --input crops/ --out runs/crops --detect-faces false

``--input`` is a folder (searched recursively by image extension), a manifest CSV/Parquet with
a ``path`` column, or a URI that pyarrow opens. ``--out`` is a Parquet data set (a folder of
part files) with ``path``, ``predicted_age`` (null where the image is unusable) and ``error``.

By default (``--detect-faces auto``) any photo is taken: a face crop framed like the training
crops is used as it is, and in any other photo the faces are found (MTCNN, from facenet-pytorch)
and aligned by their five landmarks like the training crops (``agecore.faces``). The rows are then
faces, with ``face`` (index, left to right), ``box`` (x1, y1, x2, y2 in pixels), ``face_score`` and
``aligned`` (false for a crop taken as it is); a photo without a face gets one row with error
``no_face: ...``. ``--detect-faces false`` is the fast path for face crops: a row per image.

The predictor's rows never pass through the driver: Ray Data's ``write_parquet`` writes the parts
from the workers, so ``--out`` must be reachable from every node (a URI or a shared folder). The
driver reads back only the columns the summary counts (``error``; with faces ``path`` and ``face`` too),
one part at a time.

Resumable: a rerun over the same input and output scores only the paths no part holds yet, so no
row is lost or written twice. A part that an interrupted run left half-written is unreadable (a
Parquet file ends with its footer): the rerun deletes it and scores its paths again. All the rows
of a photo go into the same part (a predictor call emits them in one block, and a write task writes
its blocks into one file), so a path in a part is complete.

A path is one image and one key of the output: a manifest that names the same path twice is
refused, naming the path, before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from agecore import storage
from agecore.checkpoint import read_calibration, read_meta, weights_digest
from agecore.config import detect_mode
from agecore.datasets import list_images
from agecore.errors import InvalidInput
from agecore.faces import NO_FACE, require_mtcnn
from agecore.predictor import BatchPredictor
from ray_jobs.common import (
    PREDICT_BATCH_ROWS,
    add_address_argument,
    add_precision_argument,
    init_ray,
    model_actor_options,
    setup_logging,
)
from ray_jobs.options import add_calibration_argument, add_detect_faces_argument

log = logging.getLogger("ray_jobs.score")

SCHEMA = pa.schema([("path", pa.string()), ("predicted_age", pa.float32()), ("error", pa.string())])
FACES_SCHEMA = pa.schema([("path", pa.string()), ("face", pa.int32()), ("box", pa.list_(pa.float32())),
                          ("face_score", pa.float32()), ("aligned", pa.bool_()), ("predicted_age", pa.float32()),
                          ("error", pa.string())])
DEFAULT_BATCH_SIZE = PREDICT_BATCH_ROWS  # paths per predictor call
# Each predictor actor gets at least this many blocks, so that no actor sits idle for long at the end.
MIN_BLOCKS_PER_ACTOR = 8


class PartNames(FilenameProvider):
    """``part-{write_uuid}-{task}``: the prefix a rerun looks for; Ray Data appends ``-{i}.parquet``."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06}.parquet"


def _parts(out: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    fs, root = storage.filesystem(out)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return fs, []
    return fs, [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(root))
                if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")]


def _read_part(fs: pyarrow.fs.FileSystem, part: str, columns: list[str], schema: pa.Schema | None) -> pa.Table | None:
    """``columns`` of a part; None where the part is unreadable: its writer was killed before the footer."""
    try:
        names = pq.read_schema(part, filesystem=fs).names
        table = pq.read_table(part, columns=columns, filesystem=fs)
    except pa.ArrowInvalid:
        return None
    if schema is not None and names != schema.names:
        written = "rows of images (--detect-faces false)" if "face" not in names else "rows of faces"
        raise InvalidInput(f"{part} holds {written}, and this run writes other columns ({', '.join(schema.names)}): "
                           "use another --out, or the --detect-faces of the run that wrote it")
    return table


def read_parts(fs: pyarrow.fs.FileSystem, parts: list[str], columns: list[str],
               schema: pa.Schema | None = None) -> Iterator[pa.Table]:
    """``columns`` of each readable part in turn; the unreadable ones are deleted, so their paths count as not done.

    With ``schema``, a part written with other columns (with and without ``--detect-faces``) is
    refused: the two kinds of rows do not mix in one data set.
    """
    for part in parts:
        table = _read_part(fs, part, columns, schema)
        if table is None:
            log.warning("deleting %s: a part whose writer was killed; its paths are scored again", part)
            fs.delete_file(part)
        else:
            yield table


def done_paths(out: str, schema: pa.Schema | None = None) -> set[str]:
    """Paths already scored by previous runs into ``out`` (read from the part files' path column)."""
    fs, parts = _parts(out)
    return {p for table in read_parts(fs, parts, ["path"], schema) for p in table.column("path").to_pylist()}


def refuse_duplicates(paths: list[str], input: str) -> None:
    """A path is the key of its rows and of resuming: an input naming one twice is refused by name."""
    twice = [p for p, n in Counter(paths).items() if n > 1]
    if twice:
        raise InvalidInput(f"{input} names {len(twice)} path(s) more than once ({', '.join(twice[:3])}"
                           f"{', ...' if len(twice) > 3 else ''}): list each image once")


def block_rows(images: int, batch_size: int, actors: int) -> int:
    """Rows in each block (one predictor call): ``batch_size``, or fewer so that each actor gets at
    least ``MIN_BLOCKS_PER_ACTOR`` blocks.

    Ray Data hands whole blocks to actors, so the last block leaves the others idle while it runs;
    with few blocks per actor that tail is a large share of the job (docs/benchmarks.md).

    >>> block_rows(5000, 64, 2), block_rows(400, 64, 2), block_rows(10, 64, 4)
    (64, 25, 1)
    """
    return max(1, min(batch_size, -(-images // (actors * MIN_BLOCKS_PER_ACTOR))))


def path_blocks(paths: list[str], batch_size: int, actors: int) -> tuple[ray.data.Dataset, int]:
    """The paths as a data set of blocks of ``block_rows`` rows each, and that row count.

    Cut here, in the driver, rather than by a repartition: a shuffle task lost with a node could not
    be retried while the surviving predictor actors held every CPU, and the job would hang.
    """
    rows = block_rows(len(paths), batch_size, actors)
    blocks = np.array_split(np.array(paths, dtype=object), -(-len(paths) // rows))
    return ray.data.from_pandas([pd.DataFrame({"path": b}) for b in blocks]), rows


def _open_output(out: str, schema: pa.Schema) -> tuple[set[str], set[str]]:
    """The output folder, created, less what an interrupted run left unfinished; its parts, and the paths done."""
    fs, root = storage.filesystem(out)
    fs.create_dir(root, recursive=True)
    for stale in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if stale.base_name.startswith(".tmp-"):  # a part whose writer stopped before naming it
            fs.delete_file(stale.path)
    done = done_paths(out, schema)
    return set(_parts(out)[1]), done


RUN_FILE = "_score.json"  # what made the rows of a folder (a leading _: Parquet readers skip it)


def _same_scorer(out: str, scorer: dict[str, Any]) -> None:
    """Record ``scorer`` in ``out``, or refuse it where the folder holds rows that another one made."""
    path = storage.join(out, RUN_FILE)
    if not storage.exists(path):
        storage.write_text(path, json.dumps(scorer, indent=2) + "\n")
        return
    made = storage.read_json(path)
    changed = {k: (made.get(k), v) for k, v in scorer.items() if made.get(k) != v}
    if changed:
        said = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in changed.items())
        raise InvalidInput(f"{out} holds rows of another scorer ({said}): use another --out, or the same settings")


def _predictions(
    todo: list[str], checkpoint: str, batch_size: int, concurrency: int | None, gpu: bool, detect_faces: str,
    precision: str | None, calibration: str | None = None,
) -> tuple[ray.data.Dataset, int, int]:
    """The scored rows of ``todo`` (lazy), and the predictor actors and threads that compute them."""
    # one single-thread predictor actor per CPU: the write tasks (write_parts) ask for no CPU
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


def write_parts(scored: ray.data.Dataset, out: str, schema: pa.Schema, rows_per_part: int, writers: int) -> None:
    """Write ``scored`` into ``out`` from the workers: ``part-*.parquet`` files of about ``rows_per_part`` rows.

    A write task writes its whole blocks into one file (no ``max_rows_per_file``), which keeps a
    photo's rows together; a retried task writes the same file name again, so no row is doubled.
    """
    fs, root = storage.filesystem(out)
    scored.write_parquet(
        root, filesystem=fs, filename_provider=PartNames(), min_rows_per_file=rows_per_part, schema=schema,
        # the predictor actors hold every CPU: a write task asking for one would wait for the whole job
        ray_remote_args={"num_cpus": 0}, concurrency=writers,
    )


def _tally(part: pa.Table, faces: bool) -> Counter:
    """Images written and unusable in a part; with rows of ``faces``, faces found and photos without one."""
    failed = pc.not_equal(part.column("error"), "")
    if not faces:
        return Counter(written=part.num_rows, failed=pc.sum(failed).as_py() or 0)
    # rows are faces here; a photo without a face is not an unusable image, and all its rows are in this part
    no_face = pc.starts_with(part.column("error"), f"{NO_FACE}:")
    return Counter(written=pc.count_distinct(part.column("path")).as_py(),
                   failed=pc.sum(pc.and_(failed, pc.invert(no_face))).as_py() or 0,
                   faces=part.num_rows - part.column("face").null_count, no_face=pc.sum(no_face).as_py() or 0)


def _written(out: str, before: set[str], expected: int, faces: bool) -> Counter:
    """Tally the parts this run wrote, one at a time by their small columns; they must hold ``expected`` images."""
    fs, parts = _parts(out)
    columns = ["path", "face", "error"] if faces else ["error"]
    counts: Counter = Counter()
    for part in read_parts(fs, sorted(set(parts) - before), columns):
        counts.update(_tally(part, faces))
    if counts["written"] != expected:
        raise RuntimeError(f"{out}: this run's parts hold {counts['written']} images of the {expected} it scored; "
                           "rerun the same command to score the missing ones")
    return counts


def _summary(input: str, paths: list[str], todo: list[str], counts: Counter, actors: int, threads: int,
             seconds: float, faces: bool) -> dict:
    """What ``score`` returns and logs: the images seen, skipped, scored and unusable, and the speed."""
    written = counts["written"]
    summary = {"input": input, "images": len(paths), "skipped_already_scored": len(paths) - len(todo),
               "scored_now": written, "unusable_now": counts["failed"], "actors": actors, "threads": threads,
               "seconds": round(seconds, 1),
               "images_per_second": round(written / seconds, 1) if written else None}
    if faces:
        summary.update(faces_found_now=counts["faces"], images_without_face_now=counts["no_face"])
    return summary


def score(checkpoint: str, input: str, out: str, batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int | None = None,
          gpu: bool = False, rows_per_part: int = 5000, address: str | None = None,
          detect_faces: bool | str = "auto", precision: str | None = None, calibration: str | None = None) -> dict:
    """Score the images of ``input`` that no part in ``out`` holds yet; returns what the run did.

    ``detect_faces`` (``auto``, ``true`` or ``false``) is ``Predictor.face_crops``'s rule: with
    ``auto`` and ``true`` the rows are faces (``FACES_SCHEMA``), with ``false`` images (``SCHEMA``).
    ``calibration`` names a calibration stored in the checkpoint (``age calibrate``): every age is corrected.
    """
    read_meta(checkpoint)  # a wrong checkpoint path fails here, before any work
    read_calibration(checkpoint, calibration)  # and so does a calibration it does not hold
    detect_faces = detect_mode(detect_faces)
    faces = detect_faces != "false"
    if faces:
        require_mtcnn()  # and so does a missing face detector
    schema = FACES_SCHEMA if faces else SCHEMA
    paths = list_images(input)
    refuse_duplicates(paths, input)
    before, done = _open_output(out, schema)
    _same_scorer(out, {"weights": weights_digest(checkpoint), "calibration": calibration, "detect_faces": detect_faces})
    todo = [p for p in paths if p not in done]
    log.info("%d images in %s; %d already scored in %s; %d to score", len(paths), input, len(done), out, len(todo))
    start, counts = time.perf_counter(), Counter()
    actors = threads = 0
    if todo:
        init_ray(address)
        scored, actors, threads = _predictions(todo, checkpoint, batch_size, concurrency, gpu, detect_faces,
                                               precision, calibration)
        write_parts(scored, out, schema, rows_per_part, writers=actors)
        counts = _written(out, before, len(todo), faces)
    summary = _summary(input, paths, todo, counts, actors, threads, time.perf_counter() - start, faces)
    log.info("done: %s", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (a training run's best/)")
    p.add_argument("--input", required=True, help="folder, manifest .csv/.parquet with path, or URI")
    p.add_argument("--out", required=True, help="output Parquet folder (local or URI)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per predictor call; fewer on small inputs, so that every actor gets "
                        f"{MIN_BLOCKS_PER_ACTOR} calls or more (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=None, help=(
        "predictor actors; on an autoscaling cluster, as many as you want it to start (default: one per CPU "
        "the cluster has at the start, one thread each, or one per GPU with --gpu)"))
    p.add_argument("--gpu", action="store_true", help="one GPU per predictor actor")
    add_precision_argument(p)
    add_detect_faces_argument(p, "A row per face; with false, a row per image")
    add_calibration_argument(p)
    add_address_argument(p)
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
