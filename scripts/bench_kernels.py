"""``benchmark.py kernels``: the point-wise GEMMs and single blocks of a network, per shape.

Point-wise: every 1x1 conv shape of the model (squeeze-excite's pooled 1x1 convs excluded) as our packed SGEMM
(``_C.PackedGemm``, NHWC rows), PyTorch's oneDNN conv with a prepacked weight (``ConvAct2d``, what
``optimize_for_inference`` runs without native blocks) and ONNX Runtime (a one-node Conv model), in GFLOP/s and as
a share of peak: ``torch.mm`` of 2048x2048 fp32 measured in the same run. Blocks: each DSConv block of the
DEPrune-BH pruned model, native block vs the same block on PyTorch ops (``native_blocks=False``). Interleaved
like ``model``: a 50 ms pause and one untimed call before each timed group; medians.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(variants: dict, repeats: int, target_s: float = 5e-3) -> dict:
    """Median seconds per call of each variant, rounds interleaved, pause + untimed call before each group."""
    for fn in variants.values():
        fn()
    inner = {k: max(1, int(target_s / max(_time(fn, 1), 1e-7))) for k, fn in variants.items()}
    samples = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            time.sleep(0.05)
            fn()
            samples[k].append(_time(fn, inner[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = interleaved({"mm": lambda: torch.mm(a, b)}, repeats, 0.05)["mm"]
    return 2 * 2048 ** 3 / t / 1e9


def pointwise_shapes(model_name: str, size: int = 224) -> list[tuple[int, int, int, int]]:
    """(H, W, K, N) of every distinct 1x1 conv with a spatial input > 1x1, in execution order."""
    import timm

    model = timm.create_model(model_name).eval()
    shapes: list = []

    def hook(m, inputs, _out):
        _, k, h, w = inputs[0].shape
        if h * w > 1 and (h, w, k, m.out_channels) not in shapes:
            shapes.append((h, w, k, m.out_channels))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return shapes


def _ort_conv(k: int, n: int, weight: torch.Tensor, bias: torch.Tensor, tmp: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from timm_deprune.inference.export import ort_session

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1])], "pw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n, "h", "w"])],
        [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = f"{tmp}/pw_{k}_{n}.onnx"
    onnx.save(model, path)
    return ort_session(path)


def run_pointwise(args, peak: float) -> list[dict]:
    from timm_deprune.inference.modules import ConvAct2d
    from timm_deprune.kernels.backend import load_extension

    C = load_extension()
    rows = []
    tmp = tempfile.TemporaryDirectory()
    print("| batch | HxW | K | N | M rows | ours GFLOP/s (% peak) | oneDNN (torch) | ONNX Runtime | ours vs oneDNN |"
          " ours vs ORT |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h, w, k, n in pointwise_shapes(args.model):
        weight, bias = torch.randn(n, k, 1, 1) * k ** -0.5, torch.randn(n)
        conv = ConvAct2d(k, n, 1).eval()
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        packed = C.PackedGemm(weight.numpy(), bias.numpy())
        try:
            session = _ort_conv(k, n, weight, bias, tmp.name)
        except ImportError:
            session = None
        for batch in args.batch:
            x = torch.randn(batch, k, h, w)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            rows_in = x_cl.permute(0, 2, 3, 1).reshape(-1, k).numpy()
            out = torch.empty(batch * h * w, n).numpy()
            threads = torch.get_num_threads()
            variants = {"ours": lambda: packed.run(rows_in, out, 0, None, threads),
                        "onednn": lambda: conv(x_cl)}
            if session is not None:
                x_np = x.numpy()
                variants["ort"] = lambda: session.run(None, {"x": x_np})
            with torch.no_grad():
                t = interleaved(variants, args.repeats)
            flops = 2 * batch * h * w * k * n
            g = {key: flops / v / 1e9 for key, v in t.items()}
            ort = f"{g['ort']:.1f} ({g['ort'] / peak:.0%})" if "ort" in g else "-"
            ratio_ort = f"{t['ort'] / t['ours']:.2f}x" if "ort" in t else "-"
            print(f"| {batch} | {h}x{w} | {k} | {n} | {batch * h * w} | {g['ours']:.1f} ({g['ours'] / peak:.0%}) |"
                  f" {g['onednn']:.1f} ({g['onednn'] / peak:.0%}) | {ort} | {t['onednn'] / t['ours']:.2f}x |"
                  f" {ratio_ort} |", flush=True)
            rows.append({"batch": batch, "shape": [h, w, k, n], "gflops": g})
    tmp.cleanup()
    return rows


def run_blocks(args) -> list[dict]:
    import timm

    from timm_deprune import DepruneConfig, optimize_for_inference, prune
    from timm_deprune.inference.native import NATIVE_BLOCK_TYPES

    dense = timm.create_model(args.model).eval()
    pruned = prune(dense, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio)).model.eval()
    native = optimize_for_inference(pruned)
    plain = optimize_for_inference(pruned, native_blocks=False)
    paths = [p for p, m in native.named_modules() if type(m) in NATIVE_BLOCK_TYPES.values()]
    rows = []
    print("\n| batch | block | input | native ms | PyTorch ops ms | native speed-up |")
    print("|---:|---|---|---:|---:|---:|")
    for batch in args.batch:
        inputs = {}
        hooks = [plain.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: inputs.__setitem__(p, a[0].clone())) for p in paths]
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            plain(x)
        for hk in hooks:
            hk.remove()
        total = {"native": 0.0, "torch": 0.0}
        for p in paths:
            xi = inputs[p]
            a, b = native.get_submodule(p), plain.get_submodule(p)
            with torch.no_grad():
                t = interleaved({"native": lambda: a(xi), "torch": lambda: b(xi)}, args.repeats)
            for key in total:
                total[key] += t[key]
            print(f"| {batch} | {p} | {list(xi.shape)} | {t['native'] * 1e3:.3f} | {t['torch'] * 1e3:.3f} |"
                  f" {t['torch'] / t['native']:.2f}x |", flush=True)
            rows.append({"batch": batch, "block": p, "ms": {k: v * 1e3 for k, v in t.items()}})
        print(f"| {batch} | all blocks | | {total['native'] * 1e3:.2f} | {total['torch'] * 1e3:.2f} |"
              f" {total['torch'] / total['native']:.2f}x |", flush=True)
    return rows


def run_kernels(args) -> None:
    torch.set_grad_enabled(False)
    peak = peak_gflops(args.repeats)
    print(f"# kernels: {args.model}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__};"
          f" peak = torch.mm 2048x2048 = {peak:.1f} GFLOP/s; medians of {args.repeats} interleaved rounds")
    if "pointwise" in args.parts:
        run_pointwise(args, peak)
    if "blocks" in args.parts:
        run_blocks(args)
    print(f"# peak again after the run: {peak_gflops(args.repeats):.1f} GFLOP/s", file=sys.stderr)


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="point-wise GEMMs (GFLOP/s vs oneDNN, ORT, peak) and single blocks")
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--dw-ratio", type=float, default=0.71)
    p.add_argument("--pw-ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--parts", nargs="+", choices=("pointwise", "blocks"), default=["pointwise", "blocks"])
    p.set_defaults(fn=run_kernels)
