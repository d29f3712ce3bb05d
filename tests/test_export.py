"""ONNX export (``export_onnx``, ``timm-deprune export``): the file runs in ONNX Runtime and matches the pruned PyTorch
model at several batch sizes, pruned taps are exact zeros in the graph, no BatchNorm is left, writes are atomic,
bad arguments get clear errors.

torch's exporter takes seconds per model: each model is exported once (module fixtures); the atomicity and error
tests replace the exporter or fail before it runs.
"""
from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnxruntime")  # a guard only: the test extra installs onnx, onnxscript and onnxruntime
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
from onnx import numpy_helper  # noqa: E402

import timm_deprune  # noqa: E402
from conftest import assert_one_line_error, randomize_bn  # noqa: E402
from conftest import run_cli as run  # noqa: E402
from timm_deprune import DepruneConfig, export_onnx, masked_convs, ort_session  # noqa: E402
from timm_deprune.inference.export import CHECK_RTOL, export_checked  # noqa: E402

SIZE = (3, 96, 96)
MODELS = ["efficientnet_b0", "mobilenetv3_small_050"]  # SiLU + SE; ReLU / hardswish + hard-sigmoid SE


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # small models on a busy 2-core machine: extra threads only stall
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return seed


def _pruned(name: str, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = randomize_bn(timm.create_model(name), gen)
    return timm_deprune.prune(dense, DepruneConfig.deprune_bh(0.71, 0.3), input_size=SIZE).model


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    """(pruned model, written path, ORT check errors by batch) for one exported model."""
    with _threads(1):
        model = _pruned(request.param, _seed())
        path, errors = export_checked(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx", input_size=SIZE)
    return model, path, errors


@pytest.fixture(scope="module")
def small_model():
    """A pruned model for the tests that fail before exporting or replace the exporter (do not modify it)."""
    with _threads(1):
        return _pruned("mobilenetv3_small_050", _seed())


def _fake_exporter(payload: bytes = b"partial onnx", fail: bool = True):
    """A ``torch.onnx.export`` stand-in that writes ``payload`` to the target and then (optionally) raises."""

    def export(model, args, f, **kwargs):
        with open(f, "wb") as fh:
            fh.write(payload)
        if fail:
            raise RuntimeError("exporter failed midway")

    return export


# ------------------------------------------------------------------------------------------- the exported file


def test_ort_matches_pruned_model_at_several_batch_sizes(exported, one_thread):
    model, path, errors = exported
    assert sorted(errors) == [1, 2] and max(errors.values()) < CHECK_RTOL, errors  # export's own check
    session = ort_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape == ["batch", *SIZE], inp.shape
    model = model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, *SIZE)
        with torch.no_grad():
            ref = model(x)  # the pruned model as it runs in PyTorch (sparse kernels, BNs not folded)
        (out,) = session.run(None, {"input": x.numpy()})
        assert out.shape == tuple(ref.shape)
        err = _rel(out, ref.numpy())
        assert err < CHECK_RTOL, f"batch {batch}: ORT vs PyTorch rel. error {err:.2e}"


def test_graph_has_exactly_the_pruned_taps_at_zero(exported):
    model, path, _ = exported
    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dw_nodes = [n for n in graph.node if n.op_type == "Conv"
                and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    masked = list(masked_convs(model))
    assert masked and len(dw_nodes) >= len(masked)
    for name, conv in masked:
        # fuse() returns the bare conv, or Sequential(conv, activation) when an activation was fused into it
        key = next((k for k in (f"{name}.weight", f"{name}.0.weight") if k in weights), None)
        assert key is not None, f"no ONNX initializer for {name}"
        w, c = weights[key], conv.weight.shape[0]
        # channels padded to a multiple of 8 (export's pad_channels) are appended, all zero
        assert w.shape[1:] == tuple(conv.weight.shape[1:]) and w.shape[0] in (c, c + (-c % 8)), (name, w.shape)
        assert not w[c:].any(), f"{name}: a padded channel is not zero"
        w = w[:c]
        mask = conv.mask.numpy()
        assert np.array_equal(w[:, 0] != 0, mask), (
            f"{name}: {int((w != 0).sum())} non-zero taps in the ONNX weight, {int(mask.sum())} kept by the mask")
        assert any(key in n.input for n in dw_nodes), f"{key} is not the weight of a grouped Conv node"


def test_no_batchnorm_left(exported):
    model, path, _ = exported
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # there were BNs to fold
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops, sorted(ops)
    assert "Conv" in ops


# ------------------------------------------------------------------------------------------- writing the file


def test_existing_file_is_refused_without_overwrite(tmp_path, small_model):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="m.onnx.*overwrite=True"):
        export_onnx(small_model, target, input_size=SIZE)
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_overwrite_replaces_the_file(tmp_path, small_model, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    monkeypatch.setattr(torch.onnx, "export", _fake_exporter(b"new", fail=False))
    # pad_channels=None: the fake file is no ONNX model to add padding metadata to
    assert export_onnx(small_model, target, input_size=SIZE, check=False, overwrite=True, pad_channels=None) == target
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_export_leaves_nothing(tmp_path, small_model, monkeypatch, existing):
    target = tmp_path / "m.onnx"
    if existing:
        target.write_bytes(b"old")
    model = copy.deepcopy(small_model).train()
    monkeypatch.setattr(torch.onnx, "export", _fake_exporter())
    with pytest.raises(RuntimeError, match="exporter failed midway"):
        export_onnx(model, target, input_size=SIZE, check=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.onnx"] if existing else [])  # no temp file either
    if existing:
        assert target.read_bytes() == b"old"
    # the model itself is untouched: still training, still masked, BNs still there
    assert model.training
    assert any(True for _ in masked_convs(model))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_failed_ort_check_raises_and_leaves_nothing(tmp_path, small_model, monkeypatch, one_thread):
    """An exporter that writes a valid ONNX model with the wrong numbers: the check catches it before the rename."""
    from onnx import TensorProto, helper

    def wrong_model(model, args, f, **kwargs):  # input -> global pool -> [N, 3] @ zeros[3, 1000]: all-zero logits
        nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
                 helper.make_node("MatMul", ["f", "w"], ["output"])]
        w = numpy_helper.from_array(np.zeros((3, 1000), np.float32), "w")
        graph = helper.make_graph(nodes, "wrong", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["batch", *SIZE])],
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1000])], [w])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), f)

    monkeypatch.setattr(torch.onnx, "export", wrong_model)
    with pytest.raises(RuntimeError, match=r"rel\. error 1\.00e\+00 > 1e-05 at batch 1"):
        export_onnx(small_model, tmp_path / "m.onnx", input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, "2"])
def test_bad_batch_size(tmp_path, small_model, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be an int >= 1, got {batch_size!r}"):
        export_onnx(small_model, tmp_path / "m.onnx", batch_size=batch_size)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("input_size", [(96, 96), (1, 3, 96, 96), (3, 0, 96), (3, 96.0, 96)])
def test_bad_input_size(tmp_path, small_model, input_size):
    with pytest.raises(ValueError, match=r"input_size must be three positive ints \(C, H, W\).*got"):
        export_onnx(small_model, tmp_path / "m.onnx", input_size=input_size)


def test_model_without_parameters(tmp_path):
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        export_onnx(torch.nn.ReLU(), tmp_path / "m.onnx", input_size=SIZE)


@pytest.mark.parametrize("opset", [13, 17, 10_000, 18.0])
def test_bad_opset(tmp_path, small_model, opset):
    with pytest.raises(ValueError, match=rf"opset must be an int from 18 .* to \d+ .*got {opset!r}"):
        export_onnx(small_model, tmp_path / "m.onnx", input_size=SIZE, opset=opset)


def test_folder_as_path(tmp_path, small_model):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export_onnx(small_model, tmp_path, input_size=SIZE)


def test_missing_onnxruntime_says_what_to_do(tmp_path, small_model, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ImportError, match=r"pip install onnxruntime.*check=False"):
        export_onnx(small_model, tmp_path / "m.onnx", input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [0, -1, 1.0])
def test_ort_session_bad_threads(exported, threads):
    with pytest.raises(ValueError, match=rf"threads must be an int >= 1.*got {threads!r}"):
        ort_session(exported[1], threads=threads)


def test_ort_session_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ort_session(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_export_end_to_end(tmp_path, one_thread):
    folder = tmp_path / "mnv2.deprune"
    code, _, err = run("prune", "mobilenetv2_050", "--random-init", "--input-size", "3", "64", "64",
                       "--output", str(folder))
    assert code == 0, err
    target = tmp_path / "out" / "mnv2.onnx"
    code, out, err = run("export", str(folder), "--output", str(target), "--input-size", "3", "64", "64",
                         "--static-batch", "--batch-size", "2")
    assert code == 0, err
    assert f"wrote {target} (" in out and "input [2, 3, 64, 64]" in out, out
    assert "ORT check    ok: max rel. error" in out and "at batch 2 " in out, out
    assert sorted(p.name for p in target.parent.iterdir()) == ["mnv2.onnx"]
    # dead-channel removal leaves odd counts: the file has them padded to multiples of 8, and says so
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert "padding      " in out and "exact-zero channels" in out and "timm_deprune.padded_blocks" in meta, (out, meta)
    (inp,) = ort_session(target).get_inputs()
    assert inp.shape == [2, 3, 64, 64]
    graph = onnx.load(str(target)).graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}

    # the same output again: refused before loading anything
    code, _, err = run("export", f"local-dir:{folder}", "--output", str(target))
    assert_one_line_error(code, err, str(target), "--overwrite")


def _internal_counts(model) -> dict[str, int]:
    from timm_deprune.pruning.groups import find_channel_groups

    return {g.block: int(model.get_submodule(g.producer).weight.shape[0]) for g in find_channel_groups(model)}


@pytest.mark.parametrize("name", ["mobilenetv2_050", "mobilenetv3_small_050", "efficientnet_b0"])
def test_padded_channels_leave_the_output_unchanged(name, gen):
    # Every block's internal channels cut to odd counts (as dead-channel removal leaves them), then padded back to
    # multiples of 8 with zero channels: the same output, also through squeeze-excite and its gate.
    from timm_deprune.inference.export import pad_block_channels
    from timm_deprune.pruning.groups import find_channel_groups
    from timm_deprune.pruning.surgery import prune_channels

    model = _pruned(name, int(torch.randint(0, 2**31, (1,), generator=gen))).eval()
    for group in find_channel_groups(model):
        c = int(model.get_submodule(group.producer).weight.shape[0])
        keep = torch.randperm(c, generator=gen)[: max(1, c - 1 - int(torch.randint(0, 7, (1,), generator=gen)))]
        prune_channels(model, group, keep.sort().values)
    before = _internal_counts(model)
    x = torch.randn(2, *SIZE, generator=gen)
    with torch.no_grad():
        ref = model(x)
        padded = pad_block_channels(model, 8)
        out = model(x)
    after = _internal_counts(model)
    assert all(c % 8 == 0 for c in after.values()), after
    assert padded == {b: (before[b], after[b]) for b in before if before[b] % 8}, (padded, before, after)
    assert padded, "the case must pad something"
    assert _rel(out, ref) < 1e-6


def test_export_pads_channels_by_default_and_records_it(tmp_path, small_model):
    from timm_deprune.inference.export import PAD_METADATA_KEY
    from timm_deprune.pruning.groups import find_channel_groups
    from timm_deprune.pruning.surgery import prune_channels

    model = copy.deepcopy(small_model).eval()
    group = next(iter(find_channel_groups(model)))
    c = int(model.get_submodule(group.producer).weight.shape[0])
    prune_channels(model, group, torch.arange(c - 3))  # an odd count in the first block
    with _threads(1):
        padded: dict = {}
        path, errors = export_checked(model, tmp_path / "pad.onnx", input_size=SIZE, padded=padded)
        plain, _ = export_checked(model, tmp_path / "plain.onnx", input_size=SIZE, pad_channels=1)
    assert group.block in padded and padded[group.block][1] % 8 == 0 and max(errors.values()) <= CHECK_RTOL
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert f"{group.block}: {c - 3}->{padded[group.block][1]}" in meta[PAD_METADATA_KEY]
    assert PAD_METADATA_KEY not in {p.key for p in onnx.load(str(plain)).metadata_props}
    assert _internal_counts(model)[group.block] == c - 3  # the model itself is never changed
    with pytest.raises(ValueError, match="pad_channels must be an int >= 1 or None, got 0"):
        export_onnx(model, tmp_path / "bad.onnx", input_size=SIZE, pad_channels=0)


def test_cli_export_errors(tmp_path):
    missing = tmp_path / "missing.deprune"
    code, _, err = run("export", str(missing), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "no model folder", str(missing))
    code, _, err = run("export", f"local-dir:{missing}", "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "no model folder", str(missing))
    code, _, err = run("export", str(tmp_path), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "has no config.json")
    code, _, err = run("export", str(tmp_path), "--output", str(tmp_path / "m.onnx"), "--batch-size", "0")
    assert_one_line_error(code, err, "--batch-size must be >= 1, got 0", exit_code=2)
    code, _, err = run("export", str(tmp_path), "--output", str(tmp_path / "m.onnx"), "--opset", "13")
    assert_one_line_error(code, err, "--opset must be >= 18, got 13", exit_code=2)
    assert list(tmp_path.iterdir()) == []


def test_an_optimized_model_exports_with_plain_ops(tmp_path, gen):
    """ConvAct2d / linear squeeze-excite fall back to ONNX-translatable ops while the exporter traces them."""
    from timm_deprune import optimize_for_inference

    dense = randomize_bn(timm.create_model("mobilenetv3_small_050"), gen)
    pruned = timm_deprune.prune(dense, DepruneConfig.deprune_bh(0.71, 0.3), input_size=(3, 64, 64)).model.eval()
    opt = optimize_for_inference(pruned, channels_last=False, input_size=(3, 64, 64))
    assert opt.deprune_inference_stats["onednn_convs"] > 0
    path = export_onnx(opt, tmp_path / "opt.onnx", input_size=(3, 64, 64))  # checked in ORT against opt
    assert path.is_file()
