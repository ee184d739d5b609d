"""Pick the default learning rate and prompt length from a small sweep on validation data.

Trains on a fixed subset of ../shared/data/<task>/train.jsonl with the bundled model and
reports the best validation loss and the primary metric on validation examples for each
setting. Only validation splits are used for choosing.

    python bench/sweep.py --task translation --lrs 0.003,0.03,0.3 --lengths 20
    python bench/sweep.py --task translation --lrs 0.03 --lengths 5,50

Each run writes bench/out/sweep-<task>-P<lengths>-lr<lrs>.json (its own file, so the two
commands above do not overwrite each other), with the command, commit, machine, date and
settings beside the rows; ``python bench/results.py --report-only`` puts every such file's
table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import git_commit  # noqa: E402
from results import DATA, machine  # noqa: E402

from softprompt import models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.evaluation import System, evaluate
from softprompt.tasks import get_task
from softprompt.training import train

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8


def default_out(task: str, lengths: str, lrs: str) -> Path:
    """bench/out/sweep-<task>-P<lengths>-lr<lrs>.json: one file per sweep command."""
    return ROOT / "bench" / "out" / f"sweep-{task}-P{lengths}-lr{lrs}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="translation")
    ap.add_argument("--train-examples", type=int, default=320)
    ap.add_argument("--val-examples", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lrs", default="0.003,0.03,0.3")
    ap.add_argument("--lengths", default="20")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/out/sweep-<task>-P<lengths>-lr<lrs>.json, where "
                         "bench/results.py looks for sweeps")
    args = ap.parse_args()
    out = args.out or default_out(args.task, args.lengths, args.lrs)
    started = {"command": " ".join(["python bench/sweep.py", *sys.argv[1:]]),
               "commit": git_commit(), "machine": machine(),
               "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "settings": {"task": args.task, "train_examples": args.train_examples,
                            "val_examples": args.val_examples, "epochs": args.epochs,
                            "batch_size": BATCH_SIZE, "max_length": args.max_length}}
    task = get_task(args.task)
    train_records = read_records(DATA / args.task / "train.jsonl", limit=args.train_examples)
    val_records = read_records(DATA / args.task / "validation.jsonl", limit=args.val_examples)
    model, tokenizer = models.load_model(models.DEFAULT_MODEL)
    rows = []
    for p in [int(x) for x in args.lengths.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = train(model, tokenizer, task, train_records, tmp,
                               validation_records=val_records,
                               prompt_config=PromptConfig(num_virtual_tokens=p),
                               train_config=TrainConfig(lr=lr, epochs=args.epochs,
                                                        batch_size=BATCH_SIZE,
                                                        max_length=args.max_length,
                                                        warmup_steps=5),
                               model_name=models.DEFAULT_MODEL, progress=False)
            seconds = time.perf_counter() - t0
            ev = evaluate(model, tokenizer, task, val_records, System("soft", result.prompt),
                          generation=GenerationConfig(max_new_tokens=task.max_new_tokens,
                                                      batch_size=16),
                          max_length=args.max_length)
            row = {"task": args.task, "num_virtual_tokens": p, "lr": lr,
                   "val_loss": result.meta.metrics.get("val_loss"),
                   f"val_{task.primary_metric}": ev.metrics[task.primary_metric],
                   "train_seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**started, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
