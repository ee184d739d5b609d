"""The Python API: the same plain functions the CLI calls.

>>> import softprompt
>>> result = softprompt.train("translation", "train.jsonl", "out/", epochs=1)  # doctest: +SKIP
>>> pm = softprompt.load_prompt("out/")                                        # doctest: +SKIP
>>> pm.generate("A dog runs on the beach.")                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from softprompt import atomic, evaluation, generation, models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig, check_count
from softprompt.data import read_records
from softprompt.encode import context_limit, encode_for_generation
from softprompt.errors import SoftPromptError
from softprompt.prefix import check_fits, num_virtual_tokens
from softprompt.prompt import load_prompt_tensor
from softprompt.tasks import (
    Task,
    get_task,
    input_example,
    make_example,
    make_examples,
    render_input,
)
from softprompt.training import TrainResult, check_output_dir
from softprompt.training import train as _train

if TYPE_CHECKING:  # the report's plotting stack loads only for compare
    from softprompt.report import ModelComparison


def _split_options(options: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Route keyword options to the config dataclasses that declare them."""
    remaining = dict(options)
    parts = []
    for cls in classes:
        names = {f.name for f in fields(cls)}
        parts.append({k: remaining.pop(k) for k in list(remaining) if k in names})
    if remaining:
        raise SoftPromptError(f"unknown option(s) {sorted(remaining)}")
    return parts


def _task(task: str | Task) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def _chat(task: Task, chat_template: bool | None) -> Task:
    """``--chat-template``: None keeps the task's (a trained prompt's) setting."""
    return task if chat_template is None else replace(task, chat_template=chat_template)


def train(task: str | Task, train: str | Path, output: str | Path, *,
          validation: str | Path | None = None, model: str = models.DEFAULT_MODEL,
          train_split: str = "train", validation_split: str = "validation",
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
          precision: str = "auto", chat_template: bool = False,
          loaded: tuple[Any, Any] | None = None, **options: Any) -> TrainResult:
    """Train a soft prompt; ``options`` are PromptConfig/TrainConfig fields (``epochs=3`` ...),
    among them the method and its options (``method="prefix"``, ``prefix_projection=True``,
    ``encoder="lstm"``, ``init_from="runs/x"``; see softprompt.methods).

    ``device``/``dtype``/``precision`` place the frozen model and choose its compute precision
    (``auto``: see :func:`models.resolve_device` and :func:`models.resolve_precision`); the
    prompt and its optimizer state are always float32. ``chat_template`` wraps every input in
    the tokenizer's chat template (recorded with the prompt). ``loaded`` passes an already
    loaded ``(model, tokenizer)`` to skip loading.
    """
    prompt_opts, train_opts = _split_options(options, PromptConfig, TrainConfig)
    pcfg, tcfg = PromptConfig(**prompt_opts), TrainConfig(**train_opts)
    task_obj = _chat(_task(task), chat_template or None)
    torch_device = models.resolve_device(device)
    prec = models.resolve_precision(precision, dtype, torch_device, training=True,
                                    bf16=tcfg.bf16)
    tcfg = replace(tcfg, bf16=prec.name == "bf16")  # the trainer's autocast switch
    torch_dtype = prec.weights
    train_records = read_records(train, train_split)
    val_records = read_records(validation, validation_split) if validation else None
    # Validate the data and the output directory before the (slow) model load.
    for records in (train_records, val_records or []):
        for i, rec in enumerate(records):
            make_example(task_obj, rec, i)
    atomic.check_writable(output)
    check_output_dir(output, overwrite, resume)
    if pcfg.init_from:
        from softprompt.methods import check_init_from

        check_init_from(pcfg, model)
    if loaded is None:
        from softprompt.distributed import distributed_state

        # A sharded model is loaded on the CPU: each process keeps only its shards of the
        # layers on its device (the trainer moves them), not a whole copy first.
        if tcfg.shard_model and distributed_state().num_processes > 1:
            torch_device = torch.device("cpu")
        loaded = models.load_model(model, dtype=torch_dtype, device=torch_device)
    lm, tokenizer = loaded
    return _train(lm, tokenizer, task_obj, train_records, output,
                  validation_records=val_records, prompt_config=pcfg, train_config=tcfg,
                  model_name=model, overwrite=overwrite, resume=resume, progress=progress)


def evaluate(test: str | Path, output: str | Path | None = None, *,
             prompt: str | Path | None = None, hard: str | None = None,
             task: str | Task | None = None, model: str | None = None,
             test_split: str = "test", limit: int | None = None, max_length: int = 1024,
             overwrite: bool = False, progress: bool = False,
             device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             precision: str = "auto", chat_template: bool | None = None,
             loaded: tuple[Any, Any] | None = None, shots: int = 0, shots_seed: int = 0,
             train: str | Path | None = None, train_split: str = "train",
             **options: Any) -> evaluation.EvalResult:
    """Score one system on a test set: a trained ``prompt`` directory, a ``hard``
    instruction, or (neither) the bare template.

    ``task`` defaults to the prompt's; ``model`` to the prompt's or the bundled model;
    ``chat_template`` (None: the prompt's own setting) wraps inputs in the chat template;
    ``options`` are GenerationConfig fields (``max_new_tokens`` and the decoding controls
    default to the task's: ``Task.generation_defaults``).
    ``shots`` > 0 puts that many solved examples from ``train`` (drawn with ``shots_seed``)
    before each input of a hard prompt (few-shot; see :mod:`softprompt.evaluation`).
    With ``output``, writes ``predictions.jsonl`` and ``metrics.json`` there.
    """
    if prompt is not None and hard is not None:
        raise SoftPromptError("give at most one of --prompt DIR and --hard TEXT")
    if shots < 0 or shots_seed < 0:
        raise SoftPromptError(f"--shots and --shots-seed must be zero or positive, got "
                              f"{shots!r} and {shots_seed!r}")
    if shots and prompt is not None:
        raise SoftPromptError("--shots puts demonstrations before a hard prompt; drop it with "
                              "--prompt")
    if shots and train is None:
        raise SoftPromptError("--shots K draws its demonstrations from the training data; "
                              "give --train PATH")
    check_count("--limit", limit)
    check_count("--max-length", max_length)
    torch_device = models.resolve_device(device)
    prec = models.resolve_precision(precision, dtype, torch_device)
    torch_dtype = prec.weights
    if output is not None:
        out = Path(output)
        if (out / evaluation.METRICS_FILE).exists() and not overwrite:
            raise SoftPromptError(f"{out} already holds {evaluation.METRICS_FILE}; pass "
                                  f"--overwrite to replace it")
        atomic.check_writable(out)
    tensor, model_name = None, model or models.DEFAULT_MODEL
    if prompt is not None:
        tensor, meta = load_prompt_tensor(prompt)
        model_name = model or meta.model
        stored = Task.from_dict(meta.task)
        task_obj = _task(task) if task is not None else stored
        if chat_template is None:  # a --task override keeps the prompt's wrapping
            chat_template = stored.chat_template or task_obj.chat_template
        system = evaluation.System(evaluation.SOFT, tensor)
    elif task is None:
        raise SoftPromptError("give --task (or --template) to evaluate a hard prompt")
    else:
        task_obj = _task(task)
        system = (evaluation.System("hard", instruction=hard) if hard is not None
                  else evaluation.System("no instruction"))
    task_obj = _chat(task_obj, chat_template)
    gen = GenerationConfig(**{**task_obj.generation_defaults(), **options})
    records = read_records(test, test_split, limit=limit)
    make_examples(task_obj, records)  # bad records answer before the model load
    if shots:  # demonstrations from the training split only; the chat-template hook: chat=
        system = evaluation.few_shot_system(
            task_obj, f"{system.name}, {shots}-shot", read_records(train, train_split), shots,
            shots_seed, system.instruction, chat=system.chat)
    lm, tokenizer = loaded or models.load_model(model_name, dtype=torch_dtype,
                                                device=torch_device)
    if tensor is not None:
        check_fits(tensor, lm, str(prompt))
    with prec.context(lm.device):
        result = evaluation.evaluate(lm, tokenizer, task_obj, records, system, generation=gen,
                                     max_length=max_length, progress=progress)
    if output is not None:
        evaluation.write_eval(output, result)
    return result


def compare(task: str | Task, train: str | Path | None, test: str | Path,
            output: str | Path, *, validation: str | Path | None = None,
            prompt: str | Path | None = None, hard: Sequence[str] = (),
            models: str | Sequence[str] = models.DEFAULT_MODEL,
            train_split: str = "train", validation_split: str = "validation",
            test_split: str = "test", limit: int | None = None, val_limit: int = 20,
            max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
            eval_batch_size: int = 16, eval_seed: int = 0,
            shots: Sequence[int] | None = None, shots_seed: int = 0,
            seeds: Sequence[int] | None = None, train_sizes: Sequence[int] = (),
            overwrite: bool = False, reuse: bool = False, progress: bool = True,
            device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
            precision: str = "auto", chat_template: bool = False,
            **options: Any) -> list[ModelComparison]:
    """Soft prompt vs hard prompts on one test set, per model; writes the report to ``output``.

    ``options`` are PromptConfig/TrainConfig fields for training the soft prompt (``epochs``,
    ``batch_size``, ``method``, ...), and the decoding controls of GenerationConfig
    (``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
    ``penalize_output_only``, ``num_beams``; default: the task's); generation has its own
    ``eval_batch_size`` and ``eval_seed``. ``shots``: the K of the hard baselines (default
    ``(0, 3)`` with ``train``, else ``(0,)``), demonstrations drawn from ``train`` with
    ``shots_seed``; ``seeds``: one soft prompt per seed (mean ± std, default the ``seed``
    option); ``train_sizes``: the learning curve.
    """
    from softprompt import comparison

    prompt_opts, train_opts, gen_opts = _split_options(options, PromptConfig, TrainConfig,
                                                       GenerationConfig)
    task_obj = _chat(_task(task), chat_template or None)
    check_count("--eval-batch-size", eval_batch_size)
    if eval_seed < 0:
        raise SoftPromptError(f"--eval-seed must be zero or positive, got {eval_seed!r}")
    gen = GenerationConfig(**{**task_obj.generation_defaults(), **gen_opts,
                              **({} if max_new_tokens is None
                                 else {"max_new_tokens": max_new_tokens})},
                           temperature=temperature, top_p=top_p, batch_size=eval_batch_size,
                           seed=eval_seed)
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    return comparison.compare(
        task_obj, None if train is None else str(train), str(test), output,
        validation_path=None if validation is None else str(validation),
        prompt_dir=None if prompt is None else str(prompt), hard=list(hard),
        model_names=[m for m in names if m], splits=(train_split, validation_split, test_split),
        limit=limit, val_limit=val_limit, generation=gen,
        prompt_config=PromptConfig(**prompt_opts), train_config=TrainConfig(**train_opts),
        shots=None if shots is None else list(shots), shots_seed=shots_seed,
        seeds=None if seeds is None else list(seeds), train_sizes=list(train_sizes),
        overwrite=overwrite, reuse=reuse, progress=progress, device=device, dtype=dtype,
        precision=precision)


@dataclass
class PromptedModel:
    """A frozen model with a trained soft prompt, ready to generate."""

    model: Any
    tokenizer: Any
    prompt: torch.Tensor  # [P, H]
    task: Task
    model_name: str
    precision: models.Precision | None = None  # None: the model computes in its own dtype

    def render(self, item: str | dict) -> str:
        """A raw text (for one-field templates) or a record -> the templated input text."""
        return render_input(self.task, input_example(self.task, item))

    def generate(self, inputs: str | dict | list[str | dict], **options: Any) -> str | list[str]:
        """Generate for one input or a list; options are GenerationConfig fields
        (``max_new_tokens``, ``temperature``, ``repetition_penalty``, ``num_beams``, ...;
        ``max_new_tokens`` and the decoding controls default to the task's).

        Each input's truncate field is cut (as in training) to leave the model's positions
        room for the prompt and ``max_new_tokens``; a task without one refuses a long input.
        """
        single = not isinstance(inputs, list)
        items = [inputs] if single else inputs
        opts = {**self.task.generation_defaults(), **options}
        progress = opts.pop("progress", False)
        cfg = GenerationConfig(**opts)
        ids = [encode_for_generation(self.task, input_example(self.task, x, i), self.tokenizer,
                                     num_virtual_tokens=num_virtual_tokens(self.prompt),
                                     max_new_tokens=cfg.max_new_tokens,
                                     max_length=context_limit(self.model))
               for i, x in enumerate(items)]
        with self.precision.context(self.model.device) if self.precision else nullcontext():
            outs = generation.generate(self.model, self.tokenizer, ids, self.prompt, cfg,
                                       stop=self.task.stop, progress=progress)
        return outs[0] if single else outs


def load_prompt(directory: str | Path, model: str | None = None, *,
                device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                precision: str = "auto", chat_template: bool | None = None,
                loaded: tuple[Any, Any] | None = None) -> PromptedModel:
    """Load ``prompt.safetensors`` + ``softprompt.json`` and the model it was trained on.

    The prompt stays float32 on the model's device; it is cast to the embeddings' dtype where
    it meets the model. ``chat_template`` None keeps the prompt's own setting.
    """
    torch_device = models.resolve_device(device)
    prec = models.resolve_precision(precision, dtype, torch_device)
    torch_dtype = prec.weights
    tensor, meta = load_prompt_tensor(directory)
    task = _chat(Task.from_dict(meta.task), chat_template)
    name = model or meta.model
    lm, tokenizer = loaded or models.load_model(name, dtype=torch_dtype, device=torch_device)
    check_fits(tensor, lm, str(directory))
    return PromptedModel(lm, tokenizer, tensor.to(lm.device), task, name, prec)


def generate(prompt_dir: str | Path, inputs: str | dict | list, *, model: str | None = None,
             device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             precision: str = "auto", chat_template: bool | None = None,
             **options: Any) -> str | list[str]:
    """Load a prompt and generate for ``inputs`` (see :meth:`PromptedModel.generate`)."""
    return load_prompt(prompt_dir, model, device=device, dtype=dtype, precision=precision,
                       chat_template=chat_template).generate(inputs, **options)


class PromptPool:
    """Several trained prompts on one frozen model: one batch serves any mix of them.

    Every input is rendered with its own prompt's task template and decoded by the
    continuous-batching engine (softprompt.engine), which computes each prompt's key/value
    prefix once; with greedy decoding each output equals that input generated alone.

    >>> pool = softprompt.load_prompts({"de": "runs/de", "qa": "runs/qa"})   # doctest: +SKIP
    >>> pool.generate(["A dog runs.", {"context": "...", "question": "..."}],
    ...               prompts=["de", "qa"])                                   # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, model_name: str, *, max_batch_size: int = 32,
                 prefix_cache_mb: int = 512):
        from softprompt.engine import Engine

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size,
                             prefix_cache_bytes=prefix_cache_mb << 20)
        self.tasks: dict[str, Task] = {}

    def add(self, name: str, directory: str | Path) -> None:
        """Load the prompt directory ``directory`` under ``name``."""
        tensor, meta = load_prompt_tensor(directory)
        check_fits(tensor, self.model, str(directory))
        self.engine.add_prompt(name, tensor)
        self.tasks[name] = Task.from_dict(meta.task)

    def generate(self, inputs: Sequence[str | dict], prompts: Sequence[str], *,
                 max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, **controls: Any) -> list[str]:
        """One output per input, input ``i`` behind prompt ``prompts[i]``, batched together.

        ``max_new_tokens`` and the decoding ``controls`` (``repetition_penalty``,
        ``no_repeat_ngram_size``, ``min_new_tokens``, ``penalize_output_only``, ``num_beams``)
        default to each prompt's
        task settings; long inputs have their task's truncate field cut to fit the model's
        positions.
        """
        from softprompt.engine import SamplingParams

        unknown_options = sorted(set(controls) - {"repetition_penalty", "no_repeat_ngram_size",
                                                   "min_new_tokens", "penalize_output_only",
                                                   "num_beams"})
        if unknown_options:
            raise SoftPromptError(f"unknown option(s) {unknown_options}")
        if len(inputs) != len(prompts):
            raise SoftPromptError(f"{len(inputs)} inputs but {len(prompts)} prompts; give one "
                                  f"prompt per input")
        unknown = sorted({p for p in prompts if p not in self.tasks})
        if unknown:
            raise SoftPromptError(f"unknown prompt(s) {unknown}; loaded: {sorted(self.tasks)}")
        handles = []
        for i, (item, name) in enumerate(zip(inputs, prompts)):
            task = self.tasks[name]
            params = SamplingParams(max_new_tokens=max_new_tokens or task.max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed,
                                    stop=[task.stop] if task.stop else [],
                                    **{**task.decoding, **controls})
            ids = encode_for_generation(
                task, input_example(task, item, i), self.tokenizer,
                num_virtual_tokens=self.engine.virtual_tokens(name),
                max_new_tokens=params.max_new_tokens, max_length=context_limit(self.model))
            handles.append(self.engine.submit(name, ids, params))
        self.engine.run_until_idle()
        return [h.result().text for h in handles]


def load_prompts(directories: dict[str, str | Path] | Sequence[str | Path], *,
                 model: str | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", precision: str = "auto",
                 loaded: tuple[Any, Any] | None = None,
                 max_batch_size: int = 32, prefix_cache_mb: int = 512) -> PromptPool:
    """Load several prompt directories onto one model (by default the first prompt's).

    ``directories`` maps names to directories, or is a list (each named by its directory).
    All prompts must fit the model.
    """
    named = (dict(directories) if isinstance(directories, dict)
             else {Path(d).name: d for d in directories})
    if not named:
        raise SoftPromptError("give at least one prompt directory")
    _, first = load_prompt_tensor(next(iter(named.values())))
    name = model or first.model
    torch_device = models.resolve_device(device)
    prec = models.engine_precision(precision, dtype, torch_device, "PromptPool")
    lm, tokenizer = loaded or models.load_model(name, dtype=prec.weights, device=torch_device)
    pool = PromptPool(lm, tokenizer, name, max_batch_size=max_batch_size,
                      prefix_cache_mb=prefix_cache_mb)
    for prompt_name, directory in named.items():
        pool.add(prompt_name, directory)
    return pool
