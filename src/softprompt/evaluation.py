"""Run a system (soft prompt, hard prompt, or no instruction) over a test set.

Every system goes through the same pipeline: same model, template, truncation, decoding and
metrics; the only difference is what stands in front of the input, learned embeddings or an
instruction line. Output: ``predictions.jsonl`` and a flat ``metrics.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt import atomic
from softprompt.batching import length_sorted_batches
from softprompt.config import GenerationConfig, check_count
from softprompt.encode import adds_bos, encode_example
from softprompt.errors import SoftPromptError
from softprompt.generation import generate
from softprompt.inputs import empty_prompt, rows_loss
from softprompt.metrics import compute_metrics, example_scores
from softprompt.prefix import PromptLike, num_virtual_tokens
from softprompt.tasks import Example, Task, make_examples, render_input

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
SOFT = "soft prompt"  # the name of the soft prompt system in reports and metrics.json


@dataclass
class System:
    """What stands in front of each input: a trained prompt (``[P, H]`` or a KV prefix) or an
    instruction."""

    name: str
    prompt: PromptLike | None = None
    instruction: str = ""
    chat: bool = False  # wrap instruction + input as a user turn in the model's chat template

    @property
    def kind(self) -> str:
        if self.prompt is not None:
            return "soft"
        return "hard" if self.instruction else "none"


@dataclass
class EvalResult:
    system: System
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


def baselines(task: Task, extra: list[str] | None = None, no_instruction: bool = True,
              chat: bool = False) -> list[System]:
    """The hard-prompt systems: the study's prompt, a better hand-written one (also inside the
    model's chat template when ``chat``, the fair way to ask an instruction-tuned model), the
    user's, and no instruction at all."""
    systems = []
    if task.instruction:
        systems.append(System("hard: study", instruction=task.instruction))
    if task.better_instruction:
        systems.append(System("hard: ours", instruction=task.better_instruction))
        if chat:
            systems.append(System("hard: ours (chat)", instruction=task.better_instruction,
                                  chat=True))
    for i, text in enumerate(extra or [], start=1):
        systems.append(System(f"hard: user {i}" if len(extra) > 1 else "hard: user",
                              instruction=text))
    if no_instruction:
        systems.append(System("no instruction"))
    return systems


def _encode(task: Task, examples: list[Example], tokenizer, system: System, max_length: int,
            with_target: bool, reserve: int = 0):
    """Token ids per example (the truncate field cut to fit), or an error if one cannot fit."""
    p = num_virtual_tokens(system.prompt)
    encoded = []
    for ex in examples:
        enc = encode_example(task, ex, tokenizer, instruction=system.instruction,
                             num_virtual_tokens=p + reserve, max_length=max_length,
                             with_target=with_target, chat=system.chat)
        if enc is None:
            raise SoftPromptError(f"example {ex.id}: does not fit in --max-length {max_length}; "
                                  f"raise it")
        encoded.append(enc)
    return encoded


@torch.no_grad()
def target_token_loss(model, tokenizer, task: Task, examples: list[Example], system: System,
                      max_length: int, batch_size: int) -> float:
    """Mean cross-entropy of the reference targets (teacher-forced) behind the system."""
    encoded = _encode(task, examples, tokenizer, system, max_length, with_target=True)
    prompt = (empty_prompt(model) if system.prompt is None else system.prompt).to(model.device)
    total, count = 0.0, 0
    rows = [e.ids_and_labels() for e in encoded]
    bos_offset = int(adds_bos(tokenizer))
    # Similar lengths share a batch (the sum does not depend on the order): fewer pads.
    for batch in length_sorted_batches([len(ids) for ids, _ in rows], batch_size):
        loss_sum, n = rows_loss(model, prompt, [rows[i] for i in batch],
                                tokenizer.pad_token_id, bos_offset, model.device)
        total += loss_sum.item()
        count += n
    return total / max(1, count)


def evaluate(model, tokenizer, task: Task, records: list[dict], system: System, *,
             generation: GenerationConfig | None = None, max_length: int = 1024,
             limit: int | None = None, progress: bool = False) -> EvalResult:
    """Generate for every record and score against its references.

    Returns metrics on a 0-100 scale (``loss`` and ``perplexity`` aside) plus ``n``,
    ``empty_rate`` (share of empty predictions), ``seconds`` and ``examples_per_s``.
    """
    gen = generation or GenerationConfig(max_new_tokens=task.max_new_tokens)
    check_count("limit", limit)
    examples = make_examples(task, records if limit is None else records[:limit])
    inputs = _encode(task, examples, tokenizer, system, max_length, with_target=False,
                     reserve=gen.max_new_tokens)
    prompt = system.prompt.to(model.device) if system.prompt is not None else None
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [e.input_ids for e in inputs], prompt, gen,
                       stop=task.stop, progress=progress)
    seconds = time.perf_counter() - start
    references = [ex.references for ex in examples]
    metrics: dict[str, float] = compute_metrics(task.metrics, outputs, references)
    loss = target_token_loss(model, tokenizer, task, examples, system, max_length,
                             gen.batch_size)
    metrics.update(loss=loss, perplexity=math.exp(min(loss, 50)), n=len(examples),
                   empty_rate=100.0 * sum(not o for o in outputs) / len(outputs),
                   seconds=round(seconds, 3), examples_per_s=round(len(outputs) / seconds, 3))
    rows = []
    for ex, enc, out in zip(examples, inputs, outputs):
        rows.append({"id": ex.id, "system": system.name,
                     "input": render_input(task, ex, system.instruction),
                     "truncated": enc.truncated, "prediction": out,
                     "references": ex.references,
                     "scores": example_scores(task.metrics, out, ex.references)})
    return EvalResult(system, {k: _round(v) for k, v in metrics.items()}, rows)


def _round(value: float) -> float:
    return round(value, 4) if isinstance(value, float) else value


def write_eval(output_dir: str | Path, result: EvalResult) -> None:
    out = Path(output_dir)
    atomic.write_jsonl(out / PREDICTIONS_FILE, result.predictions)
    atomic.write_json(out / METRICS_FILE, {"system": result.system.name, **result.metrics})
