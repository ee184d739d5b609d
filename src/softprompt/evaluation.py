"""Run a system (soft prompt, hard prompt, or no instruction) over a test set.

Every system goes through the same pipeline: same model, template, truncation, decoding and
metrics; the only difference is what stands in front of the input: learned embeddings, or an
instruction line and (few-shot) solved training examples. Output: ``predictions.jsonl`` and a
flat ``metrics.json``.

Few-shot prompts: K demonstrations drawn once from the training records with a fixed seed
(:func:`few_shot_system`), the same for every test example. An example gets the most of them,
in order, that fit beside its whole input and ``max_new_tokens`` in the model's positions; an
input that must itself be cut to fit ``max_length`` gets none (demonstrations never push out
the input). Each prediction row records its count (``shots``), metrics.json the mean. With
the chat template the whole text (instruction, demonstrations, input) is one user turn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt import atomic
from softprompt.batching import length_sorted_batches
from softprompt.config import GenerationConfig, check_count
from softprompt.encode import Encoded, adds_bos, context_limit, encode_example
from softprompt.errors import SoftPromptError
from softprompt.generation import generate
from softprompt.inputs import empty_prompt, rows_loss
from softprompt.metrics import compute_metrics, example_scores
from softprompt.prefix import PromptLike, num_virtual_tokens
from softprompt.tasks import (
    Example,
    Task,
    draw_demonstrations,
    few_shot_instruction,
    make_examples,
    render_demonstration,
    render_input,
)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
SOFT = "soft prompt"  # the name of the soft prompt system in reports and metrics.json


@dataclass
class System:
    """What stands in front of each input: a trained prompt (``[P, H]`` or a KV prefix), or
    an instruction and rendered demonstrations (solved training examples, few-shot)."""

    name: str
    prompt: PromptLike | None = None
    instruction: str = ""
    chat: bool = False  # wrap instruction + input as a user turn in the model's chat template
    demonstrations: list[str] = field(default_factory=list)  # few-shot: tried in this order

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


def few_shot_system(task: Task, name: str, train_records: list[dict], k: int, seed: int = 0,
                    instruction: str = "", chat: bool = False) -> System:
    """A hard prompt with ``k`` demonstrations drawn from ``train_records`` (the training
    split, never the test split) by ``seed``, rendered with the task's template + target."""
    demos = draw_demonstrations(task, train_records, k, seed)
    return System(name, instruction=instruction, chat=chat,
                  demonstrations=[render_demonstration(task, d) for d in demos])


def few_shot_baselines(task: Task, train_records: list[dict], shots: list[int], seed: int = 0,
                       chat: bool = False) -> list[System]:
    """compare's K-shot baselines, K > 0: our instruction (the study's where there is none)
    with K demonstrations, also inside the chat template when ``chat``."""
    instruction = task.better_instruction or task.instruction
    label = "ours" if task.better_instruction else ("study" if instruction else "none")
    systems = []
    for k in (k for k in shots if k > 0):
        systems.append(few_shot_system(task, f"hard: {label}, {k}-shot", train_records, k,
                                       seed, instruction))
        if chat:
            systems.append(few_shot_system(task, f"hard: {label}, {k}-shot (chat)",
                                           train_records, k, seed, instruction, chat=True))
    return systems


def _encode(task: Task, examples: list[Example], tokenizer, system: System, max_length: int,
            with_target: bool, reserve: int = 0) -> list[Encoded]:
    """Token ids per example (the truncate field cut to fit), or an error if one cannot fit."""
    return _encode_shots(task, examples, tokenizer, system, max_length, with_target,
                         reserve)[0]


def _encode_shots(task: Task, examples: list[Example], tokenizer, system: System,
                  max_length: int, with_target: bool, reserve: int = 0,
                  shots: list[int] | None = None,
                  context: int | None = None) -> tuple[list[Encoded], list[int]]:
    """Token ids per example (the truncate field cut to fit), or an error if one cannot fit;
    and the number of demonstrations each example got.

    Without ``shots`` each example gets the most of ``system.demonstrations`` that fit
    uncut in ``context`` positions (default ``max_length``) with ``reserve`` left free, and
    none where its input alone must be cut to ``max_length``; ``shots`` imposes the counts.
    """
    p = num_virtual_tokens(system.prompt)
    demos = system.demonstrations
    context = max(max_length, context or max_length)
    def encode(ex: Example, k: int, limit: int) -> Encoded | None:
        return encode_example(task, ex, tokenizer,
                              instruction=few_shot_instruction(system.instruction, demos[:k]),
                              num_virtual_tokens=p + reserve, max_length=limit,
                              with_target=with_target, chat=system.chat)

    encoded, counts = [], []
    for i, ex in enumerate(examples):
        enc, k = encode(ex, 0, max_length), 0
        if enc is None:
            raise SoftPromptError(f"example {ex.id}: does not fit in --max-length {max_length}; "
                                  f"raise it")
        if shots is not None and shots[i]:
            few = encode(ex, shots[i], context)
            if few is not None:
                k, enc = shots[i], few
        elif shots is None and demos and not enc.truncated:
            for n in range(len(demos), 0, -1):  # the most demonstrations that leave it whole
                few = encode(ex, n, context)
                if few is not None and not few.truncated:
                    k, enc = n, few
                    break
        encoded.append(enc)
        counts.append(k)
    return encoded, counts


@torch.no_grad()
def target_token_loss(model, tokenizer, task: Task, examples: list[Example], system: System,
                      max_length: int, batch_size: int, shots: list[int] | None = None,
                      context: int | None = None) -> float:
    """Mean cross-entropy of the reference targets (teacher-forced) behind the system (with
    ``shots[i]`` demonstrations before example ``i`` for a few-shot system)."""
    encoded, _ = _encode_shots(task, examples, tokenizer, system, max_length,
                               with_target=True, shots=shots, context=context)
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
    gen = generation or GenerationConfig(**task.generation_defaults())
    check_count("limit", limit)
    examples = make_examples(task, records if limit is None else records[:limit])
    context = context_limit(model)
    inputs, shots = _encode_shots(task, examples, tokenizer, system, max_length,
                                  with_target=False, reserve=gen.max_new_tokens,
                                  context=context)
    prompt = system.prompt.to(model.device) if system.prompt is not None else None
    start = time.perf_counter()
    outputs = generate(model, tokenizer, [e.input_ids for e in inputs], prompt, gen,
                       stop=task.stop, progress=progress)
    seconds = time.perf_counter() - start
    references = [ex.references for ex in examples]
    metrics: dict[str, float] = compute_metrics(task.metrics, outputs, references)
    loss = target_token_loss(model, tokenizer, task, examples, system, max_length,
                             gen.batch_size, shots=shots, context=context)
    metrics.update(loss=loss, perplexity=math.exp(min(loss, 50)), n=len(examples),
                   empty_rate=100.0 * sum(not o for o in outputs) / len(outputs),
                   seconds=round(seconds, 3), examples_per_s=round(len(outputs) / seconds, 3))
    if system.demonstrations:  # how many demonstrations fitted, of the K drawn
        metrics.update(shots=len(system.demonstrations), shots_mean=sum(shots) / len(shots),
                       shots_all_rate=100.0 * shots.count(len(system.demonstrations))
                       / len(shots))
    rows = []
    for ex, enc, out, k in zip(examples, inputs, outputs, shots):
        instruction = few_shot_instruction(system.instruction, system.demonstrations[:k])
        rows.append({"id": ex.id, "system": system.name,
                     "input": render_input(task, ex, instruction),
                     "truncated": enc.truncated, "prediction": out,
                     "references": ex.references,
                     "scores": example_scores(task.metrics, out, ex.references),
                     **({"shots": k} if system.demonstrations else {})})
    return EvalResult(system, {k: _round(v) for k, v in metrics.items()}, rows)


def _round(value: float) -> float:
    return round(value, 4) if isinstance(value, float) else value


def write_eval(output_dir: str | Path, result: EvalResult) -> None:
    out = Path(output_dir)
    atomic.write_jsonl(out / PREDICTIONS_FILE, result.predictions)
    atomic.write_json(out / METRICS_FILE, {"system": result.system.name, **result.metrics})
