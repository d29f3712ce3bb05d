"""Hostile inputs: the public custom op, edited plans, concurrent first calls and saves into a user's folder.

Every case that once crashed the process runs in a subprocess, so a segfault fails the test instead of pytest.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from timm_deprune import DepruneConfig, build_plan, prune, save_pretrained, sparse_dwconv2d
from conftest import PACKAGE_PROBE, child_env, package_line
from timm_deprune.kernels.backend import backend_available

needs_backend = pytest.mark.skipif(not backend_available(), reason="native backend not built")

_OP_PRELUDE = """
import dataclasses, torch
from timm_deprune import build_plan
g = torch.Generator().manual_seed(0)
p = build_plan(torch.randn(8, 1, 3, 3, generator=g), torch.rand(8, 3, 3, generator=g) > .3)
op = torch.ops.deprune.sparse_dwconv2d
def call(x, bias=None, padding=(1, 1, 1, 1), stride=(1, 1), dilation=(1, 1), act=0, kh=3, kw=3, plan=None,
         **tensors):
    q = plan or p
    t = dict(offsets=q.offsets, taps=q.taps, values=q.values, block_offsets=q.block_offsets,
             block_taps=q.block_taps, block_values=q.block_values)
    t.update(tensors)
    return op(x, t["offsets"], t["taps"], t["values"], t["block_offsets"], t["block_taps"], t["block_values"],
              bias, kh, kw, list(stride), list(padding), list(dilation), act)
"""


def _run_isolated(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` after the prelude in a fresh interpreter (the same installed package and ``_C``)."""
    code = PACKAGE_PROBE + "\n" + _OP_PRELUDE + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env())
    assert package_line() in res.stdout, f"the child ran another timm_deprune: {res.stdout[:500]!r}"
    return res


_OP_CASES = {
    "4096 channels for an 8-channel plan": ("call(torch.randn(1, 4096, 64, 64))", "4096 channels"),
    "fp64 input": ("call(torch.randn(1, 8, 9, 9, dtype=torch.float64))", "float32"),
    "1-element bias": ("call(torch.randn(1, 8, 9, 9), bias=torch.zeros(1))", "bias must be"),
    "padding 100": ("call(torch.randn(1, 8, 9, 9), padding=(100, 100, 100, 100))", "padding"),
    "stride 3": ("call(torch.randn(1, 8, 9, 9), stride=(3, 3))", "stride"),
    "activation code 99": ("call(torch.randn(1, 8, 9, 9), act=99)", "activation"),
    "kernel larger than the plan": ("call(torch.randn(1, 8, 9, 9), kh=1, kw=1, padding=(0, 0, 0, 0))", "taps"),
    "taps out of range": ("call(torch.randn(1, 8, 9, 9), taps=torch.full_like(p.taps, 10**8),"
                          " block_taps=torch.full_like(p.block_taps, 10**8))", "tap indices"),
    "int64 offsets": ("call(torch.randn(1, 8, 9, 9), offsets=p.offsets.long())", "torch.int32"),
    "short offsets": ("call(torch.randn(1, 8, 9, 9), offsets=p.offsets[:4].contiguous())", "channels"),
    "offsets past the taps": ("call(torch.randn(1, 8, 9, 9), offsets=p.offsets * 100)", "offsets must run"),
    "values of the wrong length": ("call(torch.randn(1, 8, 9, 9), values=p.values[:1].contiguous())", "values"),
    "block values of the wrong shape": ("call(torch.randn(1, 8, 9, 9), block_values=p.block_values.flatten())",
                                        "block_values"),
    "empty input": ("call(torch.randn(0, 8, 9, 9))", "non-empty"),
    "too small for the kernel": ("call(torch.randn(1, 8, 1, 1), padding=(0, 0, 0, 0))", "too small"),
}


@needs_backend
@pytest.mark.parametrize("case", sorted(_OP_CASES))
def test_custom_op_rejects_bad_arguments_without_crashing(case):
    expr, needle = _OP_CASES[case]
    res = _run_isolated(f"""
        try:
            {expr}
        except (ValueError, TypeError, RuntimeError) as e:
            print("RAISED", type(e).__name__, e)
        else:
            print("NO ERROR")
    """)
    assert res.returncode == 0, f"process died ({res.returncode}): {res.stderr[-2000:]}"
    assert "RAISED" in res.stdout, res.stdout
    assert needle in res.stdout, res.stdout


@pytest.mark.parametrize("edit, needle", [
    (lambda p: dict(taps=torch.full_like(p.taps, 10**8)), "tap indices"),
    (lambda p: dict(block_taps=torch.full_like(p.block_taps, -1)), "tap indices"),
    (lambda p: dict(offsets=p.offsets.long()), "torch.int32"),
    (lambda p: dict(values=p.values.double()), "torch.float32"),
    (lambda p: dict(offsets=p.offsets.flip(0).contiguous()), "offsets must run"),
    (lambda p: dict(group_nnz=(1, 2, 3)), "group_nnz"),
    # 10 entries for a 3x3 kernel in the first channel block: more than the CUDA kernel stages per block
    (lambda p: dict(block_offsets=torch.cat([torch.zeros(1, dtype=torch.int32), p.block_offsets[1:] * 0 + 10]),
                    block_taps=torch.zeros(10, dtype=torch.int32), block_values=torch.zeros(10, 8)),
     "a channel block lists 10 taps, more than the kernel's 9"),
])
def test_an_edited_plan_is_checked_when_it_is_made(edit, needle):
    gen = torch.Generator().manual_seed(1)
    plan = build_plan(torch.randn(40, 1, 3, 3, generator=gen), torch.rand(40, 3, 3, generator=gen) > 0.5)
    with pytest.raises(ValueError, match=needle):
        dataclasses.replace(plan, **edit(plan))


@needs_backend
def test_an_edited_plan_does_not_reuse_the_original_launches():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 1, 3, 3, generator=gen)
    plan = build_plan(w, torch.ones(16, 3, 3, dtype=torch.bool))
    x = torch.randn(1, 16, 8, 8, generator=gen)
    with torch.no_grad():
        sparse_dwconv2d(x, plan, padding=1)  # caches a launch for this geometry
        edited = dataclasses.replace(plan, values=torch.zeros_like(plan.values),
                                     block_values=torch.zeros_like(plan.block_values))
        assert sparse_dwconv2d(x, edited, padding=1).abs().max() == 0


@needs_backend
def test_first_eval_calls_from_many_threads_agree():
    gen = torch.Generator().manual_seed(3)
    for attempt in range(5):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        from timm_deprune import to_masked

        conv = to_masked(conv, torch.rand(64, 3, 3, generator=gen) > 0.5).eval()
        x = torch.randn(1, 64, 16, 16, generator=gen)
        with torch.no_grad():
            ref = conv._dense(x)
        conv.invalidate_plan()
        outs, errors = [None] * 8, []
        barrier = threading.Barrier(8)

        def work(i):
            try:
                barrier.wait()
                with torch.no_grad():
                    outs[i] = conv(x)
            except BaseException as e:  # collected: a thread's exception must fail the test
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for y in outs:
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ saving

@pytest.fixture(scope="module")
def pruned():
    import timm

    model = timm.create_model("mobilenetv2_050", num_classes=10)
    return prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3), input_size=(3, 32, 32)).model


SAVED = {"config.json", "model.safetensors", "deprune_masks.safetensors", "README.md"}


def test_saving_into_the_working_directory_keeps_the_users_files(pruned, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(b"\x00\x01")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(pruned, ".")
    save_pretrained(pruned, ".", overwrite=True)
    assert Path.cwd() == tmp_path and tmp_path.is_dir()
    assert {p.name for p in tmp_path.iterdir()} == SAVED | {"notes.txt", "data"}
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "data" / "x.bin").read_bytes() == b"\0\1"
    save_pretrained(pruned, ".", overwrite=True)  # again: only the save's own files are replaced
    assert {p.name for p in tmp_path.iterdir()} == SAVED | {"notes.txt", "data"}


def test_cli_refuses_an_empty_output_path(tmp_path, monkeypatch):
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli("prune", "mobilenetv2_050", "--random-init", "--output", "")
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_saves_temp_folder_is_removed_by_the_next_save(pruned, tmp_path):
    target = tmp_path / "out"
    save_pretrained(pruned, target)
    stale = target / f".deprune-save-{_dead_pid()}-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = target / f".deprune-save-{os.getppid()}-abcd"  # a save still running in another process
    live.mkdir()
    save_pretrained(pruned, target, overwrite=True)
    assert not stale.exists() and live.exists()


def test_saved_files_follow_the_umask(pruned, tmp_path):
    old = os.umask(0o022)
    try:
        target = save_pretrained(pruned, tmp_path / "new" / "out")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755
    for p in target.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p


def _new_model():
    """What the killed saves below write: built the same way in the subprocess."""
    import timm

    torch.manual_seed(0)
    return prune(timm.create_model("mobilenetv2_050", num_classes=10),
                 DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3), input_size=(3, 32, 32)).model


def test_a_save_killed_at_any_point_leaves_the_old_model_or_the_new_one(pruned, tmp_path):
    """SIGKILL a save after each rename into the folder: the folder keeps every file and the user's file survives;
    loading it gives the old model (with a warning, from the copies the save kept, while config.json is the old one)
    or the new one, never a mix or a refusal; after the last rename the new model loads. Twice in a row: a second
    killed save must not lose the copies the first one kept."""
    import json

    import timm

    from timm_deprune.hub.io import file_digest

    target = tmp_path / "out"
    save_pretrained(pruned, target)
    (target / "mine.txt").write_text("keep")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        old_out, new_out = pruned.eval()(x), _new_model().eval()(x)
    assert not torch.allclose(old_out, new_out), "the two saves must differ, or a mix could not be seen"
    script = PACKAGE_PROBE + "\n" + textwrap.dedent(f"""
        import os, signal, sys, torch, timm, timm_deprune
        from timm_deprune import DepruneConfig, prune, save_pretrained
        torch.manual_seed(0)
        model = prune(timm.create_model("mobilenetv2_050", num_classes=10),
                      DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3), input_size=(3, 32, 32)).model
        real, count, stop = os.replace, [0], int(sys.argv[1])
        def replace(src, dst):
            real(src, dst)
            count[0] += 1
            if count[0] == stop:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        save_pretrained(model, {str(target)!r}, overwrite=True)
    """)
    renames = [0]
    real_replace = os.replace

    def counting(src, dst):
        renames[0] += 1
        real_replace(src, dst)
    os.replace = counting
    try:
        save_pretrained(pruned, target, overwrite=True)  # how many renames a save makes: a kill after each one
    finally:
        os.replace = real_replace
    outcomes = []
    for stop in range(1, renames[0] + 1):
        save_pretrained(pruned, target, overwrite=True)  # back to the old model before each kill
        # then a second save into the state the first left, killed at its first rename: it must keep what the first
        # one kept (the old model's copies), not take the first one's new files for the old model's
        for kill_at in ([stop, 1] if stop < renames[0] else [stop]):
            res = subprocess.run([sys.executable, "-c", script, str(kill_at)], capture_output=True, text=True,
                                 timeout=300, env=child_env())
            assert res.returncode == -9, res.stderr[-2000:]
            assert package_line() in res.stdout, res.stdout[:500]
            names = {p.name for p in target.iterdir()}
            assert SAVED | {"mine.txt"} <= names, names
            assert (target / "mine.txt").read_text() == "keep"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = timm.create_model(f"local-dir:{target}", pretrained=True).eval()
            with torch.no_grad():
                out = loaded(x)
            same_old, same_new = torch.allclose(out, old_out, atol=1e-6), torch.allclose(out, new_out, atol=1e-6)
            assert same_old or same_new, f"kill after rename {stop}: the folder loads a mix of two saves"
            recorded = json.loads((target / "config.json").read_text())["model_args"]["deprune"]["files"]
            replaced = any(file_digest(target / n) != digest for n, digest in recorded.items())  # by a killed save
            interrupted = [w for w in caught if "was interrupted before it finished" in str(w.message)]
            assert bool(interrupted) == (same_old and replaced), (stop, [str(w.message) for w in caught])
            outcomes.append("new" if same_new else "old, from the kept copies" if replaced else "old")
    assert outcomes[-1] == "new" and "new" not in outcomes[:-1], outcomes  # config.json is renamed last
    assert "old, from the kept copies" in outcomes, outcomes  # kills between the file renames were reached
    save_pretrained(pruned, target, overwrite=True)  # the killed saves' temp folders and kept copies are cleaned up
    assert {p.name for p in target.iterdir()} == SAVED | {"mine.txt"}


def test_files_of_another_save_are_refused_and_folders_without_digests_still_load(pruned, tmp_path):
    import json
    import shutil

    import timm

    a, b = save_pretrained(pruned, tmp_path / "a"), save_pretrained(_new_model(), tmp_path / "b")
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # same shapes, another save's values
    with pytest.raises(ValueError, match="model.safetensors was not written by the save"):
        timm.create_model(f"local-dir:{a}", pretrained=True)
    shutil.copy(b / "deprune_masks.safetensors", a / "deprune_masks.safetensors")
    shutil.copy(b / "config.json", a / "config.json")  # now all of b: loads
    timm.create_model(f"local-dir:{a}", pretrained=True)
    config = json.loads((b / "config.json").read_text())
    assert set(config["model_args"]["deprune"].pop("files")) == {"model.safetensors", "deprune_masks.safetensors"}
    (b / "config.json").write_text(json.dumps(config))  # a folder saved before digests were recorded
    timm.create_model(f"local-dir:{b}", pretrained=True)


# ------------------------------------------------------------------------------------------------ smaller cases

def test_plan_fields_are_checked_with_clear_messages():
    from timm_deprune import PrunePlan

    base = {"format_version": 1, "config": {}, "dw": [], "pw": []}
    for version in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="format_version"):
            PrunePlan.from_dict(dict(base, format_version=version))
    with pytest.raises(ValueError, match="'dw' must be a list of layer objects"):
        PrunePlan.from_dict(dict(base, dw=["a"]))


def test_a_plan_with_out_of_range_kept_channels_is_refused():
    import timm

    from timm_deprune import apply_plan

    model = timm.create_model("mobilenetv2_050", num_classes=10)
    result = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3), input_size=(3, 32, 32))
    layer = result.plan.pw[0]
    bad = dataclasses.replace(result.plan, pw=(dataclasses.replace(layer, kept=layer.kept[:-1] + (10**6,)),))
    with pytest.raises(ValueError, match=r"kept must be sorted unique channel indices in \[0, "):
        apply_plan(timm.create_model("mobilenetv2_050", num_classes=10), bad)


def test_config_and_op_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="ignore must be a module path glob"):
        DepruneConfig(ignore=None)
    plan = build_plan(torch.randn(8, 1, 3, 3), torch.ones(8, 3, 3, dtype=torch.bool))
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match=r"activation must be one of .* got \['relu'\]"):
        sparse_dwconv2d(x, plan, activation=["relu"])
    with pytest.raises(ValueError, match="stride must be"):
        sparse_dwconv2d(x, plan, stride=(True, 1))
    with pytest.raises(ValueError, match="padding must be"):
        sparse_dwconv2d(x, plan, padding=(True, 1))


def test_nan_pointwise_importance_is_refused():
    import timm

    def importance(kind, path, module):
        if kind == "pw":
            return torch.full((module.out_channels,), float("nan"))
        return module.weight.detach()[:, 0].abs()

    with pytest.raises(ValueError, match="point-wise importance of .* NaN"):
        prune(timm.create_model("mobilenetv2_050", num_classes=10),
              DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3, importance=importance), input_size=(3, 32, 32))


def test_cli_checks_output_and_input_size_before_pruning(tmp_path):
    from conftest import assert_one_line_error, run_cli

    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli("prune", "mobilenetv2_050", "--random-init", "--output", str(tmp_path / "afile" / "sub"))
    assert_one_line_error(code, err, "is a file, so the folder cannot be created")
    code, _, err = run_cli("prune", "mobilenetv2_050", "--random-init", "--input-size", "1", "64", "64",
                           "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "--input-size has 1 channels", exit_code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_nan_depthwise_weights_name_the_layer():
    import timm

    model = timm.create_model("mobilenetv2_050", num_classes=10)
    with torch.no_grad():
        model.blocks[1][0].conv_dw.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"depth-wise layer 'blocks\.1\.0\.conv_dw' has NaN"):
        prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5), input_size=(3, 32, 32))


def test_info_takes_the_hf_hub_and_local_dir_prefixes(pruned, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from conftest import assert_one_line_error, run_cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    folder = save_pretrained(pruned, tmp_path / "m")
    code, out, err = run_cli("info", f"local-dir:{folder}")
    assert code == 0, err
    assert "architecture" in out
    code, _, err = run_cli("info", "hf-hub:nobody-here/not-cached")
    assert_one_line_error(code, err, "Hub repo nobody-here/not-cached is not in the local cache")


def test_architectures_registered_after_import_get_deprune_builds(tmp_path):
    """A user's @register_model after ``import timm_deprune`` is wrapped too: a saved DEPrune folder of it loads."""
    import timm
    from timm.models import _registry, register_model
    from timm.models.efficientnet import _gen_mobilenet_v2

    @register_model
    def deprune_test_late_mnv2(pretrained=False, **kwargs):
        return _gen_mobilenet_v2("mobilenetv2_050", 0.5, pretrained=pretrained, **kwargs)

    try:
        assert getattr(_registry._model_entrypoints["deprune_test_late_mnv2"], "_deprune_wrapped", False)
        model = timm.create_model("deprune_test_late_mnv2", num_classes=10)
        model.pretrained_cfg = dict(model.pretrained_cfg, architecture="deprune_test_late_mnv2")
        pruned = prune(model, DepruneConfig.deprune_bh(dw_ratio=0.5, pw_ratio=0.3), input_size=(3, 32, 32)).model
        folder = save_pretrained(pruned, tmp_path / "late")
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), pruned.eval()(x))
    finally:
        for table in (_registry._model_entrypoints, _registry._model_to_module, _registry._model_pretrained_cfgs):
            table.pop("deprune_test_late_mnv2", None)
        for names in _registry._module_to_models.values():
            names.discard("deprune_test_late_mnv2")


@pytest.mark.parametrize("options, says", [({"tile": 1000}, "tile=1000"), ({"min_keep": 10**6}, "min_keep=1000000")])
def test_a_config_that_can_prune_nothing_says_so(options, says):
    import timm

    with pytest.warns(UserWarning, match=f"no depth-wise tap was pruned: with .*{says}"):
        result = prune(timm.create_model("mobilenetv2_050", num_classes=10),
                       DepruneConfig.deprune_bh(dw_ratio=0.5, **options), input_size=(3, 32, 32))
    assert all(d.achieved_ratio == 0 for d in result.plan.dw)
    with pytest.warns(UserWarning, match="no point-wise filter was pruned: with pw_tile=32 and min_keep=1000000"):
        prune(timm.create_model("mobilenetv2_050", num_classes=10),
              DepruneConfig.deprune_bh(dw_ratio=0.0, pw_ratio=0.3, min_keep=10**6), input_size=(3, 32, 32))


@pytest.mark.parametrize("path, says", [("", "it is the whole model"),
                                        ("conv_stem", r"it is Conv2d\(3, 16, kernel_size=\(3, 3\), groups=1\)")])
def test_a_plan_naming_a_non_depthwise_layer_says_what_it_is_in_one_line(pruned, path, says):
    import timm
    from timm_deprune import PrunePlan, apply_plan

    data = pruned.deprune_plan.to_dict()
    data["dw"][0]["path"] = path
    with pytest.raises(ValueError, match=f"layer '{path}' is not a depth-wise conv in this model: {says}") as info:
        apply_plan(timm.create_model("mobilenetv2_050", num_classes=10), PrunePlan.from_dict(data))
    assert "\n" not in str(info.value)


def test_a_published_tag_offline_names_the_repo_and_the_file(monkeypatch, tmp_path):
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("TIMM_DEPRUNE_HUB_ORG", raising=False)
    with pytest.raises(FileNotFoundError,
                       match="cannot get config.json of Hub repo timm-deprune/mobilenetv2_100.deprune"):
        timm.create_model("mobilenetv2_100.deprune", pretrained=True)
