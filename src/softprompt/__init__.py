"""softprompt: soft prompt tuning on frozen causal language models."""

__version__ = "0.1.0"

from softprompt.api import PromptedModel, generate, load_prompt, train  # noqa: E402
from softprompt.config import GenerationConfig, PromptConfig, PromptInit, TrainConfig  # noqa: E402
from softprompt.data import read_records  # noqa: E402
from softprompt.errors import SoftPromptError  # noqa: E402
from softprompt.models import load_model  # noqa: E402
from softprompt.prompt import SoftPrompt, load_prompt_tensor  # noqa: E402
from softprompt.tasks import Task, get_task  # noqa: E402

__all__ = ["PromptedModel", "generate", "load_prompt", "train", "GenerationConfig",
           "PromptConfig", "PromptInit", "TrainConfig", "read_records", "SoftPromptError",
           "load_model", "SoftPrompt", "load_prompt_tensor", "Task", "get_task", "__version__"]
