"""Hub storage and the timm hook, all offline (ARCHITECTURE.md §2).

- An HF cache built by hand in ``tmp_path`` (``models--org--name/refs/main``, ``snapshots/<sha>/``, ``blobs/``)
  with ``HF_HUB_OFFLINE``. huggingface_hub 2.x reads ``constants.HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` when a call
  runs, so in-process tests patch those constants (``test_offline_cache_patch_is_effective`` checks that this really
  serves files from the hand-built cache, and a socket guard fails any test that tries to leave the machine); one
  subprocess test sets the environment variables *before* anything is imported, as a user would.
- ``FakeHfApi`` is the Hub at the boundary: ``create_repo`` / ``upload_folder`` (arguments checked against the real
  ``HfApi`` signatures) commit the uploaded folder into that cache.
- An HTTP download through ``olah`` (a read-only Hub mirror) on 127.0.0.1, serving a local git repository offline.

Small models (mobilenetv2_050, mobilenetv3_small_050) at 64x64; the ``ARCH.deprune`` tag uses mobilenetv2_100.
Outputs are compared exactly (eval, no_grad) wherever the model is the same.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import timm
import timm_deprune
from conftest import PACKAGE_PROBE, child_env, package_line, randomize_bn
from timm_deprune import DepruneConfig, masked_convs, prune, push_to_hub, save_pretrained
from timm_deprune.hub import io as hub, timm_plugin

TESTS = Path(__file__).resolve().parent
FILES = {"config.json", "model.safetensors", "deprune_masks.safetensors", "README.md"}
SIZE = 64
CONFIG = DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3)


# ---------------------------------------------------------------------------------------------------------------
# helpers (also imported by the subprocess test)

def write_snapshot(cache, repo_id: str, folder, *, revision: str = "main", symlinks: bool = True) -> str:
    """Commit ``folder``'s files to ``repo_id`` in a hand-built HF cache and point ``refs/<revision>`` at it.

    Files are symlinks into ``blobs/`` (as huggingface_hub writes them) or plain copies (``symlinks=False``).
    Returns the new commit sha.
    """
    org, name = repo_id.split("/")
    root = Path(cache) / f"models--{org}--{name}"
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    digest = hashlib.sha1(f"{len(list((root / 'snapshots').glob('*')))}".encode())  # a new commit every upload
    for p in files:
        digest.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    sha = digest.hexdigest()
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for p in files:
        data = p.read_bytes()
        if symlinks:
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / p.name).symlink_to(os.path.relpath(blob, snap))
        else:
            (snap / p.name).write_bytes(data)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(sha)
    return sha


def _check_signature(method: str, *args, **kwargs) -> None:
    from huggingface_hub.hf_api import HfApi  # the real class, even where a test replaced huggingface_hub.HfApi

    inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)  # TypeError on a wrong argument


class FakeHfApi:
    """``HfApi`` at the boundary: ``create_repo`` and ``upload_folder`` commit into a hand-built HF cache."""

    def __init__(self, cache):
        self.cache = Path(cache)
        self.calls: list[tuple[str, str, dict]] = []
        self.repos: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        _check_signature("create_repo", repo_id, **kwargs)
        self.calls.append(("create_repo", repo_id, kwargs))
        if repo_id in self.repos and not kwargs.get("exist_ok"):
            raise RuntimeError(f"409: {repo_id} exists")
        self.repos.setdefault(repo_id, {"private": kwargs.get("private")})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        _check_signature("upload_folder", **kwargs)
        repo_id = kwargs["repo_id"]
        if repo_id not in self.repos:
            raise RuntimeError(f"404: {repo_id} does not exist (create_repo first)")
        folder = Path(kwargs["folder_path"])
        files = sorted(p.name for p in folder.iterdir())
        sha = write_snapshot(self.cache, repo_id, folder, revision=kwargs.get("revision") or "main")
        self.calls.append(("upload_folder", repo_id, dict(kwargs, files=files)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}", oid=sha)


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so a load that drops buffers changes the outputs."""
    return randomize_bn(model, torch.Generator().manual_seed(seed))


def make_pruned(arch: str, config: DepruneConfig = CONFIG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    dense = _randomize_bn(timm.create_model(arch), seed)
    return prune(dense, config, input_size=(3, SIZE, SIZE)).model.eval()


def batch(chans: int = 3) -> torch.Tensor:
    return torch.randn(2, chans, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def masks_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {path: m.mask.clone() for path, m in masked_convs(model)}


def assert_same_masks(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ma, mb = masks_of(a), masks_of(b)
    assert ma and ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


def plan_dict(model: torch.nn.Module) -> dict:
    return json.loads(json.dumps(model.deprune_plan.to_dict()))


# ---------------------------------------------------------------------------------------------------------------
# fixtures

class NetworkAccess(RuntimeError):
    """Raised by the offline guard (not an OSError, so no client retries it as a flaky connection)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline HF cache; any connection off this machine fails the test."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    attempts = []
    local = ("127.0.0.1", "::1", "localhost")
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise NetworkAccess(f"offline test tried to look up {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            attempts.append(address)
            raise NetworkAccess(f"offline test tried to reach {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield cache
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def pruned():
    return make_pruned("mobilenetv2_050")


@pytest.fixture(scope="module")
def saved(pruned, tmp_path_factory):
    return save_pretrained(pruned, tmp_path_factory.mktemp("saved") / "mobilenetv2_050.deprune")


@pytest.fixture(params=["local-dir", "hf-hub"])
def source(request, saved, hub_cache):
    """The saved model as a ``create_model`` name: a local folder or a repo in the offline cache."""
    if request.param == "local-dir":
        return f"local-dir:{saved}"
    write_snapshot(hub_cache, "user/matrix", saved)
    return "hf-hub:user/matrix"


@pytest.fixture
def test_org():
    org = "deprune-test-org"
    timm_plugin.register_tags(org=org)
    yield org
    timm_plugin.register_tags()  # back to $TIMM_DEPRUNE_HUB_ORG / the default org


# ---------------------------------------------------------------------------------------------------------------
# offline cache, fake HfApi, push

def test_offline_cache_patch_is_effective(hub_cache, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "config.json").write_text('{"x": 1}')
    sha = write_snapshot(hub_cache, "someone/thing", folder)
    path = Path(hf_hub_download("someone/thing", "config.json"))
    assert path.parent == hub_cache / "models--someone--thing" / "snapshots" / sha
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("someone/thing", "absent.json")


@pytest.mark.parametrize("arch, private", [("mobilenetv2_050", True), ("mobilenetv3_small_050", False)])
def test_push_to_hub_then_hf_hub_load_is_exact(arch, private, hub_cache, pruned):
    model = pruned if arch == "mobilenetv2_050" else make_pruned(arch)
    api = FakeHfApi(hub_cache)
    url = push_to_hub(model, "user/repo", private=private, api=api)

    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]  # one commit, into an existing repo
    (_, repo, create), (_, _, upload) = api.calls
    assert repo == "user/repo" and create["private"] is private and create["exist_ok"] is True
    assert set(upload["files"]) == FILES
    sha = (hub_cache / "models--user--repo" / "refs" / "main").read_text()
    assert url == f"https://huggingface.co/user/repo/commit/{sha}"

    loaded = timm.create_model("hf-hub:user/repo", pretrained=True)
    assert_same(outputs(loaded, batch()), outputs(model, batch()))
    assert_same_masks(loaded, model)
    assert loaded.deprune_plan.to_dict() == plan_dict(model)


def test_push_to_a_revision_loads_from_that_revision(hub_cache, pruned):
    api = FakeHfApi(hub_cache)
    push_to_hub(pruned, "user/rev", revision="dev", api=api)
    assert api.calls[-1][2]["revision"] == "dev"
    refs = hub_cache / "models--user--rev" / "refs"
    assert sorted(p.name for p in refs.iterdir()) == ["dev"]  # masks must come from @dev too: there is no main
    loaded = timm.create_model("hf-hub:user/rev@dev", pretrained=True)
    assert_same(outputs(loaded, batch()), outputs(pruned, batch()))


def test_push_to_hub_default_api_gets_the_token(hub_cache, pruned, monkeypatch):
    import huggingface_hub
    from huggingface_hub.hf_api import HfApi

    made = []

    def factory(**kwargs):
        inspect.signature(HfApi.__init__).bind(None, **kwargs)
        made.append(kwargs)
        return FakeHfApi(hub_cache)

    monkeypatch.setattr(huggingface_hub, "HfApi", factory)
    push_to_hub(pruned, "user/tok", token="hf_secret")
    assert len(made) == 1 and made[0]["token"] == "hf_secret" and made[0]["library_name"] == "timm-deprune"
    assert (hub_cache / "models--user--tok" / "refs" / "main").is_file()


def test_push_of_an_unpruned_model_touches_no_repo(hub_cache):
    api = FakeHfApi(hub_cache)
    with pytest.raises(ValueError, match="carries no DEPrune plan"):
        push_to_hub(timm.create_model("mobilenetv2_050"), "user/dense", api=api)
    assert api.calls == []


def test_environment_set_before_import_offline_cache_and_tag_org(saved, tmp_path):
    """What a user does: HF_HUB_OFFLINE / HF_HUB_CACHE / TIMM_DEPRUNE_HUB_ORG in the environment of a fresh process."""
    script = tmp_path / "env_offline.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        assert "huggingface_hub" not in sys.modules and "timm" not in sys.modules
        import timm, timm_deprune
        """) + PACKAGE_PROBE + textwrap.dedent("""
        import huggingface_hub.constants as constants
        from test_hub import FakeHfApi, assert_same, assert_same_masks, batch, outputs
        from timm_deprune import push_to_hub
        from timm_deprune.hub import timm_plugin

        assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"]
        org = os.environ["TIMM_DEPRUNE_HUB_ORG"]
        for arch in timm_plugin.PAPER_ARCHS:  # registered at import with the org from the environment
            assert timm.models.get_pretrained_cfg(arch + ".deprune").hf_hub_id == f"{org}/{arch}.deprune"
        model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True)
        api = FakeHfApi(constants.HF_HUB_CACHE)
        push_to_hub(model, f"{org}/mobilenetv2_050.deprune", api=api)
        assert timm_plugin.register_tags(["mobilenetv2_050"]) == ["mobilenetv2_050.deprune"]
        for name in ("mobilenetv2_050.deprune", f"hf-hub:{org}/mobilenetv2_050.deprune"):
            loaded = timm.create_model(name, pretrained=True)
            assert_same(outputs(loaded, batch()), outputs(model, batch()))
            assert_same_masks(loaded, model)
        print("SUBPROCESS-OK")
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               TIMM_DEPRUNE_HUB_ORG="env-org", PYTHONPATH=child_env(TESTS)["PYTHONPATH"])
    env.setdefault("OMP_NUM_THREADS", "1")  # small models; extra threads only stall on a busy machine
    proc = subprocess.run([sys.executable, str(script), str(saved)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "SUBPROCESS-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert package_line() in proc.stdout, proc.stdout[:500]


# ---------------------------------------------------------------------------------------------------------------
# ARCH.deprune tags and timm's registry

@pytest.fixture(scope="module")
def tag_model():
    """``mobilenetv2_100.deprune`` without weights (the tag's config on a random init), with non-trivial BN stats."""
    torch.manual_seed(0)
    return _randomize_bn(timm.create_model("mobilenetv2_100.deprune")).eval()


def test_tag_with_weights_loads_from_the_org_repo(tag_model, hub_cache, test_org, tmp_path):
    folder = save_pretrained(tag_model, tmp_path / "published")
    write_snapshot(hub_cache, f"{test_org}/mobilenetv2_100.deprune", folder, symlinks=False)
    cfg = timm.models.get_pretrained_cfg("mobilenetv2_100.deprune")
    assert cfg.hf_hub_id == f"{test_org}/mobilenetv2_100.deprune" and cfg.hf_hub_filename == "model.safetensors"
    loaded = timm.create_model("mobilenetv2_100.deprune", pretrained=True)
    assert_same(outputs(loaded, batch()), outputs(tag_model, batch()))
    assert_same_masks(loaded, tag_model)
    assert loaded.deprune_plan.to_dict() == plan_dict(tag_model)


def test_tag_without_weights_builds_the_pruned_structure(tag_model):
    from timm_deprune.pruning.prune import depthwise_convs

    dense = timm.create_model("mobilenetv2_100")
    assert not list(masked_convs(dense)) and not hasattr(dense, "deprune_plan")  # untagged: timm's own model
    torch.manual_seed(1)
    other = timm.create_model("mobilenetv2_100.deprune")
    dws = depthwise_convs(dense)
    assert len(list(masked_convs(tag_model))) == len(dws) == len(tag_model.deprune_plan.dw)
    assert tag_model.deprune_plan.pw  # point-wise filters pruned too
    shapes = {k: v.shape for k, v in tag_model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in other.state_dict().items()}  # the structure does not depend on weights
    assert sum(v.numel() for v in tag_model.parameters()) < sum(v.numel() for v in dense.parameters())
    for path, m in masked_convs(tag_model):
        assert 0 < (~m.mask).float().mean() < 1, path
    y = outputs(other, batch())
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_tag_structure_takes_its_masks_from_a_pruned_checkpoint(tag_model, tmp_path):
    """ARCH.deprune + checkpoint_path=: the random-init masks of the structure must not zero the checkpoint's
    kept taps; the checkpoint's zero taps become the masks."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in tag_model.state_dict().items()}, str(ckpt))
    torch.manual_seed(1)  # a different random init: different masks before loading
    before = timm.create_model("mobilenetv2_100.deprune")
    assert any(not torch.equal(a.mask, b.mask) for (_, a), (_, b) in zip(masked_convs(before), masked_convs(tag_model)))
    torch.manual_seed(1)
    loaded = timm.create_model("mobilenetv2_100.deprune", checkpoint_path=str(ckpt)).eval()
    assert_same_masks(loaded, tag_model)
    assert_same(outputs(loaded, batch()), outputs(tag_model, batch()))
    # a second load is an ordinary one again: masks stay, pruned taps are zeroed
    loaded.load_state_dict(timm.create_model("mobilenetv2_100.deprune").state_dict())
    assert_same_masks(loaded, tag_model)


def test_registry_keeps_timm_defaults_and_its_own_pruned_models():
    paper = {"mobilenetv2_100.deprune", "mobilenetv3_small_100.deprune", "mobilenetv3_large_100.deprune",
             "efficientnet_b0.deprune"}
    listed = set(timm.list_models("*.deprune", pretrained=True))
    assert paper <= listed and listed == {f"{a}.deprune" for a in timm_plugin.PAPER_ARCHS + timm_plugin.PUBLISHED_ARCHS}
    assert timm.models.get_pretrained_cfg("mobilenetv2_100").tag == "ra_in1k"
    assert timm.create_model("mobilenetv2_100").pretrained_cfg["tag"] == "ra_in1k"
    assert "mobilenetv2_100.deprune" in timm.list_pretrained("mobilenetv2_100*")
    b1p = timm.create_model("efficientnet_b1_pruned")  # timm's own pruned=True adaptation still runs
    assert not list(masked_convs(b1p)) and not hasattr(b1p, "deprune_plan")
    n = sum(p.numel() for p in b1p.parameters())
    assert n < sum(p.numel() for p in timm.create_model("efficientnet_b1").parameters())


# ---------------------------------------------------------------------------------------------------------------
# the create_model matrix on local-dir: and hf-hub:

def test_pretrained_is_exact(source, pruned):
    loaded = timm.create_model(source, pretrained=True)
    assert_same(outputs(loaded, batch()), outputs(pruned, batch()))
    assert_same_masks(loaded, pruned)
    assert loaded.deprune_plan.to_dict() == plan_dict(pruned)


def test_pretrained_via_from_pretrained(saved, pruned):
    loaded = timm_deprune.from_pretrained(saved)
    assert_same(outputs(loaded, batch()), outputs(pruned, batch()))


def test_num_classes_resets_only_the_head(source, pruned):
    m = timm.create_model(source, pretrained=True, num_classes=5).eval()
    assert m.get_classifier().out_features == 5
    sd, ref = m.state_dict(), pruned.state_dict()
    assert sd.keys() == ref.keys()
    for key in sd:
        if not key.startswith("classifier."):
            assert torch.equal(sd[key], ref[key]), key
    assert_same_masks(m, pruned)
    with torch.no_grad():
        assert_same(m.forward_features(batch()), pruned.forward_features(batch()))
        assert m(batch()).shape == (2, 5)


def test_in_chans_1_adapts_the_stem(source, pruned):
    from timm.models._manipulate import adapt_input_conv

    m = timm.create_model(source, pretrained=True, in_chans=1).eval()
    sd, ref = m.state_dict(), pruned.state_dict()
    assert_same(sd["conv_stem.weight"], adapt_input_conv(1, ref["conv_stem.weight"]))
    for key in sd:
        if key != "conv_stem.weight":
            assert torch.equal(sd[key], ref[key]), key
    assert_same_masks(m, pruned)
    y = outputs(m, batch(1))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_features_only(source, pruned):
    f = timm.create_model(source, pretrained=True, features_only=True).eval()
    x = batch()
    with torch.no_grad():
        feats = f(x)
        last = pruned.blocks(pruned.bn1(pruned.conv_stem(x)))
    assert [t.shape[1] for t in feats] == f.feature_info.channels()
    assert_same(feats[-1], last)
    ref = pruned.state_dict()
    for key, value in f.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert masks_of(f).keys() == masks_of(pruned).keys()
    assert all(torch.equal(m, masks_of(pruned)[k]) for k, m in masks_of(f).items())


def test_checkpoint_path(source, pruned, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(ckpt))
    m = timm.create_model(source, pretrained=False, checkpoint_path=str(ckpt))
    assert_same(outputs(m, batch()), outputs(pruned, batch()))
    assert_same_masks(m, pruned)


# ---------------------------------------------------------------------------------------------------------------
# failure modes

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _edit_masks(folder: Path, edit) -> None:
    masks = hub.load_masks(folder / hub.MASKS_FILE)
    edit(masks)
    hub.save_masks(masks, folder / hub.MASKS_FILE)


def _shrink_first_mask(masks):
    key = next(iter(masks))
    masks[key] = masks[key][:-1]


def _drop_first_mask(masks):
    del masks[next(iter(masks))]


def _format_99(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"]["deprune"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(cfg))


def _foreign_masks(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2, 3, 3, dtype=torch.uint8)}, str(folder / hub.MASKS_FILE))


_HUB_MISSING = (FileNotFoundError, "cannot get .* of Hub repo .*[Cc]annot find the requested files")  # huggingface_hub's offline error
BROKEN = {
    "garbage masks": (lambda d: (d / hub.MASKS_FILE).write_bytes(os.urandom(4096)),
                      {"*": (ValueError, "cannot read DEPrune masks file")}),
    "truncated masks": (lambda d: _truncate(d / hub.MASKS_FILE, 0.9),
                        {"*": (ValueError, "cannot read DEPrune masks file")}),
    "truncated weights": (lambda d: _truncate(d / hub.WEIGHTS_FILE),
                          {"*": (ValueError, "cannot read DEPrune weights file .*model.safetensors")}),
    "mask shape": (lambda d: _edit_masks(d, _shrink_first_mask), {"*": (ValueError, "the plan expects")}),
    "mask missing": (lambda d: _edit_masks(d, _drop_first_mask),
                     {"*": (ValueError, r"do not match the prune plan: missing \['blocks")}),
    "foreign masks": (_foreign_masks, {"*": (ValueError, "is not a DEPrune masks file")}),
    "plan format 99": (_format_99, {"*": (ValueError, "unsupported prune plan format_version 99")}),
    "no masks file": (lambda d: (d / hub.MASKS_FILE).unlink(),
                      {"local-dir": (FileNotFoundError, "DEPrune masks file not found"), "hf-hub": _HUB_MISSING}),
    "no weights file": (lambda d: (d / hub.WEIGHTS_FILE).unlink(),
                        {"local-dir": (FileNotFoundError, "has no model.safetensors"), "hf-hub": _HUB_MISSING}),
}


@pytest.mark.parametrize("where", ["local-dir", "hf-hub"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_fails_clearly(case, where, saved, hub_cache, tmp_path):
    corrupt, expected = BROKEN[case]
    exc, match = expected.get(where, expected.get("*"))
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    corrupt(folder)
    if where == "local-dir":
        name = f"local-dir:{folder}"
    else:
        write_snapshot(hub_cache, "user/broken", folder)
        name = "hf-hub:user/broken"
    with pytest.raises(exc, match=match):
        timm.create_model(name, pretrained=True)


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained

def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_into_a_non_empty_folder_needs_overwrite(pruned, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save_pretrained(pruned, target)
    assert _listing(target) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    assert save_pretrained(pruned, target, overwrite=True) == target
    assert {p.name for p in target.iterdir()} == FILES | {"keep.txt"}  # the save's files added, the user's kept
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left
    loaded = timm.create_model(f"local-dir:{target}", pretrained=True)
    assert_same(outputs(loaded, batch()), outputs(pruned, batch()))


def test_save_into_an_empty_folder_or_onto_a_file(pruned, tmp_path):
    (tmp_path / "empty").mkdir()
    save_pretrained(pruned, tmp_path / "empty")
    assert {p.name for p in (tmp_path / "empty").iterdir()} == FILES
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        save_pretrained(pruned, tmp_path / "file")


@pytest.mark.parametrize("existing", [False, True])
def test_failing_save_leaves_nothing_behind(existing, pruned, tmp_path, monkeypatch):
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_masks", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(pruned, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert _listing(target) == {"old.txt": b"old"}


def test_failing_rename_keeps_the_other_files(pruned, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent == target:
            raise OSError(f"rename {src} failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename .* failed"):
        save_pretrained(pruned, target, overwrite=True)
    monkeypatch.undo()
    assert _listing(target) == {"old.txt": b"old"}  # nothing replaced, no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saving_an_unpruned_model_fails(tmp_path):
    with pytest.raises(ValueError, match="carries no DEPrune plan"):
        save_pretrained(timm.create_model("mobilenetv2_050"), tmp_path / "dense")
    assert list(tmp_path.iterdir()) == []


def test_saving_an_optimized_model_fails(pruned, tmp_path):
    from timm_deprune import optimize_for_inference

    opt = optimize_for_inference(pruned, input_size=(3, 64, 64))
    for model in (opt, torch.compile(opt)):  # the compiled wrapper too (not run: nothing is compiled)
        with pytest.raises(ValueError, match="returned by optimize_for_inference.*save the pruned model"):
            save_pretrained(model, tmp_path / "opt")
    assert list(tmp_path.iterdir()) == []


def test_load_save_load_keeps_the_model(saved, pruned, tmp_path):
    """A loaded model (here with a new head) saves and loads again exactly."""
    m = timm.create_model(f"local-dir:{saved}", pretrained=True, num_classes=5).eval()
    again = timm.create_model(f"local-dir:{save_pretrained(m, tmp_path / 'again')}", pretrained=True)
    assert_same(outputs(again, batch()), outputs(m, batch()))
    assert_same_masks(again, pruned)


# ---------------------------------------------------------------------------------------------------------------
# model card

def test_model_card(pruned, tmp_path):
    import yaml

    card = {"base_model": "timm/mobilenetv2_100.ra_in1k", "base_weights": "timm pretrained",
            "accuracy": {"top1": 71.23, "dataset": "imagenet-1k val"},
            "latency": {"batch1_ms": 5.17, "device": "test-cpu"}}
    text = (save_pretrained(pruned, tmp_path / "m", card=card) / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert {"timm", "deprune", "pruning"} <= set(meta["tags"])
    assert meta["library_name"] == "timm" and meta["base_model"] == "timm/mobilenetv2_100.ra_in1k"
    assert meta["license"]
    for d in pruned.deprune_plan.dw:
        assert f"| `{d.path}` | dw " in body, d.path
    for p in pruned.deprune_plan.pw:
        assert f"| `{p.producer}` | pw " in body, p.producer
    for line in ("- top1: 71.23", "- dataset: imagenet-1k val", "- batch1_ms: 5.17", "- device: test-cpu"):
        assert line in body
    assert "DEPrune-BH" in body and "timm.create_model" in body

    plain = (save_pretrained(pruned, tmp_path / "plain") / "README.md").read_text()
    meta = yaml.safe_load(plain[4:].split("\n---\n", 1)[0])
    assert "base_model" not in meta
    assert "Accuracy: not measured" in plain and "Latency: not measured" in plain


# ---------------------------------------------------------------------------------------------------------------
# HTTP download through a local Hub mirror (olah, PyPI, MIT)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_download_through_olah_mirror(saved, pruned, tmp_path):
    pytest.importorskip("olah", reason="olah (pip install olah) serves the HTTP download test")
    git = shutil.which("git")
    if git is None:
        pytest.skip("olah serves local mirrors from git repositories and git is not installed")
    repo = tmp_path / "mirrors" / "models" / "user" / "repo"
    shutil.copytree(saved, repo)
    git_env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_AUTHOR_NAME="t",
                   GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "pruned model"]):
        subprocess.run([git, *cmd], cwd=repo, env=git_env, check=True, capture_output=True)

    port = _free_port()
    config = tmp_path / "olah.toml"
    config.write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{tmp_path / 'olah-repos'}"
        mirrors-path = ["{tmp_path / 'mirrors'}"]
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"

        [accessibility]
        offline = true
    """))
    log = tmp_path / "olah.log"
    torch.save({"state": pruned.state_dict(), "masks": masks_of(pruned)}, tmp_path / "ref.pt")
    client = tmp_path / "client.py"
    client.write_text(PACKAGE_PROBE + "\n" + textwrap.dedent("""
        import sys, torch, timm, timm_deprune
        ref = torch.load(sys.argv[1])
        model = timm.create_model("hf-hub:user/repo", pretrained=True).eval()
        state = model.state_dict()
        assert state.keys() == ref["state"].keys() and all(torch.equal(state[k], v) for k, v in ref["state"].items())
        masks = {p: m.mask for p, m in timm_deprune.masked_convs(model)}
        assert masks.keys() == ref["masks"].keys() and all(torch.equal(masks[k], v) for k, v in ref["masks"].items())
        local = timm.create_model("local-dir:" + sys.argv[2], pretrained=True).eval()  # same process, same threads
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), local(x), rtol=0, atol=0)
        print("CLIENT-OK")
    """))
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(config), "--log-path",
                                   str(tmp_path / "olah-logs")], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"olah exited with {server.returncode}: {log.read_text()[-3000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"olah did not start: {log.read_text()[-3000:]}"
                time.sleep(0.3)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                                  "all_proxy")}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "client-cache"),
                   HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run([sys.executable, str(client), str(tmp_path / "ref.pt"), str(saved)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "CLIENT-OK" in proc.stdout, \
            proc.stdout[-2000:] + proc.stderr[-4000:] + log.read_text()[-2000:]
        assert package_line() in proc.stdout, proc.stdout[:500]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    served = log.read_text()
    for name in ("config.json", hub.MASKS_FILE, hub.WEIGHTS_FILE):
        assert f"GET /user/repo/resolve/main/{name}" in served, name  # really fetched over HTTP from olah
