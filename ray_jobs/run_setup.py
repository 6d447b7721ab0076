"""What a training run and every trial of a search share, set up once on the driver.

``setup_run`` resolves the configs against the prepared set (target scaling, preprocessing, the
cut of ``partial``), builds the initial network once, and gives the Ray datasets the workers
read: the prepared images (``finetune``) or the feature cache of the lower network, which
``build_feature_cache`` writes beside the prepared set and reuses while its inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pa_ds
import ray
import torch

from agecore import storage
from agecore.augment import view_recipe
from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.faces import template_from_prepared
from agecore.model import create_model, default_cut_stage, default_preprocessing, split_model
from agecore.prepare import SPLITS, read_prepare_info, split_dir
from agecore.training import FeatureExtractor
from ray_jobs.common import init_ray, model_actor_options, read_parquet

log = logging.getLogger("ray_jobs.run_setup")

TRAINING_SPLITS = tuple(s for s in SPLITS if s != "test")  # the test split stays unread


def _cache_key(
    prepared: str, prep: Preprocessing, cut_stage: int | None, weights: dict[str, torch.Tensor],
    degraded: TrainConfig | None,
) -> str:
    """Changes with the prepared set, the preprocessing, the cut, the degraded view, or any weight of the network."""
    inputs = {"prepared": read_prepare_info(prepared), "prep": prep.to_dict(), "cut": cut_stage}
    if degraded is not None:
        inputs["degraded"] = view_recipe(degraded)
    h = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode())
    for name, tensor in weights.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def build_feature_cache(
    prepared: str,
    model_cfg: ModelConfig,
    prep: Preprocessing,
    cut_stage: int | None,
    model: torch.nn.Module,
    cache_root: str | None = None,
    degraded: TrainConfig | None = None,
) -> dict[str, str]:
    """Run the lower network once over train and val; reused while its inputs are unchanged.

    Each face is cached as two views, itself and its mirror image; with ``degraded`` (the run's
    training config), a third: the face augmented and spoilt as a real photo would be
    (``FeatureExtractor``), which training draws for ``TrainConfig.degrade`` of the faces.

    ``model`` is the network that training starts from, so the cached activations come from exactly
    the lower part that the checkpoint will hold (random weights included); the cache key hashes
    that lower part's weights, so runs that differ only above the cut share one cache.
    """
    lower = split_model(model, cut_stage)[0]
    # a folder or a URI that every node reaches: Ray Data's tasks write it wherever they run
    root = storage.join(cache_root or storage.join(prepared, "cache"),
                        _cache_key(prepared, prep, cut_stage, lower.state_dict(), degraded))
    paths = {split: storage.join(root, f"split={split}") for split in TRAINING_SPLITS}
    complete = storage.join(root, "_COMPLETE")
    if storage.exists(complete):
        log.info("feature cache: reusing %s", root)
        return paths
    start = time.perf_counter()
    storage.delete_dir(root)  # what an interrupted build left behind
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    options, threads = model_actor_options(gpu)
    # both splits in one pass: one pool of model actors to start, not one per split
    parts = [
        read_parquet(split_dir(prepared, split)).select_columns(["image", "age"])
        .add_column("split", lambda t, split=split: pa.array([split] * t.num_rows), batch_format="pyarrow")
        for split in paths
    ]
    parts[0].union(*parts[1:]).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"model_cfg": model_cfg, "prep": prep, "cut_stage": cut_stage, "weights": weights,
                               "threads": threads, "device": "cuda" if gpu else "cpu", "degraded": degraded},
        batch_size=16, batch_format="numpy", **options,
    ).write_parquet(root, partition_cols=["split"])
    storage.write_text(complete, "")  # last: a cache without it is rebuilt
    log.info("feature cache: %s in %.0f s", root, time.perf_counter() - start)
    return paths


def _fragments(path: str) -> list[pa_ds.Fragment]:
    fs, inner = storage.filesystem(path)
    return list(pa_ds.dataset(inner, filesystem=fs, format="parquet").get_fragments())


def resolve_cut(cfg: TrainConfig, model: torch.nn.Module) -> TrainConfig:
    """``cfg`` with partial mode's cut stage filled in, where none was given: all but the backbone's top one or
    two stages (``default_cut_stage``)."""
    if cfg.mode == "partial" and cfg.cut_stage is None:
        return TrainConfig.from_dict({**cfg.to_dict(), "cut_stage": default_cut_stage(model.backbone)})
    return cfg


@dataclass(frozen=True)
class RunSetup:
    """Everything trials of one prepared set share: configs, datasets (or feature cache), initial weights."""

    prepared: str
    model_cfg: ModelConfig
    cfg: TrainConfig
    prep: Preprocessing
    datasets: dict[str, ray.data.Dataset]
    initial_weights: ray.ObjectRef
    train_rows: int
    cpus_per_worker: float


def _resolve_configs(prepared: str, info: dict, model_cfg: ModelConfig) -> tuple[ModelConfig, Preprocessing]:
    """The target scaling from the training split's ages; the preprocessing from the backbone and the prepared set."""
    ages = info["splits"]["train"]
    # regress standardised ages; the scaling travels in the checkpoint's model config
    model_cfg = dataclasses.replace(model_cfg, target_mean=round(ages["mean"], 2),
                                    target_scale=round(max(ages["std"], 1.0), 2))
    default_prep = default_preprocessing(model_cfg.backbone)
    # the landmark layout of the training crops, onto which detected faces are aligned at inference
    prep = Preprocessing(info["image_size"], default_prep.mean, default_prep.std, info["interpolation"],
                         face_template=template_from_prepared(prepared))
    return model_cfg, prep


def _datasets(
    prepared: str, model_cfg: ModelConfig, cfg: TrainConfig, prep: Preprocessing, model: torch.nn.Module,
    cache_dir: str | None,
) -> dict[str, ray.data.Dataset]:
    """The train and val datasets the workers read: images (finetune), or the feature cache's activations."""
    if cfg.mode == "finetune":
        data = {s: split_dir(prepared, s) for s in TRAINING_SPLITS}
        columns = ["image", "age"]
    else:
        data = build_feature_cache(prepared, model_cfg, prep, cfg.cut_stage if cfg.mode == "partial" else None,
                                   model, cache_dir, degraded=cfg if cfg.degrade > 0 else None)
        columns = ["features", "age"]
    if cfg.mode == "frozen":
        # pooled embeddings are small (15,745 faces: about 80 MB); held in the object store, an epoch
        # no longer re-reads Parquet, which otherwise costs more than training the head does
        datasets = {s: ray.data.from_arrow([f.to_table(columns=columns) for f in _fragments(p)])
                    for s, p in data.items()}
    else:
        # reads are light (the shards hold decoded arrays): a quarter CPU each fits them beside
        # workers that leave less than a CPU free on a node
        datasets = {s: read_parquet(p, num_cpus=0.25).select_columns(columns) for s, p in data.items()}
    datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.seed)
    return datasets


def setup_run(
    prepared: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    cpus_per_worker: float | None = None,
    cache_dir: str | None = None,
    address: str | None = None,
) -> RunSetup:
    """Resolve the configs against the prepared set, load the pretrained weights once, build the inputs."""
    info = read_prepare_info(prepared)
    model_cfg, prep = _resolve_configs(prepared, info, model_cfg)
    with torch.random.fork_rng():  # one seed, one initial network: reproducible, and the feature cache is reused
        torch.manual_seed(cfg.seed)
        model = create_model(model_cfg)  # fails here, at the start, if the weights cannot be had
    cfg = resolve_cut(cfg, model)

    init_ray(address)
    datasets = _datasets(prepared, model_cfg, cfg, prep, model, cache_dir)
    cpus = ray.cluster_resources().get("CPU", 1)
    if cpus_per_worker is None:  # leave a CPU for Ray Data, or the workers starve the input pipeline
        cpus_per_worker = 1.0 if cfg.gpu else max(0.25, min(4.0, (cpus - 1) / cfg.workers))
    weights = ray.put({k: v.cpu() for k, v in model.state_dict().items()})
    return RunSetup(str(prepared), model_cfg, cfg, prep, datasets, weights, info["counts"]["train"], cpus_per_worker)
