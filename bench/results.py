"""The study on real data, and RESULTS.md: soft prompts against zero- and few-shot hard prompts.

For each task (DialogSum summarization, SQuAD QA, Multi30k EN->DE) and each training method,
with the bundled SmolLM2-135M: train one soft prompt per seed on the first N examples of
../shared/data/<task>/train.jsonl (early stopping on validation.jsonl), evaluate each and every
hard prompt (zero-shot and 3-shot, demonstrations from the training split) on test.jsonl through
the same pipeline, with paired bootstrap intervals of (soft - hard) and, for one task, a
learning curve (softprompt.comparison.compare does the work). Settings were chosen on the
validation splits only (bench/sweep.py).

The run is sized to fit a time budget (default 3 hours) on a 2-core CPU: the time of every
training and evaluation is estimated from per-example timings recorded on that machine
(TIMINGS), and the training sets are cut, in steps of 10%, until the estimate fits; RESULTS.md
says what was cut.

    python bench/results.py --plan                 # the plan and its time estimate only
    python bench/results.py                        # every task, methods prompt and prefix, 3 seeds
    python bench/results.py --methods prompt,ptuning,residual,prefix
    python bench/results.py --reuse                # continue an interrupted run
    python bench/results.py --report-only          # rewrite RESULTS.md from --out

Further runs beside the main one, each into its own --out, reusing the main run's hard-prompt
evaluations, then RESULTS.md with a section for each (the recipe of the current RESULTS.md):

    python bench/results.py --methods prompt,ptuning,residual,prefix --seeds 0 \
        --train-limit 160 --curve-task none --hard-from results-output \
        --out results-methods --output results/methods.md
    python bench/results.py --methods prefix --seeds 0 --train-minutes 20 --curve-task none \
        --hard-from results-output --out results-prefix-20min --output results/prefix-20min.md
    python bench/results.py --report-only --also results-methods --also results-prefix-20min

RESULTS.md is generated whole: every figure in it is computed from the runs' result.json
files, with the command, commit, machine, date and time of each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import git_commit  # noqa: E402

from softprompt.comparison import SOFT, compare  # noqa: E402
from softprompt.config import (  # noqa: E402
    GenerationConfig,
    PromptConfig,
    TrainConfig,
    resolved_lr,
)
from softprompt.methods import METHODS as ALL_METHODS  # noqa: E402
from softprompt.models import DEFAULT_MODEL  # noqa: E402
from softprompt.report import margin_sentence  # noqa: E402
from softprompt.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))
BATCH_SIZE = 8
# Validation examples generated per epoch for the task metric: a plotted curve only (the best
# epoch is chosen on validation loss), so few; their generation is the cost of an epoch.
VAL_LIMIT = 8
VAL_LOSS_LIMIT = 100  # validation examples for the validation loss
TEST_EXAMPLES = 100  # of each test split's 200: the hard prompts' evaluations are a fixed cost
SEEDS = (0, 1, 2)
SHOTS = (0, 3)
# The input-level prompt (the study's method) and prefix tuning (the best method of the 1-seed
# comparison of all four at commit e3fb5b2): with 3 seeds, four methods leave ~100 examples.
METHODS = ("prompt", "prefix")
CURVE_TASK = "translation"  # the cheapest task per training example
CURVE_SIZES = (50, 200)  # plus the task's own training size
MIN_TRAIN = 100  # the training sets are not cut below this
BUDGET_HOURS = 3.0
TASKS = ("summarization", "qa", "translation")

# Chosen on validation data (bench/sweep.py); one place to change them. train_examples is
# what the study would use with time to spare; the plan cuts it to fit the budget.
SETTINGS = {
    "summarization": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 768,
                      "train_examples": 800},
    "qa": {"epochs": 1, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 512,
           "train_examples": 800},
    "translation": {"epochs": 2, "lr": 0.03, "num_virtual_tokens": 20, "max_length": 256,
                    "train_examples": 1000},
}

# Seconds on the 2-core Xeon of the 2026-11-30 run at commit e3fb5b2 (bf16, P = 20, batch 8,
# the max lengths above, 160 training examples): training steps per example and epoch,
# validation not included (train_seconds / example-epochs: 46 s / 320 Multi30k, 50 s / 160
# SQuAD, 67 s / 160 DialogSum) and generation per test example for the slowest zero-shot system (1 /
# examples_per_s: 1.38, 2.79, 1.24).
TIMINGS = {
    "summarization": {"train": 67 / 160, "generate": 1 / 1.24},
    "qa": {"train": 50 / 160, "generate": 1 / 2.79},
    "translation": {"train": 46 / 320, "generate": 1 / 1.38},
}
EVAL_OVERHEAD = 1.25  # the teacher-forced loss pass and the metrics beside generation (guess)
# A 3-shot evaluation against the slowest zero-shot one, in the same run: 1.81x on DialogSum
# (141 s / 78 s), 1.74x on SQuAD (62 s / 36 s), 0.87x on Multi30k (63 s / 72 s).
FEW_SHOT_COST = 1.8
VALIDATION_COST = 1 / 3  # a validation forward against a training step (no backward)
# --train-minutes sizes each training set to this share of the minutes by TIMINGS: the methods
# train up to 1.13x slower than TIMINGS' figures (prefix on DialogSum, results/methods.md), and
# the machine is shared.
TRAIN_MINUTES_SHARE = 0.8
ZERO_SHOT_SYSTEMS = 4  # study, ours, ours in the chat template, no instruction
CHAT_VARIANTS = 2  # each K-shot prompt also in the chat template (SmolLM2 has one)


@dataclass
class Plan:
    """What the run does, and how long it should take."""

    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    shots: list[int]
    test_examples: int | None
    train_examples: dict[str, int]
    curve_task: str | None
    curve_sizes: list[int]
    val_limit: int = VAL_LIMIT
    val_loss_limit: int = VAL_LOSS_LIMIT
    epochs: dict[str, int] = field(default_factory=dict)
    budget_hours: float = BUDGET_HOURS
    curve_below: list[int] = field(default_factory=lambda: list(CURVE_SIZES))
    estimate_seconds: float = 0.0
    cuts: list[str] = field(default_factory=list)
    lr: dict[str, float] = field(default_factory=dict)  # --lr: a method's peak learning rate


def _soft_seconds(task: str, n: int, plan: Plan) -> float:
    """One soft prompt: training, validation per epoch, its test evaluation."""
    t, epochs = TIMINGS[task], plan.epochs[task]
    generate = t["generate"] * EVAL_OVERHEAD
    per_epoch = (n * t["train"] + plan.val_loss_limit * t["train"] * VALIDATION_COST
                 + plan.val_limit * generate)
    return epochs * per_epoch + (plan.test_examples or 200) * generate


def estimate(plan: Plan) -> dict[str, float]:
    """Estimated seconds per task (TIMINGS; the guesses are marked there)."""
    out = {}
    for task in plan.tasks:
        generate = TIMINGS[task]["generate"] * EVAL_OVERHEAD * (plan.test_examples or 200)
        few = sum(1 for k in plan.shots if k > 0)
        hard = generate * ((ZERO_SHOT_SYSTEMS if 0 in plan.shots else 0)
                           + few * CHAT_VARIANTS * FEW_SHOT_COST)
        n = plan.train_examples[task]
        soft = len(plan.methods) * len(plan.seeds) * _soft_seconds(task, n, plan)
        curve = 0.0
        if task == plan.curve_task:  # the first method only
            curve = len(plan.seeds) * sum(_soft_seconds(task, m, plan) for m in plan.curve_sizes
                                          if m != n)
        out[task] = hard + soft + curve
    return out


def make_plan(args) -> Plan:
    """The plan for ``args``: training sets cut in 10% steps until the estimate fits."""
    tasks = [t for t in args.tasks.split(",") if t]
    plan = Plan(tasks, [m for m in args.methods.split(",") if m],
                [int(s) for s in args.seeds.split(",")], [int(k) for k in args.shots.split(",")],
                args.limit, {t: args.train_limit or SETTINGS[t]["train_examples"] for t in tasks},
                args.curve_task if args.curve_task in tasks else None, [],
                args.val_limit, args.val_loss_limit,
                {t: args.epochs or SETTINGS[t]["epochs"] for t in tasks}, args.budget_hours,
                [int(n) for n in args.curve_sizes.split(",") if n])
    if args.train_minutes:
        if args.train_limit:
            raise SystemExit("error: --train-minutes and --train-limit both size the training "
                             "sets; give one")
        for t in tasks:
            plan.train_examples[t], plan.epochs[t] = train_examples_for(
                t, args.train_minutes, plan, _split_size(t), fixed_epochs=bool(args.epochs))
    check_methods(plan.methods)
    plan.lr = parse_lrs(args.lr)
    wanted = dict(plan.train_examples)
    budget = args.budget_hours * 3600
    while (not (args.train_limit or args.train_minutes)
           and sum(estimate(_with_curve(plan)).values()) > budget
           and any(n > MIN_TRAIN for n in plan.train_examples.values())):
        plan.train_examples = {t: max(MIN_TRAIN, int(n * 0.9) // 10 * 10)
                               for t, n in plan.train_examples.items()}
    plan = _with_curve(plan)
    plan.estimate_seconds = round(sum(estimate(plan).values()))
    if plan.test_examples:
        plan.cuts.append(f"test sets: the first {plan.test_examples} of each test split (the "
                         "hard prompts' evaluations are a fixed cost per example)")
    cut = {t: (wanted[t], n) for t, n in plan.train_examples.items() if n < wanted[t]}
    if cut:
        plan.cuts.append("training sets: " + ", ".join(f"{t} {n} of the {w} wanted"
                                                       for t, (w, n) in cut.items())
                         + f" examples, to fit the {args.budget_hours:g}-hour budget")
    left_out = [str(m) for m in ALL_METHODS if m not in plan.methods]
    if left_out:
        plan.cuts.append("methods: " + ", ".join(left_out) + " not run (--methods "
                         + ",".join(plan.methods) + ")")
    if plan.curve_task:
        plan.cuts.append(f"learning curve: {plan.curve_task} only, method "
                         f"{plan.methods[0]} only")
    if plan.estimate_seconds > budget:
        plan.cuts.append(f"(over budget: the estimate is {plan.estimate_seconds / 3600:.1f} h "
                         f"with the training sets at their floor of {MIN_TRAIN}; fewer "
                         "--methods or --seeds would fit)")
    return plan


def train_examples_for(task: str, minutes: float, plan: Plan, available: int | None = None,
                       fixed_epochs: bool = False) -> tuple[int, int]:
    """(examples, epochs) whose training steps and per-epoch validation loss take at most
    ``TRAIN_MINUTES_SHARE`` of ``minutes`` by TIMINGS: the task's epochs on as many examples
    as fit (a multiple of 10); where the training split (``available`` examples) runs out
    first, all of it for as many epochs as fit (unless ``fixed_epochs``)."""
    t, epochs = TIMINGS[task]["train"], plan.epochs[task]
    seconds = minutes * 60 * TRAIN_MINUTES_SHARE
    validation = plan.val_loss_limit * t * VALIDATION_COST
    n = max(MIN_TRAIN, int((seconds / epochs - validation) / t) // 10 * 10)
    if available is None or n <= available:
        return n, epochs
    if not fixed_epochs:
        epochs = max(epochs, int(seconds / (available * t + validation)))
    return available, epochs


def _split_size(task: str) -> int | None:
    path = DATA / task / "train.jsonl"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _with_curve(plan: Plan) -> Plan:
    if plan.curve_task:
        main = plan.train_examples[plan.curve_task]
        plan.curve_sizes = sorted({n for n in plan.curve_below if n < main} | {main})
    return plan


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


def parse_lrs(text: str | None) -> dict[str, float]:
    """``--lr prefix=0.03,prompt=0.05`` as {method: lr}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        method, _, value = item.partition("=")
        try:
            out[method.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"error: --lr takes METHOD=LR pairs, e.g. --lr prefix=0.03; got "
                             f"{item!r}") from None
    check_methods(list(out))
    return out


def check_methods(methods: list[str]) -> None:
    """An unknown method answers before hours of work, naming the ones there are."""
    unknown = [m for m in methods if m not in {str(x) for x in ALL_METHODS}]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; --methods takes a "
                         f"comma-separated subset of {','.join(str(x) for x in ALL_METHODS)}")


def _configs(task: str, plan: Plan, method: str, n: int) -> tuple[PromptConfig, TrainConfig]:
    s = SETTINGS[task]
    return (PromptConfig(num_virtual_tokens=s["num_virtual_tokens"], method=method),
            # The swept lr is the prompt method's; the other methods take their own default.
            TrainConfig(epochs=plan.epochs[task],
                        lr=plan.lr.get(method, s["lr"] if method == "prompt" else None),
                        batch_size=BATCH_SIZE,
                        max_length=s["max_length"], max_train_examples=n,
                        max_eval_examples=plan.val_loss_limit, patience=1))


HARD_PREFIXES = ("hard_", "no_instruction")


def run_task(name: str, plan: Plan, out_dir: Path, args) -> dict:
    """Every method's comparison on one task; returns the task's result.json content."""
    task = get_task(name)
    t0 = time.perf_counter()
    task_dir = out_dir / name
    if not args.reuse and task_dir.exists():
        shutil.rmtree(task_dir)  # a fresh run
    n = plan.train_examples[name]
    if args.hard_from:
        earlier = next(iter(sorted((Path(args.hard_from) / name).glob("*/systems"))), None)
        if earlier is None:
            raise SystemExit(f"error: --hard-from: no evaluations in {args.hard_from}/{name}; "
                             "give the --out directory of a finished run")
        _copy_hard(earlier, task_dir / plan.methods[0])
    validation = DATA / name / "validation.jsonl"
    methods = {}
    for i, method in enumerate(plan.methods):
        method_dir = task_dir / method
        if i:  # the hard prompts were evaluated with the first method: read them back
            _copy_hard(task_dir / plan.methods[0] / "systems", method_dir)
        pcfg, tcfg = _configs(name, plan, method, n)
        comp = compare(
            task, str(DATA / name / "train.jsonl"), str(DATA / name / "test.jsonl"), method_dir,
            validation_path=str(validation) if validation.is_file() else None,
            model_names=[args.model], limit=plan.test_examples, val_limit=plan.val_limit,
            generation=GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=16),
            prompt_config=pcfg, train_config=tcfg, shots=plan.shots, seeds=plan.seeds,
            train_sizes=plan.curve_sizes if name == plan.curve_task and not i else None,
            reuse=bool(i) or args.reuse or bool(args.hard_from), overwrite=True,
            progress=not args.quiet)[0]
        data = json.loads((method_dir / "comparison.json").read_text())
        methods[method] = {**comp.to_dict(), "settings": data["settings"],
                           "samples": {k: v[:2] for k, v in comp.predictions.items()},
                           "trainable_parameters": _trainable_parameters(method_dir)}
        if comp.curve:
            figure = args.output.parent / "results" / f"learning_curve_{name}.png"
            figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(method_dir / "learning_curve.png", figure)
            methods[method]["curve_figure"] = str(figure.relative_to(args.output.parent))
    return {"task": name, "primary": task.primary_metric, "model": args.model,
            "settings": {**SETTINGS[name], "train_examples": n, "epochs": plan.epochs[name],
                         "batch_size": BATCH_SIZE},
            "test_examples": plan.test_examples, "methods": methods,
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def _trainable_parameters(method_dir: Path) -> int | None:
    """What the method trained, as its first prompt's softprompt.json records it."""
    metas = sorted(method_dir.glob("prompt*/softprompt.json"))
    if not metas:
        return None
    return json.loads(metas[0].read_text())["metrics"].get("trainable_parameters")


def _copy_hard(systems: Path, method_dir: Path) -> None:
    """The hard-prompt evaluations in ``systems`` (another method's, or an earlier run's)
    into ``method_dir``, where compare(reuse=True) finds them finished."""
    for src in systems.iterdir():
        dest = method_dir / "systems" / src.name
        if src.name.startswith(HARD_PREFIXES) and not dest.exists():
            shutil.copytree(src, dest)


def _validation_loss(method_dir: Path) -> float | None:
    """The selected prompts' validation loss (what picks the best epoch and the best method),
    averaged over seeds, as their softprompt.json files record it."""
    losses = [json.loads(p.read_text())["metrics"].get("val_loss")
              for p in sorted(method_dir.glob("prompt*/softprompt.json"))]
    losses = [x for x in losses if x is not None]
    return sum(losses) / len(losses) if losses else None


def _or_dash(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# --- RESULTS.md -------------------------------------------------------------------------------

PRIMARY_NAMES = {"rougeL": "ROUGE-L", "f1": "F1", "chrf": "chrF"}
TASK_TITLES = {"summarization": "Summarization (DialogSum)",
               "qa": "Question answering (SQuAD v1.1)",
               "translation": "Translation EN→DE (Multi30k)"}
TABLE_KEYS = ("rouge1", "rouge2", "rougeL", "exact_match", "f1", "bleu", "chrf",
              "token_overlap", "loss", "empty_rate")


def _soft_name(method: str) -> str:
    return f"{SOFT} ({method})"


def _systems(r: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """All systems of a task (each method's soft prompt, then the hard prompts) and spreads."""
    systems, spread = {}, {}
    for method, m in r["methods"].items():
        systems[_soft_name(method)] = m["systems"][SOFT]
        # One seed has no spread to show.
        spread[_soft_name(method)] = m["spread"].get(SOFT, {}) if len(m["seeds"]) > 1 else {}
    first = next(iter(r["methods"].values()))
    systems.update({k: v for k, v in first["systems"].items() if k != SOFT})
    return systems, spread


def _table(systems: dict[str, dict], spread: dict[str, dict]) -> list[str]:
    keys = [k for k in TABLE_KEYS if any(k in m for m in systems.values())]
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in systems.items():
        std = spread.get(name, {})
        cells = [f"{m[k]:.2f}" + (f" ± {std[k]:.2f}" if k in std else "") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _best_margin(m: dict) -> dict | None:
    return next((i for i in m["intervals"] if i["best"]), None)


def _seeds_sentence(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"one training seed ({seeds[0]}) per method, so no spread is shown."
    return (f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}) per method, shown as "
            "mean ± sample std.")


def _lrs(r: dict) -> str:
    """Each method's peak learning rate, as its comparison recorded it."""
    return ", ".join(f"{method} {m['settings']['lr']}" for method, m in r["methods"].items()
                     if m.get("settings", {}).get("lr") is not None)


def _summary(results: list[dict], out: Path) -> list[str]:
    """One row per (task, method); the method with the lowest validation loss on a task (the
    one chosen without looking at the test split) is marked *."""
    several = any(len(m["seeds"]) > 1 for r in results for m in r["methods"].values())
    soft_header = "soft prompt (mean ± std)" if several else "soft prompt"
    lines = [f"| task | metric | method | val loss | {soft_header} | best hard prompt | "
             "margin, 95% CI | significant | train s / seed | trained parameters |",
             "|---" * 10 + "|"]
    for r in results:
        p = r["primary"]
        val = {method: _validation_loss(out / r["task"] / method) for method in r["methods"]}
        known = {k: v for k, v in val.items() if v is not None}
        chosen = min(known, key=known.get) if len(known) > 1 else None
        for method, m in r["methods"].items():
            b = _best_margin(m)
            if b is None:
                continue
            soft, std = m["systems"][SOFT][p], m["spread"].get(SOFT, {}).get(p, 0.0)
            shown = f"{soft:.2f} ± {std:.2f}" if len(m["seeds"]) > 1 else f"{soft:.2f}"
            hard = m["systems"][b["system"]][p]
            lines.append(f"| {r['task']} | {PRIMARY_NAMES.get(p, p)} | "
                         f"{method}{' *' if method == chosen else ''} | "
                         f"{_or_dash(val[method], '.3f')} | "
                         f"{shown} | {hard:.2f} ({b['system']}) | "
                         f"{b['estimate']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}] | "
                         f"{'yes' if b['significant'] else 'no'} | "
                         f"{_or_dash(m.get('train_seconds'), '.0f')} | "
                         f"{_or_dash(m.get('trainable_parameters'), ',')} |")
    return lines


def _chosen_note(results: list[dict]) -> list[str]:
    if not any(len(r["methods"]) > 1 for r in results):
        return []
    return ["\\* the task's method with the lowest validation loss (mean target-token "
            "cross-entropy on the validation examples): the method chosen without the test "
            "split.", ""]


def _hard_systems(method_dir: Path) -> dict[str, bytes]:
    return {d.name: (d / "predictions.jsonl").read_bytes()
            for d in sorted((method_dir / "systems").glob("*"))
            if d.name.startswith(HARD_PREFIXES) and (d / "predictions.jsonl").is_file()}


def _further_run(number: int, out: Path, main_out: Path, main_run: dict) -> list[str]:
    """A run beside the main one (``--also``): its provenance, settings and summary."""
    run = json.loads((out / "run.json").read_text())
    results = _load_results(out)
    plan = run["plan"]
    lines = [f"## Further run {number}: {', '.join(plan['methods'])}, "
             f"{_seeds_sentence(plan['seeds']).split(' per method')[0]}", ""]
    lines += _provenance(run, results)
    lines += ["Training sets: " + ", ".join(
        f"{r['task']} {r['settings']['train_examples']} examples x "
        f"{r['settings']['epochs']} epoch(s)" for r in results) + f"; batch {BATCH_SIZE}; "
              f"learning rate {_lrs(results[0]) if results else '-'}; "
              f"{plan['test_examples'] or 'all'} test examples."]
    same = []
    for r in results:
        mine = _hard_systems(out / r["task"] / next(iter(r["methods"])))
        main_dir = next((main_out / r["task"]).glob("*/systems"), None)
        theirs = _hard_systems(main_dir.parent) if main_dir else {}
        if mine and all(theirs.get(k) == v for k, v in mine.items()):
            same.append(r["task"])
    if same:
        lines += ["", f"The hard prompts' evaluations of {', '.join(same)} are the main run's "
                  f"(commit {main_run['commit']}: identical predictions on the same test "
                  "examples), reused rather than repeated."]
    lines += [""] + [f"- {c}" for c in plan["cuts"]] + [""]
    lines += _summary(results, out) + [""] + _chosen_note(results)
    return lines


def _load_results(out: Path) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    results = [r for r in results if "methods" in r]  # result files of this script's format
    order = {t: i for i, t in enumerate(TASKS)}
    return sorted(results, key=lambda r: order.get(r["task"], 9))


def _findings(results: list[dict]) -> list[str]:
    """What the tables say, computed from them (no figure here is written by hand)."""
    margins = [(r["task"], method, _best_margin(m)) for r in results
               for method, m in r["methods"].items() if _best_margin(m)]
    wins = [x for x in margins if x[2]["significant"] and x[2]["estimate"] > 0]
    losses = [x for x in margins if x[2]["significant"] and x[2]["estimate"] < 0]
    lines = ["## What we found", "",
             f"- Of {len(margins)} (task, method) pairs, the soft prompt beats the best hard "
             f"prompt significantly in {len(wins)}, loses significantly in {len(losses)}, and "
             f"{len(margins) - len(wins) - len(losses)} are not significant (95% CI contains "
             "0)."]
    best = [b["system"] for _, _, b in margins]
    lines.append("- The best hard prompt: " + "; ".join(
        f"`{name}` for {best.count(name)} of {len(best)}" for name in sorted(set(best))) + ".")
    for r in results:
        p = r["primary"]
        systems = next(iter(r["methods"].values()))["systems"]
        zero = max((m[p], n) for n, m in systems.items() if n != SOFT and "shots" not in m)
        few = [(m[p], n, m) for n, m in systems.items() if "shots" in m]
        if few:
            top = max(few, key=lambda x: x[0])
            lines.append(f"- {r['task']}: the best few-shot prompt `{top[1]}` scores "
                         f"{top[0]:.2f} {PRIMARY_NAMES.get(p, p)} against {zero[0]:.2f} for "
                         f"the best zero-shot `{zero[1]}` ({top[0] - zero[0]:+.2f}); "
                         f"{top[2]['shots_mean']:.2f} of {int(top[2]['shots'])} demonstrations "
                         f"fitted per example on average.")
    for r in results:
        for method, m in r["methods"].items():
            if m.get("curve"):
                p = r["primary"]
                points = ", ".join(f"{c['train_examples']}: {c['mean']:.2f} ± {c['std']:.2f}"
                                   for c in m["curve"])
                lines.append(f"- Learning curve ({r['task']}, {method}), "
                             f"{PRIMARY_NAMES.get(p, p)} by training examples: {points}.")
    return lines + [""]


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
    lr, length = resolved_lr(TrainConfig(), PromptConfig()), PromptConfig().num_virtual_tokens
    lines += ["", f"Best {metric}: P = {best['num_virtual_tokens']}, lr {best['lr']} "
              f"({best[metric]:.2f}); lowest validation loss: P = {lowest['num_virtual_tokens']}"
              f", lr {lowest['lr']} ({lowest['val_loss']:.3f}). The package's defaults are lr "
              f"{lr} and P = {length}" + (", the best setting on the task metric." if
                                          (best["lr"], best["num_virtual_tokens"]) == (lr, length)
                                          else "."), ""]
    return lines


def _provenance(run: dict, results: list[dict]) -> list[str]:
    lines = [f"- Command: `{run['command']}`", f"- Commit: {run['commit']}",
             f"- Machine: {run['machine']}", f"- Date: {run['date']}",
             f"- Total time: {run['wall_seconds'] / 60:.0f} minutes (estimated beforehand: "
             f"{run['plan']['estimate_seconds'] / 60:.0f})", "", "| task | wall time |",
             "|---|---|"]
    lines += [f"| {r['task']} | {r['wall_seconds'] / 60:.0f} min |" for r in results]
    return lines + [""]


def write_results_md(out: Path, path: Path = ROOT / "RESULTS.md",
                     sweep_dir: Path = ROOT / "bench" / "out", also: list[Path] = ()) -> None:
    """RESULTS.md from <out>/run.json and <out>/<task>/result.json, a section for each run
    in ``also`` (its own out directory), and the sweep."""
    run = json.loads((out / "run.json").read_text())
    results = _load_results(out)
    plan = run["plan"]
    md = ["# Results on real data", "",
          f"Soft prompts vs hand-written prompts with {run['model']}, on the test splits of "
          f"`../{DATA.parent.name}/{DATA.name}`. Every system goes through the same template, "
          "truncation, greedy decoding and metrics; only what stands in front of the input "
          f"differs. Soft prompts: {_seeds_sentence(plan['seeds'])} Hard "
          f"prompts: zero-shot and {', '.join(str(k) for k in plan['shots'] if k)}-shot "
          "(demonstrations drawn once from the training split, seed 0, as many as fit the "
          "model's context beside the whole input). Margins: soft prompt (mean over seeds) "
          "minus the best hard prompt on the primary metric, with a paired bootstrap 95% "
          "interval over the test examples (1,000 resamples, seed 0). Scores are 0-100 (loss: "
          "mean target-token cross-entropy, teacher-forced; empty_rate: % of empty outputs).",
          "", f"Generated by `python bench/results.py` (this file written {_now()}):", ""]
    md += _provenance(run, results)
    md += ["## What was cut to fit the budget", ""] + [f"- {c}" for c in plan["cuts"]] + [""]
    if results:
        md += ["## Summary", ""] + _summary(results, out) + [""] + _chosen_note(results)
    for r in results:
        s = r["settings"]
        systems, spread = _systems(r)
        md += [f"## {TASK_TITLES.get(r['task'], r['task'])}", "",
               f"Soft prompts: P={s['num_virtual_tokens']}, learning rate {_lrs(r)}, "
               f"{s['epochs']} "
               f"epoch(s) on the first {s['train_examples']} training examples, batch "
               f"{s['batch_size']}, max length {s['max_length']}; "
               f"{r['test_examples'] or 'all'} test examples. Training time per seed: "
               + ", ".join(f"{m}: {v['train_seconds']:.0f} s" for m, v in r["methods"].items()
                           if v.get("train_seconds") is not None) + ".", ""]
        md += _table(systems, spread) + [""]
        for method, m in r["methods"].items():
            md += [f"- {method}: {margin_sentence(i)}" for i in m["intervals"] if i["best"]]
        md.append("")
        for method, m in r["methods"].items():
            if m.get("curve"):
                md += [f"Learning curve ({method}): {PRIMARY_NAMES.get(r['primary'])} against "
                       "training examples, the best zero- and few-shot hard prompts as lines.",
                       "", f"![learning curve]({m['curve_figure']})", ""]
        first = next(iter(r["methods"].values()))["samples"]
        md += ["Sample outputs (first test examples):", ""]
        for i, row in enumerate(next(iter(first.values()))[:2]):
            text = row["input"] if len(row["input"]) < 400 else row["input"][:400] + " ..."
            md += ["```", text, "```", f"- reference: {row['references'][0]!r}"]
            for method, m in r["methods"].items():
                md.append(f"- {_soft_name(method)}, seed {m['seeds'][0]}: "
                          f"{m['samples'][SOFT][i]['prediction']!r}")
            md += [f"- {name}: {rows[i]['prediction']!r}" for name, rows in first.items()
                   if name != SOFT]
            md.append("")
    if results:
        md += _findings(results)
    for number, other in enumerate(also, 1):
        md += _further_run(number, Path(other), out, run)
    md += _sweep_section(sweep_dir)
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


def _command(args) -> str:
    """The command that reproduces the run from scratch (options that only say where files
    go, or skip finished work, left out)."""
    parts = ["python bench/results.py"]
    for flag, value, default in (("--tasks", args.tasks, ",".join(TASKS)),
                                 ("--methods", args.methods, ",".join(METHODS)),
                                 ("--seeds", args.seeds, ",".join(map(str, SEEDS))),
                                 ("--shots", args.shots, ",".join(map(str, SHOTS))),
                                 ("--limit", args.limit, TEST_EXAMPLES),
                                 ("--train-limit", args.train_limit, None),
                                 ("--train-minutes", args.train_minutes, None),
                                 ("--lr", args.lr, None),
                                 ("--epochs", args.epochs, None),
                                 ("--curve-task", args.curve_task, CURVE_TASK),
                                 ("--curve-sizes", args.curve_sizes,
                                  ",".join(map(str, CURVE_SIZES))),
                                 ("--budget-hours", args.budget_hours, BUDGET_HOURS),
                                 ("--val-limit", args.val_limit, VAL_LIMIT),
                                 ("--val-loss-limit", args.val_loss_limit, VAL_LOSS_LIMIT),
                                 ("--model", args.model, DEFAULT_MODEL)):
        if value != default:
            parts += [flag, format(value, "g") if isinstance(value, float) else str(value)]
    return " ".join(parts)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated training methods (prompt, ptuning, residual, prefix "
                         f"where the tree has them; default: {','.join(METHODS)})")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="training seeds")
    ap.add_argument("--shots", default=",".join(map(str, SHOTS)),
                    help="K of the hard baselines (0: zero-shot)")
    ap.add_argument("--limit", type=int, default=TEST_EXAMPLES, help="test examples per task")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="training examples per task (default: cut to fit --budget-hours)")
    ap.add_argument("--train-minutes", type=float, default=None,
                    help="size each task's training set (and, where the split runs out first, "
                         "its epochs) to this many minutes of training on the machine of "
                         "TIMINGS, instead of cutting to fit --budget-hours")
    ap.add_argument("--lr", default=None, metavar="METHOD=LR,...",
                    help="peak learning rates by method (default: the swept 0.03 for prompt, "
                         "the package's defaults for the others)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs per task (default: SETTINGS' epochs)")
    ap.add_argument("--curve-task", default=CURVE_TASK, help="the task with a learning curve "
                    "('none': no curve)")
    ap.add_argument("--curve-sizes", default=",".join(map(str, CURVE_SIZES)),
                    help="learning-curve training sizes below the task's own (which is "
                         "always a point)")
    ap.add_argument("--budget-hours", type=float, default=BUDGET_HOURS,
                    help="the run's time budget on the 2-core machine of TIMINGS")
    ap.add_argument("--val-limit", type=int, default=VAL_LIMIT,
                    help="validation examples generated per epoch for the task metric")
    ap.add_argument("--val-loss-limit", type=int, default=VAL_LOSS_LIMIT,
                    help="validation examples for the validation loss")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the frozen model")
    ap.add_argument("--out", default=str(ROOT / "results-output"))
    ap.add_argument("--output", type=Path, default=ROOT / "RESULTS.md",
                    help="the Markdown file to write (default: RESULTS.md; the learning "
                         "curve goes to results/ beside it)")
    ap.add_argument("--also", action="append", default=[], metavar="OUT",
                    help="another run's --out directory: a section of its own in --output "
                         "(repeatable)")
    ap.add_argument("--hard-from", metavar="OUT", default=None,
                    help="an earlier run's --out directory on the same test examples: its "
                         "hard-prompt evaluations are copied, not repeated")
    ap.add_argument("--reuse", action="store_true",
                    help="keep trained prompts and finished evaluations in --out; run the rest")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite --output from results already in --out")
    ap.add_argument("--plan", action="store_true", help="print the plan and its estimate")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        write_results_md(out, args.output, also=args.also)
        return
    plan = make_plan(args)
    per_task = estimate(plan)
    print(json.dumps({**asdict(plan), "estimate_per_task_seconds":
                      {t: round(s) for t, s in per_task.items()}}, indent=1), flush=True)
    if args.plan:
        return
    # The code that runs, taken now: the run's own figures (results/*.png) are new files by
    # the end and would mark the tree dirty.
    commit = git_commit()
    for name in plan.tasks:
        result_path = out / name / "result.json"
        previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
        result = run_task(name, plan, out, args)
        if args.reuse and "methods" in previous:  # the earlier run's time counts too
            result["wall_seconds"] += previous["wall_seconds"]
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
        for method, m in result["methods"].items():
            best = _best_margin(m)
            if best:
                print(f"{name} {method}: {margin_sentence(best)}", flush=True)
    wall = sum(json.loads((out / t / "result.json").read_text())["wall_seconds"]
               for t in plan.tasks)
    run = {"command": _command(args), "commit": commit, "machine": machine(),
           "date": _now(), "wall_seconds": round(wall, 1), "model": args.model,
           "plan": asdict(plan)}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    write_results_md(out, args.output, also=args.also)


if __name__ == "__main__":
    main()
