"""Soft prompt vs hard prompts on one test set, for one or several base models.

For each model: train the soft prompt (or take ``--prompt``), evaluate it and every baseline
through the same pipeline, then write ``report.md`` / ``report.html`` with plots.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from softprompt import atomic, models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig, check_count
from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.evaluation import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    SOFT,
    System,
    baselines,
    evaluate,
    write_eval,
)
from softprompt.prefix import check_fits
from softprompt.prompt import load_prompt_tensor
from softprompt.report import ModelComparison, markdown_table, metrics_table, write_report
from softprompt.tasks import Task, make_examples
from softprompt.training import LOG_FILE, train


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def compare(task: Task, train_path: str | None, test_path: str, output: str | Path, *,
            validation_path: str | None = None, prompt_dir: str | None = None,
            hard: list[str] | None = None, model_names: list[str] | None = None,
            splits: tuple[str, str, str] = ("train", "validation", "test"),
            limit: int | None = None, val_limit: int = 20,
            generation: GenerationConfig | None = None,
            prompt_config: PromptConfig | None = None, train_config: TrainConfig | None = None,
            overwrite: bool = False, reuse: bool = False, progress: bool = True,
            device: str | torch.device = "auto",
            dtype: str | torch.dtype = "auto", precision: str = "auto") -> list[ModelComparison]:
    """Train (or load) a soft prompt per model and compare it with hard-prompt baselines.

    ``splits`` are the (train, validation, test) splits of ``hf:`` sources. ``reuse`` keeps
    the evaluations already in ``output`` (a finished or interrupted run) and only runs the
    systems that are missing; with ``prompt_dir`` nothing is retrained.
    """
    out = Path(output)
    if (out / "report.md").exists() and not (overwrite or reuse):
        raise SoftPromptError(f"{out} already holds a report; pass --overwrite to replace it "
                              f"or --reuse to add to it")
    check_count("--limit", limit)
    check_count("--val-limit", val_limit, zero="none")
    atomic.check_writable(out)
    torch_device = models.resolve_device(device)
    tcfg = train_config or TrainConfig()
    # Trained here: the training rule (float32 weights under bfloat16 autocast on a CPU),
    # and the evaluations run under the same autocast.
    prec = models.resolve_precision(precision, dtype, torch_device,
                                    training=prompt_dir is None, bf16=tcfg.bf16)
    tcfg = replace(tcfg, bf16=prec.name == "bf16")
    if prompt_dir is None and train_path is None:
        raise SoftPromptError("give --train PATH to train a soft prompt, or --prompt DIR")
    model_names = model_names or [models.DEFAULT_MODEL]
    if prompt_dir is not None and len(model_names) > 1:
        raise SoftPromptError("--prompt fits one model; drop --models or --prompt")
    train_records, val_records, test_records = _read_data(
        task, (train_path, validation_path, test_path), splits, limit)
    gen = generation or GenerationConfig(max_new_tokens=task.max_new_tokens)
    comparisons = []
    for name in model_names:
        model, tokenizer = models.load_model(name, dtype=prec.weights, device=torch_device)
        model_out = out / slug(name) if len(model_names) > 1 else out
        log: list[dict[str, Any]] = []
        train_seconds = None
        if prompt_dir is not None:
            prompt, meta = load_prompt_tensor(prompt_dir)
            check_fits(prompt, model, prompt_dir)
            log = read_log(Path(prompt_dir))
            train_seconds = meta.metrics.get("train_seconds")
        else:
            def val_metric(epoch: int, tensor, model=model,
                           tokenizer=tokenizer) -> dict[str, float]:
                with prec.context(torch_device):
                    res = evaluate(model, tokenizer, task, val_records[:val_limit],
                                   System(SOFT, tensor), generation=gen,
                                   max_length=tcfg.max_length)
                return {f"val_{task.primary_metric}": res.metrics[task.primary_metric]}

            result = train(model, tokenizer, task, train_records, model_out / "prompt",
                           validation_records=val_records, prompt_config=prompt_config,
                           train_config=tcfg, model_name=name, overwrite=overwrite,
                           progress=progress,
                           on_epoch_end=val_metric if val_records and val_limit else None)
            prompt, log = result.prompt, result.log
            train_seconds = result.meta.metrics.get("train_seconds")
        # A chat-template task wraps every system already: no separate chat baseline.
        chat = bool(getattr(tokenizer, "chat_template", None)) and not task.chat_template
        systems = [System(SOFT, prompt)] + baselines(task, hard, chat=chat)
        with prec.context(torch_device):
            metrics, predictions = _evaluate_systems(
                model, tokenizer, task, systems, test_records, model_out / "systems", name,
                generation=gen, max_length=tcfg.max_length, reuse=reuse, progress=progress)
        comparisons.append(ModelComparison(name, models.num_parameters(model), metrics,
                                           predictions, log, train_seconds))
    write_report(out, task.name, comparisons, task.primary_metric)
    atomic.write_json(out / "comparison.json",
                      {"task": task.name, "primary_metric": task.primary_metric,
                       "generation": asdict(gen),
                       "models": [{"model": c.model, "num_parameters": c.num_parameters,
                                   "train_seconds": c.train_seconds, "systems": c.systems}
                                  for c in comparisons]})
    return comparisons


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


def _evaluate_systems(model, tokenizer, task: Task, systems: list[System],
                      records: list[dict], out: Path, model_name: str, *,
                      generation: GenerationConfig, max_length: int, reuse: bool,
                      progress: bool) -> tuple[dict[str, dict[str, float]],
                                               dict[str, list[dict[str, Any]]]]:
    """Evaluate each system (or, with ``reuse``, read its finished evaluation under ``out``)."""
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for system in systems:
        done = read_eval(out / slug(system.name)) if reuse else None
        if done is not None:
            metrics[system.name], predictions[system.name] = done
            continue
        if progress:
            print(f"evaluating {system.name} on {len(records)} examples ({model_name})",
                  file=sys.stderr)
        res = evaluate(model, tokenizer, task, records, system, generation=generation,
                       max_length=max_length, progress=progress)
        write_eval(out / slug(system.name), res)
        metrics[system.name] = res.metrics
        predictions[system.name] = res.predictions
    return metrics, predictions


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
    """The comparison tables as Markdown, for the terminal."""
    return "\n\n".join(f"{c.model}\n{markdown_table(metrics_table(c.systems))}"
                       for c in comparisons)
