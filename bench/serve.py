"""Benchmark 5: serving many soft prompts from one frozen model.

64 requests spread over 8 prompts (request i uses prompt i % 8; prompts of 8-32 virtual
tokens, each the text-init embeddings of a different instruction), inputs from the first
translation test records, greedy, ``max_new_tokens`` 32, stop at a newline. All requests
arrive at once. Three ways to serve them, on the same model and machine, interleaved:

* ``ours``: the engine (softprompt.engine), mixed-prompt continuous batching: every request
  shares each decoding step, whatever its prompt; each prompt's KV prefix computed once.
* ``ours_unmixed``: the same engine with mixed batching off: one prompt's requests at a time
  (continuous batching within a prompt), the reference for what mixing buys.
* ``peft``: PEFT serving the prompts the only way it can (PEFT cannot batch rows with
  different prompts): one adapter at a time, requests grouped per adapter and batched within
  the group, ``generate`` with left padding, ``stop_strings``, the KV cache name bridged
  (bench/eval_throughput.py explains why).

Reported: requests/s and generated tokens/s, time to first token p50/p95 (from the common
arrival time), and the ratio ours / PEFT (goal >= 3x) with how many outputs are identical
(all rows, and rows PEFT did not pad). Also: time to first token of a lone request with its
prefix cached vs recomputed (prefix cache off).

Usage: python bench/serve.py [--model smollm2-135m] [--requests 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import say  # noqa: E402

GOAL = 3.0  # ours / PEFT requests per second, higher is better
INSTRUCTIONS = [
    "Translate the English sentence into German.",
    "Translate into German:",
    "You are a translator from English to German. Translate the sentence.",
    "German translation of the following English text, word for word where possible:",
    "Render this sentence in German.",
    "English to German:",
    "Please translate the next sentence from English into natural, fluent German.",
    "Give the German version of this English sentence without any explanation at all.",
]
LENGTHS = [8, 12, 16, 20, 20, 24, 28, 32]


def make_prompts(model, tokenizer, n: int) -> dict[str, torch.Tensor]:
    """``n`` prompts ``[P, H]``: text-init embeddings of different instructions."""
    from softprompt.prompt import init_prompt

    table = model.get_input_embeddings().weight
    prompts = {}
    for i in range(n):
        ids = tokenizer(INSTRUCTIONS[i % len(INSTRUCTIONS)], add_special_tokens=False).input_ids
        prompts[f"prompt{i}"] = init_prompt(table, LENGTHS[i % len(LENGTHS)], "text", ids,
                                            seed=i).embeddings.detach()
    return prompts


def inputs(task, n: int) -> list[str]:
    from softprompt.tasks import make_examples, render_input

    path = common.DATA_DIR / "translation" / "test.jsonl"
    records = common.read_subset(path, n)
    return [render_input(task, ex) for ex in make_examples(task, records)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_engine(engine, jobs, max_new_tokens: int, stop: str) -> dict:
    from softprompt.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, stop=[stop])
    t0 = time.perf_counter()
    handles = [engine.submit(name, text, params) for text, name in jobs]
    engine.run_until_idle()
    wall = time.perf_counter() - t0
    done = [h.result() for h in handles]
    return {"wall": wall, "texts": [c.text for c in done],
            "tokens": sum(len(c.token_ids) for c in done),
            "ttft": [c.first_token_seconds for c in done], "padded": [False] * len(done)}


class _FirstToken:
    """A transformers streamer that notes when a batch's first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the input ids
            self.first = time.perf_counter()

    def end(self):
        pass


def run_peft(pm, tokenizer, prompts: dict, jobs, max_new_tokens: int, stop: str, device) -> dict:
    """One adapter at a time: each prompt's requests batched together, groups in turn."""
    from softprompt.generation import cut_at_stop

    eos = tokenizer.eos_token_id
    texts, ttft, padded, tokens = [""] * len(jobs), [0.0] * len(jobs), [False] * len(jobs), 0
    t0 = time.perf_counter()
    for name in prompts:
        rows = [i for i, (_, n) in enumerate(jobs) if n == name]
        if not rows:
            continue
        pm.set_adapter(name)  # one adapter at a time
        enc = tokenizer([jobs[i][0] for i in rows], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        streamer = _FirstToken()
        with torch.no_grad():
            out = pm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                              stop_strings=[stop], tokenizer=tokenizer, streamer=streamer)
        first = (streamer.first or time.perf_counter()) - t0
        mask = enc["attention_mask"]
        for j, i in enumerate(rows):
            ids = out[j, enc["input_ids"].shape[1]:].tolist()
            ids = ids[:ids.index(eos)] if eos in ids else ids
            ids = [t for t in ids if t != tokenizer.pad_token_id] if eos == \
                tokenizer.pad_token_id else ids
            tokens += len(ids)
            texts[i] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0]
            ttft[i] = first
            padded[i] = bool((mask[j] == 0).any())
    return {"wall": time.perf_counter() - t0, "texts": texts, "tokens": tokens, "ttft": ttft,
            "padded": padded}


def peft_adapters(model, prompts: dict[str, torch.Tensor]):
    """One PEFT prompt-tuning adapter per prompt on the same frozen model (PEFT's multi-adapter
    API: ``add_adapter`` then ``set_adapter``), each holding our tensor."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    def config(p: int):
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)

    items = list(prompts.items())
    pm = get_peft_model(model, config(items[0][1].shape[0]), adapter_name=items[0][0])
    for name, tensor in items[1:]:
        pm.add_adapter(name, config(tensor.shape[0]))
    for name, tensor in items:
        weight = pm.prompt_encoder[name].embedding.weight
        with torch.no_grad():
            weight.copy_(tensor.to(weight.device, weight.dtype))
    return pm


def summary(runs: list[dict], n: int) -> dict:
    walls = [r["wall"] for r in runs]
    wall = common.median(walls)
    last = runs[-1]
    return {"seconds": [round(w, 3) for w in walls], "median_seconds": round(wall, 3),
            "requests_per_s": round(n / wall, 3),
            "tokens_per_s": round(last["tokens"] / wall, 1),
            "ttft_p50_s": round(percentile(last["ttft"], 0.5), 3),
            "ttft_p95_s": round(percentile(last["ttft"], 0.95), 3)}


def prefix_ttft(model, tokenizer, prompts, texts, reps: int) -> dict:
    """Time to first token of lone requests: prefix cached vs recomputed every time."""
    from softprompt.engine import Engine, SamplingParams

    cached, fresh = Engine(model, tokenizer), Engine(model, tokenizer, prefix_cache_bytes=0)
    for engine in (cached, fresh):
        for name, tensor in prompts.items():
            engine.add_prompt(name, tensor)
    for name in prompts:  # warm the cache: every prefix computed once
        cached.generate([texts[0]], [name], SamplingParams(max_new_tokens=1))
    times: dict[str, list[float]] = {"cached": [], "recomputed": []}
    for rep in range(reps):
        for i, name in enumerate(prompts):
            order = (("cached", cached), ("recomputed", fresh))
            for label, engine in (order if (rep + i) % 2 == 0 else order[::-1]):
                h = engine.submit(name, texts[i % len(texts)], SamplingParams(max_new_tokens=1))
                engine.run_until_idle()
                times[label].append(h.result().first_token_seconds)
    c, r = common.median(times["cached"]), common.median(times["recomputed"])
    assert cached.prefixes.misses == len(prompts) and fresh.prefixes.hits == 0
    return {"cached_ttft_s": round(c, 4), "recomputed_ttft_s": round(r, 4),
            "ratio_recomputed_over_cached": round(r / c, 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=common.OUT_DIR / "serve.json")
    args = p.parse_args(argv)
    from softprompt.engine import Engine
    from softprompt.tasks import get_task

    model, tok, _ = common.load(args.model, args.dtype, args.device)
    task = get_task("translation")
    prompts = make_prompts(model, tok, args.prompts)
    texts = inputs(task, args.requests)
    names = list(prompts)
    jobs = [(texts[i % len(texts)], names[i % len(names)]) for i in range(args.requests)]
    say(f"{args.requests} requests over {len(prompts)} prompts (P = "
        f"{[int(t.shape[0]) for t in prompts.values()]}), max_new_tokens "
        f"{args.max_new_tokens}, stop '\\n', greedy")

    engines = {}
    for label, mixed in (("ours", True), ("ours_unmixed", False)):
        engine = Engine(model, tok, max_batch_size=args.requests, mixed=mixed)
        for name, tensor in prompts.items():
            engine.add_prompt(name, tensor)
        engines[label] = engine
    from eval_throughput import cache_kwarg_renamed, fix_peft_cache_kwarg

    pm = peft_adapters(model, prompts)
    if cache_kwarg_renamed(model):
        fix_peft_cache_kwarg(pm)
    fns = {
        "ours": lambda: run_engine(engines["ours"], jobs, args.max_new_tokens, "\n"),
        "ours_unmixed": lambda: run_engine(engines["ours_unmixed"], jobs, args.max_new_tokens,
                                           "\n"),
        "peft": lambda: run_peft(pm, tok, prompts, jobs, args.max_new_tokens, "\n",
                                 args.device),
    }
    runs: dict[str, list[dict]] = {k: [] for k in fns}
    for rep in range(args.reps):
        order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
        for name in order:
            runs[name].append(fns[name]())
        say(f"  rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {runs[n][-1]['wall']:.2f}s" for n in fns))
    result = {"settings": vars(args) | {"out": str(args.out)}, "machine": common.machine()}
    for name in fns:
        result[name] = summary(runs[name], args.requests)
    ours_texts = runs["ours"][-1]["texts"]
    for name in ("ours_unmixed", "peft"):
        theirs = runs[name][-1]
        same = [a == b for a, b in zip(ours_texts, theirs["texts"])]
        unpadded = [s for s, pad in zip(same, theirs["padded"]) if not pad]
        result[name]["identical_to_ours"] = [sum(same), len(same)]
        result[name]["identical_unpadded_rows"] = [sum(unpadded), len(unpadded)]
    ratio = common.paired_ratio([r["wall"] for r in runs["peft"]],
                                [r["wall"] for r in runs["ours"]])
    unmixed = common.paired_ratio([r["wall"] for r in runs["ours_unmixed"]],
                                  [r["wall"] for r in runs["ours"]])
    result["serve_throughput"] = {"ratio": round(ratio, 3), "goal": GOAL,
                                  "verdict": common.verdict(ratio, GOAL, True),
                                  "ratio_vs_unmixed": round(unmixed, 3)}
    result["prefix_ttft"] = prefix_ttft(model, tok, prompts, texts, reps=2)
    for name in fns:
        r = result[name]
        say(f"{name:13s} {r['requests_per_s']:7.2f} req/s {r['tokens_per_s']:8.1f} tok/s  "
            f"TTFT p50 {r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s"
            + (f"  identical {r['identical_to_ours'][0]}/{r['identical_to_ours'][1]} "
               f"(unpadded {r['identical_unpadded_rows'][0]}/"
               f"{r['identical_unpadded_rows'][1]})" if "identical_to_ours" in r else ""))
    s = result["serve_throughput"]
    say(f"ours / PEFT requests per second: {s['ratio']:.2f}x (goal >= {GOAL}) {s['verdict']}; "
        f"ours / ours unmixed: {s['ratio_vs_unmixed']:.2f}x")
    t = result["prefix_ttft"]
    say(f"lone-request TTFT: prefix cached {t['cached_ttft_s'] * 1000:.1f} ms, recomputed "
        f"{t['recomputed_ttft_s'] * 1000:.1f} ms ({t['ratio_recomputed_over_cached']:.2f}x)")
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
