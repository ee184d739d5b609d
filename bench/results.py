"""Reproduce the study's comparison on real data and write RESULTS.md.

For each task (DialogSum summarization, SQuAD QA, Multi30k EN->DE), with the bundled
SmolLM2-135M: train a soft prompt on ../shared/data/<task>/train.jsonl (early stopping and
the per-epoch metric on validation.jsonl), then evaluate it and every hard-prompt baseline on
test.jsonl through the same pipeline. Settings were chosen on the validation splits only
(bench/sweep.py; see RESULTS.md).

    python bench/results.py                       # all three tasks
    python bench/results.py --tasks qa --limit 50  # a quicker partial run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from softprompt.comparison import SOFT, compare
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# Chosen on validation data (bench/sweep.py); one place to change them.
# max_train_examples keeps the whole run to about an hour on 2 CPU cores.
SETTINGS = {
    "translation": {"epochs": 2, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 256,
                    "max_train_examples": 1000},
    "qa": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 512,
           "max_train_examples": 800},
    "summarization": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 768,
                      "max_train_examples": 800},
}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    import os

    return f"{name}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}"


def run_task(name: str, out_dir: Path, limit: int | None, train_limit: int | None,
             reuse: bool = False) -> dict:
    s = SETTINGS[name]
    task = get_task(name)
    t0 = time.perf_counter()
    prompt_dir = out_dir / name / "prompt"
    reuse = reuse and (prompt_dir / "prompt.safetensors").is_file()
    comps = compare(
        task, str(DATA / name / "train.jsonl"), str(DATA / name / "test.jsonl"), out_dir / name,
        validation_path=str(DATA / name / "validation.jsonl"), limit=limit, val_limit=24,
        generation=GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=16),
        prompt_config=PromptConfig(num_virtual_tokens=s["num_virtual_tokens"]),
        train_config=TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=8,
                                 max_length=s["max_length"],
                                 max_train_examples=train_limit or s["max_train_examples"],
                                 max_eval_examples=100, patience=1),
        prompt_dir=str(prompt_dir) if reuse else None, reuse=reuse, overwrite=not reuse,
        progress=True)
    comp = comps[0]
    return {"task": name, "primary": task.primary_metric, "settings": s,
            "systems": comp.systems, "train_seconds": comp.train_seconds,
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


def _sweep_section() -> list[str]:
    rows = []
    for path in sorted((ROOT / "bench" / "out").glob("sweep-*.json")):
        rows += json.loads(path.read_text())
    if not rows:
        return []
    metric = next(k for k in rows[0] if k.startswith("val_") and k != "val_loss")
    lines = ["| task | P | lr | best val loss | " + metric + " | train s |", "|---" * 6 + "|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["num_virtual_tokens"], r["lr"])):
        lines.append(f"| {r['task']} | {r['num_virtual_tokens']} | {r['lr']} | "
                     f"{r['val_loss']:.3f} | {r[metric]:.2f} | {r['train_seconds']:.0f} |")
    return lines


# What we saw in the recorded run (hand-written; rerunning the script keeps this text).
FINDINGS = """\
## What we found

- **The soft prompt wins on every task, by a wide margin.** A 135M model barely follows
  written instructions: with the study's prompts it often repeats the input (the bare template
  copies the English sentence in translation), loops ("The answer is: The answer is: ..."), or
  writes a long sentence where SQuAD wants a span. Twenty trained vectors teach it the output
  format (a short span, a German sentence, a one-line `#Person1# ...` summary) as well as the
  task, which is most of what these metrics reward.
- **Hard prompts were given a fair chance.** The stop rule skips leading whitespace, so an
  answer on the line after "Answer:" is not cut to nothing; the share of empty outputs is
  reported per system. The empty outputs that remain are the model's own choice: it emits
  its end-of-turn token at once (21% of QA answers with the study's prompt, 65% of
  summaries with our one-sentence instruction, which is why that better-worded prompt scores
  lowest; plain `transformers` `generate` gives the same). Besides the study's prompts we
  wrote a better instruction per task and also asked it inside SmolLM2's chat template, the
  way the instruction-tuned model was trained; the chat form is the best hard prompt on all
  three tasks, still far behind.
- **Training budget.** To keep the whole run under two hours on 2 CPU cores, the prompts were
  trained on subsets (1,000 / 800 / 800 examples) for 2 / 1 / 1 epochs. Translation's
  validation chrF rose from 21.3 to 23.2 between its two epochs (see
  `results-output/<task>/report.md` for the curves), so longer training should widen the gap.
- **The study's metric.** `token_overlap` (the share of generated word types found in the
  reference) moves with the standard metrics here, but it also rewards copying words of the
  input: in summarization the bare template, which mostly continues the dialogue, scores 23 on
  it against 11 ROUGE-L. Use it only for comparison with the study.
"""


def write_results_md(out: Path, path: Path = ROOT / "RESULTS.md") -> None:
    """RESULTS.md from results-output/<task>/result.json (and the sweep, if present)."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    order = {"summarization": 0, "qa": 1, "translation": 2}
    results.sort(key=lambda r: order.get(r["task"], 9))
    md = ["# Results on real data", "",
          "Soft prompt vs hand-written prompts with the bundled SmolLM2-135M-Instruct, on the "
          "test splits of `../shared/data` (200 examples per task). Every system goes through "
          "the same template, truncation, greedy decoding and metrics; only what stands in "
          "front of the input differs. Scores are 0-100 (loss: mean target-token "
          "cross-entropy, teacher-forced; empty_rate: % of empty outputs).", ""]
    if results:
        md += [f"Reproduce: `{results[0]['command']}` (about "
               f"{sum(r['wall_seconds'] for r in results) / 60:.0f} minutes). "
               f"Machine: {results[0]['machine']}. Date: {results[0].get('date', '?')}.", ""]
        md += ["| task | primary metric | soft prompt | best hard prompt | margin |",
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
               f"on the first {s['max_train_examples']} training examples, batch 8, "
               f"max length {s['max_length']}; training took {r['train_seconds']:.0f} s.", ""]
        md += _table(r["systems"]) + [""]
        md += ["Sample outputs (first test examples):", ""]
        first = next(iter(r["samples"].values()))
        for i, row in enumerate(first[:2]):
            text = row["input"] if len(row["input"]) < 400 else row["input"][:400] + " ..."
            md += ["```", text, "```", f"- reference: {row['references'][0]!r}"]
            md += [f"- {name}: {rows[i]['prediction']!r}" for name, rows in r["samples"].items()]
            md.append("")
    md += [FINDINGS]
    sweep = _sweep_section()
    if sweep:
        md += ["## Choosing the defaults: learning rate and prompt length", "",
               "Small sweep on the translation task (first 320 training examples, 1 epoch, "
               "batch 8), scored on the first 48 validation examples only: "
               "`python bench/sweep.py --task translation --lrs 0.003,0.03,0.3 --lengths 20` "
               "and `python bench/sweep.py --task translation --lrs 0.03 --lengths 5,50`. "
               "Training seconds were measured on a shared machine and are only indicative.",
               "", *sweep, "",
               "lr 0.03 gives the best validation chrF (0.3 a slightly lower loss but worse "
               "outputs, 0.003 learns too slowly); P = 20 beats 5 clearly and 50 on chrF at "
               "half the cost. Hence the defaults `--lr 0.03 --num-virtual-tokens 20`, used "
               "for every task above.", ""]
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=None, help="test examples per task")
    ap.add_argument("--train-limit", type=int, default=None, help="training examples per task")
    ap.add_argument("--out", default=str(ROOT / "results-output"))
    ap.add_argument("--reuse", action="store_true",
                    help="keep trained prompts and finished evaluations in --out; run the rest")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite RESULTS.md from results already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        write_results_md(out)
        return
    for name in args.tasks.split(","):
        previous = out / name / "result.json"
        result = run_task(name, out, args.limit, args.train_limit, args.reuse)
        if args.reuse and previous.is_file():  # keep the wall time of the original run
            result["wall_seconds"] += json.loads(previous.read_text())["wall_seconds"]
        result["machine"] = machine()
        # The command that reproduces it from scratch (--reuse only skips finished work).
        result["command"] = " ".join(["python bench/results.py",
                                      *(["--tasks", name] if args.tasks != DEFAULT_TASKS else []),
                                      *(["--limit", str(args.limit)] if args.limit else [])])
        result["date"] = time.strftime("%Y-%m-%d")
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "result.json").write_text(json.dumps(result, indent=1))
        soft = result["systems"][SOFT][result["primary"]]
        best = max((m[result["primary"]], s) for s, m in result["systems"].items() if s != SOFT)
        print(f"{name}: soft {soft:.2f} vs best hard {best[0]:.2f} ({best[1]})", flush=True)
    write_results_md(out)


if __name__ == "__main__":
    main()
