"""``age STAGE [options]``: one command whose subcommands are the pipeline's stages.

    age prepare  --data ../shared/data/faces --out runs/prepared
    age train    --prepared runs/prepared --out runs/train
    age evaluate --checkpoint runs/train/best --data runs/prepared --out runs/eval
    age tune     --prepared runs/prepared --out runs/tune --samples 16
    age calibrate --checkpoint runs/train/best --data photos/manifest.csv --name mine --person-from prefix:3
    age score    --checkpoint runs/train/best --input photos/ --out runs/scores
    age serve    --checkpoint runs/train/best
    age predict  --checkpoint runs/train/best photo.jpg
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from agecore.errors import UserError

STAGES = ("quickstart", "prepare", "train", "tune", "evaluate", "calibrate", "score", "serve", "predict")
USER_ERROR_STATUS = 2  # argparse's status for a bad option: every user error exits the same way


def run_stage(stage: str, argv: list[str] | None = None) -> Any:
    """Run one stage's ``main``; a ``UserError`` is printed in a line or two and exits with status 2.

    Anything else is a bug and keeps its traceback. A ``UserError`` raised inside a Ray task or
    actor arrives wrapped (Ray's error class derives from the original), so it is caught too.
    """
    try:
        return importlib.import_module(f"ray_jobs.{stage}").main(argv)
    except UserError as e:
        message = str(getattr(e, "cause", None) or e)
        print(f"age {stage}: error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"age {stage}: interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    available = [s for s in STAGES if importlib.util.find_spec(f"ray_jobs.{s}") is not None]
    usage = __doc__.strip() + "\n\nstages: " + ", ".join(available) + "\n`age STAGE --help` lists a stage's options."
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if not argv or argv[0] not in available:
        problem = f"unknown stage {argv[0]!r}" if argv else "no stage given"
        print(f"{usage}\n\nage: error: {problem}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    run_stage(argv[0], argv[1:])


if __name__ == "__main__":
    main()
