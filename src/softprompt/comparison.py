"""Soft prompt vs hard prompts on one test set, for one or several base models.

For each model:

1. train one soft prompt per seed (or take ``--prompt``) and evaluate each;
2. evaluate the hard-prompt baselines through the same pipeline: zero-shot (the study's
   instruction, ours, ours in the chat template, ``--hard``, none) and K-shot (ours with K
   demonstrations drawn from the training split, :mod:`softprompt.evaluation`);
3. the soft prompt's margin over every hard prompt on the primary metric, with a paired
   bootstrap 95% interval over test examples (:mod:`softprompt.stats`);
4. with ``train_sizes``, the learning curve: soft prompts trained on the first N training
   examples (every seed), scored on the same test set;

then write ``report.md`` / ``report.html`` with plots and ``comparison.json``.

Layout of ``output``: ``prompt/`` and ``systems/<system>/`` (one seed) or ``prompt-seed<S>/``
and ``systems/soft_prompt-seed<S>/`` (several), ``curve/n<N>-seed<S>/{prompt,eval}/``.
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softprompt import atomic, models
from softprompt.config import (
    GenerationConfig,
    PromptConfig,
    TrainConfig,
    check_count,
    resolved_lr,
)
from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.evaluation import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    SOFT,
    System,
    baselines,
    evaluate,
    few_shot_baselines,
    write_eval,
)
from softprompt.prefix import check_fits
from softprompt.prompt import load_prompt_tensor
from softprompt.report import (
    ModelComparison,
    margin_sentence,
    markdown_table,
    metrics_table,
    write_report,
)
from softprompt.stats import mean_of, paired_bootstrap, rows_score
from softprompt.tasks import Task, make_examples
from softprompt.training import LOG_FILE, train

DEFAULT_SHOTS = (0, 3)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


@dataclass
class SoftRun:
    """One trained (or loaded) soft prompt and its evaluation on the test set."""

    seed: int
    train_examples: int | None
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    log: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float | None = None


@dataclass
class _Setup:
    """What every training and evaluation of one model shares."""

    model: Any
    tokenizer: Any
    name: str
    task: Task
    train_records: list[dict] | None
    val_records: list[dict] | None
    test_records: list[dict]
    generation: GenerationConfig
    prompt_config: PromptConfig
    train_config: TrainConfig
    val_limit: int
    overwrite: bool
    reuse: bool
    progress: bool


def compare(task: Task, train_path: str | None, test_path: str, output: str | Path, *,
            validation_path: str | None = None, prompt_dir: str | None = None,
            hard: list[str] | None = None, model_names: list[str] | None = None,
            splits: tuple[str, str, str] = ("train", "validation", "test"),
            limit: int | None = None, val_limit: int = 20,
            generation: GenerationConfig | None = None,
            prompt_config: PromptConfig | None = None, train_config: TrainConfig | None = None,
            shots: list[int] | tuple[int, ...] | None = None, shots_seed: int = 0,
            seeds: list[int] | None = None, train_sizes: list[int] | None = None,
            overwrite: bool = False, reuse: bool = False, progress: bool = True,
            device: str | torch.device = "auto",
            dtype: str | torch.dtype = "auto", precision: str = "auto") -> list[ModelComparison]:
    """Train (or load) soft prompts per model and compare them with hard-prompt baselines.

    ``splits`` are the (train, validation, test) splits of ``hf:`` sources. ``shots`` are
    the K of the hard baselines (0: zero-shot; default 0 and 3 with training data, 0
    without); ``seeds`` train one prompt each (default: the train config's seed);
    ``train_sizes`` add the learning curve. ``reuse`` keeps the evaluations already in
    ``output`` (a finished or interrupted run), resumes or keeps its trained prompts and
    only runs what is missing; with ``prompt_dir`` nothing is trained.
    """
    started, clock = _now(), time.perf_counter()
    out = Path(output)
    if (out / "report.md").exists() and not (overwrite or reuse):
        raise SoftPromptError(f"{out} already holds a report; pass --overwrite to replace it "
                              f"or --reuse to add to it")
    check_count("--limit", limit)
    check_count("--val-limit", val_limit, zero="none")
    atomic.check_writable(out)
    torch_device = models.resolve_device(device)
    if prompt_dir is None and train_path is None:
        raise SoftPromptError("give --train PATH to train a soft prompt, or --prompt DIR")
    model_names = model_names or [models.DEFAULT_MODEL]
    if prompt_dir is not None and len(model_names) > 1:
        raise SoftPromptError("--prompt fits one model; drop --models or --prompt")
    tcfg = train_config or TrainConfig()
    # Trained here: the training rule (float32 weights under bfloat16 autocast on a CPU), and
    # every evaluation of the comparison runs under the same autocast.
    prec = models.resolve_precision(precision, dtype, torch_device,
                                    training=prompt_dir is None, bf16=tcfg.bf16)
    tcfg = replace(tcfg, bf16=prec.name == "bf16")
    seeds = _check_seeds(seeds if seeds is not None else [tcfg.seed], prompt_dir)
    shots = sorted(set(DEFAULT_SHOTS if train_path else (0,)) if shots is None else set(shots))
    if any(k < 0 for k in shots) or shots_seed < 0:
        raise SoftPromptError(f"--shots and --shots-seed must be zero or positive, got "
                              f"{shots} and {shots_seed}")
    if any(shots) and train_path is None:
        raise SoftPromptError("K-shot baselines draw their demonstrations from the training "
                              "data; give --train PATH or --shots 0")
    train_records, val_records, test_records = _read_data(
        task, (train_path, validation_path, test_path), splits, limit)
    sizes = _check_sizes(train_sizes or [], train_records, prompt_dir)
    gen = generation or GenerationConfig(**task.generation_defaults())
    pcfg = prompt_config or PromptConfig()
    comparisons = []
    for name in model_names:
        model, tokenizer = models.load_model(name, dtype=prec.weights, device=torch_device)
        setup = _Setup(model, tokenizer, name, task, train_records, val_records, test_records,
                       gen, pcfg, tcfg, val_limit, overwrite, reuse, progress)
        model_out = out / slug(name) if len(model_names) > 1 else out
        with prec.context(torch_device):
            comparisons.append(_compare_model(setup, model_out, prompt_dir, hard, shots,
                                              shots_seed, seeds, sizes))
    settings = _settings(task, (train_path, validation_path, test_path),
                         (train_records, val_records, test_records), model_names, pcfg, tcfg,
                         gen, prompt_dir=prompt_dir, seeds=seeds, shots=shots,
                         shots_seed=shots_seed, train_sizes=sizes, val_limit=val_limit,
                         started=started, seconds=time.perf_counter() - clock)
    write_report(out, task.name, comparisons, task.primary_metric, settings=settings)
    atomic.write_json(out / "comparison.json",
                      {"task": task.name, "primary_metric": task.primary_metric,
                       "generation": asdict(gen), "settings": settings,
                       "models": [c.to_dict() for c in comparisons]})
    return comparisons


def _compare_model(s: _Setup, out: Path, prompt_dir: str | None, hard: list[str] | None,
                   shots: list[int], shots_seed: int, seeds: list[int],
                   sizes: list[int]) -> ModelComparison:
    """Steps 1-4 of the module docstring for one model."""
    # 1. The soft prompts, one per seed.
    several = len(seeds) > 1
    runs = []
    for seed in seeds:
        tag = f"-seed{seed}" if several else ""
        runs.append(_soft_run(s, seed, s.train_config.max_train_examples,
                              Path(prompt_dir) if prompt_dir else out / f"prompt{tag}",
                              out / "systems" / slug(SOFT + tag), trained=prompt_dir is not None,
                              val_metric=True))
    # 2. The hard prompts: zero-shot and K-shot.
    # A chat-template task wraps every system already: no separate chat baselines.
    chat = bool(getattr(s.tokenizer, "chat_template", None)) and not s.task.chat_template
    systems = baselines(s.task, hard, chat=chat) if 0 in shots else []
    if s.train_records is not None:
        systems += few_shot_baselines(s.task, s.train_records, shots, shots_seed, chat=chat)
    metrics, predictions = _evaluate_systems(s, systems, out / "systems")
    soft_metrics, spread = _mean_and_std([r.metrics for r in runs])
    comp = ModelComparison(
        s.name, models.num_parameters(s.model), {SOFT: soft_metrics, **metrics},
        {SOFT: runs[0].predictions, **predictions}, runs[0].log,
        _mean([r.train_seconds for r in runs]),
        spread={SOFT: spread} if several else {}, seeds=seeds,
        seed_metrics=[{"seed": r.seed, **r.metrics} for r in runs])
    # 3. The soft prompt's margin over each hard prompt, with its interval.
    comp.intervals = _intervals(s.task.primary_metric, runs, predictions)
    # 4. The learning curve.
    if sizes:
        comp.curve = _curve(s, out, seeds, sizes, runs)
    return comp


def _soft_run(s: _Setup, seed: int, size: int | None, prompt_dir: Path, eval_dir: Path, *,
              trained: bool, val_metric: bool) -> SoftRun:
    """Train (or load) one soft prompt and evaluate it (or read its finished evaluation)."""
    if trained:
        prompt, meta = load_prompt_tensor(prompt_dir)
        check_fits(prompt, s.model, str(prompt_dir))
        log, seconds = read_log(prompt_dir), meta.metrics.get("train_seconds")
    else:
        tcfg = replace(s.train_config, seed=seed, max_train_examples=size)
        pcfg, task, gen = s.prompt_config, s.task, s.generation

        def metric(epoch: int, tensor) -> dict[str, float]:
            res = evaluate(s.model, s.tokenizer, task, s.val_records[:s.val_limit],
                           System(SOFT, tensor), generation=gen, max_length=tcfg.max_length)
            return {f"val_{task.primary_metric}": res.metrics[task.primary_metric]}

        per_epoch = val_metric and s.val_records and s.val_limit
        # --reuse resumes an interrupted training; a finished one returns at once.
        result = train(s.model, s.tokenizer, task, s.train_records, prompt_dir,
                       validation_records=s.val_records, prompt_config=pcfg, train_config=tcfg,
                       model_name=s.name, overwrite=s.overwrite, resume=s.reuse,
                       progress=s.progress, on_epoch_end=metric if per_epoch else None)
        prompt, log = result.prompt, result.log
        seconds = result.meta.metrics.get("train_seconds")
    system = System(SOFT, prompt)
    done = _kept_eval(s, eval_dir)
    if done is None:
        res = _run_eval(s, system, f"{SOFT} (seed {seed}, {size or 'all'} examples)")
        write_eval(eval_dir, res)
        done = res.metrics, res.predictions
    return SoftRun(seed, size, done[0], done[1], log, seconds)


def _curve(s: _Setup, out: Path, seeds: list[int], sizes: list[int],
           runs: list[SoftRun]) -> list[dict[str, Any]]:
    """Primary metric of soft prompts trained on the first N examples, per N and seed (the
    main runs stand in where N is their own size)."""
    primary = s.task.primary_metric
    main = min(len(s.train_records), s.train_config.max_train_examples or len(s.train_records))
    points = []
    for n in sizes:
        if n == main:
            values = [r.metrics[primary] for r in runs]
        else:
            values = []
            for seed in seeds:
                d = out / "curve" / f"n{n}-seed{seed}"
                values.append(_soft_run(s, seed, n, d / "prompt", d / "eval", trained=False,
                                        val_metric=False).metrics[primary])
        mean, std = _mean_std(values)
        points.append({"train_examples": n, "seeds": seeds, "values": values, "mean": mean,
                       "std": std})
    return points


def _intervals(primary: str, runs: list[SoftRun],
               predictions: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Paired bootstrap of (soft - hard) on ``primary`` for every hard system; the soft
    prompt's score is its mean over seeds on the same resampled examples."""
    ids = [r["id"] for r in runs[0].predictions]
    for name, rows in [*((SOFT, r.predictions) for r in runs), *predictions.items()]:
        assert [r["id"] for r in rows] == ids, f"{name} was scored on other examples"
    soft = mean_of([rows_score(primary, r.predictions) for r in runs])
    scores = {name: rows_score(primary, rows) for name, rows in predictions.items()}
    if not scores:
        return []
    best = max(scores, key=lambda n: scores[n](np.arange(len(ids))))
    return [{"system": name, "metric": primary, "best": name == best,
             **paired_bootstrap(soft, score, len(ids)).to_dict()}
            for name, score in scores.items()]


def _run_eval(s: _Setup, system: System, what: str):
    if s.progress:
        print(f"evaluating {what} on {len(s.test_records)} examples ({s.name})", file=sys.stderr)
    return evaluate(s.model, s.tokenizer, s.task, s.test_records, system,
                    generation=s.generation, max_length=s.train_config.max_length,
                    progress=s.progress)


def _evaluate_systems(s: _Setup, systems: list[System], out: Path
                      ) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """Evaluate each system (or, with ``reuse``, read its finished evaluation under ``out``)."""
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for system in systems:
        done = _kept_eval(s, out / slug(system.name))
        if done is None:
            res = _run_eval(s, system, system.name)
            write_eval(out / slug(system.name), res)
            done = res.metrics, res.predictions
        metrics[system.name], predictions[system.name] = done
    return metrics, predictions


def _kept_eval(s: _Setup, directory: Path
               ) -> tuple[dict[str, float], list[dict[str, Any]]] | None:
    """With ``reuse``, a finished evaluation in ``directory`` of this run's test examples."""
    done = read_eval(directory) if s.reuse else None
    if done is not None:
        ids = [ex.id for ex in make_examples(s.task, s.test_records)]
        if [r["id"] for r in done[1]] != ids:
            raise SoftPromptError(f"{directory} holds an evaluation of other test examples "
                                  f"than this run's; drop --reuse (or restore --limit)")
    return done


def _check_seeds(seeds: list[int], prompt_dir: str | None) -> list[int]:
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SoftPromptError(f"--seeds must be distinct non-negative integers, e.g. 0,1,2; got "
                              f"{seeds}")
    if prompt_dir is not None and len(seeds) > 1:
        raise SoftPromptError("--seeds trains one prompt per seed; drop it with --prompt")
    return list(seeds)


def _check_sizes(sizes: list[int], train_records: list[dict] | None,
                 prompt_dir: str | None) -> list[int]:
    if not sizes:
        return []
    if prompt_dir is not None or train_records is None:
        raise SoftPromptError("--train-sizes trains prompts: give --train PATH (not --prompt)")
    if any(n <= 0 for n in sizes):
        raise SoftPromptError(f"--train-sizes must be positive, got {sizes}")
    if max(sizes) > len(train_records):
        raise SoftPromptError(f"--train-sizes {max(sizes)} exceeds the {len(train_records)} "
                              f"training records; lower it")
    return sorted(set(sizes))


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return (statistics.fmean(values),
            statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_and_std(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per metric, the mean and sample standard deviation over seeds."""
    if len(rows) == 1:
        return dict(rows[0]), {}
    means, stds = {}, {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if len(values) == len(rows):
            means[key], stds[key] = (round(v, 4) for v in _mean_std(values))
    return means, stds


def _read_data(task: Task, paths: tuple[str | None, str | None, str],
               splits: tuple[str, str, str], limit: int | None,
               ) -> tuple[list[dict] | None, list[dict] | None, list[dict]]:
    """Read and validate every dataset (train, validation, test) before any slow work."""
    test_records = read_records(paths[2], splits[2], limit=limit)
    make_examples(task, test_records)
    train_records, val_records = (read_records(path, split) if path else None
                                  for path, split in zip(paths[:2], splits[:2]))
    for records in (train_records or [], val_records or []):
        make_examples(task, records)
    return train_records, val_records, test_records


def _settings(task: Task, paths: tuple[str | None, str | None, str],
              records: tuple[list | None, list | None, list], model_names: list[str],
              pcfg: PromptConfig, tcfg: TrainConfig, gen: GenerationConfig, *,
              prompt_dir: str | None, seeds: list[int], shots: list[int], shots_seed: int,
              train_sizes: list[int], val_limit: int, started: str,
              seconds: float) -> dict[str, Any]:
    """The run's settings and provenance, shown at the top of the report."""
    train_n, val_n, test_n = (None if r is None else len(r) for r in records)
    used = None if train_n is None else min(train_n, tcfg.max_train_examples or train_n)
    return {
        "task": task.name, "primary_metric": task.primary_metric, "models": model_names,
        "data": {"train": paths[0], "validation": paths[1], "test": paths[2]},
        "split_sizes": {"train": train_n, "train_used": used, "validation": val_n,
                        "validation_loss_examples": None if val_n is None else
                        min(val_n, tcfg.max_eval_examples or val_n),
                        "validation_metric_examples": None if val_n is None else
                        min(val_n, val_limit),
                        "test": test_n},
        "method": getattr(tcfg, "method", getattr(pcfg, "method", "prompt")),
        "prompt": prompt_dir,
        "num_virtual_tokens": pcfg.num_virtual_tokens, "init": pcfg.init.value,
        "epochs": tcfg.epochs, "lr": resolved_lr(tcfg, pcfg), "batch_size": tcfg.batch_size,
        "max_length": tcfg.max_length, "seeds": seeds, "shots": shots,
        "shots_seed": shots_seed, "train_sizes": train_sizes,
        "decoding": ("greedy" if gen.temperature == 0 else
                     f"temperature {gen.temperature}, top-p {gen.top_p}"),
        "max_new_tokens": gen.max_new_tokens, "commit": source_commit(),
        "started": started, "finished": _now(), "seconds": round(seconds, 1),
    }


def source_commit() -> str:
    """``git describe --always --dirty`` of the checkout this package runs from, or
    "unknown" outside one."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_log(prompt_dir: Path) -> list[dict[str, Any]]:
    """The training log written beside a prompt (empty if there is none)."""
    path = prompt_dir / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_eval(directory: Path) -> tuple[dict[str, float], list[dict[str, Any]]] | None:
    """Metrics and predictions of a finished evaluation, or None."""
    metrics_path, preds_path = directory / METRICS_FILE, directory / PREDICTIONS_FILE
    if not (metrics_path.is_file() and preds_path.is_file()):
        return None
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics.pop("system", None)
    rows = [json.loads(line) for line in preds_path.read_text(encoding="utf-8").splitlines()]
    return metrics, rows


def summary(comparisons: list[ModelComparison]) -> str:
    """The comparison tables as Markdown, for the terminal, with the soft prompt's margin."""
    parts = []
    for c in comparisons:
        text = f"{c.model}\n{markdown_table(metrics_table(c.systems, c.spread))}"
        best = next((i for i in c.intervals if i["best"]), None)
        if best:
            text += "\n\n" + margin_sentence(best)
        parts.append(text)
    return "\n\n".join(parts)

