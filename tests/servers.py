"""Shared by the server and playground tests: prompt directories, a real uvicorn on an
ephemeral 127.0.0.1 port (always stopped), and the unbatched reference output."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from softprompt.config import GenerationConfig
from softprompt.generation import generate
from softprompt.prefix import KVPrefix
from softprompt.prompt import PromptMeta, save_prompt
from softprompt.serving.app import Server, create_app
from softprompt.tasks import get_task, make_example, render_input

TRANSLATION = get_task("translation")
QA = get_task("qa")
SOURCES = ["A dog runs on the beach.", "Two children play football in a park.", "Rain.",
           "A man in a red shirt reads a newspaper.", "Cats sleep on the sofa.",
           "The old bridge crosses the river."]
BASE = "tiny-base"


def make_responsive(model) -> None:
    """Scale every weight matrix so greedy outputs depend on the prompt and the input."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)


def write_prompts(root: Path, hidden: int,
                  kv: tuple[int, int, int] | None = None) -> dict[str, tuple[object, object]]:
    """Four prompts (three translation prompts of 3, 5 and 8 tokens, one QA prompt of 4) and,
    given the model's ``kv`` cache shape (layers, kv heads, head dim), a translation KV prefix
    of 6 slots (prefix tuning's kind), ``kv6``."""
    made: dict[str, tuple[object, object]] = {}
    if kv is not None:
        layers, kv_heads, head_dim = kv
        prefix = KVPrefix(torch.randn(layers, 2, kv_heads, 6, head_dim,
                                      generator=torch.Generator().manual_seed(6)) * 2)
        save_prompt(root / "kv6", prefix, PromptMeta(
            model="tiny", task=TRANSLATION.to_dict(), num_virtual_tokens=6, hidden_size=hidden,
            method="prefix", num_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim))
        made["kv6"] = (prefix, TRANSLATION)
    for name, p, task in (("de3", 3, TRANSLATION), ("de5", 5, TRANSLATION),
                          ("de8", 8, TRANSLATION), ("qa4", 4, QA)):
        tensor = torch.randn(p, hidden, generator=torch.Generator().manual_seed(p)) * 0.7
        save_prompt(root / name, tensor, PromptMeta(model="tiny", task=task.to_dict(),
                                                    num_virtual_tokens=p, hidden_size=hidden))
        made[name] = (tensor, task)
    return made


@contextmanager
def running(server: Server):
    """A real uvicorn serving ``server`` on 127.0.0.1, an ephemeral port; stopped after."""
    import uvicorn

    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    server.engine.start()
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        server.engine.stop()


def rss_bytes() -> int:
    import gc
    import os

    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def expected_output(model, tok, tensor, task, record, max_tokens, **options) -> str:
    """The request decoded alone by generation.generate (no server, no engine), with the
    task's decoding defaults and ``options`` (GenerationConfig fields)."""
    text = render_input(task, make_example(task, record, with_target=False))
    cfg = GenerationConfig(**{**task.generation_defaults(), "max_new_tokens": max_tokens,
                              **options})
    return generate(model, tok, [text], tensor, cfg, stop=task.stop)[0]
