"""Every figure the reports draw. Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from agecore.metrics import AGE_BAND_LABELS, age_band

SPLIT_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}


def age_histogram(ages_by_split: dict[str, np.ndarray], path: str | Path) -> Path:
    """Age distribution per split (the plot the reference notebook drew), as densities."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.arange(0, 122, 2)
    for split, ages in ages_by_split.items():
        ax.hist(ages, bins=bins, density=True, histtype="step", linewidth=1.6,
                color=SPLIT_COLORS.get(split), label=f"{split} (n={len(ages):,})")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("share of images per year")
    ax.set_title("Age distribution per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path,
               suptitle: str = "", columns: int = 6) -> Path:
    """A grid of HWC uint8 images with a title under each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.15), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def sample_grid(images: Sequence[np.ndarray], ages: Sequence[float], path: str | Path) -> Path:
    """Faces across age bands, labelled with their ages."""
    return image_grid(images, [f"age {a:g}" for a in ages], path, "Samples across age bands")


def learning_curves(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Train and validation MAE per epoch (the reference notebook's curve), with the best epoch marked."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(metrics["epoch"], metrics["train_mae"], marker="o", label="train MAE")
    ax.plot(metrics["epoch"], metrics["val_mae"], marker="o", label="validation MAE")
    best = metrics.loc[metrics["val_mae"].idxmin()]
    ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best: {best['val_mae']:.2f} @ epoch {int(best['epoch'])}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MAE (years)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def predicted_vs_true(true: np.ndarray, pred: np.ndarray, path: str | Path) -> Path:
    """Scatter of predicted against true age with the identity line."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(true, pred, s=4, alpha=0.35)
    hi = float(max(np.max(true), np.max(pred), 1)) + 2
    ax.plot([0, hi], [0, hi], color="black", linewidth=1, label="identity")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("true age")
    ax.set_ylabel("predicted age")
    ax.set_title(f"Predicted vs true (MAE {np.mean(np.abs(pred - true)):.2f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def error_by_age(true: np.ndarray, pred: np.ndarray, path: str | Path) -> Path:
    """MAE and bias per age band, with counts."""
    bands = age_band(true)
    err = pred - true
    idx = np.arange(len(AGE_BAND_LABELS))
    mae = [np.mean(np.abs(err[bands == b])) if np.any(bands == b) else np.nan for b in idx]
    bias = [np.mean(err[bands == b]) if np.any(bands == b) else np.nan for b in idx]
    counts = [int(np.sum(bands == b)) for b in idx]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.bar(idx - 0.2, mae, width=0.4, label="MAE")
    ax.bar(idx + 0.2, bias, width=0.4, label="bias (pred - true)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(idx, [f"{lab}\n(n={c})" for lab, c in zip(AGE_BAND_LABELS, counts, strict=True)], fontsize=8)
    ax.set_ylabel("years")
    ax.set_title("Error by age band")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def band_errors(tables: dict[str, pd.DataFrame], path: str | Path, title: str = "Error by age band") -> Path:
    """MAE (bars) and bias (dots) per age band, one colour a model; ``tables`` are ``metrics.per_band`` frames
    of the same photos, so the counts under the bands are the first one's."""
    idx = np.arange(len(AGE_BAND_LABELS))
    width = 0.8 / max(len(tables), 1)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, (name, table) in enumerate(tables.items()):
        table = table.reindex(AGE_BAND_LABELS)
        x = idx - 0.4 + width * (k + 0.5)
        bars = ax.bar(x, table["mae"].astype(float), width=width, label=f"{name}: MAE")
        ax.scatter(x, table["bias"].astype(float), color=bars.patches[0].get_facecolor(), edgecolor="black",
                   zorder=3, label=f"{name}: bias (pred - true)")
    counts = next(iter(tables.values())).reindex(AGE_BAND_LABELS)["count"].fillna(0).astype(int)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(idx, [f"{lab}\n(n={c})" for lab, c in zip(AGE_BAND_LABELS, counts, strict=True)], fontsize=8)
    ax.set_ylabel("years")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def tune_scatter(trials: pd.DataFrame, path: str | Path) -> Path:
    """Best validation MAE of each trial against its learning rate and its dropout."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    best = trials["best_val_mae"].idxmin()
    for ax, col, log in ((axes[0], "config/lr", True), (axes[1], "config/dropout", False)):
        ax.scatter(trials[col], trials["best_val_mae"], c=trials["epochs_run"], cmap="viridis", s=30)
        ax.scatter(trials.loc[best, col], trials.loc[best, "best_val_mae"], marker="*", s=250, color="red",
                   label="best")
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(col.removeprefix("config/"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best validation MAE (years)")
    axes[1].legend()
    fig.suptitle("Tuning trials (colour: epochs run before stopping)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


VERDICT_COLORS = {"yes": (27, 127, 59), "no": (176, 0, 32), "uncertain": (199, 119, 0), None: (30, 90, 200)}


def annotate_faces(photo: Image.Image, faces: Sequence[dict], path: str | Path) -> Path:
    """The photo with a box and a label (``i: age``) on each face, coloured by its verdict where it has one."""
    from PIL import ImageDraw, ImageFont

    image = photo.convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, image.width // 300)
    font = ImageFont.load_default(size=max(14, image.width // 40))
    for i, face in enumerate(faces, start=1):
        colour = VERDICT_COLORS[face.get("verdict")]
        x1, y1, x2, y2 = face["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{i}: {face['age']:.1f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font, anchor="lb")
        draw.rectangle((left - line, top - line, right + line, bottom), fill=colour)
        draw.text((x1, y1), label, fill="white", font=font, anchor="lb")
    image.save(path)


def correction_curve(raw: np.ndarray, true: np.ndarray, grid: np.ndarray, corrected: np.ndarray, path: str | Path,
                     title: str) -> Path:
    """True age against the model's raw estimate of each photo, with the identity and the fitted correction."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.scatter(raw, true, s=6, alpha=0.4, label=f"photos (n={len(raw)})")
    hi = float(max(np.max(raw), np.max(true), np.max(grid), 1)) + 2
    ax.plot([0, hi], [0, hi], color="black", linewidth=1, linestyle="--", label="no correction")
    ax.plot(grid, corrected, color="tab:red", linewidth=2, label="correction")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("raw estimate (years)")
    ax.set_ylabel("true age / corrected estimate (years)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
