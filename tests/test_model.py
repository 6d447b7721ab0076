import numpy as np
import pytest
import torch
from PIL import Image

from agecore.checkpoint import load_checkpoint, read_meta, save_checkpoint, weights_digest
from agecore.config import ModelConfig, Preprocessing
from agecore.model import create_backbone, create_model, default_cut_stage, split_model, trainable_module
from tests.conftest import tiny_checkpoint

TINY = ModelConfig(backbone="test_resnet", pretrained="none", hidden=16, dropout=0.2)


def test_forward_shape_no_nan_and_years():
    model = create_model(TINY).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3,) and torch.isfinite(out).all()
    # a fresh head starts near the target mean, so early losses are in years, not thousands
    assert (out - TINY.target_mean).abs().max() < 3 * TINY.target_scale


@pytest.mark.parametrize("mode", ["finetune", "partial", "frozen"])
def test_every_trainable_parameter_gets_a_gradient(mode):
    model = create_model(TINY)
    cut = default_cut_stage(model.backbone) if mode == "partial" else None
    module = trainable_module(model, mode, cut)
    lower, _ = split_model(model, cut) if mode != "finetune" else (None, None)
    x = torch.randn(4, 3, 64, 64)
    if lower is not None:
        with torch.no_grad():
            x = lower(x)
    module.train()
    module(x).sum().backward()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if lower is not None:
        assert all(not p.requires_grad for p in lower.parameters())


@pytest.mark.parametrize("backbone", ["test_resnet", "tf_efficientnet_lite0"])
def test_split_model_composes_to_the_whole(backbone):
    model = create_model(ModelConfig(backbone=backbone, pretrained="none")).eval()
    x = torch.randn(2, 3, 64, 64)
    for cut in (None, 1, default_cut_stage(model.backbone)):
        lower, upper = split_model(model, cut)
        assert torch.allclose(upper(lower(x)), model(x), atol=1e-4)


def test_partial_mode_refuses_unknown_families():
    model = create_model(ModelConfig(backbone="test_vit", pretrained="none"))
    with pytest.raises(ValueError, match="--mode frozen"):
        split_model(model, 1)


def test_pretrained_file_loads_by_name_and_by_position(tmp_path):
    import safetensors.torch

    reference = create_backbone(ModelConfig(backbone="test_resnet", pretrained="none"))
    import timm

    full = timm.create_model("test_resnet", pretrained=False)
    state = full.state_dict()
    safetensors.torch.save_file(state, tmp_path / "same.safetensors")
    renamed = {f"m{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, tmp_path / "renamed.pth")
    # a headless export (no ImageNet classifier), under timm's names and under others
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert len(headless) < len(state)
    torch.save(headless, tmp_path / "headless.pth")
    torch.save({f"x{i}": v for i, v in enumerate(headless.values())}, tmp_path / "headless-renamed.pth")
    for name in ("same.safetensors", "renamed.pth", "headless.pth", "headless-renamed.pth"):
        got = create_backbone(ModelConfig(backbone="test_resnet", pretrained="file", pretrained_file=str(tmp_path / name)))
        assert torch.equal(got.conv1[0].weight, full.conv1[0].weight)
        assert not torch.equal(got.conv1[0].weight, reference.conv1[0].weight)
    torch.save({"a": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="same architecture"):
        create_backbone(ModelConfig(backbone="test_resnet", pretrained="file", pretrained_file=str(tmp_path / "other.pth")))


def test_hub_failure_names_both_ways_out(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"--pretrained-file.*--no-pretrained"):
        create_backbone(ModelConfig(backbone="resnet50", pretrained="hub"))


def test_checkpoint_round_trip_describes_itself(tmp_path):
    model = create_model(TINY).eval()
    prep = Preprocessing(input_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    save_checkpoint(tmp_path, model, TINY, prep, train_cfg={"mode": "frozen"}, metrics={"val_mae": 7.5}, epoch=3)
    loaded, meta = load_checkpoint(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(x), model(x))
    assert meta["preprocessing"]["input_size"] == 64 and meta["model"]["backbone"] == "test_resnet"
    assert meta["metrics"]["val_mae"] == 7.5 and meta["epoch"] == 3 and "torch" in meta["versions"]
    assert not (tmp_path / "train_state.pt").exists()
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.json"):
        read_meta(tmp_path / "nothing")


def test_predictor_chunk_is_timed_on_cpu_and_does_not_change_predictions(tmp_path):
    import numpy as np

    from agecore.predictor import CPU_CHUNK_CANDIDATES, Predictor

    ckpt = tiny_checkpoint(tmp_path / "ck")
    images = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    timed = Predictor(ckpt, "cpu", precision="fp32")
    assert timed.batch_size in CPU_CHUNK_CANDIDATES and timed.identity["weights"] == weights_digest(ckpt)
    one_by_one = Predictor(ckpt, "cpu", batch_size=1, precision="fp32")
    np.testing.assert_allclose(timed.predict_arrays(images), one_by_one.predict_arrays(images), atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(ckpt, "cpu", batch_size=0)

    chunks = []
    network = one_by_one._network
    one_by_one._network = lambda x: chunks.append(len(x)) or network(x)
    one_by_one.batch_size = 4
    assert len(one_by_one.predict_arrays(images[:5])) == 5 and len(one_by_one.predict_arrays(images[:0])) == 0
    assert chunks == [3, 3, 2, 2]  # even chunks (each twice: flip TTA), not 4 + 1


@pytest.mark.parametrize("native", [False, True])
def test_predictor_runs_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, native):
    import numpy as np

    from agecore.predictor import Predictor

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    ckpt = tiny_checkpoint(tmp_path / "ck")
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    default = Predictor(ckpt, "cpu", batch_size=4)
    assert default.precision == default.identity["precision"] == ("bf16" if native else "fp32")
    fp32 = Predictor(ckpt, "cpu", batch_size=4, precision="fp32").predict_arrays(images)
    bf16 = Predictor(ckpt, "cpu", batch_size=4, precision="bf16").predict_arrays(images)
    eager = Predictor(ckpt, "cpu", batch_size=4, precision="bf16", freeze=False).predict_arrays(images)
    assert not np.array_equal(bf16, fp32)  # the frozen graph kept the bf16 casts: it does compute in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
    np.testing.assert_allclose(bf16, eager, atol=1e-4)  # and the same casts as eager autocast
    # the head runs in fp32 in both: ages are not rounded to bf16's 8 significant bits
    assert not np.array_equal(bf16, torch.from_numpy(bf16).bfloat16().float().numpy())
    np.testing.assert_array_equal(default.predict_arrays(images), bf16 if native else fp32)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(ckpt, "cpu", precision="fp16")


def test_predictor_takes_one_image_or_a_list_in_any_form(tmp_path):
    from agecore import ImageError, Predictor

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    path = tmp_path / "face.png"
    Image.fromarray(pixels).save(path)
    predictor = Predictor(ckpt, "cpu", batch_size=4, precision="fp32")

    one = predictor.predict(str(path))
    assert isinstance(one, float)
    forms = [path, path.read_bytes(), Image.open(path), pixels]
    ages = predictor.predict(forms)
    assert ages.shape == (4,) and ages.dtype == np.float32
    np.testing.assert_allclose(ages, one, atol=1e-4)  # the same picture, however it is given
    assert predictor.predict(np.stack([pixels, pixels])).shape == (2,)  # an N x H x W x 3 array is a list
    with pytest.raises(ImageError, match=r"missing\.jpg"):
        predictor.predict([path, tmp_path / "missing.jpg"])
    with pytest.raises(TypeError, match="give a path"):
        predictor.predict(3.5)
