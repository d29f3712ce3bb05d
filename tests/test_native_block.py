"""The native block kernel (``_C.NativeBlock``, ``deprune::native_block``, ``inference.native``) against timm's blocks
computed in float64: every block type, stride, kernel, squeeze-excite and residual, outputs NaN-poisoned before each
native call; bad inputs; whole pruned models after optimize_for_inference; torch.compile and torch.export."""
import copy
from functools import partial

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from timm.layers import Conv2dSame
from timm.models._efficientnet_blocks import (DepthwiseSeparableConv, InvertedResidual, SqueezeExcite,
                                              UniversalInvertedResidual)
from timm_deprune import DepruneConfig, optimize_for_inference, prune, to_masked
from timm_deprune.inference.fold import fold_all_batchnorms
from timm_deprune.inference.modules import fast_squeeze_excite, fuse_conv_activations
from timm_deprune.inference.native import NATIVE_BLOCK_TYPES, native_block_problem, use_native_blocks
from timm_deprune.kernels import load_extension
from timm_deprune.kernels.block_op import native_block, register_block, registered_block

from conftest import assert_matches_reference, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = [nn.ReLU6, nn.SiLU, nn.Hardswish, nn.ReLU]
GATES = [nn.Sigmoid, nn.Hardsigmoid]
KINDS = ["ds", "ir", "uir_ib", "uir_extra", "uir_cnext", "uir_end"]


def _mask_depthwise(block: nn.Module, gen: torch.Generator, keep: float = 0.3, shared: int = 1) -> None:
    """Random tap masks on every depth-wise conv (``shared`` consecutive channels share one pattern: ``block:N``),
    with a few channels dead (every tap pruned)."""
    for path, m in list(block.named_modules()):
        if type(m) in (nn.Conv2d, Conv2dSame) and m.groups == m.in_channels == m.out_channels > 1 \
                and m.kernel_size != (1, 1):
            c, (kh, kw) = m.out_channels, m.kernel_size
            base = torch.rand(-(-c // shared), kh, kw, generator=gen) < keep
            mask = base.repeat_interleave(shared, 0)[:c]
            mask[torch.randint(0, c, (max(1, c // 8),), generator=gen)] = False  # dead channels
            block.set_submodule(path, to_masked(m, mask))


def _make_block(kind: str, stride: int, k: int, se: bool, residual: bool, gen: torch.Generator, index: int = 0,
                cin: int = 16, shared: int = 1) -> nn.Module:
    act, gate = ACTS[index % len(ACTS)], GATES[index % len(GATES)]
    pad = "same" if index % 3 == 0 else ""  # timm's Conv2dSame (asymmetric TF SAME) where static padding won't do
    se_layer = partial(SqueezeExcite, gate_layer=gate) if se else None
    cout = cin if residual else cin + 8
    common = dict(stride=stride, act_layer=act, se_layer=se_layer, pad_type=pad, noskip=not residual)
    if kind == "ds":
        block = DepthwiseSeparableConv(cin, cout, dw_kernel_size=k, pw_act=index % 2 == 1, **common)
    elif kind == "ir":
        block = InvertedResidual(cin, cout, dw_kernel_size=k, exp_ratio=4.0, **common)
    else:
        start, mid, end = {"uir_ib": (0, k, 0), "uir_extra": (k, 3, 0), "uir_cnext": (k, 0, 0),
                           "uir_end": (0, k, 3)}[kind]
        block = UniversalInvertedResidual(cin, cout, dw_kernel_size_start=start, dw_kernel_size_mid=mid,
                                          dw_kernel_size_end=end, exp_ratio=3.0, **common)
        with torch.no_grad():
            block.layer_scale.gamma.uniform_(0.5, 1.5, generator=gen)  # timm's 1e-5 would hide the block
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    randomize_bn(block.eval(), gen)
    _mask_depthwise(block, gen, shared=shared)
    return block.eval()


def _nativize(block: nn.Module, size) -> nn.Module:
    """What optimize_for_inference does to a block: BNs folded, activations fused, linear SE, native swap."""
    out = copy.deepcopy(block)
    fold_all_batchnorms(out, size)
    fast_squeeze_excite(out)
    fuse_conv_activations(out, size)
    stats = use_native_blocks(out)
    assert stats == {"native_blocks": 1, "native_skipped": 0}, native_block_problem(out)
    assert type(out) is NATIVE_BLOCK_TYPES[type(block)]
    return out


def _poisoned_native(native: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The native op writing into a NaN-filled output: every element must be written."""
    n, c, h, w = x.shape
    shape = registered_block(native._native_handle).out_shape(n, h, w, c)
    out = torch.full((shape[0], shape[3], shape[1], shape[2]), float("nan")).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        y = native_block(x, native._native_handle, native._native_out, list(native._native_geometry), out=out)
    assert y is out
    return y


def _check(block: nn.Module, native: nn.Module, x: torch.Tensor, info: str) -> None:
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        assert_matches_reference(_poisoned_native(native, x.contiguous(memory_format=torch.channels_last)), ref,
                                 info=info)
        assert_matches_reference(native(x), ref, info=info + " (module forward, NCHW input)")


CASES = [(kind, stride, k, se, residual) for kind in KINDS for stride in (1, 2) for k in (3, 5, 7)
         for se in (False, True) for residual in (False, True) if not (residual and stride == 2)]


@pytest.mark.parametrize("kind,stride,k,se,residual", CASES)
def test_block_matches_float64_timm(kind, stride, k, se, residual, gen):
    index = CASES.index((kind, stride, k, se, residual))
    block = _make_block(kind, stride, k, se, residual, gen, index)
    native = _nativize(block, (16, 7, 7))
    for size in (1, 7, 13):
        for batch in (1, 3):
            x = torch.randn(batch, 16, size, size, generator=gen)
            _check(block, native, x, f"{kind} s{stride} k{k} se={se} res={residual} {batch}x{size}x{size}")


@pytest.mark.parametrize("kind", ["ir", "ds"])
def test_large_image_and_block8_masks(kind, gen):
    block = _make_block(kind, 2, 5, True, False, gen, index=3, cin=24, shared=8)
    native = _nativize(block, (24, 9, 9))
    _check(block, native, torch.randn(1, 24, 113, 113, generator=gen), f"{kind} 113x113 block:8")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cin=st.integers(1, 40), exp=st.sampled_from([1.0, 2.5, 6.0]), k=st.sampled_from([3, 5, 7]),
       stride=st.sampled_from([1, 2]), h=st.integers(1, 20), w=st.integers(1, 20), batch=st.integers(1, 3),
       se=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_random_shapes(cin, exp, k, stride, h, w, batch, se, seed):
    gen = torch.Generator().manual_seed(seed)
    se_layer = partial(SqueezeExcite, gate_layer=GATES[seed % 2]) if se else None
    block = InvertedResidual(cin, cin if stride == 1 else cin + 3, dw_kernel_size=k, stride=stride, exp_ratio=exp,
                             act_layer=ACTS[seed % 4], se_layer=se_layer, pad_type="same" if seed % 2 else "")
    randomize_bn(block.eval(), gen)
    _mask_depthwise(block, gen, keep=0.5)
    native = _nativize(block, (cin, h, w))
    _check(block, native, torch.randn(batch, cin, h, w, generator=gen), f"cin={cin} exp={exp} k={k} {h}x{w}")


def _simple_native(gen):
    block = _make_block("ir", 1, 3, True, True, gen, index=1)
    return block, _nativize(block, (16, 7, 7))


def test_bad_inputs_raise_clear_errors(gen):
    _, native = _simple_native(gen)
    h, oc, geo = native._native_handle, native._native_out, list(native._native_geometry)
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        with pytest.raises(ValueError, match="input has 12 channels but the native block expects 16"):
            native_block(torch.randn(2, 12, 7, 7), h, oc, geo)
        with pytest.raises(TypeError, match="float32 input, got torch.float64"):
            native_block(x.double(), h, oc, geo)
        with pytest.raises(ValueError, match="4-D input .* got 3-D"):
            native_block(x[0], h, oc, geo)
        with pytest.raises(ValueError, match="non-empty input"):
            native_block(torch.randn(0, 16, 7, 7), h, oc, geo)
        with pytest.raises(ValueError, match="no native block is registered under handle -5"):
            native_block(x, -5, oc, geo)
        with pytest.raises(ValueError, match="describes"):
            native_block(x, h, oc + 1, geo)
        with pytest.raises(ValueError, match="out must be a channels_last float32 CPU tensor of shape"):
            native_block(x, h, oc, geo, out=torch.empty(2, oc, 7, 7))
        # any memory format is accepted (copied once to channels_last) and gives the same values
        y1 = native_block(x, h, oc, geo)
        y2 = native_block(x.contiguous(memory_format=torch.channels_last), h, oc, geo)
        y3 = native_block(x.transpose(2, 3).contiguous().transpose(2, 3), h, oc, geo)
        assert torch.equal(y1, y2) and torch.equal(y1, y3)
    with pytest.raises(RuntimeError, match="inference-only"):
        native_block(x.requires_grad_(), h, oc, geo)


def test_native_block_class_rejects_bad_stages():
    C = load_extension()
    b = C.NativeBlock()
    with pytest.raises(ValueError, match="the block has no stages"):
        b.out_shape(1, 7, 7, 0)
    with pytest.raises(ValueError, match="point-wise weights must have 32 elements, got 24"):
        b.add_pw(torch.zeros(4, 6).numpy(), 4, 8)
    with pytest.raises(ValueError, match="point-wise weights must be float32"):
        b.add_pw(torch.zeros(4, 8, dtype=torch.float64).numpy(), 4, 8)
    with pytest.raises(ValueError, match="activation code must be 0-4 .* got 5"):
        b.add_pw(torch.zeros(4, 8).numpy(), 4, 8, None, 5)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32).numpy()  # noqa: E731
    f32 = lambda n: torch.zeros(n).numpy()  # noqa: E731
    with pytest.raises(ValueError, match="offsets must have 3 entries, got 2"):
        b.add_dw(2, i32(0, 1), i32(0), f32(1), i32(0, 1), i32(0), f32(8), None, (3, 3), (1, 1), [1, 1, 1, 1], 0)
    with pytest.raises(ValueError, match=r"taps must be in \[0, 9\), got 9"):
        b.add_dw(2, i32(0, 1, 1), i32(9), f32(1), i32(0, 1), i32(0), f32(8), None, (3, 3), (1, 1), [1, 1, 1, 1], 0)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got \\(3, 1\\)"):
        b.add_dw(2, i32(0, 1, 1), i32(0), f32(1), i32(0, 1), i32(0), f32(8), None, (3, 3), (3, 1), [1, 1, 1, 1], 0)
    with pytest.raises(ValueError, match="padding .* must be in \\[0, kernel - 1\\], got 3, 1, 1, 1"):
        b.add_dw(2, i32(0, 1, 1), i32(0), f32(1), i32(0, 1), i32(0), f32(8), None, (3, 3), (1, 1), [3, 1, 1, 1], 0)
    with pytest.raises(ValueError, match="gate code must be 0 .* got 7"):
        b.add_se(8, 2, f32(16), f32(2), f32(16), f32(8), 1, 7)
    with pytest.raises(ValueError, match="squeeze-excite reduce bias must have 2 elements, got 3"):
        b.add_se(8, 2, f32(16), f32(3), f32(16), f32(8), 1, 0)
    b.add_pw(torch.randn(4, 8).numpy(), 4, 8)
    b.add_dw(4, i32(0, 1, 1, 1, 1), i32(4), f32(1), i32(0, 1), i32(4), f32(8), None, (3, 3), (1, 1), None, 0)
    assert b.out_shape(2, 5, 6, 8) == (2, 5, 6, 4)
    with pytest.raises(ValueError, match="input has 6 channels, the block expects 8"):
        b.out_shape(2, 5, 6, 6)
    b.residual = True
    with pytest.raises(ValueError, match="a residual block must keep its input's shape"):
        b.out_shape(2, 5, 6, 8)
    b.residual = False
    v = C.NativeBlock()
    v.add_dw(4, i32(0, 1, 1, 1, 1), i32(4), f32(1), i32(0, 1), i32(4), f32(8), None, (5, 5), (1, 1), [0, 0, 0, 0], 0)
    with pytest.raises(ValueError, match="input of spatial size 3x3 is too small for the 5x5 depth-wise conv"):
        v.out_shape(1, 3, 3, 4)
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        v.out_shape(0, 7, 7, 4)
    with pytest.raises(TypeError, match="NativeBlock"):
        register_block(object())


def test_training_gradients_and_state_dict_are_the_blocks(gen):
    block, native = _simple_native(gen)
    assert list(native.state_dict()) == list(_nativize(block, (16, 7, 7)).state_dict())
    x = torch.randn(2, 16, 7, 7, generator=gen, requires_grad=True)
    native.train()
    native(x).sum().backward()  # the PyTorch forward: gradients flow
    assert x.grad is not None and native.conv_pwl.weight.grad is not None
    native.eval()
    y = native(x)  # eval with a gradient needed: the PyTorch forward again
    assert y.requires_grad


def test_weights_changed_in_place_are_repacked(gen):
    block, native = _simple_native(gen)
    x = torch.randn(2, 16, 7, 7, generator=gen)
    with torch.no_grad():
        before = native(x)
        native.conv_pwl.weight.mul_(2.0)
        after = native(x)
        ref = copy.deepcopy(native).float()
        ref.__class__ = InvertedResidual
        torch.testing.assert_close(after, ref(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


MODELS = ["mobilenetv2_100", "efficientnet_b0", "mobilenetv3_large_100", "mobilenetv4_conv_small"]


@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_runs_every_block_natively(name, gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    model = timm.create_model(name).eval()
    randomize_bn(model, gen)
    granularity = "block:8" if name == "efficientnet_b0" else "element"
    cfg = DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3, granularity=granularity)
    res = prune(model, cfg, input_size=(3, 64, 64))
    opt = optimize_for_inference(res.model, input_size=(3, 64, 64))
    stats = opt.deprune_inference_stats
    assert stats["native_blocks"] > 0 and stats["native_skipped"] == 0, stats
    off = optimize_for_inference(res.model, input_size=(3, 64, 64), native_blocks=False, check=False)
    assert off.deprune_inference_stats["native_blocks"] == 0
    assert not any(type(m) in NATIVE_BLOCK_TYPES.values() for m in off.modules())
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = res.model.eval()(x)
        out = opt(x.contiguous(memory_format=torch.channels_last))
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_torch_compile_fullgraph_and_export(gen):
    block, native = _simple_native(gen)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), native, nn.ReLU()).eval()
    x = torch.randn(2, 8, 7, 7, generator=gen)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "deprune.native_block.default" in targets, targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ir", "uir_extra", "ds"])
def test_batches_run_image_by_image_on_several_threads(kind, gen):
    block = _make_block(kind, 1, 3, True, True, gen, index=2)
    native = _nativize(block, (16, 7, 7))
    x = torch.randn(5, 16, 9, 11, generator=gen)  # 5 images on 2 threads: the image-by-image order
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(block, native, x, f"{kind} batch 5 on 2 threads")
        with torch.no_grad():
            two = native(x)
            torch.set_num_threads(1)
            one = native(x)  # the stage-by-stage order: the same sums
        assert torch.equal(one, two)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind,stride,k,cin,size", [("ir", 2, 3, 32, 64), ("ir", 1, 3, 32, 80), ("ds", 1, 5, 64, 64)])
@pytest.mark.parametrize("se", [False, True])
def test_wide_images_run_in_bands_with_halo_rows(kind, stride, k, cin, size, se, gen):
    # Expanded rows of 32-41 KB: the banded order (cpp/cpu/block_banded.cpp) takes 7-28 output rows per band, so
    # every image runs as 3-8 bands whose depth-wise windows reach into the neighbouring bands' rows.
    block = _make_block(kind, stride, k, se, stride == 1, gen, index=1, cin=cin)
    native = _nativize(block, (cin, 9, 9))
    _check(block, native, torch.randn(2, cin, size, size, generator=gen), f"{kind} s{stride} k{k} {size}px bands")


def test_fuse_and_onnx_export_restore_the_timm_block(gen, tmp_path):
    pytest.importorskip("onnxruntime")
    from timm.models import reparameterize_model

    from timm_deprune.inference.export import export_onnx
    block, native = _simple_native(gen)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), native).eval()
    x = torch.randn(2, 8, 7, 7, generator=gen)
    with torch.no_grad():
        expected = model(x)
        path = export_onnx(model, tmp_path / "m.onnx", input_size=(8, 7, 7))  # checked in ORT against the model
        assert type(model[1]) is NATIVE_BLOCK_TYPES[InvertedResidual]  # export works on a copy
        plain = reparameterize_model(model)
        assert not any(type(m) in NATIVE_BLOCK_TYPES.values() for m in plain.modules())
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert path.is_file()
