"""deprune::sparse_dwconv2d as a registered custom op: schema, fake kernel, torch.compile and torch.export."""
from __future__ import annotations

import pytest
import torch

from timm_deprune.pruning.select import balanced_magnitude_mask
from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.kernels.activations import ACTIVATIONS


class SparseDW(torch.nn.Module):
    """Minimal module calling the op, as the pruned layers do."""

    def __init__(self, channels: int, stride: int = 1, padding="same", activation: str = "silu"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, 1, 3, 3), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(channels), requires_grad=False)
        self.plan = build_plan(self.weight, balanced_magnitude_mask(self.weight.data, 0.29))
        self.stride, self.padding, self.activation = stride, padding, activation

    def forward(self, x):
        return sparse_dwconv2d(x, self.plan, self.bias, self.activation, self.stride, self.padding)


def _op_args(plan, x, bias):
    return (x, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values, bias,
            3, 3, [2, 2], [0, 1, 0, 1], [1, 1], ACTIVATIONS["relu6"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_schema_and_fake_kernel(channels_last):
    weight = torch.randn(16, 1, 3, 3)
    plan = build_plan(weight, torch.rand(16, 3, 3) > 0.5)
    x = torch.randn(2, 16, 9, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.deprune.sparse_dwconv2d.default, _op_args(plan, x, torch.randn(16)),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_fullgraph_matches_eager(channels_last):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 1), SparseDW(24, stride=2), torch.nn.Conv2d(24, 8, 1)).eval()
    x = torch.randn(2, 8, 17, 15)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        got = compiled(x)
        got2 = compiled(torch.randn(3, 8, 11, 12))  # a new shape: recompiles, still one graph
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got2.shape == (3, 8, 6, 6)


def test_torch_export_keeps_the_custom_op():
    model = SparseDW(16, stride=1, padding=1, activation="hardswish").eval()
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "deprune.sparse_dwconv2d.default" in targets, targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_registered_op_equals_eager_fast_path():
    weight = torch.randn(16, 1, 3, 3)
    plan = build_plan(weight, torch.rand(16, 3, 3) > 0.5)
    x, bias = torch.randn(2, 16, 9, 10), torch.randn(16)
    with torch.no_grad():
        via_dispatcher = torch.ops.deprune.sparse_dwconv2d(*_op_args(plan, x, bias))
        eager = sparse_dwconv2d(x, plan, bias, "relu6", 2, (0, 1, 0, 1))
    assert torch.equal(via_dispatcher, eager)
