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
import sys
import time
from pathlib import Path

from softprompt.compare import SOFT, compare
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


def run_task(name: str, out_dir: Path, limit: int | None, train_limit: int | None) -> dict:
    s = SETTINGS[name]
    task = get_task(name)
    t0 = time.perf_counter()
    comps = compare(
        task, str(DATA / name / "train.jsonl"), str(DATA / name / "test.jsonl"), out_dir / name,
        validation_path=str(DATA / name / "validation.jsonl"), limit=limit, val_limit=24,
        generation=GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=16),
        prompt_config=PromptConfig(num_virtual_tokens=s["num_virtual_tokens"]),
        train_config=TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=8,
                                 max_length=s["max_length"],
                                 max_train_examples=train_limit or s["max_train_examples"],
                                 max_eval_examples=100, patience=1),
        overwrite=True, progress=True)
    comp = comps[0]
    return {"task": name, "primary": task.primary_metric, "settings": s,
            "systems": comp.systems, "train_seconds": comp.train_seconds,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "samples": {k: v[:3] for k, v in comp.predictions.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="translation,qa,summarization")
    ap.add_argument("--limit", type=int, default=None, help="test examples per task")
    ap.add_argument("--train-limit", type=int, default=None, help="training examples per task")
    ap.add_argument("--out", default=str(ROOT / "results-output"))
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.tasks.split(","):
        result = run_task(name, out, args.limit, args.train_limit)
        result["machine"] = machine()
        result["command"] = "python " + " ".join(sys.argv)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "result.json").write_text(json.dumps(result, indent=1))
        soft = result["systems"][SOFT][result["primary"]]
        best = max((m[result["primary"]], s) for s, m in result["systems"].items() if s != SOFT)
        print(f"{name}: soft {soft:.2f} vs best hard {best[0]:.2f} ({best[1]})", flush=True)


if __name__ == "__main__":
    main()
