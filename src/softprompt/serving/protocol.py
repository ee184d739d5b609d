"""OpenAI-compatible request and response shapes (the subset softprompt serves).

Requests are validated here; a request that does not fit becomes a 400 in OpenAI's
``{"error": {"message", "type", "code"}}`` shape (see :func:`error_body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    """Decoding fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256,
                       description="A prompt's name (GET /v1/models) or the base model's.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate "
                                   "(default: the prompt's task setting).")
    temperature: float | None = Field(default=None, ge=0, le=2,
                                      description="0 (the default) decodes greedily.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings, "
                                         "besides the task's own.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    # Decoding controls (not OpenAI's; OpenAI clients send them in extra_body, as for vLLM).
    # Unset, a prompt's task settings apply (see softprompt.tasks), else off.
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=10, description="Above 1 penalises tokens already in the input "
        "or output (transformers' semantics; 1: off).")
    no_repeat_ngram_size: int | None = Field(
        default=None, ge=0, le=64, description="Never repeat an n-gram of this size from the "
        "input or output (0: off).")
    min_tokens: int | None = Field(
        default=None, ge=0, le=100_000, description="No EOS before this many tokens (vLLM's "
        "name; stop strings still end the output).")
    min_new_tokens: int | None = Field(default=None, ge=0, le=100_000,
                                       description="The same as min_tokens (transformers' name).")
    penalize_output_only: bool | None = Field(
        default=None, description="repetition_penalty and no_repeat_ngram_size weigh the "
        "generated tokens alone, not the input's too.")
    num_beams: int | None = Field(default=None, ge=1, le=8, description="Beam search with this "
                                  "many beams (greedy search, temperature 0); 1: off.")
    best_of: int | None = Field(default=None, ge=1, description="Only 1; send num_beams for "
                                "beam search.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is the input text, or a JSON record (an object
    of the task's fields) for multi-field tasks."""

    prompt: str | dict[str, str] = Field(description="The input (filled into the prompt's "
                                         "task template).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: the last user message is the input."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class PromptLoad(BaseModel):
    """``POST /v1/prompts``: load the directory ``name`` under ``--prompts``."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=128)


def error_body(message: str, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def _ident(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """Builds the response objects and stream chunks of one request."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = _ident("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def full(self, text: str, finish_reason: str, prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or not finish_reason else {}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice.update(text=text, logprobs=None)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}
