"""softprompt: soft prompt tuning on frozen causal language models.

The public names are imported on first use, so ``softprompt --help`` and input errors answer
without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PromptedModel": "softprompt.api", "generate": "softprompt.api",
    "load_prompt": "softprompt.api", "train": "softprompt.api",
    "evaluate": "softprompt.api", "compare": "softprompt.api",
    "PromptPool": "softprompt.api", "load_prompts": "softprompt.api",
    "Engine": "softprompt.engine", "SamplingParams": "softprompt.engine",
    "GenerationConfig": "softprompt.config", "PromptConfig": "softprompt.config",
    "PromptInit": "softprompt.config", "TrainConfig": "softprompt.config",
    "read_records": "softprompt.data", "SoftPromptError": "softprompt.errors",
    "load_model": "softprompt.models", "SoftPrompt": "softprompt.prompt",
    "load_prompt_tensor": "softprompt.prompt", "Task": "softprompt.tasks",
    "get_task": "softprompt.tasks",
    "export_peft": "softprompt.interop", "import_peft": "softprompt.interop",
    "inspect_prompt": "softprompt.inspection", "PromptInspection": "softprompt.inspection",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
