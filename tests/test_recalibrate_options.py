"""Recalibration options checked against hand-computed values: the warmup + cosine LR schedule, label smoothing,
AMP on the CPU (bf16 autocast), BN re-estimation before fine-tuning, empty loaders; and `bench --compile`."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_cli
from timm_deprune import DepruneConfig, RecalibrateConfig, evaluate, prune, recalibrate, recalibrate_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(gen, classes=4):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    dense = timm.create_model("mobilenetv2_050", num_classes=classes)
    return prune(dense, DepruneConfig.deprune_bh(dw_ratio=0.71), input_size=(3, 32, 32))


def _loader(gen, n=8, batch=4, classes=4):
    x = torch.randn(n, 3, 32, 32, generator=gen)
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=batch)


@pytest.fixture
def step_lrs():
    """The learning rate of every optimizer step taken while the fixture is active."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    yield seen
    handle.remove()


def test_lr_follows_linear_warmup_then_cosine_to_min_lr(gen, step_lrs):
    res = _model(gen)
    lr, min_lr, warmup, total = 1e-3, 1e-5, 3, 10
    recalibrate(res.model, _loader(gen, n=40), RecalibrateConfig(max_steps=total, lr=lr, min_lr=min_lr,
                                                                  warmup_steps=warmup, progress=False))
    expected = [lr * (s + 1) / (warmup + 1) for s in range(warmup)]
    expected += [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                 for s in range(warmup, total)]
    assert step_lrs == pytest.approx(expected, rel=1e-9)
    assert step_lrs[warmup] == pytest.approx(lr) and step_lrs[-1] > min_lr


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_training_loss_is_cross_entropy_with_label_smoothing(gen, smoothing):
    res = _model(gen)
    loader = _loader(gen, n=8, batch=8)
    x, y = next(iter(loader))
    ref_model = copy.deepcopy(res.model).train()
    with torch.no_grad():
        logits = ref_model(x)
    expected = F.cross_entropy(logits, y, label_smoothing=smoothing).item()
    other = F.cross_entropy(logits, y, label_smoothing=0.3 - smoothing).item()
    out = recalibrate(res.model, loader, RecalibrateConfig(max_steps=1, label_smoothing=smoothing, progress=False))
    assert out.losses == [pytest.approx(expected, rel=1e-5)]
    assert abs(expected - other) > 1e-3  # the option changes the loss: the check above can tell them apart


@pytest.mark.parametrize("amp", [True, False])
def test_amp_on_the_cpu_runs_the_forward_in_bfloat16(gen, amp):
    res = _model(gen)
    dtypes = []
    conv = res.model.conv_head
    conv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    out = recalibrate(res.model, _loader(gen), RecalibrateConfig(max_steps=2, amp=amp, progress=False))
    assert out.steps == 2 and all(math.isfinite(v) for v in out.losses)
    assert set(dtypes) == {torch.bfloat16 if amp else torch.float32}
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # autocast, not a cast of the weights
    for path, mask in res.masks.items():
        assert (res.model.get_submodule(path).weight.detach()[:, 0][~mask] == 0).all()


def test_bn_batches_reestimate_statistics_before_the_first_step(gen):
    res = _model(gen)
    loader = _loader(gen, n=12, batch=4)
    expected = recalibrate_bn(copy.deepcopy(res.model), loader, num_batches=2)
    recalibrate(res.model, loader, RecalibrateConfig(max_steps=0, bn_batches=2, progress=False))
    bns = [(n, m) for n, m in res.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for name, bn in bns:
        ref = expected.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=0)
    untouched = _model(gen)  # without bn_batches the statistics stay those of the initialisation
    recalibrate(untouched.model, loader, RecalibrateConfig(max_steps=0, progress=False))
    assert all(bool((m.running_mean == 0).all()) for m in untouched.model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_empty_loaders_are_refused_by_name(gen):
    res = _model(gen)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="train_loader is empty"):
        recalibrate(res.model, empty, RecalibrateConfig(progress=False))
    with pytest.raises(ValueError, match="evaluate got an empty loader"):
        evaluate(res.model, empty)
    with pytest.raises(ValueError, match="empty loader"):
        recalibrate_bn(res.model, empty)


def test_bench_compile_times_the_compiled_optimised_model(tmp_path):
    folder = tmp_path / "m.deprune"
    code, _, err = run_cli("prune", "mobilenetv3_small_050", "--random-init", "--input-size", "3", "32", "32",
                           "--output", str(folder))
    assert code == 0, err
    code, out, err = run_cli("bench", str(folder), "--input-size", "3", "32", "32", "--repeats", "1", "--threads", "1",
                             "--compile")
    assert code == 0, err
    assert "pruned, optimised + torch.compile" in out
    assert out.count("x vs best dense eager") == 6  # dense NCHW / CL, masked, optimised with / without native blocks
