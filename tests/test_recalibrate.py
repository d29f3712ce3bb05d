"""Recalibration: masks held, distillation, BN re-estimation, resume, evaluate, timm's data pipeline."""
import copy

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import child_env, package_line
from timm_deprune import (DepruneConfig, RecalibrateConfig, create_loaders, evaluate, prune, recalibrate,
                          recalibrate_bn)


def _data(gen, n=48, classes=4, size=32, shift=0.0):
    x = torch.randn(n, 3, size, size, generator=gen) + shift
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


def _pruned(gen, classes=4):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    dense = timm.create_model("mobilenetv2_050", num_classes=classes)
    return dense, prune(dense, DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3), input_size=(3, 32, 32))


def _pruned_taps_zero(model, masks) -> bool:
    return all((model.get_submodule(p).weight.detach()[:, 0][~m] == 0).all() for p, m in masks.items())


def _learnable(gen, n=16, classes=4, size=48):
    """Each class is a colour plus noise: a task a small network fits in a few steps."""
    y = torch.arange(n) % classes
    proto = torch.randn(classes, 3, 1, 1, generator=gen)
    return TensorDataset(proto[y] + 0.3 * torch.randn(n, 3, size, size, generator=gen), y)


def test_fine_tuning_learns_and_holds_masks(gen):
    _, res = _pruned(gen)
    model = res.model
    data = _learnable(gen)
    loader = DataLoader(data, batch_size=16, shuffle=True)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = recalibrate(model, loader, RecalibrateConfig(epochs=10, lr=1e-3, progress=False))
    assert out.steps == 10 and out.epochs_done == 10 and len(out.losses) == 10
    assert out.losses[-1] < 0.1 * out.losses[0]
    recalibrate_bn(model, loader, num_batches=1)  # eval-mode BN statistics of exactly these 16 images
    assert evaluate(model, loader)["top1"] >= 75.0  # chance is 25%; the train loss above shows the fit
    assert _pruned_taps_zero(model, res.masks)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # removed channels stay removed
    assert not model.training


def test_distillation_uses_the_teacher_and_leaves_it_alone(gen):
    dense, res = _pruned(gen)
    teacher_state = copy.deepcopy(dense.state_dict())
    loader = DataLoader(_data(gen, n=16), batch_size=8)
    calls = []
    dense.register_forward_hook(lambda *a: calls.append(1))
    recalibrate(res.model, loader, RecalibrateConfig(max_steps=3, kd_alpha=1.0, progress=False), teacher=dense)
    assert len(calls) == 3
    for k, v in dense.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    assert all(p.requires_grad for p in dense.parameters())  # the teacher can still be trained or pruned later
    assert _pruned_taps_zero(res.model, res.masks)


def test_bn_recalibration_matches_the_data_statistics(gen):
    _, res = _pruned(gen)
    model = res.model
    data = _data(gen, n=32, shift=3.0)
    recalibrate_bn(model, DataLoader(data, batch_size=8), num_batches=4)
    with torch.no_grad():
        stem = model.conv_stem(data.tensors[0])  # the first BN's input over exactly those 4 batches
    torch.testing.assert_close(model.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert model.bn1.momentum == 0.1  # restored


def test_interrupted_run_resumes_to_the_same_weights(gen, tmp_path):
    _, res = _pruned(gen)
    start = copy.deepcopy(res.model)
    loader = DataLoader(_data(gen, n=32), batch_size=8, shuffle=True)
    cfg = RecalibrateConfig(epochs=2, lr=1e-3, seed=7, progress=False, checkpoint_dir=str(tmp_path / "ck"),
                            checkpoint_every=1)
    full = copy.deepcopy(start)
    recalibrate(full, loader, RecalibrateConfig(epochs=2, lr=1e-3, seed=7, progress=False))

    interrupted = copy.deepcopy(start)
    calls = {"n": 0}

    def crash(*_):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-epoch 2: step 5 is checkpointed, step 6 dies
            raise KeyboardInterrupt

    h = interrupted.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        recalibrate(interrupted, loader, cfg)
    h.remove()
    resumed = copy.deepcopy(start)  # a fresh process: only the checkpoint survives
    out = recalibrate(resumed, loader, cfg)
    assert out.resumed_from == 5 and out.steps == 8
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_evaluate_counts_top1_top5_and_loss(gen):
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x[:, 0, 0, :6]

    x = torch.zeros(4, 3, 1, 6)
    x[:, 0, 0] = torch.tensor([[6., 5, 4, 3, 2, 1]] * 4)
    y = torch.tensor([0, 4, 5, 1])  # top-1 hit, top-5 hit, miss, top-5 hit
    out = evaluate(Fixed(), DataLoader(TensorDataset(x, y), batch_size=3))
    assert out["top1"] == 25.0 and out["top5"] == 75.0 and out["samples"] == 4
    ref = torch.nn.functional.cross_entropy(x[:, 0, 0], y)
    assert out["loss"] == pytest.approx(float(ref), rel=1e-6)


# timm's ImageDataset hands PIL an open file and leaves closing it to the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_timm_data_pipeline_on_an_image_folder(gen, tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                arr = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    _, res = _pruned(gen, classes=2)
    train, val = create_loaders(str(tmp_path), res.model, batch_size=4, num_workers=0, input_size=(3, 32, 32))
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    out = recalibrate(res.model, train, RecalibrateConfig(max_steps=2, progress=False))
    assert out.steps == 2
    assert evaluate(res.model, val)["samples"] == 8


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs must be a positive int, got 0"),
    ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
    ({"kd_alpha": 1.5}, r"kd_alpha must be in \[0, 1\], got 1.5"),
])
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecalibrateConfig(**kwargs)


def test_accelerate_two_processes_agree_with_what_rank0_saves(tmp_path):
    """Two CPU processes (gloo) through `accelerate launch`: same masks on every rank, same final model."""
    pytest.importorskip("accelerate")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).parent / "scripts" / "distributed_recalibrate.py"
    env = child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # --multi_gpu selects accelerate's torchrun launcher; the script's Accelerator(cpu=True) then uses gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(package_line()) == 2, proc.stdout[-2000:]  # both ranks ran this timm_deprune
    m0, m1 = load_file(tmp_path / "masks_rank0.safetensors"), load_file(tmp_path / "masks_rank1.safetensors")
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    s0, s1 = load_file(tmp_path / "state_rank0.safetensors"), load_file(tmp_path / "state_rank1.safetensors")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert s0.keys() == s1.keys() == saved.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
        assert torch.equal(s0[k], saved[k]), k
    loaded = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
    assert {p for p, _ in __import__("timm_deprune").masked_convs(loaded)} == set(m0)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_distillation_loss_is_the_hand_computed_kl(gen, alpha):
    """One step's loss against KL(teacher || student) * T^2 written out from softmaxes (no F.kl_div)."""
    dense, res = _pruned(gen)
    x, y = _data(gen, n=8).tensors
    temp = 3.0
    student, teacher = copy.deepcopy(res.model).train(), copy.deepcopy(dense).eval()
    with torch.no_grad():
        s, t = student(x).double(), teacher(x).double()
    p_t = torch.softmax(t / temp, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, 1))).sum(1).mean() * temp * temp
    ce = -torch.log_softmax(s, 1)[torch.arange(len(y)), y].mean()
    expected = (1 - alpha) * ce + alpha * kl
    out = recalibrate(res.model, DataLoader(TensorDataset(x, y), batch_size=8),
                      RecalibrateConfig(max_steps=1, kd_alpha=alpha, kd_temperature=temp, progress=False),
                      teacher=dense)
    assert out.losses == pytest.approx([float(expected)], rel=1e-4)


def test_recalibrate_bn_takes_input_tensors_or_pairs_and_names_a_bad_batch(gen):
    import timm

    from timm_deprune import recalibrate_bn

    model = timm.create_model("mobilenetv2_050", num_classes=10)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    bn = model.bn1
    recalibrate_bn(model, [x], num_batches=1)
    from_tensors = bn.running_mean.clone()
    recalibrate_bn(model, [(x, torch.zeros(4, dtype=torch.long))], num_batches=1)
    torch.testing.assert_close(bn.running_mean, from_tensors)  # labels change nothing
    assert not torch.equal(from_tensors, torch.zeros_like(from_tensors))
    with pytest.raises(TypeError, match="batch 0 must be an input tensor or an \\(input, target\\) pair, got str"):
        recalibrate_bn(model, ["not a tensor"], num_batches=1)
    with pytest.raises(ValueError, match="empty loader"):
        recalibrate_bn(model, [], num_batches=1)


def test_a_checkpoint_write_that_dies_keeps_the_previous_checkpoint(gen, tmp_path, monkeypatch):
    import importlib
    import os

    recal = importlib.import_module("timm_deprune.recalibrate")  # the module (the package's attribute is the function)

    _, res = _pruned(gen)
    loader = DataLoader(_data(gen, n=16), batch_size=8)
    ck = tmp_path / "ck"
    cfg = RecalibrateConfig(epochs=1, lr=1e-3, seed=7, progress=False, checkpoint_dir=str(ck), checkpoint_every=1)
    recalibrate(copy.deepcopy(res.model), loader, cfg)  # a good checkpoint at the end of the run
    (good,) = list(ck.iterdir())
    before = good.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # writes half a checkpoint, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        os.truncate(f, os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(recal.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        recalibrate(copy.deepcopy(res.model), loader, RecalibrateConfig(epochs=2, lr=1e-3, seed=7, progress=False,
                                                                        checkpoint_dir=str(ck), checkpoint_every=1))
    monkeypatch.setattr(recal.torch, "save", real_save)
    assert [p.name for p in ck.iterdir()] == [good.name], "a temp file or a second checkpoint was left behind"
    assert good.read_bytes() == before, "the interrupted save replaced the good checkpoint"
    torch.load(good, map_location="cpu", weights_only=True)  # still loads
