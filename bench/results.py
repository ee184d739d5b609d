"""Reproduce the study's comparison on real data and write RESULTS.md.

For each task (DialogSum summarization, SQuAD QA, Multi30k EN->DE), with the bundled
SmolLM2-135M: train a soft prompt on ../shared/data/<task>/train.jsonl (early stopping and
the per-epoch metric on validation.jsonl), then evaluate it and every hard-prompt baseline on
test.jsonl through the same pipeline. Settings were chosen on the validation splits only
(bench/sweep.py; see RESULTS.md).

    python bench/results.py                       # all three tasks
    python bench/results.py --tasks qa --limit 50  # a quicker partial run
    python bench/results.py --tasks translation --limit 4 --train-limit 8 --epochs 1 \
        --val-limit 4 --out /tmp/r --output /tmp/RESULTS.md   # smoke test, not the results

RESULTS.md is generated whole: every figure in it (scores, times, sizes, the findings) is
computed from the run's result.json files, with the commit, command, machine and date of
each task's run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from softprompt.comparison import SOFT, compare
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.models import DEFAULT_MODEL
from softprompt.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))
BATCH_SIZE = 8
VAL_LIMIT = 24  # validation examples generated per epoch for the task metric
VAL_LOSS_LIMIT = 100  # validation examples for the validation loss

# Chosen on validation data (bench/sweep.py); one place to change them.
# max_train_examples bounds the run's time on a small CPU.
SETTINGS = {
    "translation": {"epochs": 2, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 256,
                    "max_train_examples": 1000},
    "qa": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 512,
           "max_train_examples": 800},
    "summarization": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 768,
                      "max_train_examples": 800},
}


def machine() -> str:
    """CPU model, core count, GPU (if any) and Python version, in one line."""
    import torch

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{name}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run_task(name: str, out_dir: Path, args) -> dict:
    s = dict(SETTINGS[name])  # the settings this run used, overrides applied
    if args.train_limit:
        s["max_train_examples"] = args.train_limit
    if args.epochs:
        s["epochs"] = args.epochs
    task = get_task(name)
    t0 = time.perf_counter()
    prompt_dir = out_dir / name / "prompt"
    reuse = args.reuse and (prompt_dir / "prompt.safetensors").is_file()
    comps = compare(
        task, str(DATA / name / "train.jsonl"), str(DATA / name / "test.jsonl"), out_dir / name,
        validation_path=str(DATA / name / "validation.jsonl"), limit=args.limit,
        val_limit=args.val_limit,
        generation=GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=16),
        prompt_config=PromptConfig(num_virtual_tokens=s["num_virtual_tokens"]),
        train_config=TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=BATCH_SIZE,
                                 max_length=s["max_length"],
                                 max_train_examples=s["max_train_examples"],
                                 max_eval_examples=args.val_loss_limit,
                                 patience=1),
        prompt_dir=str(prompt_dir) if reuse else None, reuse=reuse, overwrite=not reuse,
        progress=True)
    comp = comps[0]
    return {"task": name, "primary": task.primary_metric, "settings": s,
            "batch_size": BATCH_SIZE, "model": DEFAULT_MODEL,
            "test_examples": len(comp.predictions[SOFT]),
            "systems": comp.systems, "train_seconds": comp.train_seconds,
            "epochs": [r for r in comp.train_log if r.get("event") == "epoch"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "samples": {k: v[:3] for k, v in comp.predictions.items()}}


DEFAULT_TASKS = "translation,qa,summarization"
PRIMARY_NAMES = {"rougeL": "ROUGE-L", "f1": "F1", "chrf": "chrF"}
TASK_TITLES = {"summarization": "Summarization (DialogSum)",
               "qa": "Question answering (SQuAD v1.1)",
               "translation": "Translation EN→DE (Multi30k)"}


def _table(systems: dict[str, dict[str, float]]) -> list[str]:
    keys = [k for k in ("rouge1", "rouge2", "rougeL", "exact_match", "f1", "bleu", "chrf",
                        "token_overlap", "loss", "empty_rate", "examples_per_s")
            if any(k in m for m in systems.values())]
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in systems.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |")
    return lines


def _sweep_section(sweep_dir: Path) -> list[str]:
    """The learning-rate / prompt-length sweep (bench/sweep.py's files), with its provenance."""
    runs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("sweep-*.json"))]
    runs = [r for r in runs if isinstance(r, dict) and r.get("rows")]  # skip older formats
    if not runs:
        return []
    rows = [row for r in runs for row in r["rows"]]
    metric = next(k for k in rows[0] if k.startswith("val_") and k != "val_loss")
    first = runs[0]["settings"]
    lines = ["## Choosing the defaults: learning rate and prompt length", "",
             f"Sweep on the {first['task']} task (first {first['train_examples']} training "
             f"examples, {first['epochs']} epoch(s), batch {first['batch_size']}, max length "
             f"{first['max_length']}), scored on the first {first['val_examples']} validation "
             "examples only. Runs:", ""]
    lines += [f"- `{r['command']}`: commit {r['commit']}, {r['machine']}, {r['date']}, "
              f"load average at start {r['load_average_at_start']}" for r in runs]
    if any(r["settings"] != first for r in runs):
        lines.append("- (the runs' settings differ: " + "; ".join(
            json.dumps(r["settings"]) for r in runs) + ")")
    lines += ["", f"| task | P | lr | best val loss | {metric} | train s |", "|---" * 6 + "|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["num_virtual_tokens"], r["lr"])):
        lines.append(f"| {r['task']} | {r['num_virtual_tokens']} | {r['lr']} | "
                     f"{r['val_loss']:.3f} | {r[metric]:.2f} | {r['train_seconds']:.0f} |")
    best = max(rows, key=lambda r: r[metric])
    lowest = min(rows, key=lambda r: r["val_loss"])
    lr, length = TrainConfig().lr, PromptConfig().num_virtual_tokens
    lines += ["", f"Best {metric}: P = {best['num_virtual_tokens']}, lr {best['lr']} "
              f"({best[metric]:.2f}); lowest validation loss: P = {lowest['num_virtual_tokens']}"
              f", lr {lowest['lr']} ({lowest['val_loss']:.3f}). The package's defaults are lr "
              f"{lr} and P = {length}" + (", the best setting on the task metric." if
                                          (best["lr"], best["num_virtual_tokens"]) == (lr, length)
                                          else "."), ""]
    return lines


def _findings(results: list[dict]) -> list[str]:
    """What the tables say, computed from them (no figure here is written by hand)."""
    lines = ["## What we found", ""]
    margins = []
    for r in results:
        p = r["primary"]
        soft = r["systems"][SOFT][p]
        best, name = max((m[p], n) for n, m in r["systems"].items() if n != SOFT)
        margins.append((r["task"], PRIMARY_NAMES.get(p, p), soft - best, name))
    wins = sum(m[2] > 0 for m in margins)
    lines.append(f"- **The soft prompt beats the best other system on {wins} of "
                 f"{len(margins)} task(s)** (margin on the primary metric): "
                 + "; ".join(f"{t} {m} {d:+.2f} against `{n}`" for t, m, d, n in margins) + ".")
    best_other = [n for *_, n in margins]
    lines.append("- The best other system: " + "; ".join(
        f"`{name}` on {best_other.count(name)} of {len(margins)} task(s)"
        for name in sorted(set(best_other))) + ".")
    empties = [(r["task"], *max((m.get("empty_rate", 0.0), n) for n, m in r["systems"].items()))
               for r in results]
    lines.append("- Empty outputs (the model ends its answer at once; the stop rule skips "
                 "leading whitespace, so these are not answers cut on a newline), the highest "
                 "share per task: " + "; ".join(f"{t} {rate:.1f}% ({n})" if rate else f"{t} none"
                                                 for t, rate, n in empties) + ".")
    for r in results:
        s, curve = r["settings"], r.get("epochs", [])
        metric = f"val_{r['primary']}"
        text = (f"- {r['task']}: the prompt was trained on the first "
                f"{s['max_train_examples']} training examples for {s['epochs']} epoch(s) "
                f"({r['train_seconds']:.0f} s)")
        if any(metric in e for e in curve):
            text += (f"; validation {PRIMARY_NAMES.get(r['primary'], r['primary'])} by epoch "
                     f"(first {r.get('val_limit', VAL_LIMIT)} "
                     "validation examples): "
                     + ", ".join(f"{e[metric]:.2f}" for e in curve if metric in e))
        lines.append(text + ".")
    for r in results:
        p = r["primary"]
        gaps = [(m["token_overlap"] - m[p], n, m) for n, m in r["systems"].items()
                if "token_overlap" in m]
        if gaps:
            _, name, m = max(gaps)
            lines.append(f"- `token_overlap` (the study's metric: the share of generated word "
                         f"types found in the reference, so input words copied into the output "
                         f"count too) against {PRIMARY_NAMES.get(p, p)} in {r['task']}: the "
                         f"widest gap is `{name}`, {m['token_overlap']:.2f} against "
                         f"{m[p]:.2f}.")
    return lines + [""]


def _provenance(results: list[dict]) -> list[str]:
    """Per task: the command, commit, machine and date of its run."""
    lines = ["| task | command | commit | machine | date | wall time |", "|---" * 6 + "|"]
    for r in results:
        lines.append(f"| {r['task']} | `{r['command']}` | {r.get('commit', 'not recorded')} | "
                     f"{r['machine']} | {r.get('date', '?')} | "
                     f"{r['wall_seconds'] / 60:.0f} min |")
    return lines


def write_results_md(out: Path, path: Path = ROOT / "RESULTS.md",
                     sweep_dir: Path = ROOT / "bench" / "out") -> None:
    """RESULTS.md from results-output/<task>/result.json (and the sweep, if present)."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    order = {"summarization": 0, "qa": 1, "translation": 2}
    results.sort(key=lambda r: order.get(r["task"], 9))
    sizes = sorted({r.get("test_examples", "?") for r in results}, key=str)
    md = ["# Results on real data", "",
          f"Soft prompt vs hand-written prompts with the bundled {DEFAULT_MODEL}, on the test "
          f"splits of `{DATA.parent.name}/{DATA.name}` ({', '.join(map(str, sizes))} examples "
          "per task). Every system goes through the same template, truncation, greedy "
          "decoding and metrics; only what stands in front of the input differs. Scores "
          "are 0-100 (loss: mean target-token cross-entropy, teacher-forced; empty_rate: % "
          "of empty outputs).", "",
          f"Generated by `python bench/results.py` (report written at commit {git_commit()}, "
          f"{_now()}) from these runs, {sum(r['wall_seconds'] for r in results) / 60:.0f} "
          "minutes in all:", ""]
    if results:
        md += _provenance(results) + [""]
        md += ["| task | primary metric | soft prompt | best other system | margin |",
               "|---|---|---|---|---|"]
        for r in results:
            p = r["primary"]
            soft = r["systems"][SOFT][p]
            best_score, best_name = max((m[p], n) for n, m in r["systems"].items() if n != SOFT)
            md.append(f"| {r['task']} | {PRIMARY_NAMES.get(p, p)} | {soft:.2f} | "
                      f"{best_score:.2f} ({best_name}) | {soft - best_score:+.2f} |")
        md.append("")
    for r in results:
        s = r["settings"]
        md += [f"## {TASK_TITLES.get(r['task'], r['task'])}", "",
               f"Soft prompt: P={s['num_virtual_tokens']}, lr={s['lr']}, {s['epochs']} epoch(s) "
               f"on the first {s['max_train_examples']} training examples, batch "
               f"{r.get('batch_size', BATCH_SIZE)}, max length {s['max_length']}; training "
               f"took {r['train_seconds']:.0f} s.", ""]
        md += _table(r["systems"]) + [""]
        md += ["Sample outputs (first test examples):", ""]
        first = next(iter(r["samples"].values()))
        for i, row in enumerate(first[:2]):
            text = row["input"] if len(row["input"]) < 400 else row["input"][:400] + " ..."
            md += ["```", text, "```", f"- reference: {row['references'][0]!r}"]
            md += [f"- {name}: {rows[i]['prediction']!r}" for name, rows in r["samples"].items()]
            md.append("")
    if results:
        md += _findings(results)
    md += _sweep_section(sweep_dir)
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


def _command(args, task: str) -> str:
    """The command that reproduces ``task``'s run from scratch (options that only say where
    files go, or skip finished work, left out)."""
    parts = ["python bench/results.py", "--tasks", task]
    for flag, value, default in (("--limit", args.limit, None),
                                 ("--train-limit", args.train_limit, None),
                                 ("--epochs", args.epochs, None),
                                 ("--val-limit", args.val_limit, VAL_LIMIT),
                                 ("--val-loss-limit", args.val_loss_limit, VAL_LOSS_LIMIT)):
        if value != default:
            parts += [flag, str(value)]
    return " ".join(parts)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=None, help="test examples per task")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="training examples per task (default: SETTINGS' max_train_examples)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs per task (default: SETTINGS' epochs)")
    ap.add_argument("--val-limit", type=int, default=VAL_LIMIT,
                    help="validation examples generated per epoch for the task metric")
    ap.add_argument("--val-loss-limit", type=int, default=VAL_LOSS_LIMIT,
                    help="validation examples for the validation loss")
    ap.add_argument("--out", default=str(ROOT / "results-output"))
    ap.add_argument("--output", type=Path, default=ROOT / "RESULTS.md",
                    help="the Markdown file to write (default: RESULTS.md)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep trained prompts and finished evaluations in --out; run the rest")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite --output from results already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        write_results_md(out, args.output)
        return
    for name in args.tasks.split(","):
        previous = out / name / "result.json"
        commit = git_commit()
        result = run_task(name, out, args)
        if args.reuse and previous.is_file():  # keep the wall time of the original run
            result["wall_seconds"] += json.loads(previous.read_text())["wall_seconds"]
        result["machine"] = machine()
        result["commit"] = commit
        result["val_limit"] = args.val_limit
        result["command"] = _command(args, name)
        result["date"] = _now()
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "result.json").write_text(json.dumps(result, indent=1))
        soft = result["systems"][SOFT][result["primary"]]
        best = max((m[result["primary"]], s) for s, m in result["systems"].items() if s != SOFT)
        print(f"{name}: soft {soft:.2f} vs best hard {best[0]:.2f} ({best[1]})", flush=True)
    write_results_md(out, args.output)


if __name__ == "__main__":
    main()
