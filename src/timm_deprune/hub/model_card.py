"""The README.md model card of a pruned model: what it is, how it was pruned, what it costs, how to load it."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..pruning.plan import PrunePlan

__all__ = ["model_card", "method_name", "config_summary"]


def _yaml_list(items) -> str:
    return "".join(f"\n- {i}" for i in items)


def model_card(model: nn.Module, plan: PrunePlan, card: Mapping[str, Any]) -> str:
    """Markdown with Hub metadata (tags ``timm``, ``deprune``, ``pruning``; ``base_model`` when known)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = plan.arch or cfg.get("architecture", type(model).__name__)
    conf = plan.config
    base_model = card.get("base_model")
    meta = ["---", "library_name: timm", f"license: {card.get('license', cfg.get('license') or 'apache-2.0')}",
            "tags:" + _yaml_list(["timm", "deprune", "pruning", "image-classification"]),
            "pipeline_tag: image-classification"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    lines = meta + ["", f"# {arch} pruned with {method_name(conf)}", ""]
    lines += [
        f"Depth-wise separable convolutions of `{arch}` pruned with DEPrune (NeurIPS 2024) by"
        " [timm-deprune](https://github.com/timm-deprune/timm-deprune): depth-wise taps pruned element-wise"
        " (DCP)" + (", balanced per 32-channel group (BWT)" if conf.get("balance") else "")
        + (f", pruned counts aligned to {conf.get('tile')}-tap tiles ({conf.get('align')}, HSR)"
           if conf.get("align") not in (None, "none") else "")
        + ("; block-internal point-wise filters pruned by l2-norm" if plan.pw else "") + ".",
        "",
        f"- Base weights: {card.get('base_weights', 'not recorded')}" + (f" (`{base_model}`)" if base_model else ""),
        f"- Config: `{config_summary(conf)}`",
        f"- Plan format version {plan.format_version}; masks in `deprune_masks.safetensors` (uint8 per layer)",
        "",
    ]
    stats = plan.extra.get("stats", {})
    if stats:
        lines += ["## Cost", "", "| | before | after |", "|---|---:|---:|",
                  f"| MACs (input {stats.get('input_size')}) | {stats['macs_before'] / 1e6:.1f}M |"
                  f" {stats['macs_after'] / 1e6:.1f}M |",
                  f"| params (non-zero) | {stats['params_before'] / 1e6:.3f}M | {stats['params_after'] / 1e6:.3f}M |",
                  f"| time to decide all masks | | {stats.get('decide_seconds', 0) * 1e3:.1f} ms |", ""]
    acc, lat = card.get("accuracy"), card.get("latency")
    lines += ["## Accuracy and latency", ""]
    if acc:
        lines += [f"- {k}: {v}" for k, v in acc.items()]
    else:
        lines.append("- Accuracy: not measured for this upload.")
    if lat:
        lines += [f"- {k}: {v}" for k, v in lat.items()]
    else:
        lines.append("- Latency: not measured for this upload.")
    lines += ["", "## Per-layer sparsity", "", "| layer | kind | channels | target PR | achieved PR | min group PR |"
              " max group PR | aligned |", "|---|---|---:|---:|---:|---:|---:|:-:|"]
    for d in plan.dw:
        lines.append(f"| `{d.path}` | dw {d.kernel_size[0]}x{d.kernel_size[1]} | {d.channels} | {d.target_ratio:.2f} |"
                     f" {d.achieved_ratio:.3f} | {d.min_group_ratio:.3f} | {d.max_group_ratio:.3f} |"
                     f" {'yes' if d.aligned else 'no'} |")
    for p in plan.pw:
        lines.append(f"| `{p.producer}` | pw | {p.channels_before} -> {p.channels} | {p.target_ratio:.2f} |"
                     f" {1 - p.channels / p.channels_before:.3f} | | | |")
    lines += ["", "## How to load", "", "```python", "import timm, timm_deprune  # importing registers the loader",
              "", 'model = timm.create_model("hf-hub:REPO_ID", pretrained=True).eval()',
              "# or: timm_deprune.from_pretrained(\"REPO_ID\")  /  timm.create_model(\"local-dir:/path\", pretrained=True)",
              "```", "", "In eval mode the depth-wise layers run timm-deprune's sparse kernels (CPU, CUDA).", ""]
    return "\n".join(lines)


def method_name(conf: Mapping) -> str:
    if conf.get("balance") and conf.get("align") not in (None, "none"):
        return "DEPrune-BH"
    return "DEPrune-B" if conf.get("balance") else "DEPrune"


def config_summary(conf: Mapping) -> str:
    keys = ("dw_ratio", "pw_ratio", "balance", "align", "tile", "group", "pw_tile", "importance", "remove_dead",
            "granularity")
    return ", ".join(f"{k}={conf[k]!r}" for k in keys if k in conf)
