"""Pick the default learning rate and prompt length from a small sweep on validation data.

Trains on a fixed subset of ../shared/data/<task>/train.jsonl with the bundled model and
reports the best validation loss and the primary metric on validation examples for each
setting. Only validation splits are used for choosing.

    python bench/sweep.py --task translation --train-examples 320 --out bench/out/sweep.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from softprompt import models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.evaluation import System, evaluate
from softprompt.tasks import get_task
from softprompt.training import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="translation")
    ap.add_argument("--train-examples", type=int, default=320)
    ap.add_argument("--val-examples", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lrs", default="0.003,0.03,0.3")
    ap.add_argument("--lengths", default="20")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--out", default="bench/out/sweep.json")
    args = ap.parse_args()
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
                               train_config=TrainConfig(lr=lr, epochs=args.epochs, batch_size=8,
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
