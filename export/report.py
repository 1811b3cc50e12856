"""Compression report: a markdown card and an accuracy-versus-latency plot per model version,
and a summary table over the repository. Everything is rendered from the manifest alone, so the
build (before publishing) and ``python -m export report`` (afterwards) write the same card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.core.repository import Manifest

from .selection import LOWER_IS_BETTER

__all__ = ["CARD_FILE", "PLOT_FILE", "card", "plot", "summary", "write_card"]

CARD_FILE = "card.md"
PLOT_FILE = "accuracy_latency.png"


def _metric(m: dict[str, Any] | None, key: str) -> str:
    if not m or key not in m.get("metrics", {}):
        return "-"
    return f"{m['metrics'][key]:.4g}"


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


def _measured(manifest: Manifest, variant: str) -> dict[str, Any] | None:
    return manifest.variants[variant].details.get("measurement")


def card(manifest: Manifest) -> str:
    """The model's compression card (markdown)."""
    sel = manifest.selection
    metric = manifest.headline_metric or "-"
    fp32 = _measured(manifest, "fp32")
    lines = [
        f"# {manifest.name}: variants",
        "",
        f"Default variant: **{manifest.default_variant}**. {sel.get('reason', '')}",
        "",
    ]
    if sel:
        budget = sel.get("budget", {})
        cond = sel.get("conditions", {})
        lines += [
            f"Accuracy budget: {metric} may drop at most "
            f"{budget.get('max_accuracy_drop', 0) * 100:.1f} points (higher-is-better metrics) "
            f"or rise at most {budget.get('max_error_increase', 0):.0%} (errors); a variant must "
            f"be at least {budget.get('min_speedup', 1):.2f}x FP32 at batch 32 to replace it.",
            f"Measured in one run on {cond.get('provider', '?')}, {cond.get('intra_op_threads')} "
            f"intra-op thread(s), variants interleaved after warm-up; test split of "
            f"{cond.get('test_rows', '?')} rows. Speed is FP32 p50 latency / variant p50 latency.",
            "",
        ]
    header = (
        f"| variant | {metric} | label agreement | max abs diff | size | parameters "
        "| p50 batch 1 | p50 batch 32 | speed batch 1 | speed batch 32 | within budget |"
    )
    lines += [header, "|" + "---|" * 11]
    skipped = []
    for name, variant in manifest.variants.items():
        m = variant.details.get("measurement")
        if m is None:
            skipped.append((name, variant.reason or "not measured"))
            continue
        lat, speed = m["latency"], m["speedup"]
        agreement = m.get("label_agreement")
        diff = m.get("max_abs_diff")
        verdict = sel.get("verdicts", {}).get(name, {})
        mark = "**default**" if name == manifest.default_variant else ""
        lines.append(
            f"| {name} {mark} | {_metric(m, metric)} | "
            f"{'-' if agreement is None else f'{agreement:.2%}'} | "
            f"{'-' if diff is None else f'{diff:.2g}'} | {_kib(m['size_bytes'])} | "
            f"{m['parameters']:,} | {lat['1']['p50_us']:.0f} us | {lat['32']['p50_us']:.0f} us | "
            f"{speed['1']:.2f}x | {speed['32']:.2f}x | "
            f"{'yes' if verdict.get('eligible') else 'no'} |"
        )
    if fp32 is None:
        lines.append("| fp32 | (not measured) |")
    lines += _other_metrics(manifest, metric)
    lines += _baselines(manifest)
    if skipped:
        lines += ["", "Not measured here:", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in skipped]
    lines += _how_made(manifest)
    lines.append("")
    return "\n".join(lines)


def _how_made(manifest: Manifest) -> list[str]:
    """One line per compressed variant: the technique and its settings."""
    lines: list[str] = []
    built = [
        (n, v) for n, v in manifest.variants.items() if n != "fp32" and v.details.get("compression")
    ]
    if built:
        lines += ["", "How each variant was made:", ""]
        for name, v in built:
            c = v.details["compression"]
            extra = ", ".join(
                f"{k}: {c[k]}"
                for k in (
                    "weights",
                    "activations",
                    "calibration",
                    "channels_after",
                    "hidden_after",
                    "parameters_removed",
                    "student",
                    "parameters_fewer",
                    "temperature",
                    "note",
                )
                if k in c
            )
            lines.append(f"- **{name}**: {c.get('technique', '')}. {extra}")
    return lines


def _other_metrics(manifest: Manifest, headline: str) -> list[str]:
    """Every other test metric of each measured variant (cosine to FP32, macro F1, ...)."""
    measured = {
        n: v.details["measurement"]
        for n, v in manifest.variants.items()
        if v.details.get("measurement")
    }
    keys = sorted({k for m in measured.values() for k in m["metrics"]} - {headline})
    if not keys:
        return []
    lines = ["", "Other test metrics:", "", "| variant | " + " | ".join(keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 1))
    for name, m in measured.items():
        lines.append(f"| {name} | " + " | ".join(_metric(m, k) for k in keys) + " |")
    return lines


def _baselines(manifest: Manifest) -> list[str]:
    """Simple methods on the same split, and whether the default variant beats each."""
    if not manifest.baselines:
        return []
    default = _measured(manifest, manifest.default_variant) or {}
    lines = ["", "Baselines on the same split:", ""]
    for name, b in manifest.baselines.items():
        metric, value = b["metric"], float(b["value"])
        ours = default.get("metrics", {}).get(metric, manifest.metrics.get(metric))
        verdict = ""
        if ours is not None:
            beats = ours < value if metric in LOWER_IS_BETTER else ours > value
            verdict = (
                f": the default variant ({ours:.4g}) **{'beats' if beats else 'does not beat'}** it"
            )
        lines.append(f"- **{name}** ({b.get('what', '')}): {metric} {value:.4g}{verdict}")
    return lines


def plot(manifest: Manifest, path: Path) -> bool:
    """Headline metric against batch-32 latency, one point per measured variant."""
    metric = manifest.headline_metric
    points = [
        (name, v.details["measurement"])
        for name, v in manifest.variants.items()
        if v.details.get("measurement") and metric in v.details["measurement"]["metrics"]
    ]
    if not points or metric is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, m in points:
        x, y = m["latency"]["32"]["p50_us"], m["metrics"][metric]
        chosen = name == manifest.default_variant
        ax.scatter([x], [y], s=80 if chosen else 40, marker="*" if chosen else "o")
        ax.annotate(
            name + (" (default)" if chosen else ""),
            (x, y),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("p50 latency at batch 32 (us, in-process onnxruntime)")
    ax.set_ylabel(f"{metric} (test split)")
    ax.set_title(f"{manifest.name}: variants")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def write_card(folder: Path, manifest: Manifest) -> list[str]:
    """Write the card (and plot, when there is something to plot) into ``folder``."""
    (folder / CARD_FILE).write_text(card(manifest), encoding="utf-8")
    written = [CARD_FILE]
    if plot(manifest, folder / PLOT_FILE):
        written.append(PLOT_FILE)
    return written


def summary(manifests: list[Manifest]) -> str:
    """One row per model: default variant, its quality and speed against FP32, size ratio."""
    lines = [
        "| model | headline | FP32 | default | default's value | speed batch 32 | speed batch 1 "
        "| size | best INT8 (batch 32, size) | variants measured |",
        "|" + "---|" * 10,
    ]
    for m in manifests:
        metric = m.headline_metric or "-"
        fp32 = _measured(m, "fp32")
        chosen = _measured(m, m.default_variant)
        measured = [n for n in m.variants if _measured(m, n)]
        if fp32 is None or chosen is None:
            lines.append(
                f"| {m.name} | {metric} | - | {m.default_variant} | - | - | - | - | - | - |"
            )
            continue
        size = fp32["size_bytes"] / chosen["size_bytes"]
        int8 = [
            (q["speedup"]["32"], n, q)
            for n in ("int8-dynamic", "int8-static")
            if (q := _measured(m, n)) is not None
        ]
        best = "-"
        if int8:
            speed, name, q = max(int8, key=lambda t: t[0])
            best = (
                f"{name} {speed:.2f}x, {fp32['size_bytes'] / q['size_bytes']:.1f}x smaller, "
                f"{_metric(q, metric)}"
            )
        lines.append(
            f"| {m.name} | {metric} | {_metric(fp32, metric)} | {m.default_variant} | "
            f"{_metric(chosen, metric)} | {chosen['speedup']['32']:.2f}x | "
            f"{chosen['speedup']['1']:.2f}x | {size:.1f}x smaller | {best} | "
            f"{', '.join(measured)} |"
        )
    return "\n".join(lines) + "\n"
