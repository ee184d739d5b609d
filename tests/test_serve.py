"""The HTTP server over a real uvicorn on 127.0.0.1 (ephemeral port), with the tiny models.

Every request loop here is bounded in count and time, and every server is stopped.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from servers import (
    BASE,
    QA,
    SOURCES,
    TRANSLATION,
    expected_output,
    make_responsive,
    rss_bytes,
    running,
    write_prompts,
)

from softprompt.config import GenerationConfig
from softprompt.engine import Engine
from softprompt.errors import SoftPromptError
from softprompt.generation import generate
from softprompt.prefix import kv_shape
from softprompt.prompt import PromptMeta, save_prompt
from softprompt.serving.app import Server, ServerConfig, create_app
from softprompt.serving.registry import confined
from softprompt.tasks import make_example, render_input


@pytest.fixture
def served(tiny, tmp_path):
    """``(server, prompts, model, tokenizer)`` with four [P, H] prompts and a KV prefix under
    tmp_path/prompts."""
    model, tok, _ = tiny
    make_responsive(model)
    root = tmp_path / "prompts"
    prompts = write_prompts(root, model.config.hidden_size, kv_shape(model.config))
    server = Server(Engine(model, tok, max_batch_size=16),
                    ServerConfig(root, BASE, max_new_tokens_limit=64))
    server.load_all()
    return server, prompts, model, tok


def test_openai_client_models_completions_chat_and_streaming(served):
    server, prompts, model, tok = served
    with running(server) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=30)
        ids = [m.id for m in client.models.list().data]
        assert ids == [BASE, "de3", "de5", "de8", "kv6", "qa4"]
        tensor, task = prompts["de5"]
        want = expected_output(model, tok, tensor, task, {"source": SOURCES[0]}, 12)
        done = client.completions.create(model="de5", prompt=SOURCES[0], max_tokens=12)
        assert done.choices[0].text == want
        assert done.choices[0].finish_reason in ("stop", "length")
        n_in = len(tok(render_input(task, make_example(task, {"source": SOURCES[0]},
                                                       with_target=False))).input_ids)
        assert done.usage.prompt_tokens == n_in - (tok.bos_token_id is not None
                                                   and tok("a").input_ids[0] == tok.bos_token_id)
        assert 0 < done.usage.completion_tokens <= 12
        chat = client.chat.completions.create(
            model="de5", max_tokens=12,
            messages=[{"role": "system", "content": "ignored"},
                      {"role": "user", "content": SOURCES[0]}])
        assert chat.choices[0].message.content == want
        assert chat.choices[0].message.role == "assistant"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="de5", prompt=SOURCES[0], max_tokens=12, stream=True))
        assert streamed == want
        chunks = list(client.chat.completions.create(
            model="de5", max_tokens=12, stream=True,
            messages=[{"role": "user", "content": SOURCES[0]}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        # A multi-field task takes a JSON record.
        record = {"context": "The cat sat on the mat in the kitchen.", "question": "Where?"}
        qa_tensor, _ = prompts["qa4"]
        got = client.completions.create(model="qa4", prompt=json.dumps(record), max_tokens=8)
        assert got.choices[0].text == expected_output(model, tok, qa_tensor, QA, record, 8)
        # A prefix-tuned prompt (a KV prefix) serves like any other.
        kv_prefix, _ = prompts["kv6"]
        got = client.completions.create(model="kv6", prompt=SOURCES[1], max_tokens=10)
        assert got.choices[0].text == expected_output(model, tok, kv_prefix, TRANSLATION,
                                                      {"source": SOURCES[1]}, 10)
        # The base model takes raw text.
        raw = "English: Rain.\nGerman:"
        base = client.completions.create(model=BASE, prompt=raw, max_tokens=6)
        assert base.choices[0].text == generate(model, tok, [raw], None,
                                                GenerationConfig(max_new_tokens=6))[0]


def test_api_key_guards_every_route_but_health(served):
    server, _, _, _ = served
    server.config.api_key = "sekrit"
    with running(server) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=30)
        assert len(good.models.list().data) == 6
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 401
            assert http.post("/v1/prompts", json={"name": "de3"}).status_code == 401
            assert http.get("/").status_code == 200  # the page holds no data


def test_bad_requests_get_openai_errors_with_4xx_codes(served):
    server, _, _, _ = served
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        def post(body, path="/v1/completions", **kw):
            res = http.post(path, json=body, **kw) if body is not None else http.post(path, **kw)
            assert 400 <= res.status_code < 500, res.text
            err = res.json()["error"]
            assert set(err) >= {"message", "type", "code"} and err["message"]
            return res.status_code, err

        assert post({"model": "nope", "prompt": "x"})[0] == 404
        assert post({"model": "de3", "prompt": "x", "max_tokens": 65})[0] == 400
        code, err = post({"model": "de3", "prompt": "word " * 600, "max_tokens": 8})
        assert code == 400 and err["code"] == "context_length_exceeded"
        assert post({"model": "de3", "prompt": "x", "n": 2})[0] == 400
        assert post({"model": "de3", "prompt": ""})[0] == 400
        assert "looks like JSON" in post({"model": "de3", "prompt": "{broken"})[1]["message"]
        assert post({"model": "qa4", "prompt": "only text"})[0] == 400
        assert post({"model": "de3"})[0] == 400
        assert post(None, content=b"{not json", headers={"content-type": "application/json"})[0] \
            == 400
        assert post({"model": "de3", "messages": []}, "/v1/chat/completions")[0] == 400
        assert post({"model": "de3", "messages": [{"role": "system", "content": "x"}]},
                    "/v1/chat/completions")[0] == 400
        big = {"model": "de3", "prompt": "x" * (server.config.max_body_bytes + 10)}
        assert post(big)[0] == 413
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/nothing").json()["error"]["message"]


def test_prompts_load_and_delete_at_run_time(served, tmp_path):
    server, prompts, model, tok = served
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.delete("/v1/prompts/de8").json()["deleted"] is True
        assert http.post("/v1/completions", json={"model": "de8", "prompt": "x"}).status_code \
            == 404
        assert http.delete("/v1/prompts/de8").status_code == 404
        card = http.post("/v1/prompts", json={"name": "de8"})
        assert card.status_code == 201 and card.json()["softprompt"]["num_virtual_tokens"] == 8
        res = http.post("/v1/completions", json={"model": "de8", "prompt": SOURCES[2],
                                                 "max_tokens": 6})
        tensor, task = prompts["de8"]
        assert res.json()["choices"][0]["text"] == expected_output(model, tok, tensor, task,
                                                             {"source": SOURCES[2]}, 6)
        assert http.post("/v1/prompts", json={"name": "../prompts"}).status_code == 400
        assert http.post("/v1/prompts", json={"name": "absent"}).status_code == 404
        metrics = http.get("/metrics").text
        assert 'softprompt_requests_total{endpoint="completions",prompt="de8",status="ok"} 1.0' \
            in metrics
        assert "softprompt_prefix_cache_misses_total" in metrics
        assert "softprompt_batch_size_bucket" in metrics


def test_malformed_and_escaping_prompt_directories_are_skipped(tiny, tmp_path, capsys):
    model, tok, _ = tiny
    root = tmp_path / "prompts"
    write_prompts(root, model.config.hidden_size)
    (root / "broken").mkdir()
    (root / "broken" / "softprompt.json").write_text("{not json")
    wrong = torch.zeros(3, model.config.hidden_size + 2)
    save_prompt(root / "wide", wrong, PromptMeta(model="x", task=TRANSLATION.to_dict(),
                                                 num_virtual_tokens=3,
                                                 hidden_size=model.config.hidden_size + 2))
    outside = tmp_path / "outside"
    save_prompt(outside, torch.zeros(2, model.config.hidden_size),
                PromptMeta(model="x", task=TRANSLATION.to_dict(), num_virtual_tokens=2,
                           hidden_size=model.config.hidden_size))
    (root / "escape").symlink_to(outside, target_is_directory=True)
    save_prompt(root / "nan", torch.full((2, model.config.hidden_size), float("nan")),
                PromptMeta(model="x", task=TRANSLATION.to_dict(), num_virtual_tokens=2,
                           hidden_size=model.config.hidden_size))
    server = Server(Engine(model, tok), ServerConfig(root, BASE))
    server.load_all()
    assert sorted(server.prompts) == ["de3", "de5", "de8", "qa4"]
    assert server.engine.prompt_names() == ["de3", "de5", "de8", "qa4"]
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 4
    for bad in ("broken", "wide", "escape", "nan"):
        assert f"skipping {root / bad}" in err
    with pytest.raises(SoftPromptError, match="not allowed"):
        confined(root, "../outside")
    with pytest.raises(SoftPromptError, match="not allowed"):
        confined(root, "/etc")


def test_client_disconnect_mid_stream_frees_its_row(served):
    server, _, _, _ = served
    server.config.max_new_tokens_limit = 400
    with running(server) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"model": "de3", "prompt": SOURCES[1], "max_tokens": 400, "stream": True,
                    "stop": ["\u0000never"]}
            with http.stream("POST", "/v1/completions", json=body) as res:
                assert res.status_code == 200
                lines = res.iter_lines()
                next(line for line in lines if line.startswith("data:"))
            # The connection is closed: within a few seconds the row leaves the batch.
            deadline = time.monotonic() + 15
            while server.engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.engine.stats()["running"] == 0
            metrics = http.get("/metrics").text
            assert 'status="cancelled"} 1.0' in metrics


def test_deleting_a_prompt_lets_running_requests_finish(served):
    server, prompts, model, tok = served
    server.config.max_new_tokens_limit = 300
    with running(server) as url:
        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                first = asyncio.create_task(http.post("/v1/completions", json={
                    "model": "de5", "prompt": SOURCES[3], "max_tokens": 300,
                    "stop": ["\u0000never"]}))
                deadline = time.monotonic() + 10
                while not server.engine.stats()["running"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                deleted = await http.delete("/v1/prompts/de5")
                still_running = server.engine.stats()["running"]
                refused = await http.post("/v1/completions", json={"model": "de5",
                                                                   "prompt": "x"})
                return await first, deleted, still_running, refused
        res, deleted, still_running, refused = asyncio.run(scenario())
    assert deleted.status_code == 200 and still_running == 1  # deleted mid-decoding
    assert refused.status_code == 404
    tensor, task = prompts["de5"]
    assert res.status_code == 200
    text = render_input(task, make_example(task, {"source": SOURCES[3]}, with_target=False))
    cfg = GenerationConfig(**{**task.generation_defaults(), "max_new_tokens": 300})
    want = generate(model, tok, [text], tensor, cfg, stop="\u0000never")[0]
    assert res.json()["choices"][0]["text"] == want


def test_load_many_concurrent_requests_over_four_prompts(served):
    """200 concurrent requests: all answered, each equal to its unbatched output."""
    server, prompts, model, tok = served
    names = ["de3", "de5", "de8", "qa4"]

    def record(i):
        if names[i % 4] == "qa4":
            return {"context": SOURCES[i % 6], "question": "What is it?"}
        return {"source": SOURCES[i % 6]}

    expected = {}
    for i in range(24):  # the distinct (prompt, input) pairs among the 200 requests
        tensor, task = prompts[names[i % 4]]
        expected[(names[i % 4], json.dumps(record(i)))] = expected_output(model, tok, tensor, task,
                                                                    record(i), 6)

    async def fire(url, n):
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            async def one(i):
                body = {"model": names[i % 4], "max_tokens": 6,
                        "prompt": json.dumps(record(i)) if names[i % 4] == "qa4"
                        else record(i)["source"]}
                res = await http.post("/v1/completions", json=body)
                return i, res.status_code, res.json()
            return await asyncio.gather(*(one(i) for i in range(n)))

    with running(server) as url:
        asyncio.run(asyncio.wait_for(fire(url, 40), 120))  # warm-up: allocator, sockets
        baseline = rss_bytes()
        results = asyncio.run(asyncio.wait_for(fire(url, 200), 300))
        assert server.engine.stats()["running"] == 0 and server.engine.stats()["waiting"] == 0
        # Memory is back near its baseline: no request's cache rows or buffers are kept.
        assert rss_bytes() - baseline < 64 << 20
    assert len(results) == 200
    for i, status, body in results:
        assert status == 200, body
        key = (names[i % 4], json.dumps(record(i)))
        assert body["choices"][0]["text"] == expected[key], i
    assert server.engine._cache is None  # the batch's KV cache is gone once idle


# --- schemathesis: requests generated from the server's own OpenAPI schema ---------------------

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402


@pytest.fixture
def api_schema(tiny_dirs, tmp_path):
    """The server's schema, loaded from the app (in process, no socket)."""
    from softprompt.models import load_model

    model, tok = load_model(str(tiny_dirs["llama"]))
    root = tmp_path / "prompts"
    write_prompts(root, model.config.hidden_size)
    server = Server(Engine(model, tok, max_batch_size=8),
                    ServerConfig(root, BASE, max_new_tokens_limit=8, max_body_bytes=4096))
    server.load_all()
    server.engine.start()
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(server))
    server.engine.stop()


def test_no_generated_request_makes_a_server_error(api_schema):
    """Every operation, 25 generated requests each (fixed seed): never a 5xx, and every
    4xx in OpenAI's error shape. (schemathesis' pytest plugin is driven by hand: its
    fixture loader does not support pytest 9.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
        "POST /v1/prompts", "DELETE /v1/prompts/{name}", "GET /health", "GET /metrics"}
    names = [BASE, "de3", "qa4", "unknown"]
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            # Point most generated bodies at a real prompt so they reach the engine.
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = names[len(json.dumps(case.body)) % len(names)]
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.body,
                                                response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"message", "type", "code"}

        check()


def test_cli_serve_starts_lists_prompts_and_stops(tiny_dirs, tmp_path):
    """`softprompt serve` as a user runs it: a real process on a loopback port."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    root = tmp_path / "prompts"
    write_prompts(root, 32)
    save_prompt(root / "wide", torch.zeros(2, 40), PromptMeta(
        model="x", task=TRANSLATION.to_dict(), num_virtual_tokens=2, hidden_size=40))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--prompts", str(root),
                             "--model", str(tiny_dirs["gpt2"]), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        models = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert models is not None, "server did not come up"
        assert [m["id"] for m in models["data"]] == [str(tiny_dirs["gpt2"]), "de3", "de5",
                                                     "de8", "qa4"]
        res = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                         json={"model": "de3", "prompt": "Rain.", "max_tokens": 4})
        assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "wide" in warnings[0] and "hidden size 40" in warnings[0]
    assert "serving 4 prompt(s)" in err


def test_cli_serve_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from softprompt.cli import main

    for args, message in (([str(tmp_path / "absent")], "is not a directory"),
                          ([str(tmp_path), "--max-batch-size", "0"], "--max-batch-size"),
                          ([str(tmp_path), "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
                          ([str(tmp_path), "--max-new-tokens-limit", "0"],
                           "--max-new-tokens-limit"),
                          ([str(tmp_path), "--port", "70000"], "--port")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--prompts", *args, "--model", str(tmp_path / "no-model")])
        assert exit_.value.code == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_readme_openai_client_block_runs_against_the_server(served):
    """The README's OpenAI-client example, run as written against a live server (its URL and
    the prompt name 'de' are the only things mapped)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    server, prompts, model, tok = served
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "OpenAI(" in b)
    server.load_all()
    tensor, task = prompts["de5"]
    server._register(type(server.prompts["de5"])("de", tensor, task, server.config.prompts_dir))
    with running(server) as url:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    source = re.search(r'prompt="([^"]+)"', block).group(1)
    tokens = int(re.search(r"max_tokens=(\d+)", block).group(1))
    plain, controlled = out.getvalue().strip("\n").split("\n")
    assert plain == expected_output(model, tok, tensor, task, {"source": source}, tokens)
    assert controlled == expected_output(model, tok, tensor, task, {"source": source}, tokens,
                                         num_beams=4, repetition_penalty=1.2)


def test_chat_with_the_base_model_uses_its_chat_template(served):
    """The base model of a tokenizer with a chat template gets the whole conversation in it;
    a soft prompt still takes the last user message through its task template."""
    server, prompts, model, tok = served
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Rain."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    want = generate(model, tok, [ids], None, GenerationConfig(max_new_tokens=6))[0]
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        res = http.post("/v1/chat/completions", json={"model": BASE, "messages": messages,
                                                      "max_tokens": 6})
        soft = http.post("/v1/chat/completions", json={"model": "de3", "messages": messages,
                                                       "max_tokens": 6})
    body = res.json()
    assert body["choices"][0]["message"]["content"] == want
    from softprompt.encode import adds_bos

    in_prefix = adds_bos(tok) and ids[0] == tok.bos_token_id  # BOS lives in the cached prefix
    assert body["usage"]["prompt_tokens"] == len(ids) - in_prefix
    tensor, task = prompts["de3"]
    assert soft.json()["choices"][0]["message"]["content"] == expected_output(
        model, tok, tensor, task, {"source": "Rain."}, 6)


def test_decoding_controls_and_beams_from_an_openai_client(served):
    """The controls travel in extra_body (as for vLLM); each output equals generate() with
    the same settings, which tests/test_decoding.py compares with transformers."""
    server, prompts, model, tok = served
    tensor, task = prompts["de5"]
    with running(server) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=30)
        for body, options in [
            ({"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
             {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}),
            ({"min_tokens": 6}, {"min_new_tokens": 6}),
            ({"repetition_penalty": 1.5, "penalize_output_only": True},
             {"repetition_penalty": 1.5, "penalize_output_only": True}),
            ({"min_new_tokens": 6, "num_beams": 3}, {"min_new_tokens": 6, "num_beams": 3}),
        ]:
            want = expected_output(model, tok, tensor, task, {"source": SOURCES[1]}, 12,
                                   **options)
            done = client.completions.create(model="de5", prompt=SOURCES[1], max_tokens=12,
                                             extra_body=body)
            assert done.choices[0].text == want, body
            chat = client.chat.completions.create(
                model="de5", max_tokens=12, extra_body=body,
                messages=[{"role": "user", "content": SOURCES[1]}])
            assert chat.choices[0].message.content == want, body
        beams = {"num_beams": 3}
        # An input whose beam output is not the greedy one (the comparison can fail).
        source, want = next((s, w) for s in SOURCES for w in [expected_output(
            model, tok, tensor, task, {"source": s}, 12, **beams)]
            if w != expected_output(model, tok, tensor, task, {"source": s}, 12))
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="de5", prompt=source, max_tokens=12, stream=True, extra_body=beams))
        assert streamed == want
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        for body, words in [({"best_of": 2}, "send num_beams"),
                            ({"min_tokens": 2, "min_new_tokens": 3}, "disagree"),
                            ({"num_beams": 2, "temperature": 0.8}, "searches deterministically"),
                            ({"num_beams": 9}, ""), ({"repetition_penalty": 0}, "")]:
            res = http.post("/v1/completions", json={"model": "de3", "prompt": "x", **body})
            assert res.status_code == 400, body
            assert words in res.json()["error"]["message"]
