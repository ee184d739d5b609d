"""The HTTP server: OpenAI-compatible routes over one :class:`~softprompt.engine.Engine`.

Route handlers are thin: they check the request, render the input with the prompt's task
template, submit it to the engine and relay its events (whole, or as server-sent events).
Every error is OpenAI's ``{"error": {...}}`` shape with a 4xx code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.encode import chat_text
from softprompt.engine import Completion, Engine, Handle, SamplingParams
from softprompt.errors import SoftPromptError
from softprompt.prefix import num_virtual_tokens
from softprompt.serving import protocol
from softprompt.serving.metrics import ServerMetrics
from softprompt.serving.registry import ServedPrompt, candidates, load_served
from softprompt.tasks import input_example, parse_input, render_input

OPEN_PATHS = ("/health", "/")  # the page holds no data; it asks for the key itself


@dataclass
class ServerConfig:
    """Limits and identity of one server."""

    prompts_dir: Path
    model_name: str
    api_key: str | None = None
    max_new_tokens_limit: int = 512
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 64  # for the base model, which has no task

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_limit", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise SoftPromptError(f"{flag} must be positive, got {getattr(self, name)}")


class ApiError(Exception):
    """A request the server refuses: becomes ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class Server:
    """The prompts, the engine and the routes that join them."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.prompts: dict[str, ServedPrompt] = {}
        self.metrics = ServerMetrics(engine)
        engine.on_step = self.metrics.batch_size.observe

    # --- prompts -------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Every prompt directory under ``--prompts``; one that fails is skipped with a
        one-line warning naming it, and the rest serve."""
        root = self.config.prompts_dir
        for name in candidates(root):
            try:
                self.load(name)
            except ApiError as exc:
                print(f"warning: skipping {root / name}: {exc.message}", file=sys.stderr)

    def load(self, name: str) -> ServedPrompt:
        """Load ``--prompts``/``name`` and register it with the engine (which checks it)."""
        try:
            served = load_served(self.config.prompts_dir, name)
        except SoftPromptError as exc:
            missing = "no softprompt.json" in str(exc)
            raise ApiError(404 if missing else 400, str(exc),
                           code="prompt_not_found" if missing else "invalid_prompt") from None
        try:
            self._register(served)
        except SoftPromptError as exc:
            raise ApiError(400, str(exc), code="invalid_prompt") from None
        return served

    def _register(self, served: ServedPrompt) -> None:
        served.key = self.engine.add_prompt(served.name, served.tensor)
        self.prompts[served.name] = served

    def unload(self, name: str) -> None:
        if name not in self.prompts:
            raise ApiError(404, f"no prompt named {name!r} is loaded", code="model_not_found")
        self.engine.remove_prompt(name)
        del self.prompts[name]

    def model_card(self, name: str) -> dict[str, Any]:
        card: dict[str, Any] = {"id": name, "object": "model", "created": 0,
                                "owned_by": "softprompt"}
        served = self.prompts.get(name)
        if served is None:
            card["softprompt"] = {"kind": "base model"}
            return card
        task = served.task
        card["softprompt"] = {"kind": "soft prompt", "task": task.name,
                              "template": task.template, "fields": task.placeholders(),
                              "stop": task.stop, "max_new_tokens": task.max_new_tokens,
                              "decoding": task.decoding, "instruction": task.instruction,
                              "method": served.method,
                              "num_virtual_tokens": num_virtual_tokens(served.tensor),
                              "sha256": served.key}
        return card

    # --- requests ------------------------------------------------------------------------------

    def chat_text(self, req: protocol.ChatRequest) -> str | None:
        """For the base model, when its tokenizer has a chat template: the whole conversation
        in that template, ready for the assistant's turn. None otherwise (a soft prompt takes
        the last user message through its task template)."""
        tokenizer = self.engine.tokenizer
        if req.model != self.config.model_name or not getattr(tokenizer, "chat_template", None):
            return None
        roles = {"developer": "system", "system": "system", "user": "user",
                 "assistant": "assistant"}
        messages = [{"role": roles[m.role], "content": m.content} for m in req.messages
                    if m.role in roles and m.content]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. role order), as jinja raises
            raise ApiError(400, f"messages: the model's chat template refused them "
                                f"({' '.join(str(exc).split())[:200]})") from None

    def _input_text(self, served: ServedPrompt | None, value: str | dict[str, str]) -> str:
        """The request's input rendered with the prompt's task template: plain text, or a
        record as a JSON object (or a string holding one), as ``generate --input`` takes it."""
        try:
            item = parse_input(value) if isinstance(value, str) else value
            if served is None:
                if not isinstance(item, str):
                    raise ApiError(400, "the base model takes plain text; send a string")
                text = item
            else:
                text = render_input(served.task, input_example(served.task, item))
        except SoftPromptError as exc:
            raise ApiError(400, str(exc)) from None
        if not text.strip():
            raise ApiError(400, "the input is empty; send some text")
        return text

    def prepare(self, req: protocol.SamplingFields, value: str | dict[str, str],
                templated: bool = False) -> tuple[str | None, list[int], SamplingParams]:
        """Check a request; return the engine's prompt name, input ids and settings.

        ``templated``: ``value`` is the base model's chat template already applied.
        """
        if req.model in self.prompts:
            name: str | None = req.model
            served: ServedPrompt | None = self.prompts[req.model]
        elif req.model == self.config.model_name:
            name, served = None, None
        else:
            raise ApiError(404, f"the model {req.model!r} does not exist; GET /v1/models lists "
                                f"the prompts", code="model_not_found")
        if templated and served is None:
            ids = self.engine.encode(value, special_tokens=False)
        elif served is not None and served.task.chat_template:  # as the prompt was trained
            text = self._input_text(served, value)
            try:
                text = chat_text(self.engine.tokenizer, text)
            except SoftPromptError as exc:
                raise ApiError(400, str(exc)) from None
            ids = self.engine.encode(text, special_tokens=False)
        else:
            ids = self.engine.encode(self._input_text(served, value))
        if not ids:
            raise ApiError(400, "the input is empty; send some text")
        cap = self.config.max_new_tokens_limit
        if req.max_tokens is not None and req.max_tokens > cap:
            raise ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit {cap}")
        default = served.task.max_new_tokens if served else self.config.default_max_tokens
        max_tokens = req.max_tokens or min(default, cap)
        stops = req.stops()
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop strings, got {len(stops)}")
        if served is not None and served.task.stop:
            stops.append(served.task.stop)
        try:
            params = SamplingParams(max_new_tokens=max_tokens,
                                    temperature=req.temperature or 0.0,
                                    top_p=req.top_p if req.top_p is not None else 1.0,
                                    seed=req.seed or 0, stop=stops,
                                    **_controls(req, served.task.decoding if served else {}))
        except SoftPromptError as exc:
            raise ApiError(400, str(exc)) from None
        return name, ids, params

    async def run(self, request: Request, req: protocol.SamplingFields,
                  value: str | dict[str, str], chat: bool, endpoint: str,
                  templated: bool = False) -> Response:
        name, ids, params = self.prepare(req, value, templated)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def listener(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        try:
            handle = self.engine.submit(name, ids, params, listener)
        except SoftPromptError as exc:  # the input does not fit the model's positions
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        reply = protocol.Reply(req.model, chat)
        label = req.model
        if req.stream:
            return StreamingResponse(self._stream(handle, events, reply, label, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.metrics.record(label, endpoint, None)
                    handle.cancel()  # the client left: free its batch row
                    return Response(status_code=204)
                continue
            if kind == "done":
                break
        completion: Completion = payload
        self.metrics.record(label, endpoint, completion)
        if completion.finish_reason == "error":
            raise ApiError(409, completion.error or "the request failed", code="prompt_removed")
        return JSONResponse(reply.full(completion.text, _finish(completion),
                                       completion.prompt_tokens, len(completion.token_ids)))

    async def _stream(self, handle: Handle, events: asyncio.Queue, reply: protocol.Reply,
                      label: str, endpoint: str):
        completion: Completion | None = None
        try:
            first = True
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    yield _sse(reply.chunk(payload, first=first))
                    first = False
                    continue
                completion = payload
                if completion.finish_reason == "error":
                    yield _sse(protocol.error_body(completion.error or "the request failed",
                                                   code="prompt_removed"))
                else:
                    if first and reply.chat:
                        yield _sse(reply.chunk("", first=True))
                    yield _sse(reply.chunk("", _finish(completion)))
                yield "data: [DONE]\n\n"
                return
        finally:
            # Recorded before the cancel: once the row has left, the metric is there.
            self.metrics.record(label, endpoint, completion)
            if completion is None:
                handle.cancel()  # the client disconnected mid-stream


def _controls(req: protocol.SamplingFields, task_defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's decoding controls, the prompt's task defaults where it sends none."""
    if req.best_of is not None and req.best_of > 1:
        raise ApiError(400, f"best_of {req.best_of} is not supported; send num_beams (in "
                            f"extra_body with OpenAI's client) for beam search")
    if None not in (req.min_tokens, req.min_new_tokens) and req.min_tokens != req.min_new_tokens:
        raise ApiError(400, f"min_tokens {req.min_tokens} and min_new_tokens "
                            f"{req.min_new_tokens} disagree; send one of them")
    given = {"repetition_penalty": req.repetition_penalty,
             "no_repeat_ngram_size": req.no_repeat_ngram_size,
             "min_new_tokens": req.min_tokens if req.min_tokens is not None
             else req.min_new_tokens,
             "penalize_output_only": req.penalize_output_only, "num_beams": req.num_beams}
    return {**task_defaults, **{k: v for k, v in given.items() if v is not None}}


def _finish(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, code), status_code=status)


def _playground() -> str:
    return resources.files("softprompt.serving").joinpath("playground.html").read_text("utf-8")


def create_app(server: Server) -> FastAPI:
    """The FastAPI application: routes, auth, body limit and error shapes."""
    app = FastAPI(title="softprompt", version="1",
                  description="OpenAI-compatible serving of soft prompts over one frozen model.")
    cfg = server.config

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if cfg.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return _error(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                              "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return _error(413, f"the request body is over {cfg.max_body_bytes} bytes",
                          code="request_too_large")
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()  # chunked bodies carry no content-length
            if len(body) > cfg.max_body_bytes:
                return _error(413, f"the request body is over {cfg.max_body_bytes} bytes",
                              code="request_too_large")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail),
                      "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(_playground())

    @app.get("/health")
    async def health():
        return {"status": "ok", "prompts": len(server.prompts), **server.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models():
        names = [cfg.model_name, *sorted(server.prompts)]
        return {"object": "list", "data": [server.model_card(n) for n in names]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: protocol.CompletionRequest):
        return await server.run(request, body, body.prompt, chat=False, endpoint="completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: protocol.ChatRequest):
        users = [m.content for m in body.messages if m.role == "user" and m.content]
        if not users:
            raise ApiError(400, "messages: no user message with content; the last user "
                                "message is the input")
        chat_text = server.chat_text(body)
        if chat_text is not None:  # the base model, which has a chat template: all messages
            return await server.run(request, body, chat_text, chat=True, endpoint="chat",
                                    templated=True)
        return await server.run(request, body, users[-1], chat=True, endpoint="chat")

    @app.post("/v1/prompts", status_code=201)
    async def load_prompt(body: protocol.PromptLoad):
        served = server.load(body.name)
        return server.model_card(served.name)

    @app.delete("/v1/prompts/{name}")
    async def delete_prompt(name: str):
        server.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def serve(prompts_dir: str | Path, *, model: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_batch_size: int = 32,
          max_new_tokens_limit: int = 512, prefix_cache_mb: int = 512,
          device: str = "auto", dtype: str = "auto", precision: str = "auto",
          loaded: tuple[Any, Any] | None = None) -> None:
    """Load the model (``device``/``dtype`` as for every command) and every prompt under
    ``prompts_dir``, then serve until interrupted."""
    import uvicorn

    from softprompt import models

    # Every argument is checked before the (slow) model load.
    root = Path(prompts_dir)
    if not root.is_dir():
        raise SoftPromptError(f"--prompts {root} is not a directory")
    for flag, value in (("--max-batch-size", max_batch_size),
                        ("--prefix-cache-mb", prefix_cache_mb)):
        if value <= 0:
            raise SoftPromptError(f"{flag} must be positive, got {value}")
    if not 0 <= port <= 65535:
        raise SoftPromptError(f"--port must be in 0..65535, got {port}")
    name = model or models.DEFAULT_MODEL
    config = ServerConfig(root, name, api_key, max_new_tokens_limit)
    torch_device = models.resolve_device(device)
    prec = models.engine_precision(precision, dtype, torch_device, "serve")
    lm, tokenizer = loaded or models.load_model(name, dtype=prec.weights, device=torch_device)
    engine = Engine(lm, tokenizer, max_batch_size=max_batch_size,
                    prefix_cache_bytes=prefix_cache_mb << 20)
    server = Server(engine, config)
    server.load_all()
    print(f"serving {len(server.prompts)} prompt(s) on http://{host}:{port} "
          f"(model {name})", file=sys.stderr)
    engine.start()
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        engine.stop()
