"""Benchmark 6: bfloat16 against float32 on the bundled model, speed and quality.

1. Speed of training: one epoch (``--limit`` QA training examples, batch ``--batch-size``)
   trained by softprompt.training.train in float32 and under bfloat16 autocast
   (``TrainConfig.bf16``, what ``--precision bf16`` resolves to for training), on the same
   float32 model object, from the same initial prompt; ``--repeats`` pairs of epochs, the order
   flipped each pair so that load on the machine hits both alike. Prints each pair's ratio,
   their median and both training losses.
2. Quality on the three tasks (summarization, qa, translation): for each precision, one
   epoch on the same ``--limit`` examples, then the validation loss of the trained prompt
   (``--val-limit`` validation examples) under that same precision.
3. Inference: the fp32-trained QA prompt's validation loss and greedy decoding speed with
   float32 weights, bfloat16 weights (what ``--precision bf16`` loads for generate, evaluate
   and serve) and float32 weights under bfloat16 autocast (``--dtype float32``).

Data: ``../shared/data/<task>/{train,validation}.jsonl`` (``SOFTPROMPT_DATA`` overrides), the
first N records. Results go to ``bench/out/precision.json``.

Usage: python bench/precision.py [--limit 48] [--val-limit 24] [--batch-size 8] [--repeats 2]
       python bench/precision.py --limit 16 --val-limit 8 --repeats 1   # a few minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import say  # noqa: E402
from report import git_commit  # noqa: E402

TASKS = ("summarization", "qa", "translation")
PRECISIONS = {"fp32": False, "bf16": True}  # name -> TrainConfig.bf16 (autocast)


def train_epoch(model, tokenizer, task, records, val_records, bf16: bool, args, out: Path):
    """One epoch from the task's text init; returns softprompt.training's TrainResult."""
    from softprompt.config import PromptConfig, TrainConfig
    from softprompt.training import train

    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, bf16=bf16, seed=0,
                      max_eval_examples=args.val_limit)
    return train(model, tokenizer, task, records, out, validation_records=val_records,
                 prompt_config=PromptConfig(num_virtual_tokens=common.NUM_VIRTUAL_TOKENS),
                 train_config=cfg, model_name=args.model, overwrite=True, progress=False)


def speed(model, tokenizer, args, tmp: Path) -> dict:
    """Part 1: paired epochs, fp32 and bf16 autocast, order flipped each pair; an epoch's time
    is the sum of its optimizer steps' (the trainer's ``train_seconds``)."""
    from softprompt.tasks import get_task

    task = get_task("qa")
    records = common.read_subset(common.DATA_DIR / "qa" / "train.jsonl", args.limit)
    seconds: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    losses: dict[str, float] = {}
    for rep in range(args.repeats):
        order = list(PRECISIONS) if rep % 2 == 0 else list(reversed(PRECISIONS))
        for name in order:
            result = train_epoch(model, tokenizer, task, records, None, PRECISIONS[name], args,
                                 tmp / f"speed-{name}")
            seconds[name].append(result.meta.metrics["train_seconds"])  # the steps' time
            losses[name] = result.meta.metrics["train_loss"]  # the same every repetition
        say(f"  pair {rep + 1}: fp32 {seconds['fp32'][-1]:.1f} s, bf16 {seconds['bf16'][-1]:.1f}"
            f" s, {seconds['fp32'][-1] / seconds['bf16'][-1]:.2f}x")
    ratios = [f / b for f, b in zip(seconds["fp32"], seconds["bf16"])]
    return {"examples": len(records), "batch_size": args.batch_size, "seconds": seconds,
            "ratios": ratios, "ratio_median": statistics.median(ratios),
            "train_loss": losses}


def quality(model, tokenizer, args, tmp: Path) -> dict:
    """Part 2: validation loss after one epoch, per task and precision."""
    from softprompt.tasks import get_task

    table = {}
    for name in TASKS:
        task = get_task(name)
        train = common.read_subset(common.DATA_DIR / name / "train.jsonl", args.limit)
        val = common.read_subset(common.DATA_DIR / name / "validation.jsonl", args.val_limit)
        row = {}
        for precision, bf16 in PRECISIONS.items():
            result = train_epoch(model, tokenizer, task, train, val, bf16, args,
                                 tmp / f"{name}-{precision}")
            row[precision] = {"train_loss": result.meta.metrics["train_loss"],
                              "val_loss": result.meta.metrics["val_loss"],
                              "seconds": result.meta.metrics["train_seconds"]}
            if name == "qa" and precision == "fp32":
                row["prompt"] = result.prompt
        say(f"  {name}: val loss fp32 {row['fp32']['val_loss']:.4f}, bf16 "
            f"{row['bf16']['val_loss']:.4f}; train loss fp32 {row['fp32']['train_loss']:.4f}, "
            f"bf16 {row['bf16']['train_loss']:.4f}")
        table[name] = row
    return table


def inference(model32, tokenizer, prompt: torch.Tensor, args) -> dict:
    """Part 3: the fp32-trained QA prompt, three ways of computing; loss and decoding time."""
    from softprompt.config import GenerationConfig
    from softprompt.evaluation import System, target_token_loss
    from softprompt.generation import generate
    from softprompt.models import Precision, load_model
    from softprompt.tasks import get_task, make_examples

    task = get_task("qa")
    val = common.read_subset(common.DATA_DIR / "qa" / "validation.jsonl", args.val_limit)
    examples = make_examples(task, val)
    model16, _ = load_model(args.model, dtype=torch.bfloat16)
    ways = {"fp32": (model32, Precision(torch.float32, None)),
            "bf16 weights": (model16, Precision(torch.bfloat16, None)),
            "fp32 weights + autocast": (model32, Precision(torch.float32, torch.bfloat16))}
    gen = GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=args.batch_size)
    from softprompt.encode import encode_for_generation

    ids = [encode_for_generation(task, ex, tokenizer, num_virtual_tokens=prompt.shape[0],
                                 max_new_tokens=gen.max_new_tokens, max_length=1024)
           for ex in examples]
    out: dict[str, dict] = {name: {"decode_seconds": []} for name in ways}
    for rep in range(args.repeats):
        order = list(ways) if rep % 2 == 0 else list(reversed(ways))
        for name in order:
            model, precision = ways[name]
            with precision.context("cpu"):
                t0 = time.perf_counter()
                texts = generate(model, tokenizer, ids, prompt, gen, stop=task.stop)
                out[name]["decode_seconds"].append(time.perf_counter() - t0)
                if rep == 0:
                    out[name]["val_loss"] = target_token_loss(
                        model, tokenizer, task, examples, System("soft", prompt), 1024,
                        args.batch_size)
                    out[name]["empty"] = sum(not t for t in texts)
    base = statistics.median(out["fp32"]["decode_seconds"])
    for name, row in out.items():
        row["decode_speedup"] = base / statistics.median(row["decode_seconds"])
        say(f"  {name}: val loss {row['val_loss']:.4f}, decoding {len(ids)} inputs "
            f"{statistics.median(row['decode_seconds']):.1f} s ({row['decode_speedup']:.2f}x "
            f"fp32), {row['empty']} empty outputs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=48, help="training examples per task")
    parser.add_argument("--val-limit", type=int, default=24, help="validation examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="paired epochs in part 1")
    parser.add_argument("--skip", action="append", default=[], choices=["speed", "quality",
                        "inference"], help="leave a part out (repeatable)")
    args = parser.parse_args()
    from softprompt.models import bf16_native, load_model

    info = common.machine()
    info["bf16_native_cpu"] = bf16_native(torch.device("cpu"))
    say(f"machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
        f"native bfloat16: {info['bf16_native_cpu']}, load {info['load_average_at_start']}")
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    results: dict = {"machine": info, "args": vars(args), "commit": git_commit(),
                     "command": "python " + " ".join(sys.argv),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" not in args.skip:
            say(f"1. training epoch, QA, {args.limit} examples, batch {args.batch_size}")
            results["speed"] = speed(model, tokenizer, args, Path(tmp))
            s = results["speed"]
            say(f"   bf16 autocast {s['ratio_median']:.2f}x faster (median of "
                f"{len(s['ratios'])}); train loss fp32 {s['train_loss']['fp32']:.4f}, bf16 "
                f"{s['train_loss']['bf16']:.4f}")
        prompt = None
        if "quality" not in args.skip:
            say(f"2. validation loss after one epoch ({args.limit} train, {args.val_limit} "
                f"validation examples)")
            results["quality"] = quality(model, tokenizer, args, Path(tmp))
            prompt = results["quality"]["qa"].pop("prompt")
        if "inference" not in args.skip:
            if prompt is None:
                from softprompt.tasks import get_task

                prompt = common.our_prompt(model, tokenizer, get_task("qa")).embeddings.detach()
            say(f"3. inference, QA validation ({args.val_limit} examples), greedy")
            results["inference"] = inference(model, tokenizer, prompt, args)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    common.write_json(common.OUT_DIR / "precision.json", results)
    say(f"wrote {common.OUT_DIR / 'precision.json'}")


if __name__ == "__main__":
    main()
