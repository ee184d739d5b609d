"""Typed, validated configuration for prompts, training and generation.

Each field's ``help`` metadata is its documentation and becomes the CLI's ``--help`` text;
validation errors name the CLI flag, the bad value and the fix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from softprompt.errors import SoftPromptError

DEFAULT_MODEL = "smollm2-135m"  # the bundled SmolLM2-135M-Instruct (see models.py)


class PromptInit(str, enum.Enum):
    """How the soft prompt's ``[P, H]`` tensor starts out."""

    TEXT = "text"  # embeddings of --init-text, repeated or cut to P tokens
    VOCAB = "vocab"  # embeddings of P tokens sampled from the 5,000 lowest token ids
    RANDOM = "random"  # uniform, scaled to the embedding table's std


class _Choice(str, enum.Enum):
    """A flag's choices; ``str()`` and f-strings give the value, as typed on the command line."""

    def __str__(self) -> str:
        return self.value


class Method(_Choice):
    """What is trained (softprompt/methods/); each saves a ``[P, H]`` prompt or a KV prefix."""

    PROMPT = "prompt"  # the [P, H] input embeddings themselves (Lester et al. 2021)
    PTUNING = "ptuning"  # [P, H] embeddings through an MLP or LSTM encoder (Liu et al. 2021)
    RESIDUAL = "residual"  # E + LayerNorm(up(ReLU(down(E)))) (Razdaibiedina et al. 2023)
    PREFIX = "prefix"  # a key/value prefix in every layer (Li & Liang 2021)


class Encoder(_Choice):
    """P-tuning's prompt encoder."""

    MLP = "mlp"  # Linear-ReLU-Linear-ReLU-Linear
    LSTM = "lstm"  # a 2-layer bidirectional LSTM, then Linear-ReLU-Linear


class PrefixInit(_Choice):
    """How a KV prefix starts out."""

    TEXT = "text"  # the keys/values of --init-text (one forward pass), repeated or cut to P
    ZERO = "zero"  # all zeros
    RANDOM = "random"  # standard normal, as PEFT's prefix embedding


# Peak learning rate per method when --lr is not given. prompt and prefix: measured on the
# bundled model (issue #11: prompt 0.03, prefix 0.01); ptuning's encoder weights take smaller
# steps than raw embeddings; residual trains the raw embeddings alongside its small MLP.
DEFAULT_LR = {Method.PROMPT: 0.03, Method.PTUNING: 0.003, Method.RESIDUAL: 0.03,
              Method.PREFIX: 0.01}


class Scheduler(_Choice):
    """The learning rate after warm-up."""

    LINEAR = "linear"  # linear decay to zero at the last step
    COSINE = "cosine"  # half a cosine from the peak to zero at the last step


def _enum(obj: object, name: str, cls: type[enum.Enum]) -> None:
    """Turn the field's string into ``cls`` or refuse it naming the flag and the choices."""
    try:
        setattr(obj, name, cls(getattr(obj, name)))
    except ValueError:
        choices = ", ".join(i.value for i in cls)
        raise SoftPromptError(f"{_flag(name)} must be one of {choices}, "
                              f"got {getattr(obj, name)!r}") from None


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
    method: Method = field(
        default=Method.PROMPT,
        metadata={"help": "What is trained: prompt ([P, H] embeddings), ptuning (embeddings "
                  "through an encoder), residual (embeddings plus a residual MLP) or prefix "
                  "(keys/values in every layer)."},
    )
    encoder: Encoder = field(
        default=Encoder.MLP, metadata={"help": "ptuning's prompt encoder: mlp or lstm."}
    )
    encoder_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Hidden size of the ptuning encoder (default: the model's hidden "
                  "size H), the residual bottleneck (default: min(H, 400)) or the prefix "
                  "projection (default: H)."},
    )
    prefix_init: PrefixInit = field(
        default=PrefixInit.TEXT,
        metadata={"help": "How the prefix starts: text (the keys/values of --init-text), zero "
                  "or random."},
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "Train the prefix through an MLP from [P, H] embeddings (PEFT's "
                  "prefix_projection); saved collapsed."},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start from this trained prompt directory (same method and model)."},
    )

    def __post_init__(self) -> None:
        _positive(self, "num_virtual_tokens")
        for name, cls in (("init", PromptInit), ("method", Method), ("encoder", Encoder),
                          ("prefix_init", PrefixInit)):
            _enum(self, name, cls)
        if self.encoder_hidden_size is not None:
            _positive(self, "encoder_hidden_size")
        # Options of another method are refused, not ignored.
        if self.encoder is not Encoder.MLP and self.method is not Method.PTUNING:
            raise SoftPromptError("--encoder is an option of --method ptuning; drop it")
        prefix_only = {"prefix_init": self.prefix_init is not PrefixInit.TEXT,
                       "prefix_projection": self.prefix_projection}
        for name, given in prefix_only.items():
            if given and self.method is not Method.PREFIX:
                raise SoftPromptError(f"{_flag(name)} is an option of --method prefix; drop it")
        if (self.method is Method.PREFIX and not self.prefix_projection
                and self.init is not PromptInit.TEXT):
            raise SoftPromptError("--init sets [P, H] embeddings, which --method prefix has "
                                  "only with --prefix-projection; use --prefix-init")
        if self.encoder_hidden_size is not None and not (
                self.method in (Method.PTUNING, Method.RESIDUAL) or self.prefix_projection):
            raise SoftPromptError("--encoder-hidden-size needs --method ptuning or residual, "
                                  "or --method prefix with --prefix-projection; drop it")


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
    lr: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of Adam (default per --method: prompt 0.03, "
                  "ptuning 0.003, residual 0.03, prefix 0.01)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the prompt gradient to this norm (0 disables)."}
    )
    warmup_steps: int = field(
        default=10, metadata={"help": "Linear warm-up steps, then --lr-scheduler's decay."}
    )
    lr_scheduler: Scheduler = field(
        default=Scheduler.LINEAR,
        metadata={"help": "Decay after warm-up to zero at the last step: linear or cosine."},
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
        metadata={"help": "Stop after this many validations in a row without a better "
                  "--metric-for-best."},
    )
    eval_steps: int = field(
        default=0,
        metadata={"help": "Also validate every N optimizer steps (0: at epoch ends only)."},
    )
    metric_for_best: str = field(
        default="loss",
        metadata={"help": "What selects the best prompt and drives --patience: loss "
                  "(validation loss) or the task's primary metric (rougeL, f1, chrf, ...) of "
                  "greedy generation on the validation records."},
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
        _positive(self, "epochs", "batch_size", "gradient_accumulation_steps",
                  "max_length", "save_total_limit")
        if self.lr is not None:
            _positive(self, "lr")
        _enum(self, "lr_scheduler", Scheduler)
        for other in ("gradient_checkpointing", "shard_model"):
            if self.compile and getattr(self, other):
                raise SoftPromptError(f"--compile cannot be combined with "
                                      f"--{other.replace('_', '-')}; drop one of them")
        _non_negative(self, "weight_decay", "max_grad_norm", "warmup_steps", "patience",
                      "save_steps", "seed", "eval_steps")
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
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalise tokens already in the input or output: their positive "
                          "scores divided by this, negative ones multiplied (1.0: off; above 1 "
                          "curbs loops; transformers' semantics)."},
    )
    no_repeat_ngram_size: int = field(
        default=0,
        metadata={"help": "Never repeat an n-gram of this size from the input or output "
                          "(0: off)."},
    )
    min_new_tokens: int = field(
        default=0, metadata={"help": "No EOS before this many new tokens (0: off)."}
    )
    penalize_output_only: bool = field(
        default=False,
        metadata={"help": "The repetition penalty and the n-gram ban weigh the generated "
                          "tokens alone, not the input's too"},
    )
    num_beams: int = field(
        default=1,
        metadata={"help": "Beam search with this many beams (1: greedy or sampling; length "
                          "penalty 1.0, no early stopping, as transformers)."},
    )

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size", "num_beams")
        _non_negative(self, "temperature", "seed")
        if not 0 < self.top_p <= 1:
            raise SoftPromptError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        problem = check_controls(self)
        if problem:
            raise SoftPromptError(problem)
        if self.num_beams > 1 and self.temperature > 0:
            raise SoftPromptError(f"--num-beams {self.num_beams} searches deterministically; "
                                  f"drop --temperature (or use --num-beams 1 to sample)")


def check_controls(settings: Any, flag=_flag) -> str | None:
    """The first decoding control out of range (``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens``) as a one-line message naming ``flag(name)``
    (GenerationConfig's flags, or a request's field names), or None."""
    penalty = settings.repetition_penalty
    if not (isinstance(penalty, (int, float)) and penalty > 0):
        return (f"{flag('repetition_penalty')} must be positive (1.0: off, above 1 penalises "
                f"repeats), got {penalty!r}")
    for name in ("no_repeat_ngram_size", "min_new_tokens"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{flag(name)} must be zero (off) or a positive integer, got {value!r}"
    return None


def resolved_lr(train: TrainConfig, prompt: PromptConfig) -> float:
    """The peak learning rate a run uses: ``--lr``, or the default of its ``--method``."""
    return train.lr if train.lr is not None else DEFAULT_LR[prompt.method]


def field_names(cls: type) -> list[str]:
    """The field names of a config dataclass, in declaration order."""
    return [f.name for f in fields(cls)]
