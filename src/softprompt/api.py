"""The Python API: the same plain functions the CLI calls.

>>> import softprompt
>>> result = softprompt.train("translation", "train.jsonl", "out/", epochs=1)  # doctest: +SKIP
>>> pm = softprompt.load_prompt("out/")                                        # doctest: +SKIP
>>> pm.generate("A dog runs on the beach.")                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from softprompt import generation, models
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.encode import context_limit, encode_for_generation
from softprompt.errors import SoftPromptError
from softprompt.prompt import check_hidden_size, load_prompt_tensor
from softprompt.tasks import Task, get_task, input_example, make_example, render_input
from softprompt.training import TrainResult, check_output_dir
from softprompt.training import train as _train


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


def train(task: str | Task, train: str | Path, output: str | Path, *,
          validation: str | Path | None = None, model: str = models.DEFAULT_MODEL,
          split: str | None = None, validation_split: str | None = None,
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          loaded: tuple[Any, Any] | None = None, **options: Any) -> TrainResult:
    """Train a soft prompt; ``options`` are PromptConfig/TrainConfig fields (``epochs=3`` ...).

    ``loaded`` passes an already loaded ``(model, tokenizer)`` to skip loading.
    """
    prompt_opts, train_opts = _split_options(options, PromptConfig, TrainConfig)
    pcfg, tcfg = PromptConfig(**prompt_opts), TrainConfig(**train_opts)
    task_obj = task if isinstance(task, Task) else get_task(task)
    train_records = read_records(train, split)
    val_records = read_records(validation, validation_split or "validation") if validation else None
    # Validate the data and the output directory before the (slow) model load.
    for records in (train_records, val_records or []):
        for i, rec in enumerate(records):
            make_example(task_obj, rec, i)
    check_output_dir(output, overwrite, resume)
    lm, tokenizer = loaded or models.load_model(model, device=_device())
    return _train(lm, tokenizer, task_obj, train_records, output,
                  validation_records=val_records, prompt_config=pcfg, train_config=tcfg,
                  model_name=model, overwrite=overwrite, resume=resume, progress=progress)


def _device() -> torch.device:
    from softprompt.distributed import distributed_state

    return distributed_state().device


@dataclass
class PromptedModel:
    """A frozen model with a trained soft prompt, ready to generate."""

    model: Any
    tokenizer: Any
    prompt: torch.Tensor  # [P, H]
    task: Task
    model_name: str

    def render(self, item: str | dict) -> str:
        """A raw text (for one-field templates) or a record -> the templated input text."""
        return render_input(self.task, input_example(self.task, item))

    def generate(self, inputs: str | dict | list[str | dict], **options: Any) -> str | list[str]:
        """Generate for one input or a list; options are GenerationConfig fields.

        Each input's truncate field is cut (as in training) to leave the model's positions
        room for the prompt and ``max_new_tokens``; a task without one refuses a long input.
        """
        single = not isinstance(inputs, list)
        items = [inputs] if single else inputs
        opts = {"max_new_tokens": self.task.max_new_tokens, **options}
        progress = opts.pop("progress", False)
        cfg = GenerationConfig(**opts)
        ids = [encode_for_generation(self.task, input_example(self.task, x, i), self.tokenizer,
                                     num_virtual_tokens=self.prompt.shape[0],
                                     max_new_tokens=cfg.max_new_tokens,
                                     max_length=context_limit(self.model))
               for i, x in enumerate(items)]
        outs = generation.generate(self.model, self.tokenizer, ids, self.prompt, cfg,
                                   stop=self.task.stop, progress=progress)
        return outs[0] if single else outs


def load_prompt(directory: str | Path, model: str | None = None,
                loaded: tuple[Any, Any] | None = None) -> PromptedModel:
    """Load ``prompt.safetensors`` + ``softprompt.json`` and the model it was trained on."""
    tensor, meta = load_prompt_tensor(directory)
    task = Task.from_dict(meta.task)
    name = model or meta.model
    lm, tokenizer = loaded or models.load_model(name, device=_device())
    check_hidden_size(tensor, lm.get_input_embeddings().weight.shape[1],
                      str(Path(directory) / "prompt.safetensors"))
    return PromptedModel(lm, tokenizer, tensor.to(lm.device), task, name)


def generate(prompt_dir: str | Path, inputs: str | dict | list, *, model: str | None = None,
             **options: Any) -> str | list[str]:
    """Load a prompt and generate for ``inputs`` (see :meth:`PromptedModel.generate`)."""
    return load_prompt(prompt_dir, model).generate(inputs, **options)


def parse_input(text: str) -> str | dict:
    """``--input``: a JSON object is a record, anything else is plain text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise SoftPromptError(f"--input looks like JSON but is not valid ({exc.msg})") from None
        if isinstance(value, dict):
            return value
    return text
