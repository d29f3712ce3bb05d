"""Shared helpers of the test suite: the float64 reference conv and random masks."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

REFERENCE_ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "gelu": F.gelu,
}


def reference_dwconv(x, weight, mask, bias, stride, pads, dilation, activation):
    """float64 ground truth: F.conv2d on the masked weight; pads are (top, bottom, left, right)."""
    wm = (weight.double() * mask.unsqueeze(1).double())
    xp = F.pad(x.double(), (pads[2], pads[3], pads[0], pads[1]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 convs: extra threads only stall when the machine is busy
    try:
        y = F.conv2d(xp, wm, None, stride, 0, dilation, groups=x.shape[1])
    finally:
        torch.set_num_threads(threads)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    return REFERENCE_ACTIVATIONS[activation](y)


def assert_matches_reference(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, info: str = "") -> None:
    """Max error relative to the reference's magnitude (floored at 1) below rtol; no NaN left anywhere."""
    assert y.shape == ref.shape, f"shape {list(y.shape)} != reference {list(ref.shape)} {info}"
    assert not torch.isnan(y).any(), f"output has NaN: some element was never written {info}"
    err = (y.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g} {info}"


def random_mask(channels: int, kh: int, kw: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(channels, kh, kw, generator=gen) < keep


def supported_isas() -> list[str]:
    """The CPU kernels' instruction sets this CPU runs (none when the extension is not built)."""
    from timm_deprune.kernels.backend import backend_available, load_extension

    if not backend_available():
        return []
    return [name for name in ("generic", "avx2", "avx512") if load_extension().cpu_isa_supported(name)]


@contextlib.contextmanager
def forced_isa(name: str):
    """Run the CPU kernels on instruction set ``name`` inside the block, restoring the previous one after."""
    from timm_deprune.kernels.backend import load_extension

    native = load_extension()
    previous = native.cpu_isa()
    native.set_cpu_isa(name)
    try:
        yield name
    finally:
        native.set_cpu_isa(previous)


def pytest_generate_tests(metafunc):
    """A test taking the ``isa`` fixture runs once per supported instruction set (resolved when its module is
    collected, so importing this conftest loads nothing)."""
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", supported_isas(), indirect=True)


@pytest.fixture
def isa(request):
    """The instruction set the CPU kernels run during the test (see ``pytest_generate_tests``)."""
    with forced_isa(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """Small models and layers: on a busy 2-core machine extra intra-op threads only stall (about 3x slower).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; kernel threading is tested elsewhere.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh random seed per test, printed on failure by pytest's captured output; set
    ``DEPRUNE_TEST_SEED`` to replay one."""
    import os

    replay = os.environ.get("DEPRUNE_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little") & (2**31 - 1)
    print(f"seed={seed} (replay with DEPRUNE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters (in place), so BN folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


# A child Python prints this first (flushed, so it survives a crash); the parent checks it against its own
# `package_line()`: both ran the same timm_deprune with the same native backend (a child that put a bare src/ on its
# path would import a package without the built _C and silently test the dense fallback).
PACKAGE_PROBE = ("import timm_deprune, timm_deprune.kernels.backend as _backend; print('timm_deprune at',"
                 " timm_deprune.__file__, 'native', _backend.backend_available(), flush=True)")


def package_line() -> str:
    """The line ``PACKAGE_PROBE`` prints in this process."""
    import timm_deprune
    from timm_deprune.kernels.backend import backend_available

    return f"timm_deprune at {timm_deprune.__file__} native {backend_available()}"


def child_env(*paths, **overrides: str) -> dict:
    """This process's environment for a child Python: PYTHONPATH gains only ``paths`` (test helpers), so the child
    imports timm_deprune from where this process did; ``overrides`` are set last."""
    import os

    env = dict(os.environ)
    parts = [str(p) for p in paths] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(overrides)
    return env


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``timm_deprune.cli.main(argv)`` in-process with stdout and stderr captured: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from timm_deprune import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int = 1) -> None:
    """The CLI failed with ``exit_code`` and exactly one ``timm-deprune: error: ...`` line naming every needle."""
    assert code == exit_code, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert err.startswith("timm-deprune: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
