"""Tables and plots of ``benchmark.py model`` results (split out so each script file stays small)."""
from __future__ import annotations

import sys


MODEL_VARIANTS = {
    # key: (label, pruned?) -- order is the order of the table and the plot
    "dense_nchw": "dense eager NCHW",
    "dense_cl": "dense eager channels_last",
    "dense_compile": "dense torch.compile (channels_last)",
    "dense_compile_freeze": "dense torch.compile, freezing (channels_last)",
    "dense_ort": "dense ONNX Runtime",
    "masked_dense": "DEPrune-BH masked dense eager",
    "ours_element": "DEPrune-BH optimised, element masks, PyTorch 1x1 convs (native_blocks=False)",
    "ours_block": "DEPrune-BH block:8 optimised, channels_last, PyTorch 1x1 convs (native_blocks=False)",
    "ours_block_compile": "DEPrune-BH block:8 optimised + torch.compile (native_blocks=False)",
    "ours_block_compile_freeze": "DEPrune-BH block:8 optimised + torch.compile, freezing (native_blocks=False)",
    "ours_native": "DEPrune-BH optimised, element masks, native blocks (ours, default)",
    "ours_native_block": "DEPrune-BH block:8 optimised, native blocks (ours)",
    "pruned_ort": "DEPrune-BH block:8 pruned-dense ONNX Runtime",
    "tp_ort": "Torch-Pruning channel-pruned at DEPrune-BH's MACs, ONNX Runtime",
}


def best_eager(ms: dict) -> float:
    """The reference of every ratio: the faster dense eager layout that was measured."""
    return min(ms[k] for k in ("dense_nchw", "dense_cl") if k in ms)


def model_markdown(results: dict) -> str:
    lines = []
    for row in results["rows"]:
        ms = row["ms"]
        eager = best_eager(ms)
        lines.append(f"\n{row['model']}, batch {row['batch']}\n")
        lines.append("| variant | ms | vs best dense eager | ours (native, element masks) vs this |")
        lines.append("|---|---:|---:|---:|")
        ours = ms.get("ours_native")
        for k, v in ms.items():
            rel = f"{v / ours:.2f}x" if ours else "-"
            lines.append(f"| {MODEL_VARIANTS[k]} | {v:.2f} | {eager / v:.2f}x | {rel} |")
    return "\n".join(lines)


def plot_model(results: dict, path: str) -> None:
    """Bar chart: speed-up of every variant over the best dense eager layout, one group per (model, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    keys = [k for k in MODEL_VARIANTS if any(k in r["ms"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(rows)), 6.5))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [best_eager(r["ms"]) / r["ms"][k] if k in r["ms"] else 0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=MODEL_VARIANTS[k], color=plt.cm.tab20(i),
               hatch="//" if k.startswith(("ours", "masked")) or k in ("pruned_ort", "tp_ort") else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']}\nbatch {r['batch']}" for r in rows], fontsize=8)
    ax.set_ylabel("speed-up vs best dense eager (higher is faster)")
    ax.set_title(results["header"].lstrip("# "), fontsize=7)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.0) * 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)
