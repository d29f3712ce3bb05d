"""One-shot calibration (ARCHITECTURE.md §9): OBS tap selection, least-squares refits, ``prune(calibration=...)``
on representative families, the CLI's ``--calibration-dir``. Tiny models and inputs: the whole file runs in well
under a minute on two cores."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import timm
from timm_deprune import DepruneConfig, prune
from timm_deprune.pruning.calibrator import Calibrator, collect_inputs, dw_dense_channels, take_rows
from timm_deprune.pruning.obs import DWStats, damped_inverse, dw_hessian, dw_patches, obs_select, refit_kept_taps
from timm_deprune.pruning.select import select_dw_taps

CFG = DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3, importance="obs")


def _spd(c: int, k: int, gen: torch.Generator, corr: float = 0.0) -> torch.Tensor:
    """``c`` random SPD ``k x k`` matrices; ``corr`` > 0 adds a strong shared component (correlated inputs)."""
    x = torch.randn(c, k, 4 * k, generator=gen, dtype=torch.float64)
    if corr:
        x = x + corr * torch.randn(c, 1, 4 * k, generator=gen, dtype=torch.float64)
    return x @ x.transpose(1, 2) / (4 * k)


def _error(w: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(w - w')ᵀ H (w - w')`` per channel, computed directly."""
    d = (w - w2).reshape(w.shape[0], -1).double()
    return torch.einsum("ci,cij,cj->c", d, h, d)


# --- OBS selection meets the structural constraints -----------------------------------------------------------

@pytest.mark.parametrize("channels,kernel,align,block", [(64, 3, "under", 1), (80, 3, "over", 1), (96, 5, "under", 1),
                                                         (64, 3, "under", 8), (72, 3, "nearest", 8)])
def test_obs_meets_bwt_hsr_counts(channels, kernel, align, block):
    gen = torch.Generator().manual_seed(channels + kernel)
    w = torch.randn(channels, 1, kernel, kernel, generator=gen)
    h = _spd(channels, kernel * kernel, gen, corr=1.0)
    sel, _ = obs_select(w, h, 0.71, balance=True, align=align, block=block)
    ref = select_dw_taps(w.detach().square().reshape(channels, kernel, kernel), 0.71, balance=True, align=align,
                         block=block)
    assert sel.group_pruned == ref.group_pruned  # the counts select_dw_taps fixes, met exactly
    full = channels // 32
    assert len(set(sel.group_pruned[:full])) == 1  # BWT: every full group prunes the same count
    assert all(p % 32 == 0 for p in sel.group_pruned[:full])  # HSR: whole tiles
    if block > 1:
        m = sel.mask.reshape(channels, -1)
        for b0 in range(0, channels, block):
            assert (m[b0:b0 + block] == m[b0]).all()  # block:N shares one pattern
    assert sel.mask.shape == (channels, kernel, kernel)


def test_obs_dcp_meets_layer_total():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 1, 3, 3, generator=gen)
    sel, _ = obs_select(w, _spd(48, 9, gen, 1.0), 0.5, balance=False, align="none")
    assert int((~sel.mask).sum()) == round(0.5 * 48 * 9)


def test_identity_hessian_selects_like_magnitude():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 1, 3, 3, generator=gen)
    eye = torch.eye(9, dtype=torch.float64).repeat(64, 1, 1)
    for kwargs in (dict(balance=True, align="under"), dict(balance=True, align="none"),
                   dict(balance=False, align="none"), dict(balance=True, align="under", block=8)):
        sel, w2 = obs_select(w, eye, 0.71, **kwargs)
        ref = select_dw_taps(w.square().reshape(64, 3, 3), 0.71, **kwargs)
        assert torch.equal(sel.mask, ref.mask), kwargs
        # with H = I removing a tap changes no other: the kept taps keep their values
        assert torch.allclose(w2, w * sel.mask[:, None], atol=1e-6)


def test_obs_beats_magnitude_on_correlated_hessian():
    gen = torch.Generator().manual_seed(5)
    c, k = 32, 9
    w = torch.randn(c, 1, 3, 3, generator=gen, dtype=torch.float64)
    h = _spd(c, k, gen, corr=3.0)
    kw = dict(balance=True, align="none")
    sel, w_obs = obs_select(w, h, 0.5, damp=0.0, **kw)
    mag = select_dw_taps(w.square().reshape(c, 3, 3), 0.5, **kw)
    e_obs = _error(w, w_obs, h).sum()
    e_mag = _error(w, w * mag.mask[:, None], h).sum()
    e_mag_refit = _error(w, refit_kept_taps(w, h, mag.mask, damp=0.0), h).sum()
    assert e_obs < 0.5 * e_mag
    assert e_obs <= e_mag_refit * (1 + 1e-9)  # same count per group, better taps


def test_obs_single_channel_against_brute_force():
    # one channel, one group: the greedy OBS error against the optimum over every mask with that count
    gen = torch.Generator().manual_seed(6)
    for trial in range(4):
        w = torch.randn(1, 1, 3, 3, generator=gen, dtype=torch.float64)
        h = _spd(1, 9, gen, corr=2.0)
        sel, w_obs = obs_select(w, h, 5 / 9, balance=True, align="none", damp=0.0)
        assert int((~sel.mask).sum()) == 5
        hn, wn = h[0].numpy(), w.reshape(9).numpy()
        errors = {}
        for kept in itertools.combinations(range(9), 4):
            kk, pp = list(kept), [i for i in range(9) if i not in kept]
            # independent LS: minimise (w - w')ᵀ H (w - w') over the kept taps via the Cholesky factor
            lt = np.linalg.cholesky(hn).T
            sol, *_ = np.linalg.lstsq(lt[:, kk], lt @ wn, rcond=None)
            d = wn.copy()
            d[kk] -= sol
            errors[kept] = float(d @ hn @ d)
        best = min(errors.values())
        mine = float(_error(w, w_obs, h)[0])
        kept_obs = tuple(int(i) for i in sel.mask.reshape(9).nonzero().flatten())
        assert mine == pytest.approx(errors[kept_obs], rel=1e-6)  # the weights are that mask's optimum
        assert best * (1 - 1e-9) <= mine <= 2.0 * best
        mag_kept = tuple(sorted(np.argsort(-np.abs(wn), kind="stable")[:4].tolist()))
        assert mine <= errors[mag_kept] * (1 + 1e-9) or trial  # greedy OBS is not always optimal


def test_refit_kept_taps_equals_least_squares():
    gen = torch.Generator().manual_seed(7)
    c, k, n = 6, 9, 200
    x = torch.randn(c, k, n, generator=gen, dtype=torch.float64)  # patches
    w = torch.randn(c, 1, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.einsum("ck,ckn->cn", w.reshape(c, k), x)
    mask = torch.rand(c, 3, 3, generator=gen) > 0.5
    mask[:, 1, 1] = True
    out = refit_kept_taps(w, x @ x.transpose(1, 2), mask, damp=0.0).reshape(c, k)
    for ch in range(c):
        kept = mask[ch].reshape(k).numpy()
        sol, *_ = np.linalg.lstsq(x[ch][kept].T.numpy(), y[ch].numpy(), rcond=None)
        assert np.allclose(out[ch, kept].numpy(), sol, atol=1e-8)
        assert (out[ch, ~torch.from_numpy(kept)] == 0).all()


def test_dw_hessian_predicts_output_error():
    gen = torch.Generator().manual_seed(8)
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False).double()
    x = torch.randn(3, 8, 9, 9, generator=gen, dtype=torch.float64)
    h = dw_hessian(conv, x, positions=10 ** 6)
    dw = torch.randn(8, 1, 3, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        diff = conv(x) - nn.functional.conv2d(x, conv.weight - dw, stride=2, padding=1, groups=8)
    assert torch.allclose(diff.square().sum((0, 2, 3)), _error(dw, torch.zeros_like(dw), h), rtol=1e-9)


@pytest.mark.parametrize("stride,padding,dilation,kernel", [(1, 1, 1, 3), (2, 1, 1, 3), (1, 2, 1, 5), (1, 2, 2, 3),
                                                          (1, "same", 1, 3)])
def test_dw_patches_at_sampled_positions(stride, padding, dilation, kernel):
    gen = torch.Generator().manual_seed(20)
    conv = nn.Conv2d(5, 5, kernel, stride=stride, padding=padding, dilation=dilation, groups=5)
    x = torch.randn(3, 5, 11, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    full = dw_patches(conv, x)  # [N, C, k, L], every position
    with torch.no_grad():  # the patches reproduce the conv
        y = torch.einsum("nckl,ck->ncl", full, conv.weight.reshape(5, -1)) + conv.bias[None, :, None]
        assert torch.allclose(y, conv(x).reshape(3, 5, -1), atol=1e-5)
    pos = torch.randint(full.shape[-1], (3, 7), generator=gen)
    per_image = full.gather(3, pos[:, None, None, :].expand(3, 5, full.shape[2], 7))
    assert torch.equal(dw_patches(conv, x, pos), per_image)
    assert torch.equal(dw_patches(conv, x, pos[0]), full[..., pos[0]])


def test_take_rows_matches_layout():
    gen = torch.Generator().manual_seed(21)
    t = torch.randn(2, 4, 3, 5, generator=gen)
    idx = torch.tensor([[0, 14, 3], [7, 7, 1]])
    rows = take_rows(nn.Conv2d(4, 4, 1), t.contiguous(memory_format=torch.channels_last), idx)
    flat = t.reshape(2, 4, 15)
    ref = torch.stack([flat[n, :, i] for n in range(2) for i in idx[n]])
    assert torch.equal(rows, ref)
    lin = torch.randn(2, 6, 4, generator=gen)
    assert torch.equal(take_rows(nn.Linear(4, 3), lin, idx[:, :2] % 6), torch.stack(
        [lin[n, i] for n in range(2) for i in (idx[n, :2] % 6)]))


def test_refit_kept_taps_with_targets_is_least_squares_against_them():
    gen = torch.Generator().manual_seed(22)
    c, k, n = 6, 9, 300
    x = torch.randn(c, k, n, generator=gen, dtype=torch.float64)
    w = torch.randn(c, 1, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.einsum("ck,ckn->cn", torch.randn(c, k, generator=gen, dtype=torch.float64), x)  # another layer's
    mask = torch.rand(c, 3, 3, generator=gen) > 0.5
    mask[:, 1, 1] = True
    h, g = x @ x.transpose(1, 2), (x @ y[:, :, None])[:, :, 0]
    out = refit_kept_taps(w, h, mask, damp=0.0, target=g).reshape(c, k)
    for ch in range(c):
        kept = mask[ch].reshape(k).numpy()
        sol, *_ = np.linalg.lstsq(x[ch][kept].T.numpy(), y[ch].numpy(), rcond=None)
        assert np.allclose(out[ch, kept].numpy(), sol, atol=1e-8)
    # g = H w: fitting the layer's own outputs is the plain refit, and OBS selects as without a target
    own = (h @ w.reshape(c, k, 1))[:, :, 0]
    assert torch.allclose(refit_kept_taps(w, h, mask, target=own), refit_kept_taps(w, h, mask))
    s1, w1 = obs_select(w, h, 0.5, balance=True, align="none")
    s2, w2 = obs_select(w, h, 0.5, balance=True, align="none", target=own)
    assert torch.equal(s1.mask, s2.mask) and torch.allclose(w1, w2)


def test_dw_stats_centered_fit_has_a_free_offset():
    gen = torch.Generator().manual_seed(23)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).double()
    x = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64) + 2.0  # inputs with a mean
    target = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = nn.functional.conv2d(x, target, padding=1, groups=4) + torch.tensor([1.0, -2.0, 0.5, 3.0],
                                                                                 dtype=torch.float64)[:, None, None]
    st = DWStats.zeros(4, 9, targets=True)
    for part in range(0, 6, 2):  # batch by batch
        st.add(dw_patches(conv, x[part:part + 2]), y[part:part + 2].reshape(2, 4, -1))
    mask = torch.rand(4, 3, 3, generator=gen) > 0.4
    mask[:, 1, 1] = True
    w = refit_kept_taps(conv.weight, st.hessian(True), mask, damp=0.0, target=st.target(True))
    b = st.offset(w)
    p = dw_patches(conv, x).permute(1, 0, 3, 2).reshape(4, -1, 9)  # [C, samples, k]
    yr = y.permute(1, 0, 2, 3).reshape(4, -1)
    for ch in range(4):
        kept = mask[ch].reshape(9)
        a = torch.cat([p[ch][:, kept], torch.ones(p.shape[1], 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, yr[ch][:, None]).solution[:, 0]
        assert torch.allclose(w.reshape(4, 9)[ch, kept], sol[:-1], atol=1e-8)
        assert b[ch].item() == pytest.approx(sol[-1].item(), abs=1e-8)
    sub = st.take(torch.tensor([2, 0]))
    assert torch.equal(sub.h, st.h[[2, 0]]) and torch.equal(sub.g, st.g[[2, 0]]) and sub.n == st.n


def test_calibrator_targets_and_replayed_head_inputs():
    gen = torch.Generator().manual_seed(24)
    model = timm.create_model("efficientnet_b0", num_classes=10).eval()
    inputs = collect_inputs([torch.randn(2, 3, 64, 64, generator=gen) for _ in range(2)])
    calib = Calibrator(model, model, inputs)
    assert calib.units and calib.units[0] == "blocks.0.0"
    dw = "blocks.1.0.conv_dw"
    calib.record(refit=["conv_head"], dw=[dw])
    conv = model.get_submodule(dw)
    st = calib.dw_stats(dw)
    ref = DWStats.zeros(conv.out_channels, 9, targets=True)
    for i, x in enumerate(inputs):  # the same positions, recomputed from a plain forward with hooks
        with torch.no_grad():
            xin = Calibrator._run_to(model, conv, x)
            y = conv(xin).reshape(len(x), conv.out_channels, -1)
        idx = calib._pos[dw][i]
        yi = y if idx is None else y.gather(2, idx[:, None, :].expand(len(x), y.shape[1], idx.shape[1]))
        ref.add(dw_patches(conv, xin, idx), yi)
    assert ref.n == st.n > 0
    for a, b in ((st.h, ref.h), (st.g, ref.g), (st.sy, ref.sy), (st.sp, ref.sp)):  # float32 sums of one batch
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # the head conv, after the chain, reads the cached chain output: the same as a forward from the input
    head = model.get_submodule("conv_head")
    got = list(calib._inputs_of(head, "conv_head"))
    assert calib.unit == len(calib.units)
    with torch.no_grad():
        for x, g in zip(inputs, got):
            assert torch.allclose(g, Calibrator._run_to(model, head, x), atol=1e-5)
    calib.close()


def test_dw_offset_lands_in_the_following_bn():
    gen = torch.Generator().manual_seed(25)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4)).eval()
    model[1].running_mean.normal_(generator=gen)
    x = [torch.randn(2, 4, 6, 6, generator=gen)]
    calib = Calibrator(model, model, x)
    off = torch.tensor([1.0, -2.0, 0.5, 0.0])
    before_mean, before_bias = model[1].running_mean.clone(), model[2].bias.detach().clone()
    with torch.no_grad():
        ref = model[1](model[0](x[0]) + off[:, None, None])
    assert calib.offset_home("0") and calib.offset_home("2")
    assert calib.set_offset("0", off) and calib.set_offset("2", off)
    with torch.no_grad():  # bn(conv(x) + b) == bn with its running mean lowered by b
        assert torch.allclose(model[1](model[0](x[0])), ref, atol=1e-5)
    assert torch.allclose(model[1].running_mean, before_mean - off)
    assert torch.allclose(model[2].bias.detach(), before_bias + off)
    calib.close()


def test_dense_channels_of_mixed_conv_parts():
    from timm_deprune.pruning.groups import find_channel_groups

    model = timm.create_model("mixnet_s", num_classes=10)
    groups = find_channel_groups(model)
    g = next(g for g in groups if g.dw is None and isinstance(model.get_submodule(g.channelwise[1]),
                                                                timm.layers.MixedConv2d))
    mixed = model.get_submodule(g.channelwise[1])
    sizes = [c.out_channels for c in mixed.values()]
    kept = torch.arange(0, sum(sizes), 3)
    parts = [dw_dense_channels(model, groups, {g.producer: kept}, f"{g.channelwise[1]}.{j}") for j in range(len(sizes))]
    assert torch.equal(torch.cat([p + sum(sizes[:j]) for j, p in enumerate(parts)]), kept)
    assert all(int(p.max()) < s for p, s in zip(parts, sizes))


# --- reconstruction -----------------------------------------------------------------------------------------------

def test_consumer_refit_reduces_block_error():
    gen = torch.Generator().manual_seed(9)
    dense = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()
    dense[3].running_mean.normal_(generator=gen)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()
    keep = torch.arange(0, 32, 2)
    with torch.no_grad():  # remove half of the hidden channels, as point-wise surgery would
        model[0].weight.copy_(dense[0].weight[keep])
        model[0].bias.copy_(dense[0].bias[keep])
        model[2].weight.copy_(dense[2].weight[:, keep])
        model[3].load_state_dict(dense[3].state_dict())
    inputs = [torch.randn(16, 8, 6, 6, generator=gen) for _ in range(3)]  # 108 rows >= 8 per weight column

    def err():
        with torch.no_grad():
            return sum(float((model(x) - dense(x)).square().sum()) for x in inputs)

    before = err()
    calib = Calibrator(model, dense, inputs)
    assert calib.bn_after() == {"2": "3"}
    assert calib.refit("2")
    calib.close()
    assert err() < 0.5 * before


# --- prune(calibration=...) -------------------------------------------------------------------------------------

def _batches(kind: str, gen: torch.Generator, size: int = 64):
    xs = [torch.randn(1, 3, size, size, generator=gen) for _ in range(2)]
    if kind == "tensors":
        return xs
    if kind == "pairs":
        return [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.zeros(2, dtype=torch.long))
    return torch.utils.data.DataLoader(ds, batch_size=1)


@pytest.mark.parametrize("arch,kind", [("efficientnet_b0", "tensors"), ("mobilenetv2_035", "pairs"),
                                       ("mobilenetv3_small_050", "loader"), ("mobilenetv4_conv_small", "tensors"),
                                       ("mixnet_s", "pairs")])
def test_prune_with_calibration_on_families(arch, kind):
    gen = torch.Generator().manual_seed(10)
    model = timm.create_model(arch, num_classes=10).eval()
    res = prune(model, CFG, calibration=_batches(kind, gen), input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert torch.isfinite(res.model.eval()(x)).all()
    assert any(d.achieved_ratio > 0 for d in res.plan.dw)
    cal = res.plan.extra["stats"]["calibration"]
    assert cal["samples"] == 2 and cal["importance"] == "obs" and cal["reconstruct"] is True
    assert cal["layers_refit"] > 0 or arch == "mixnet_s"  # mixnet's consumers are MixedConv2d: not refit
    assert res.plan.config["importance"] == "obs"
    assert res.report.calibration_seconds > 0 and res.report.calibration_peak_mb > 0
    assert "calibration" in res.report.summary()
    assert res.plan.extra["stats"]["decide_seconds"] >= 0


def test_bwt_hsr_counts_hold_in_a_calibrated_model():
    gen = torch.Generator().manual_seed(11)
    model = timm.create_model("mobilenetv2_050", num_classes=10).eval()
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.71, importance="obs", remove_dead=False),
                calibration=_batches("tensors", gen, 32), input_size=(3, 32, 32))
    for path, mask in res.masks.items():
        m = mask.reshape(mask.shape[0], -1)
        c = m.shape[0]
        pruned = [int((~m[g:g + 32]).sum()) for g in range(0, c - c % 32, 32)]
        assert len(set(pruned)) <= 1 and all(p % 32 == 0 for p in pruned), path


def test_calibration_is_required():
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    with pytest.raises(ValueError, match="calibration"):
        prune(model, CFG)
    with pytest.raises(ValueError, match="reconstruct=True"):
        prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5, reconstruct=True))
    with pytest.raises(ValueError, match="reconstruct"):
        DepruneConfig.deprune_bh(dw_ratio=0.5, reconstruct="yes")
    with pytest.raises(ValueError, match="empty"):
        collect_inputs([])


def test_without_calibration_nothing_changes():
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5), input_size=(3, 32, 32))
    assert res.calibration is None and res.report.calibration_seconds is None
    assert "calibration" not in res.plan.extra["stats"]
    dense = dict(model.named_modules())
    for path, mask in res.masks.items():
        kept = res.model.get_submodule(path).weight.detach()
        src = dense[path].weight.detach()
        if src.shape == kept.shape:  # magnitude pruning zeroes taps and changes nothing else
            assert torch.equal(kept, src * mask[:, None])


def test_calibrated_plan_replays_on_a_dense_model():
    from timm_deprune import apply_plan
    from timm_deprune.pruning.plan import PrunePlan

    gen = torch.Generator().manual_seed(12)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    res = prune(model, CFG, calibration=_batches("tensors", gen, 32), input_size=(3, 32, 32))
    plan = PrunePlan.from_dict(res.plan.to_dict())
    assert plan.config["reconstruct"] is None and plan.config["importance"] == "obs"
    fresh = timm.create_model("mobilenetv3_small_050", num_classes=10)
    apply_plan(fresh, plan)
    fresh.load_state_dict(res.model.state_dict())  # same shapes: the refit weights load into the replayed model


# --- CLI ----------------------------------------------------------------------------------------------------------

def _image_folder(path, count: int = 5):
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = path / ("a" if i % 2 else "b")  # class sub-folders and loose files both read; labels unused
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    return path


def test_cli_prunes_with_a_calibration_folder(tmp_path):
    from conftest import run_cli
    from timm_deprune import from_pretrained

    images = _image_folder(tmp_path / "calib")
    out = tmp_path / "o"
    code, stdout, err = run_cli("prune", "mobilenetv3_small_050", "--random-init", "--importance", "obs",
                                "--calibration-dir", str(images), "--calibration-samples", "3", "--batch-size", "2",
                                "--input-size", "3", "64", "64", "--output", str(out))
    assert code == 0, err
    assert "calibration  3 images, importance obs, reconstruct True" in stdout
    plan = from_pretrained(out).deprune_plan
    assert plan.config["importance"] == "obs"
    assert plan.extra["stats"]["calibration"]["samples"] == 3


@pytest.mark.parametrize("argv, needle", [
    (["--importance", "obs"], "--calibration-dir"),
    (["--calibration-samples", "4"], "--calibration-dir"),
    (["--calibration-dir", "/nonexistent/calib"], "is not a folder"),
], ids=["obs-without-data", "samples-without-data", "missing-folder"])
def test_cli_calibration_errors_are_one_line(tmp_path, argv, needle):
    from conftest import assert_one_line_error, run_cli

    code, _, err = run_cli("prune", "mobilenetv3_small_050", "--random-init", "--output", str(tmp_path / "o"), *argv)
    assert_one_line_error(code, err, needle, exit_code=2 if "not a folder" not in needle else 1)


def test_cli_empty_calibration_folder_is_one_line(tmp_path):
    from conftest import assert_one_line_error, run_cli

    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("prune", "mobilenetv3_small_050", "--random-init", "--calibration-dir",
                           str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--calibration-dir", exit_code=1)
