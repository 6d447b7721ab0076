"""``age STAGE [options]``: one command whose subcommands are the pipeline's stages.

    age prepare --data ../shared/data/faces --out runs/prepared
    age train --prepared runs/prepared --out runs/train
    age evaluate --checkpoint runs/train/best --data runs/prepared --out runs/eval
    age tune --prepared runs/prepared --out runs/tune --samples 16
    age score --checkpoint runs/train/best --input photos/ --out runs/scores
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

STAGES = ("prepare", "train", "tune", "evaluate", "score", "serve")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    available = [s for s in STAGES if importlib.util.find_spec(f"ray_jobs.{s}") is not None]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        print(__doc__.strip() + "\n\nstages: " + ", ".join(available) + "\n`age STAGE --help` lists a stage's options.")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(f"ray_jobs.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
