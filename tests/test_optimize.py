"""optimize_for_inference: BN folded, activations fused into the sparse kernel, outputs unchanged."""
import copy

import pytest
import timm
import torch

from timm_deprune import DepruneConfig, MaskedConv2d, masked_convs, optimize_for_inference, prune, set_execution

FAMILIES = ["mobilenetv2_050", "efficientnet_b0", "mobilenetv3_small_050", "tf_efficientnet_lite0", "mixnet_s",
            "mobilenetv4_conv_small", "ghostnet_050", "rexnet_100", "lcnet_050", "fbnetc_100", "convnext_atto"]


def _bn_count(model) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", FAMILIES)
def test_optimized_model_matches_and_has_no_batchnorm(name, gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3), input_size=(3, 64, 64))
    opt = optimize_for_inference(res.model, input_size=(3, 64, 64))
    assert opt is not res.model and _bn_count(res.model) > 0 or name == "convnext_atto"
    assert _bn_count(opt) == 0  # every BN of these families follows a conv
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = res.model.eval()(x)
        set_execution(opt, "sparse")
        out = opt(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    fused = [m.activation for _, m in masked_convs(opt) if m.activation != "identity"]
    if name in ("mobilenetv2_050", "efficientnet_b0", "tf_efficientnet_lite0", "mixnet_s"):
        assert len(fused) == len(list(masked_convs(opt)))  # every DW conv's BN + act went into the kernel
    if name in ("efficientnet_b0", "mobilenetv3_small_050", "mixnet_s"):  # squeeze-excite runs as two matmuls
        assert opt.deprune_inference_stats["linear_squeeze_excite"] > 0
    if name in ("mobilenetv2_050", "efficientnet_b0", "mobilenetv3_small_050"):  # conv_pw + act in one oneDNN call
        assert opt.deprune_inference_stats["conv_activations"] > 0
    if name not in ("convnext_atto", "ghostnet_050", "lcnet_050", "rexnet_100"):  # no DW conv in a channel group
        assert opt.deprune_inference_stats["reordered_blocks"] > 0
    for path, mask in res.masks.items():  # pruned taps stay exactly zero after folding; reordering permutes rows
        conv = opt.get_submodule(path)
        assert (conv.weight.detach()[:, 0][~conv.mask] == 0).all()
        # padding (pad_channels=8) adds channels with every tap pruned, up to a multiple of 8
        extra = conv.mask.shape[0] - mask.shape[0]
        assert extra == 0 or (0 < extra < 8 and conv.mask.shape[0] % 8 == 0), (path, mask.shape, conv.mask.shape)
        rows = mask.flatten(1).tolist() + [[False] * mask[0].numel()] * extra
        assert sorted(conv.mask.flatten(1).tolist()) == sorted(rows)


def test_fused_activation_is_kept_by_every_path(gen):
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=True)
    from timm_deprune import to_masked
    m = to_masked(conv, torch.rand(32, 3, 3, generator=gen) > 0.5).eval()
    m.activation = "relu6"
    x = torch.randn(2, 32, 9, 9, generator=gen) * 4
    ref = torch.nn.functional.relu6(torch.nn.functional.conv2d(x, m.masked_weight(), m.bias, padding=1, groups=32))
    with torch.no_grad():
        for mode in ("sparse", "dense"):
            m.execution = mode
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        fused = m.fuse()
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    m.train()
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert "activation='relu6'" in repr(m)
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        m.activation = "tanh"
    assert isinstance(m, MaskedConv2d)


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "hardswish", "gelu"])
def test_conv_activation_fusion_matches_every_path(act, gen):
    from timm_deprune.inference.modules import ConvAct2d
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, bias=True).eval()
    x = torch.randn(2, 16, 9, 9, generator=gen) * 3
    with torch.no_grad():
        ref = getattr(torch.nn.functional, act)(conv(x))  # an independent reference: torch by name
        conv.__class__ = ConvAct2d
        conv.post_act = act
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1], x):  # reordered weight per shape
            torch.testing.assert_close(conv(inp), ref[:len(inp)], rtol=1e-5, atol=1e-5)
        conv.weight.mul_(2)  # an in-place change invalidates the reordered weight
        ref2 = getattr(torch.nn.functional, act)(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
        torch.testing.assert_close(conv(x), ref2, rtol=1e-5, atol=1e-5)
        copy.deepcopy(conv)  # no oneDNN tensor on the module
        conv.train()  # the unfused path
        torch.testing.assert_close(conv(x), ref2, rtol=1e-5, atol=1e-5)
    assert f"post_act='{act}'" in repr(conv)


def test_optimize_options(gen):
    res = prune(timm.create_model("mobilenetv2_050"), DepruneConfig.deprune_bh(dw_ratio=0.5), input_size=(3, 64, 64))
    same = optimize_for_inference(res.model, inplace=True, channels_last=True, input_size=(3, 64, 64))
    assert same is res.model and not same.training
    assert same.deprune_inference_stats["folded"] > 0


def test_channels_last_and_reordering_auto(gen):
    model = timm.create_model("mobilenetv2_050")
    element = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71), input_size=(3, 64, 64)).model
    block = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71, granularity="block:8"), input_size=(3, 64, 64)).model
    stats = optimize_for_inference(element, input_size=(3, 64, 64)).deprune_inference_stats
    assert stats["channels_last"] is True and stats["reordered_blocks"] == 16  # every inverted residual
    # Without reordering, element patterns keep NCHW; block:8 patterns are already one pattern per 8 channels.
    stats = optimize_for_inference(element, reorder_channels=False, input_size=(3, 64, 64)).deprune_inference_stats
    assert stats["channels_last"] is False and stats["reordered_blocks"] == 0
    stats = optimize_for_inference(element, channels_last=False, input_size=(3, 64, 64)).deprune_inference_stats
    assert stats["reordered_blocks"] == 0  # "auto" reorders only for channels_last
    opt = optimize_for_inference(block, reorder_channels=False, input_size=(3, 64, 64))
    assert opt.deprune_inference_stats["channels_last"] is True
    assert opt.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimize_for_inference(block, input_size=(3, 64, 64)).deprune_inference_stats["reordered_blocks"] == 0
    assert optimize_for_inference(model, input_size=(3, 64, 64)).deprune_inference_stats["channels_last"] is True
    with pytest.raises(ValueError, match="channels_last must be True, False or 'auto', got 'yes'"):
        optimize_for_inference(block, channels_last="yes", input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="reorder_channels must be True, False or 'auto', got 1"):
        optimize_for_inference(block, reorder_channels=1, input_size=(3, 64, 64))


@pytest.mark.parametrize("name", ["efficientnet_b0", "mixnet_s", "mobilenetv4_conv_small"])
def test_reorder_dw_channels_keeps_outputs_and_shrinks_block_unions(name, gen):
    from timm_deprune.inference.reorder import reorder_dw_channels
    from timm_deprune.kernels.plan import block_lanes

    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    res = prune(timm.create_model(name), DepruneConfig.deprune_b(dw_ratio=0.71), input_size=(3, 64, 64))
    model = res.model.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = model(x)
    lanes = sum(block_lanes(m.mask) for _, m in masked_convs(model))
    moved = reorder_dw_channels(model)
    assert moved > 0
    with torch.no_grad():
        out = model(x)
        set_execution(model, "dense")
        dense = model(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5 and float((dense - ref).norm() / ref.norm()) < 1e-5
    after = sum(block_lanes(m.mask) for _, m in masked_convs(model))
    assert after < 0.85 * lanes  # random-weight 71% masks: 3.1-3.3 lanes per kept tap before, 1.5-2.7 after
    for path, mask in res.masks.items():
        conv = model.get_submodule(path)
        assert sorted(conv.mask.flatten(1).tolist()) == sorted(mask.flatten(1).tolist())
        assert (conv.weight.detach()[:, 0][~conv.mask] == 0).all()
    reorder_dw_channels(model)  # a group moves again only when the new order runs fewer lanes
    assert sum(block_lanes(m.mask) for _, m in masked_convs(model)) <= after


def test_squeeze_excite_gates_in_place_only_inside_blocks_that_consume_its_input(gen):
    from timm.models._efficientnet_blocks import SqueezeExcite

    from timm_deprune.inference.modules import fast_squeeze_excite

    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    model = timm.create_model("efficientnet_b0").eval()
    lone = torch.nn.Sequential(SqueezeExcite(24)).eval()  # not in a timm block: its input may be read again
    assert fast_squeeze_excite(model) == 16 and fast_squeeze_excite(lone) == 1
    assert all(m.inplace_gate for m in model.modules() if hasattr(m, "inplace_gate"))
    assert lone[0].inplace_gate is False
    x = torch.randn(2, 24, 5, 5, generator=gen)
    kept = x.clone()
    with torch.no_grad():
        lone(x)
    assert torch.equal(x, kept)
    se = model.blocks[1][0].se
    x = torch.randn(2, se.conv_reduce.in_channels, 5, 5, generator=gen)
    with torch.no_grad():
        ref = SqueezeExcite.forward(se, x)  # timm's own forward (1x1 convs, out of place) as the reference
    y = x.clone().requires_grad_()
    out = se(y)  # with grad enabled: out of place, so autograd sees no modified tensor
    out.sum().backward()
    assert out is not y and y.grad is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    z = x.clone()
    with torch.no_grad():
        out = se(z)
    assert out is z  # inference: the gate went into the input tensor
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_features_only_model_is_optimized_and_checked(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    model = timm.create_model("mobilenetv2_050", features_only=True, out_indices=(1, 3, 4))
    pm = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3), input_size=(3, 64, 64)).model.eval()
    opt = optimize_for_inference(pm, input_size=(3, 64, 64))  # its check compares every feature map
    assert opt.deprune_inference_stats["reordered_blocks"] > 0
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref, out = pm(x), opt(x.contiguous(memory_format=torch.channels_last))
    assert len(out) == len(ref) == 3
    for r, o in zip(ref, out):
        assert o.shape == r.shape and float((o - r).norm() / r.norm()) < 1e-5


def test_output_check_runs_in_full_fp32_and_restores_the_math_settings():
    # On an Ampere-or-newer GPU, TF32 convs / matmuls move a model's output by ~1e-3 (seen on an H200: 4e-4 rel.),
    # which tripped the 1e-4 check of optimize_for_inference; the check runs both passes in full fp32 instead.
    from timm_deprune.inference.optimize import full_fp32_math

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_fp32_math():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 is True
        with pytest.raises(KeyError), full_fp32_math():  # restored when the body raises too
            raise KeyError("body")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]



def test_padding_channels_is_exact_and_optional(gen):
    # Random BN statistics make dead DW channels carry a constant that dead-channel folding moves; the padded model
    # must give the same output, and pad_channels=None must leave every count alone.
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    model = timm.create_model("mobilenetv2_050").eval()
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3), input_size=(3, 64, 64))
    counts = {p: m.mask.shape[0] for p, m in masked_convs(res.model)}
    assert any(c % 8 for c in counts.values()), "the case needs an odd channel count"
    padded = optimize_for_inference(res.model, input_size=(3, 64, 64))
    plain = optimize_for_inference(res.model, input_size=(3, 64, 64), pad_channels=None)
    assert padded.deprune_inference_stats["padded_blocks"] == sum(c % 8 > 0 for c in counts.values())
    assert plain.deprune_inference_stats["padded_blocks"] == 0
    assert all(m.mask.shape[0] % 8 == 0 for _, m in masked_convs(padded))
    assert {p: m.mask.shape[0] for p, m in masked_convs(plain)} == counts
    x = torch.randn(2, 3, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = res.model.eval()(x)
        for opt in (padded, plain):
            assert float((opt(x) - ref).norm() / ref.norm()) < 1e-5
    with pytest.raises(ValueError, match="pad_channels must be an int >= 1 or None, got 0"):
        optimize_for_inference(res.model, pad_channels=0)
