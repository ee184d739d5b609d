"""Typed, validated configuration for prompts, training and generation.

Each field's ``help`` metadata is its documentation and becomes the CLI's ``--help`` text;
validation errors name the CLI flag, the bad value and the fix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from softprompt.errors import SoftPromptError

DEFAULT_MODEL = "smollm2-135m"  # the bundled SmolLM2-135M-Instruct (see models.py)


class PromptInit(str, enum.Enum):
    """How the soft prompt's ``[P, H]`` tensor starts out."""

    TEXT = "text"  # embeddings of --init-text, repeated or cut to P tokens
    VOCAB = "vocab"  # embeddings of P tokens sampled from the 5,000 lowest token ids
    RANDOM = "random"  # uniform, scaled to the embedding table's std


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise SoftPromptError(f"{_flag(name)} must be positive, got {value!r}")


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value < 0:
            raise SoftPromptError(f"{_flag(name)} must be zero or positive, got {value!r}")


def check_count(flag: str, value: int | None, zero: str | None = None) -> None:
    """A count flag (``--limit``, ``--max-length``, ...): positive, or None for "no limit".

    ``zero`` names what 0 means where 0 is allowed (``--val-limit 0``: none).
    """
    if value is None or value > 0 or (value == 0 and zero):
        return
    allowed = f"positive (or 0: {zero})" if zero else "positive"
    raise SoftPromptError(f"{flag} must be {allowed}, got {value!r}")


@dataclass
class PromptConfig:
    """The soft prompt itself."""

    num_virtual_tokens: int = field(
        default=20, metadata={"help": "Number of virtual tokens P in the soft prompt."}
    )
    init: PromptInit = field(
        default=PromptInit.TEXT,
        metadata={"help": "Initialisation: text (from --init-text), vocab, or random."},
    )
    init_text: str | None = field(
        default=None,
        metadata={"help": "Text whose token embeddings start the prompt (default: the task's "
                  "hard prompt)."},
    )

    def __post_init__(self) -> None:
        _positive(self, "num_virtual_tokens")
        try:
            self.init = PromptInit(self.init)
        except ValueError:
            choices = ", ".join(i.value for i in PromptInit)
            raise SoftPromptError(f"--init must be one of {choices}, got {self.init!r}") from None


@dataclass
class TrainConfig:
    """The optimisation of the prompt. The base model is never updated."""

    epochs: int = field(default=3, metadata={"help": "Passes over the training data."})
    batch_size: int = field(
        default=8, metadata={"help": "Examples per micro-batch on each process."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    lr: float = field(default=0.03, metadata={"help": "Peak learning rate of Adam."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the prompt gradient to this norm (0 disables)."}
    )
    warmup_steps: int = field(
        default=10, metadata={"help": "Linear warm-up steps, then linear decay to zero."}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Max tokens per example including the prompt; the source is cut."},
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples."}
    )
    max_eval_examples: int | None = field(
        default=200, metadata={"help": "Use only the first N validation examples."}
    )
    patience: int = field(
        default=2,
        metadata={"help": "Stop after this many epochs without a better validation loss."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation and data order."})
    save_steps: int = field(
        default=0, metadata={"help": "Write a checkpoint every N optimizer steps (0: epochs only)."}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "Keep only the newest K checkpoints (plus the best)."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "Alias of --precision bf16 (kept for old scripts): "
                                          "bfloat16 autocast around the frozen model."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    shard_model: bool = field(
        default=False,
        metadata={"help": "With several processes, shard the frozen decoder layers (FSDP2)."},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the decoder layers: faster steps after a one-off "
                          "compile (needs a C++ compiler on CPU)."},
    )

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "gradient_accumulation_steps", "lr",
                  "max_length", "save_total_limit")
        for other in ("gradient_checkpointing", "shard_model"):
            if self.compile and getattr(self, other):
                raise SoftPromptError(f"--compile cannot be combined with "
                                      f"--{other.replace('_', '-')}; drop one of them")
        _non_negative(self, "weight_decay", "max_grad_norm", "warmup_steps", "patience",
                      "save_steps", "seed")
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _positive(self, name)


@dataclass
class GenerationConfig:
    """Decoding settings: greedy unless a temperature is given."""

    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per input."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature (0: greedy)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with sampling)."})
    batch_size: int = field(default=16, metadata={"help": "Inputs decoded together."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size")
        _non_negative(self, "temperature", "seed")
        if not 0 < self.top_p <= 1:
            raise SoftPromptError(f"--top-p must be in (0, 1], got {self.top_p!r}")


def field_names(cls: type) -> list[str]:
    """The field names of a config dataclass, in declaration order."""
    return [f.name for f in fields(cls)]
