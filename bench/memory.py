"""Benchmark 4: peak memory of one training step at batch 8 x 512 tokens, ours vs PEFT.

Each method runs in a fresh child process (so neither inherits the other's freed-but-kept
heap): load the frozen model, build the batch, the prompt and the Adam optimiser, then read
the resident set size (VmRSS) as the baseline, reset the kernel's peak-RSS counter (write 5
to /proc/self/clear_refs, which sets VmHWM back to the current RSS), run one full step
(forward, backward, clip, Adam) and read VmHWM. Before the baseline, every weight is read
once and one tiny step is run, so lazily mapped weights, thread pools and Adam state are
already resident; then glibc's freed heap is trimmed so that no slack from it hides part of
the step's memory. The figure is VmHWM - baseline: the most memory the step itself held at
once (activations, logits, gradients). A 1 ms RSS-sampling thread runs too, as a
cross-check and as the fallback where clear_refs is not writable.

Allocator: glibc adapts its mmap threshold to the allocation history, so with its defaults a
freed block may stay in the heap and RSS carries run-dependent slack (PEFT's figure moved
by ~7% between identical runs here). By default the children therefore run with
MALLOC_MMAP_THRESHOLD_=64 KiB: every tensor larger than that gets its own mapping, returned on
free, so the peak RSS increase is the peak of live tensor memory and repeats to the MiB.
``--malloc default`` measures with glibc's defaults instead.

The batch is 8 rows of exactly 512 real tokens (consecutive training examples joined; no
padding), the last 40 of each row the target; P = 20 virtual tokens, so the model sees
8 x 532.

Usage: python bench/memory.py            (parent: runs the children, prints the ratio)
       python bench/memory.py --child ours|peft|ours_checkpointing|ours_compile
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import say  # noqa: E402

GOAL = 0.7  # ours / PEFT peak step memory, lower is better
MiB = 1024 * 1024
MMAP_THRESHOLD = 64 * 1024  # bytes; glibc serves every larger block with its own mapping


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc), so the baseline holds no reusable slack."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Sampler(threading.Thread):
    """Highest RSS seen while running (sampled every millisecond)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_bytes(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(1e-3)


def child(method: str, args) -> dict:
    import gc

    import torch
    from train_throughput import Ours, Peft, fixed_batch, right_pad

    model, tokenizer, task = common.load(args.model)
    rows = fixed_batch(tokenizer, task, args.batch_size, args.max_tokens, args.target_tokens)
    prompt = common.our_prompt(model, tokenizer, task).embeddings.detach()
    modes = contextlib.ExitStack()  # held open until this child returns
    if method.startswith("ours"):
        if method == "ours_checkpointing":
            from softprompt.training import layer_modes

            # A context manager entered and dropped is closed by the garbage collector at once
            # (its generator exits): keep it open in ``modes`` for the measured step.
            modes.enter_context(layer_modes(model, checkpointing=True))
        runner = Ours(model, tokenizer, prompt, "cpu", compiled=method == "ours_compile")
        step = lambda: runner.step(rows)  # noqa: E731
    else:
        runner = Peft(model, tokenizer, prompt, "cpu")
        batch = right_pad(rows, tokenizer.pad_token_id)
        step = lambda: runner.step(batch)  # noqa: E731
    # Fault in every weight page (safetensors maps the checkpoint lazily) and run one tiny step
    # (thread pools, Adam state), so the baseline holds all that the big step does not add.
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    small = [(ids[:32], lab[:24] + ids[24:32]) for ids, lab in rows[:2]]
    if method.startswith("ours"):
        runner.step(small)
    else:
        runner.step(right_pad(small, tokenizer.pad_token_id))
    gc.collect()
    _malloc_trim()
    baseline = _rss_bytes()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    hwm = _status_kib("VmHWM") * 1024 if hwm_reset else None
    modes.close()
    peak = hwm if hwm is not None else sampler.peak
    return {"method": method, "baseline_rss_mib": baseline / MiB,
            "peak_rss_mib": peak / MiB, "step_peak_increase_mib": (peak - baseline) / MiB,
            "sampled_increase_mib": (sampler.peak - baseline) / MiB,
            "measured_by": "VmHWM after clear_refs" if hwm is not None else "RSS sampling",
            "step_seconds": seconds, "loss": loss, "torch_threads": torch.get_num_threads()}


def run_child(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model,
           "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens),
           "--target-tokens", str(args.target_tokens)]
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"memory child {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--target-tokens", type=int, default=40)
    p.add_argument("--checkpointing", action="store_true",
                   help="also measure ours with --gradient-checkpointing")
    p.add_argument("--compile", action="store_true",
                   help="also measure ours with --compile (compiled in the untimed warm-up)")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="fixed: MALLOC_MMAP_THRESHOLD_=64 KiB in the children (RSS follows live "
                        "tensors, same figure every run); default: glibc's adaptive threshold")
    p.add_argument("--out", type=Path, default=common.OUT_DIR / "memory.json")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    say(f"[4] peak memory of one training step, batch {args.batch_size} x {args.max_tokens} "
        f"tokens (+P={common.NUM_VIRTUAL_TOKENS}), {args.target_tokens} target tokens per row, "
        f"fresh process per method, malloc {args.malloc}")
    methods = (["ours", "peft"] + (["ours_checkpointing"] if args.checkpointing else [])
               + (["ours_compile"] if args.compile else []))
    runs = {m: run_child(m, args) for m in methods}
    for m, r in runs.items():
        say(f"  {m}: baseline RSS {r['baseline_rss_mib']:.0f} MiB, step peak +"
            f"{r['step_peak_increase_mib']:.0f} MiB ({r['measured_by']}; sampled +"
            f"{r['sampled_increase_mib']:.0f} MiB), step {r['step_seconds']:.1f}s, "
            f"loss {r['loss']:.4f}")
    ratio = runs["ours"]["step_peak_increase_mib"] / runs["peft"]["step_peak_increase_mib"]
    result = {"batch": [args.batch_size, args.max_tokens], "malloc": args.malloc,
              "target_tokens_per_row": args.target_tokens,
              "num_virtual_tokens": common.NUM_VIRTUAL_TOKENS, "runs": runs,
              "ratio": ratio, "goal": GOAL, "higher_is_better": False,
              "verdict": common.verdict(ratio, GOAL, False)}
    if "ours_checkpointing" in runs:
        result["ratio_with_checkpointing"] = (runs["ours_checkpointing"]["step_peak_increase_mib"]
                                              / runs["peft"]["step_peak_increase_mib"])
        say(f"  (ours with gradient checkpointing / PEFT = "
            f"{result['ratio_with_checkpointing']:.2f})")
    if "ours_compile" in runs:
        result["ratio_with_compile"] = (runs["ours_compile"]["step_peak_increase_mib"]
                                        / runs["peft"]["step_peak_increase_mib"])
        say(f"  (ours with --compile / PEFT = {result['ratio_with_compile']:.2f})")
    say(f"  RATIO step peak memory ours/PEFT = {ratio:.2f} (goal <= {GOAL}) {result['verdict']}")
    common.write_json(args.out, {"model": args.model, "machine": common.machine(),
                                 "memory": result})
    return result


if __name__ == "__main__":
    main()
