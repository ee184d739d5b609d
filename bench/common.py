"""Shared pieces of the PEFT comparison benchmarks: model, data, PEFT wrapper, timing, machine.

Every benchmark runs softprompt and PEFT on the same frozen model object, the same examples
and the same prompt tensor, and times them interleaved (ours, PEFT, ours, PEFT, ... with the
order flipped every repetition) so that other load on the machine hits both alike; ratios are
medians of per-repetition ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP's wait policy is left as the shell sets it (unset: libgomp spins briefly, then sleeps;
# what users get). On a small machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE:
# spinning workers that lose their core make every element-wise op wait at the barrier
# (measured here under load: a [4, 276, 1536] multiply took 7.8 ms with 2 spinning threads
# against 0.75 ms passive). On an idle machine PASSIVE instead slows the backward pass's many
# small ops (a step 2.67 s against 2.35 s unset). Both methods always get the same setting.

import torch  # noqa: E402

# PEFT calls a transformers method deprecated in 5.x on every wrap; not ours to fix here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
# The shared evaluation data, read in place (never copied into the repository).
DATA_DIR = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))
TRAIN_FILE = DATA_DIR / "summarization" / "train.jsonl"
TEST_FILE = DATA_DIR / "summarization" / "test.jsonl"
TASK = "summarization"
NUM_VIRTUAL_TOKENS = 20
LR = 0.03  # TrainConfig's default; both optimisers get it


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load(model_name: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, task)``: the frozen model as softprompt loads it."""
    from transformers.utils import logging as hf_logging

    from softprompt.models import load_model
    from softprompt.tasks import get_task

    hf_logging.disable_progress_bar()

    model, tokenizer = load_model(model_name, dtype=dtype_of(dtype), device=device)
    return model, tokenizer, get_task(TASK)


def read_subset(path: Path, n: int) -> list[dict]:
    """The first ``n`` records of a JSONL file (a fixed, deterministic subset)."""
    from softprompt.data import read_records

    if not path.is_file():
        sys.exit(f"{path} not found; set SOFTPROMPT_DATA to the folder holding "
                 f"summarization/train.jsonl")
    return read_records(path)[:n]


def our_prompt(model, tokenizer, task, init: str = "text"):
    """The ``[P, H]`` SoftPrompt our trainer would start from (TEXT init from the instruction)."""
    from softprompt.prompt import init_prompt

    ids = tokenizer(task.instruction, add_special_tokens=False).input_ids
    soft = init_prompt(model.get_input_embeddings().weight, NUM_VIRTUAL_TOKENS, init, ids, seed=0)
    return soft.to(model.device)


def peft_model(model, prompt: torch.Tensor):
    """PEFT's prompt tuning on the same frozen model, its prompt set to ``prompt`` ``[P, H]``.

    ``PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=P, init RANDOM)``, then our
    prompt is copied into ``prompt_encoder.default.embedding.weight`` so both start (and, in
    the generation benchmark, decode) from the identical tensor.
    """
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0],
                                prompt_tuning_init=PromptTuningInit.RANDOM)
    pm = get_peft_model(model, config)
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(prompt.detach().to(weight.dtype))
    return pm


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # that device, not the current one (DEVICE=cuda:1)


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], reps: int,
                device: torch.device | str = "cpu", log: Callable[[str], None] | None = None
                ) -> dict[str, list[float]]:
    """Seconds per repetition of each function, run alternately (order flipped each rep)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name], device))
        if log:
            log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repetition ratios ``num[i] / den[i]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def verdict(ratio: float, goal: float, higher_is_better: bool) -> str:
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return "PASS" if ok else "FAIL"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    import peft
    import transformers

    info: dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset (libgomp default)",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def say(msg: str) -> None:
    print(msg, flush=True)
