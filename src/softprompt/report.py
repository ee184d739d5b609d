"""Comparison reports: ``report.md`` and a self-contained ``report.html`` (inline style,
every figure embedded) with the run's settings, the metric table (best value per metric
highlighted, mean ± std over seeds), the soft prompt's margins with their bootstrap intervals,
the learning curve, loss curves, bar charts and sample outputs beside the reference.

Plots are PNG files drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict, dataclass, field
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
    train_seconds: float | None = None  # mean over seeds
    spread: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> metric -> std
    seeds: list[int] = field(default_factory=lambda: [0])
    seed_metrics: list[dict[str, Any]] = field(default_factory=list)  # the soft prompt per seed
    intervals: list[dict[str, Any]] = field(default_factory=list)  # soft - each hard system
    curve: list[dict[str, Any]] = field(default_factory=list)  # learning-curve points

    def to_dict(self) -> dict[str, Any]:
        """Everything but the prediction rows (they are in ``systems/``)."""
        data = asdict(self)
        data.pop("predictions")
        data.pop("train_log")
        return data


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


def plot_intervals(intervals: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Soft prompt minus each hard prompt on the primary metric, with its 95% interval."""
    rows = list(reversed(intervals))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.4))
    for y, r in enumerate(rows):
        color = "tab:green" if r["significant"] and r["estimate"] > 0 else (
            "tab:red" if r["significant"] else "0.5")
        ax.plot([r["low"], r["high"]], [y, y], color=color, lw=2.5)
        ax.plot([r["estimate"]], [y], "o", color=color, ms=7 if r["best"] else 5)
    ax.axvline(0, color="0.3", lw=1, ls="--")
    labels = [f"{r['system']}{' (best hard)' if r['best'] else ''}"
              f"{'' if r['significant'] else '  n.s.'}" for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    metric = rows[0]["metric"] if rows else ""
    ax.set_xlabel(f"soft prompt − hard prompt, {metric} "
                  f"({100 * rows[0]['level']:.0f}% paired bootstrap CI)" if rows else "")
    ax.set_title(title or "soft prompt margin")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def hard_lines(systems: dict[str, dict[str, float]], metric: str,
               soft: str = "soft prompt") -> list[tuple[str, float]]:
    """The learning curve's horizontal lines: the best zero-shot hard prompt and the best
    K-shot one for each K (systems whose metrics carry ``shots``)."""
    groups: dict[int, list[tuple[float, str]]] = {}
    for name, m in systems.items():
        if name != soft and metric in m:
            groups.setdefault(int(m.get("shots", 0)), []).append((m[metric], name))
    return [(name, value) for _, (value, name) in
            sorted((k, max(group)) for k, group in groups.items())]


def plot_learning_curve(curve: list[dict[str, Any]], systems: dict[str, dict[str, float]],
                        metric: str, path: Path, title: str = "") -> Path:
    """The soft prompt's metric (mean ± std over seeds) against its training examples, the
    zero- and few-shot hard prompts as horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [p["train_examples"] for p in curve]
    ax.errorbar(xs, [p["mean"] for p in curve], yerr=[p["std"] for p in curve], fmt="o-",
                capsize=4, lw=2, label=f"soft prompt (mean ± std, {len(curve[0]['seeds'])} "
                                         f"seed{'s' if len(curve[0]['seeds']) > 1 else ''})")
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for i, (name, value) in enumerate(hard_lines(systems, metric)):
        ax.axhline(value, ls=styles[i % len(styles)], color=f"C{i + 1}", label=name)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("training examples")
    ax.set_ylabel(metric)
    ax.set_title(title or "learning curve")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --- tables -----------------------------------------------------------------------------------

LOWER_IS_BETTER = ("loss", "empty_rate")
HIGHLIGHT_KEYS = SCORE_KEYS + LOWER_IS_BETTER


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _keys(systems: dict[str, dict[str, float]]) -> list[str]:
    return [k for k in TABLE_KEYS if any(k in m for m in systems.values())]


def best_systems(systems: dict[str, dict[str, float]]) -> dict[str, set[str]]:
    """Per metric, the system(s) with the best value (lowest loss/empty rate, else highest)."""
    best = {}
    for key in _keys(systems):
        if key not in HIGHLIGHT_KEYS:
            continue
        values = {n: m[key] for n, m in systems.items() if isinstance(m.get(key), (int, float))}
        if values:
            top = (min if key in LOWER_IS_BETTER else max)(values.values())
            best[key] = {n for n, v in values.items() if v == top}
    return best


def metrics_table(systems: dict[str, dict[str, float]],
                  spread: dict[str, dict[str, float]] | None = None) -> list[list[str]]:
    """Rows of a comparison table, header first; ``mean ± std`` where ``spread`` has one."""
    keys = _keys(systems)
    rows = [["system", *keys]]
    for name, m in systems.items():
        std = (spread or {}).get(name, {})
        rows.append([name, *(_fmt(m.get(k, "")) + (f" ± {std[k]:.2f}" if k in std else "")
                             for k in keys)])
    return rows


def markdown_table(rows: list[list[str]], bold: dict[str, set[str]] | None = None) -> str:
    """A Markdown table; ``bold`` (column -> row names) marks cells in bold."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows[1:]:
        cells = [f"**{c}**" if r[0] in (bold or {}).get(key, ()) and c else c
                 for key, c in zip(rows[0], r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margin_sentence(interval: dict[str, Any]) -> str:
    """``soft prompt - hard: ours (rougeL): +3.20, 95% CI [+1.10, +5.30], significant``."""
    verdict = "significant" if interval["significant"] else "not significant (CI contains 0)"
    return (f"soft prompt - {interval['system']} ({interval['metric']}): "
            f"{interval['estimate']:+.2f}, {100 * interval['level']:.0f}% CI "
            f"[{interval['low']:+.2f}, {interval['high']:+.2f}], {verdict}")


def shots_sentence(systems: dict[str, dict[str, float]]) -> list[str]:
    """How many demonstrations each few-shot system fitted."""
    return [f"{name}: {m['shots_mean']:.2f} of {int(m['shots'])} demonstrations per example "
            f"on average; all {int(m['shots'])} fitted for {m['shots_all_rate']:.0f}% of the "
            f"examples" for name, m in systems.items() if "shots_mean" in m]


def _sample_name(comp: ModelComparison, name: str) -> str:
    """A system's name beside a sample output (the soft prompt's first seed, of several)."""
    return f"{name} (seed {comp.seeds[0]})" if name in comp.spread else name


def _samples(comp: ModelComparison, n: int) -> list[dict[str, Any]]:
    first = next(iter(comp.predictions.values()))
    out = []
    for i, row in enumerate(first[:n]):
        out.append({"input": row["input"], "reference": row["references"][0],
                    **{name: preds[i]["prediction"] for name, preds in comp.predictions.items()}})
    return out


def _seed_text(comp: ModelComparison) -> str:
    if len(comp.seeds) < 2:
        return ""
    return (f"The soft prompt row is the mean ± sample std over {len(comp.seeds)} training "
            f"seeds ({', '.join(map(str, comp.seeds))}); the hard prompts are deterministic "
            f"(greedy decoding, fixed demonstrations): no spread.")


SETTING_LABELS = {
    "task": "task", "models": "model(s)", "data": "data files", "split_sizes": "split sizes",
    "method": "method", "prompt": "trained prompt given",
    "num_virtual_tokens": "P (virtual tokens)",
    "init": "init", "epochs": "epochs", "lr": "learning rate", "batch_size": "batch size",
    "max_length": "max length", "seeds": "seeds", "shots": "shots (K)",
    "shots_seed": "shots seed", "train_sizes": "learning-curve sizes", "decoding": "decoding",
    "max_new_tokens": "max new tokens", "commit": "commit", "started": "started",
    "finished": "finished", "seconds": "run time (s)",
}


def _setting_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items() if v is not None) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _settings_rows(settings: dict[str, Any]) -> list[tuple[str, str]]:
    return [(SETTING_LABELS.get(k, k), _setting_value(v)) for k, v in settings.items()
            if k in SETTING_LABELS and v not in (None, [], "")]


# --- the report -------------------------------------------------------------------------------


def write_report(output_dir: str | Path, task: str, comparisons: list[ModelComparison],
                 primary_metric: str, n_samples: int = 5,
                 settings: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG plots; return the Markdown path."""
    out = Path(output_dir)
    md = [f"# softprompt comparison: {task}", ""]
    page = _Html(f"softprompt comparison: {task}")
    if settings:
        md += ["## Settings", "", "| setting | value |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in _settings_rows(settings)] + [""]
        page.settings(_settings_rows(settings))
    for comp in comparisons:
        slug = comp.model.replace("/", "_")
        prefix = f"{slug}-" if len(comparisons) > 1 else ""
        rows = metrics_table(comp.systems, comp.spread)
        best = best_systems(comp.systems)
        figures: list[tuple[Path, str]] = []
        if comp.intervals:
            figures.append((plot_intervals(comp.intervals, out / f"{prefix}intervals.png",
                                           comp.model),
                            "soft prompt minus each hard prompt, 95% paired bootstrap CI"))
        if comp.curve:
            figures.append((plot_learning_curve(comp.curve, comp.systems, primary_metric,
                                                out / f"{prefix}learning_curve.png",
                                                comp.model), "learning curve"))
        figures.append((plot_bars(comp.systems, out / f"{prefix}bars.png"), "all scores"))
        if comp.train_log:
            figures.append((plot_losses(comp.train_log, out / f"{prefix}loss.png", comp.model),
                            "training loss"))
            val = plot_validation_metric(comp.train_log, primary_metric,
                                         out / f"{prefix}val_{primary_metric}.png")
            if val:
                figures.append((val, f"validation {primary_metric} per epoch"))
        notes = [_seed_text(comp)] if _seed_text(comp) else []
        if comp.train_seconds is not None:
            notes.append(f"Soft prompt training time: {comp.train_seconds:.1f} s"
                         + (" (mean over seeds)." if len(comp.seeds) > 1 else "."))
        notes += [s + "." for s in shots_sentence(comp.systems)]
        margins = [margin_sentence(i) + ("  ← best hard prompt" if i["best"] else "")
                   for i in comp.intervals]
        md += [f"## {comp.model} ({comp.num_parameters / 1e6:.1f}M parameters)", "",
               markdown_table(rows, best), "", "Best value per metric in bold.", ""]
        md += [n for note in notes for n in (note, "")]
        if margins:
            md += [f"### Margins on {primary_metric} (paired bootstrap, "
                   f"{comp.intervals[0]['resamples']} resamples of the test examples, seed "
                   f"{comp.intervals[0]['seed']})", ""] + [f"- {m}" for m in margins] + [""]
        if comp.curve:
            md += ["### Learning curve", "", f"| training examples | {primary_metric} mean | "
                   "std | per seed |", "|---|---|---|---|"]
            md += [f"| {p['train_examples']} | {p['mean']:.2f} | {p['std']:.2f} | "
                   + ", ".join(f"{v:.2f}" for v in p["values"]) + " |" for p in comp.curve]
            md += [""]
        md += [f"![{p.stem}]({p.name})" for p, _ in figures] + [""]
        samples = _samples(comp, n_samples)
        md += ["### Sample outputs", ""]
        for s in samples:
            md += [f"**Input:** {s['input']!r}", "", f"- reference: {s['reference']!r}"]
            md += [f"- {_sample_name(comp, name)}: {s[name]!r}" for name in comp.predictions]
            md.append("")
        page.model(comp, rows, best, notes, margins, primary_metric, figures,
                   samples, n_samples)
    if len(comparisons) > 1:
        scaling = plot_scaling(comparisons, primary_metric, out / "scaling.png")
        md += ["## Scaling with model size", "", f"![scaling]({scaling.name})", ""]
        page.figure_section("Scaling with model size", [(scaling, "scaling")])
    path = out / "report.md"
    atomic.write_text(path, "\n".join(md) + "\n")
    atomic.write_text(out / "report.html", page.render())
    return path


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
  background:#f6f8fa;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;
  box-shadow:0 0 0 1px #d0d7de}
h1{font-size:26px;margin:8px 0 16px}h2{font-size:21px;margin:36px 0 10px;
  border-bottom:1px solid #d0d7de;padding-bottom:4px}h3{font-size:17px;margin:24px 0 8px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:5px 9px;text-align:right;vertical-align:top}
th{background:#f0f3f6}td:first-child,th:first-child{text-align:left;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}
td.best{background:#dafbe1 !important;font-weight:700;color:#116329}
.settings td{text-align:left}.settings td:first-child{color:#57606a}
.note{color:#57606a;margin:4px 0}.margins li{margin:2px 0}
.ns{color:#9a6700}.sig{color:#116329}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figure img{max-width:560px;border:1px solid #d0d7de}
figcaption{font-size:13px;color:#57606a}
.sample{margin:14px 0 22px}.sample pre{white-space:pre-wrap;background:#f6f8fa;
  border:1px solid #d0d7de;padding:8px;max-height:180px;overflow:auto;font-size:13px;margin:4px 0}
.outputs{width:100%}.outputs td{text-align:left;white-space:pre-wrap}
.outputs td:nth-child(2){width:75%}.outputs tr.ref td{background:#ddf4ff}
.outputs td.score{text-align:right;white-space:nowrap;color:#57606a}
"""


class _Html:
    """The HTML page, section by section (every image inlined as a data URI)."""

    def __init__(self, title: str):
        self.title = title
        self.parts = [f"<h1>{html.escape(title)}</h1>"]

    def settings(self, rows: list[tuple[str, str]]) -> None:
        self.parts.append('<h2>Settings</h2><table class="settings" id="settings">' + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
            + "</table>")

    def table(self, rows: list[list[str]], best: dict[str, set[str]]) -> None:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = []
        for r in rows[1:]:
            cells = [f"<td>{html.escape(r[0])}</td>"]
            for key, c in zip(rows[0][1:], r[1:]):
                mark = ' class="best"' if r[0] in best.get(key, ()) and c else ""
                cells.append(f"<td{mark}>{html.escape(c)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.parts.append(f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>'
                          '<p class="note">Best value per metric highlighted.</p>')

    def figures(self, figures: list[tuple[Path, str]]) -> None:
        for path, caption in figures:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            self.parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                              f'alt="{html.escape(path.stem)}"><figcaption>'
                              f"{html.escape(caption)}</figcaption></figure>")

    def figure_section(self, title: str, figures: list[tuple[Path, str]]) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")
        self.figures(figures)

    def model(self, comp: ModelComparison, rows: list[list[str]], best: dict[str, set[str]],
              notes: list[str], margins: list[str], metric: str,
              figures: list[tuple[Path, str]], samples: list[dict[str, Any]],
              n_samples: int) -> None:
        self.parts.append(f"<h2>{html.escape(comp.model)} "
                          f"({comp.num_parameters / 1e6:.1f}M parameters)</h2>")
        self.table(rows, best)
        self.parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
        if margins:
            items = "".join(
                f'<li class="{"sig" if i["significant"] else "ns"}">{html.escape(m)}</li>'
                for i, m in zip(comp.intervals, margins))
            self.parts.append(f"<h3>Margins on {html.escape(metric)}</h3>"
                              f'<ul class="margins">{items}</ul>')
        if comp.curve:
            cells = "".join(f"<tr><td>{p['train_examples']}</td><td>{p['mean']:.2f}</td>"
                            f"<td>{p['std']:.2f}</td></tr>" for p in comp.curve)
            self.parts.append(f"<h3>Learning curve</h3><table><tr><th>training examples</th>"
                              f"<th>{html.escape(metric)} mean</th><th>std</th></tr>{cells}"
                              "</table>")
        self.parts.append("<h3>Figures</h3>")
        self.figures(figures)
        self.parts.append(f"<h3>Sample outputs (first {min(n_samples, len(samples))} test "
                          "examples)</h3>")
        for i, s in enumerate(samples):
            scores = {name: preds[i].get("scores", {}).get(metric)
                      for name, preds in comp.predictions.items()}
            rows_html = [f'<tr class="ref"><td>reference</td>'
                         f'<td>{html.escape(s["reference"])}</td><td class="score"></td></tr>']
            for name in comp.predictions:
                score = "" if scores[name] is None else f"{metric} {scores[name]:.1f}"
                rows_html.append(f"<tr><td>{html.escape(_sample_name(comp, name))}</td>"
                                 f"<td>{html.escape(s[name])}</td>"
                                 f'<td class="score">{score}</td></tr>')
            self.parts.append(f'<div class="sample"><pre>{html.escape(s["input"])}</pre>'
                              f'<table class="outputs">{"".join(rows_html)}</table></div>')

    def render(self) -> str:
        return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>"
                f"<body><main>{''.join(self.parts)}</main></body></html>")
