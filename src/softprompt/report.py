"""Comparison reports: a Markdown (and HTML) table, loss curves, bar charts, sample outputs.

Plots are PNG files drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from softprompt import atomic  # noqa: E402

SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "exact_match", "f1", "bleu", "chrf", "token_overlap")
TABLE_KEYS = SCORE_KEYS + ("loss", "empty_rate", "examples_per_s")


@dataclass
class ModelComparison:
    """Everything measured for one base model."""

    model: str
    num_parameters: int
    systems: dict[str, dict[str, float]]  # system name -> metrics
    predictions: dict[str, list[dict[str, Any]]]  # system name -> prediction rows
    train_log: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float | None = None


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
    return path


def plot_losses(log: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss per step, and train/validation loss per epoch."""
    steps = [r for r in log if r["event"] == "step"]
    epochs = [r for r in log if r["event"] == "epoch"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
    ax.plot(xs, ys, color="0.8", lw=1, label="train (step)")
    window = max(1, len(ys) // 20)
    if window > 1:  # a running mean makes the trend readable through batch noise
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                  for i in range(len(ys))]
        ax.plot(xs, smooth, color="0.4", lw=1.5, label=f"train (mean of {window} steps)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-",
                label="train (epoch)")
        val = [r for r in epochs if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "s-",
                    label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target-token loss")
    ax.set_title(title or "soft prompt training")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_validation_metric(log: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """The validation metric after each epoch (if training recorded it)."""
    points = [(r["epoch"], r[f"val_{metric}"]) for r in log
              if r["event"] == "epoch" and f"val_{metric}" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(*zip(*points), "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_xticks([p[0] for p in points])
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(systems: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: each score metric, one bar per system."""
    keys = [k for k in SCORE_KEYS if any(k in m for m in systems.values())]
    names = list(systems)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(keys) + 2), 3.8))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [systems[name].get(k, 0.0) for k in keys], width, label=name)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("score (0-100)")
    ax.set_title("soft vs hard prompts")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_scaling(comparisons: list[ModelComparison], metric: str, path: Path) -> Path:
    """Metric against parameter count, one line per system (does prompt tuning scale?)."""
    comps = sorted(comparisons, key=lambda c: c.num_parameters)
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for name in comps[0].systems:
        ax.plot([c.num_parameters for c in comps], [c.systems[name].get(metric, 0.0)
                                                   for c in comps], "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def metrics_table(systems: dict[str, dict[str, float]]) -> list[list[str]]:
    """Rows of a comparison table, header first."""
    keys = [k for k in TABLE_KEYS if any(k in m for m in systems.values())]
    rows = [["system", *keys]]
    rows += [[name, *(_fmt(m.get(k, "")) for k in keys)] for name, m in systems.items()]
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _samples(comp: ModelComparison, n: int) -> list[dict[str, Any]]:
    first = next(iter(comp.predictions.values()))
    out = []
    for i, row in enumerate(first[:n]):
        out.append({"input": row["input"], "reference": row["references"][0],
                    **{name: preds[i]["prediction"] for name, preds in comp.predictions.items()}})
    return out


def write_report(output_dir: str | Path, task: str, comparisons: list[ModelComparison],
                 primary_metric: str, n_samples: int = 5) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG plots; return the Markdown path."""
    out = Path(output_dir)
    md = [f"# softprompt comparison: {task}", ""]
    body_html = [f"<h1>softprompt comparison: {html.escape(task)}</h1>"]
    for comp in comparisons:
        slug = comp.model.replace("/", "_")
        prefix = f"{slug}-" if len(comparisons) > 1 else ""
        rows = metrics_table(comp.systems)
        images = [plot_bars(comp.systems, out / f"{prefix}bars.png")]
        if comp.train_log:
            images.append(plot_losses(comp.train_log, out / f"{prefix}loss.png", comp.model))
            val = plot_validation_metric(comp.train_log, primary_metric,
                                         out / f"{prefix}val_{primary_metric}.png")
            if val:
                images.append(val)
        md += [f"## {comp.model} ({comp.num_parameters / 1e6:.1f}M parameters)", "",
               markdown_table(rows), ""]
        if comp.train_seconds is not None:
            md += [f"Soft prompt training time: {comp.train_seconds:.1f} s.", ""]
        md += [f"![{p.stem}]({p.name})" for p in images] + [""]
        samples = _samples(comp, n_samples)
        md += ["### Sample outputs", ""]
        for s in samples:
            md += [f"**Input:** {s['input']!r}", "", f"- reference: {s['reference']!r}"]
            md += [f"- {name}: {s[name]!r}" for name in comp.predictions]
            md.append("")
        body_html.append(f"<h2>{html.escape(comp.model)}</h2><table border=1 cellpadding=4>")
        for i, r in enumerate(rows):
            tag = "th" if i == 0 else "td"
            body_html.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)
                             + "</tr>")
        body_html.append("</table>")
        body_html += [f'<img src="{p.name}" alt="{p.stem}">' for p in images]
    if len(comparisons) > 1:
        scaling = plot_scaling(comparisons, primary_metric, out / "scaling.png")
        md += ["## Scaling with model size", "", f"![scaling]({scaling.name})", ""]
        body_html.append(f'<h2>Scaling</h2><img src="{scaling.name}" alt="scaling">')
    path = out / "report.md"
    atomic.write_text(path, "\n".join(md) + "\n")
    atomic.write_text(out / "report.html", "<!doctype html><meta charset=utf-8><body>"
                      + "\n".join(body_html) + "</body>")
    return path
