"""``timm-deprune`` CLI: prune / info / push end to end on a small model, one-line errors, the script wrapper.

Never touches the network: pretrained downloads run with the Hub client in offline mode and an empty cache, and
pushes go through a fake ``HfApi`` (the ``cli._make_api`` seam).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_deprune
from conftest import PACKAGE_PROBE, assert_one_line_error, child_env, package_line
from conftest import run_cli as run
from timm_deprune import cli
from timm_deprune.cli import commands as cli_commands
from timm_deprune.hub import MASKS_FILE, WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mobilenetv2_050"
SMALL = ["--input-size", "3", "64", "64"]  # keeps the MACs pass cheap
FOLDER_FILES = {"config.json", WEIGHTS_FILE, MASKS_FILE, "README.md"}


def _bind(method: str, *args, **kwargs) -> None:
    """The call must fit the real ``HfApi`` method: a misspelt keyword is a TypeError here as on the Hub."""
    import inspect

    from huggingface_hub.hf_api import HfApi

    inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)


class FakeApi:
    """Records Hub calls (checked against the real ``HfApi`` signatures); ``upload_folder`` snapshots the files it
    was given."""

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        _bind("create_repo", repo_id, **kwargs)
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        _bind("upload_folder", **kwargs)
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{kwargs['repo_id']}/commit/abc"})()

    def count(self, name: str) -> int:
        return sum(c == name for c, _ in self.calls)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """One ``prune --random-init --push-to-hub`` run (fake Hub): (folder, stdout, stderr, fake api)."""
    folder = tmp_path_factory.mktemp("cli") / "mnv2.deprune"
    apis: list[FakeApi] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_commands, "_make_api", lambda token: apis.append(FakeApi(token)) or apis[-1])
        code, out, err = run("prune", MODEL, "--random-init", *SMALL, "--output", str(folder),
                             "--push-to-hub", "org/mnv2-deprune", "--private", "--token", "tok")
    assert code == 0, err
    assert len(apis) == 1
    return folder, out, err, apis[0]


def test_the_fake_hub_refuses_what_the_real_one_would():
    with pytest.raises(TypeError):
        FakeApi().upload_folder(repo_id="a/b", folder_path=".", allow_pattern=["*"])  # allow_patterns misspelt
    with pytest.raises(TypeError):
        FakeApi().create_repo("a/b", privat=True)


def test_prune_random_init_writes_a_folder_timm_loads(pruned):
    folder, out, err, _ = pruned
    assert FOLDER_FILES <= {p.name for p in folder.iterdir()}
    # the per-layer table, the summary and the load line
    assert "layer" in out and "achvd" in out and "blocks.1.0.conv_dw" in out and "blocks.1.0.conv_pw" in out
    for needle in ("DW sparsity", "MACs", "params", "decided in", "model.safetensors", MASKS_FILE,
                   f'timm.create_model("local-dir:{folder}", pretrained=True)'):
        assert needle in out, needle
    assert "Base weights: random init" in (folder / "README.md").read_text()

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    masked = list(timm_deprune.masked_convs(model))
    assert masked and all(not bool(m.mask.all()) for _, m in masked)
    reference = timm_deprune.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_prune_push_to_hub_uploads_the_saved_folder_in_one_commit(pruned):
    folder, out, _, api = pruned
    assert api.token == "tok"
    assert api.count("create_repo") == 1 and api.count("upload_folder") == 1
    create = dict(api.calls)["create_repo"]
    assert create["repo_id"] == "org/mnv2-deprune" and create["private"] is True
    upload = dict(api.calls)["upload_folder"]
    assert upload["repo_id"] == "org/mnv2-deprune" and Path(upload["folder_path"]) == folder
    assert FOLDER_FILES <= set(upload["files"])
    assert "https://hub.test/org/mnv2-deprune/commit/abc" in out


def test_prune_checkpoint_weights_come_from_the_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    dense = timm.create_model(MODEL).eval()
    with torch.no_grad():  # weights a fresh random init could not reproduce
        dense.conv_stem.weight.mul_(3.0)
        dense.classifier.weight.uniform_(-1, 1)
    ckpt = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ckpt))
    folder = tmp_path / "out"
    code, out, err = run("prune", MODEL, "--checkpoint", str(ckpt), *SMALL, "--output", str(folder),
                         "--method", "deprune-b", "--dw-ratio", "0.5", "--pw-ratio", "0.25")
    assert code == 0, err
    assert f"checkpoint: {ckpt}" in (folder / "README.md").read_text()

    model = timm_deprune.from_pretrained(folder).eval()
    assert torch.equal(model.conv_stem.weight, dense.conv_stem.weight)  # never pruned
    assert torch.equal(model.classifier.weight, dense.classifier.weight)
    dw = model.blocks[0][0].conv_dw  # input from the stem: masked, no channel removed
    assert torch.equal(dw.weight * dw.mask[:, None], dense.blocks[0][0].conv_dw.weight * dw.mask[:, None])
    # the CLI's model is exactly what the Python API gives for the same weights and config
    expected = timm_deprune.prune(dense, timm_deprune.DepruneConfig.deprune_b(dw_ratio=0.5, pw_ratio=0.25),
                                  input_size=(3, 64, 64)).model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "ten_classes.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(MODEL, num_classes=10).state_dict().items()},
              str(ckpt))
    code, _, err = run("prune", MODEL, "--checkpoint", str(ckpt), *SMALL, "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "shape mismatches", "classifier.weight", "--num-classes")
    assert not (tmp_path / "o").exists()


def test_no_weights_flag_tells_the_user_to_pick_one(tmp_path):
    code, _, err = run("prune", MODEL, "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--pretrained", "--checkpoint", "--random-init", exit_code=2)


def test_pretrained_without_network_is_one_clear_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run("prune", MODEL, "--pretrained", *SMALL, "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cannot download the pretrained weights", MODEL, "HF_HUB_OFFLINE")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needles, exit_code", [
    (["--dw-ratio", "1.5"], ["dw_ratio", "1.5"], 2),
    (["--pw-ratio", "-0.1"], ["pw_ratio", "-0.1"], 2),
    (["--method", "deprune-b", "--align", "over"], ["--align over", "deprune-bh"], 2),
    (["--method", "deprune-bh", "--align", "none"], ["align", "'none'"], 2),
    (["--epochs", "3"], ["--data-dir"], 2),
    (["--granularity", "block:5"], ["granularity 'block:5'", "must divide group"], 2),
], ids=["dw-ratio", "pw-ratio", "align-without-bh", "bh-align-none", "epochs-without-data", "granularity"])
def test_bad_options_are_one_line(tmp_path, argv, needles, exit_code):
    code, _, err = run("prune", MODEL, "--random-init", "--output", str(tmp_path / "o"), *argv)
    assert_one_line_error(code, err, *needles, exit_code=exit_code)


def test_block_granularity_is_recorded_and_masks_share_taps(tmp_path):
    folder = tmp_path / "o"
    code, _, err = run("prune", MODEL, "--random-init", *SMALL, "--granularity", "block:8", "--output", str(folder))
    assert code == 0, err
    model = timm_deprune.from_pretrained(folder)
    assert model.deprune_plan.config["granularity"] == "block:8"
    assert "granularity='block:8'" in (folder / "README.md").read_text()
    for _, conv in timm_deprune.masked_convs(model):
        mask = conv.mask.reshape(conv.out_channels, -1)
        assert all(bool((mask[b:b + 8] == mask[b]).all()) for b in range(0, conv.out_channels, 8))


def test_bench_times_dense_pruned_and_optimised(pruned):
    folder = pruned[0]
    code, out, err = run("bench", str(folder), "--input-size", "3", "64", "64", "--repeats", "2", "--threads", "1")
    assert code == 0, err
    assert "dense mobilenetv2_050, eager NCHW" in out and "dense mobilenetv2_050, eager channels_last" in out
    assert "pruned, as loaded (masked dense)" in out
    assert "pruned, optimised (channels_last, channels reordered, sparse DW, PyTorch 1x1 convs)" in out
    assert "pruned, optimised (channels_last, channels reordered, 17 native blocks)" in out
    assert out.count("x vs best dense eager") == 5
    code, _, err = run("bench", str(folder), "--repeats", "0")
    assert_one_line_error(code, err, "--repeats must be >= 1, got 0", exit_code=2)


def test_unknown_model_suggests_names(tmp_path):
    code, _, err = run("prune", "mobilenetv2_05", "--random-init", "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown timm model 'mobilenetv2_05'", "mobilenetv2_050")


def test_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run("prune", MODEL, "--random-init", *SMALL, "--output", str(out))
    assert_one_line_error(code, err, str(out), "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# timm's ImageDataset hands PIL an open file and leaves closing it to the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_recalibration_runs_and_records_accuracy(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("validation", 2)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for k in range(n):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{k}.png")
    folder = tmp_path / "out"
    code, out, err = run("prune", MODEL, "--random-init", "--num-classes", "2", *SMALL, "--output", str(folder),
                         "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--distill", "--batch-size", "4",
                         "--workers", "0", "--device", "cpu")
    assert code == 0, err
    assert "recalibrated 2 steps" in out and "distilled from the dense model" in out and "validation top-1" in out
    assert "- top1: " in (folder / "README.md").read_text()
    assert list(timm_deprune.masked_convs(timm_deprune.from_pretrained(folder)))


@pytest.mark.parametrize("before", [False, True], ids=["after-command", "before-command"])
def test_verbose_shows_the_traceback(tmp_path, before):
    argv = ["prune", MODEL, "--random-init", "--dw-ratio", "1.5", "--output", str(tmp_path / "o")]
    code, _, err = run(*(["--verbose", *argv] if before else [*argv, "--verbose"]))
    assert code == 2
    assert "Traceback" in err and "timm-deprune: error: invalid pruning options" in err


def test_argparse_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        cli.main(["prune", MODEL, "--random-init", "--pretrained"])  # mutually exclusive
    assert e.value.code == 2


def test_info_prints_architecture_plan_and_files(pruned):
    folder = pruned[0]
    code, out, err = run("info", str(folder))
    assert code == 0, err
    for needle in (f"architecture  {MODEL}", "DEPrune-BH", "dw_ratio=0.71", "blocks.1.0.conv_dw", "blocks.6.0.conv_dw",
                   "blocks.1.0.conv_pw", "config.json", WEIGHTS_FILE, MASKS_FILE, f'"local-dir:{folder}"'):
        assert needle in out, needle


def test_info_on_a_missing_folder_is_one_line(tmp_path):
    code, _, err = run("info", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no model folder")


def test_push_uploads_the_folder_once(pruned, monkeypatch):
    folder = pruned[0]
    apis: list[FakeApi] = []
    monkeypatch.setattr(cli_commands, "_make_api", lambda token: apis.append(FakeApi(token)) or apis[-1])
    code, out, err = run("push", str(folder), "org/other")
    assert code == 0, err
    (api,) = apis
    assert api.count("upload_folder") == 1 and api.count("create_repo") == 1
    upload = dict(api.calls)["upload_folder"]
    assert upload["repo_id"] == "org/other" and FOLDER_FILES <= set(upload["files"])
    assert dict(api.calls)["create_repo"]["private"] is False
    assert "hf-hub:org/other" in out


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_commands, "_make_api", lambda token: pytest.fail("must not reach the Hub"))
    code, _, err = run("push", str(tmp_path), "org/x")
    assert_one_line_error(code, err, "missing", "config.json")


def _script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    # The script as `python script.py ...` runs it, after the probe of which timm_deprune the child imports.
    script = ROOT / "scripts" / "prune_and_upload.py"
    code = (f"{PACKAGE_PROBE}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nsys.path[0] = {str(script.parent)!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(script), *argv], cwd=cwd, env=child_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert package_line() in proc.stdout, proc.stdout[:500] + proc.stderr[-2000:]
    return proc


def test_script_wrapper_is_timm_deprune_prune(tmp_path):
    help_ = _script("--help", cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "--random-init" in help_.stdout and "--push-to-hub" in help_.stdout
    res = _script(MODEL, "--random-init", *SMALL, "--output", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert FOLDER_FILES <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "DW sparsity" in res.stdout


def test_pruning_flags_reach_the_config_and_the_plan(tmp_path):
    import json

    folder = tmp_path / "o"
    flags = ["--ignore", "blocks.1.*", "--no-remove-dead", "--importance", "l1", "--tile", "16", "--group", "16",
             "--pw-tile", "16", "--align", "over", "--dw-ratio", "0.6", "--pw-ratio", "0.25"]
    code, _, err = run("prune", MODEL, "--random-init", *SMALL, *flags, "--output", str(folder))
    assert code == 0, err
    plan = json.loads((folder / "config.json").read_text())["model_args"]["deprune"]
    expected = timm_deprune.DepruneConfig.deprune_bh(dw_ratio=0.6, pw_ratio=0.25, ignore=("blocks.1.*",),
                                                     remove_dead=False, importance="l1", tile=16, group=16,
                                                     pw_tile=16, align="over")
    assert timm_deprune.DepruneConfig.from_dict(plan["config"]) == expected
    assert plan["dw"] and not any(d["path"].startswith("blocks.1.") for d in plan["dw"])
    assert plan["pw"] and not any(p["producer"].startswith("blocks.1.") for p in plan["pw"])
    assert all(d["dead_removed"] == 0 and d["tile"] == 16 and d["group"] == 16 for d in plan["dw"])
    assert all(len(p["kept"]) % 16 == 0 or len(p["kept"]) == p["channels_before"] for p in plan["pw"])
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # and it loads
    assert {p for p, _ in timm_deprune.masked_convs(model)} == {d["path"] for d in plan["dw"]}


def test_export_no_check_skips_onnx_runtime(tmp_path, pruned):
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
    folder = pruned[0]
    code, out, err = run("export", str(folder), "--output", str(tmp_path / "m.onnx"), "--no-check", *SMALL)
    assert code == 0, err
    assert "ORT check    skipped (--no-check)" in out and (tmp_path / "m.onnx").stat().st_size > 0
