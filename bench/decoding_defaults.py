"""Choose each task preset's default decoding controls on the VALIDATION split.

For every task: the bundled model behind the task's hand-written prompt ("hard: ours", the
plain template a soft prompt also uses), the first N validation examples, greedy decoding
with each candidate setting of the controls (softprompt.decoding); the primary metric per
setting. A setting becomes the task's default only if it beats no controls by at least
--margin points (a smaller gain on this few examples is noise); the preset's comment in
softprompt/tasks.py quotes the command and the figures. Never reads a test split.

    nice -n 10 python bench/decoding_defaults.py --tasks translation --limit 30 \
        --settings '[{"repetition_penalty": 1.2}]'    # one setting against none: ~2 min
    python bench/decoding_defaults.py --tasks qa --limit 8   # every setting: a screen

The runs behind the presets, their commands and figures are quoted above softprompt.tasks'
_preset. On 2 shared CPU cores a summarization setting costs 2-5 min for 30 examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DATA_DIR = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))
LIMITS = {"summarization": 30, "qa": 30, "translation": 30}
SETTINGS = [
    {},
    {"repetition_penalty": 1.2},
    {"no_repeat_ngram_size": 3},
    {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
    {"repetition_penalty": 1.1},
    {"no_repeat_ngram_size": 3, "penalize_output_only": True},
    {"repetition_penalty": 1.2, "penalize_output_only": True},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="summarization,qa,translation")
    parser.add_argument("--limit", type=int, default=None, help="validation examples per "
                        f"task (default: {LIMITS})")
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--settings", default=None, help="a JSON list of settings to try "
                        "(default: all of SETTINGS); no controls ({}) is always measured")
    parser.add_argument("--output", default=str(ROOT / "bench" / "out" / "decoding_defaults.json"))
    args = parser.parse_args()

    import torch

    from softprompt.config import GenerationConfig
    from softprompt.data import read_records
    from softprompt.evaluation import System, _encode
    from softprompt.generation import generate
    from softprompt.metrics import compute_metrics
    from softprompt.models import load_model
    from softprompt.tasks import get_task, make_examples

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    results = {}
    start = time.perf_counter()
    for name in args.tasks.split(","):
        task = get_task(name)
        limit = args.limit or LIMITS[name]
        records = read_records(DATA_DIR / name / "validation.jsonl", limit=limit)
        examples = make_examples(task, records)
        system = System("hard: ours", instruction=task.better_instruction)
        inputs = _encode(task, examples, tok, system, 1024, with_target=False,
                         reserve=task.max_new_tokens)
        refs = [ex.references for ex in examples]
        rows = []
        settings = SETTINGS if args.settings is None else [{}] + [
            s for s in json.loads(args.settings) if s]
        for setting in settings:
            cfg = GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=16, **setting)
            t0 = time.perf_counter()
            outs = generate(model, tok, [e.input_ids for e in inputs], None, cfg, stop=task.stop)
            score = compute_metrics(task.metrics, outs, refs)[task.primary_metric]
            rows.append({"setting": setting, task.primary_metric: round(score, 2),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:13s} {json.dumps(setting):55s} {task.primary_metric} {score:6.2f} "
                  f"({rows[-1]['seconds']} s)", flush=True)
        base = rows[0][task.primary_metric]
        best = max(rows, key=lambda r: r[task.primary_metric])
        chosen = best["setting"] if best[task.primary_metric] - base >= args.margin else {}
        results[name] = {"n": len(examples), "system": system.name, "rows": rows,
                         "chosen": chosen}
        print(f"{name}: chosen {chosen or 'no controls'}", flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    import common
    from report import git_commit

    results["command"] = "python " + " ".join(sys.argv)
    results.update(commit=git_commit(), machine=common.machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"total {results['seconds']} s; written to {args.output}")


if __name__ == "__main__":
    main()
