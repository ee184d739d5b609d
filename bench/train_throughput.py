"""Benchmarks 1 and 2: training throughput against PEFT, and step time / plain forward time.

1. One epoch over a fixed subset of summarization/train.jsonl (the first N records), per
   method, repeated; steps of the three methods interleaved.
   * ours: the training loop's own step (softprompt.training): ``step_order`` (length-grouped
     batches, so each batch is padded only to its own longest row), ``rows_loss`` (right
     padding, so causal attention needs no mask; logits only at target positions),
     ``(loss_sum / n_targets).backward()``, gradient clipping at 1.0, Adam.
   * PEFT, plain shuffled DataLoader (``peft``; the goal is judged against it):
     ``get_peft_model(model, PromptTuningConfig(CAUSAL_LM, P))`` and a plain
     ``DataLoader(shuffle=True)`` whose collate right-pads each random batch to its longest
     row with labels -100 on input and pads; ``model(input_ids, attention_mask,
     labels).loss.backward()``, the same clipping, Adam with the same lr.
   * PEFT, length-grouped (``peft_length_grouped``; PEFT's best case): the same PEFT step fed
     exactly our ``step_order`` batches, right-padded the same way. Reported as its own ratio.
   Same examples, encoding (encode_dataset, ``max_length = P + T``), batch size, prompt
   length, initial prompt tensor.
2. On one fixed batch of B rows x T real tokens (no padding; the last K tokens of each row are
   the target): our step time divided by a no-grad forward of the same B x T token batch
   through the frozen model, two ways:
   * ``forward_logits`` (the goal's denominator): ``model(input_ids, attention_mask).logits``,
     full ``[B, T, V]`` vocabulary logits at every position (work our step skips: it applies
     the head only at target positions);
   * ``forward_base``: ``model.base_model(input_ids, attention_mask)``, hidden states
     ``[B, T, H]`` without the head, the real floor of a forward.
   PEFT's step over both is printed for context.

Usage: python bench/train_throughput.py [--model smollm2-135m] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import say  # noqa: E402

GOAL_THROUGHPUT = 1.5  # ours / PEFT, higher is better
GOAL_STEP_RATIO = 2.2  # our step / no-grad forward, lower is better


class Ours:
    """The step of softprompt.training, minus logging and checkpoints."""

    def __init__(self, model, tokenizer, prompt: torch.Tensor, device, compiled: bool = False):
        from softprompt.encode import adds_bos
        from softprompt.prompt import SoftPrompt

        self.model, self.device = model, device
        self.pad, self.bos_offset = tokenizer.pad_token_id, int(adds_bos(tokenizer))
        self.soft = SoftPrompt(prompt.detach().float()).to(device)
        self.opt = torch.optim.Adam(self.soft.parameters(), lr=common.LR)
        # --compile: the trainer's compiled decoder layers, switched on for our steps only (the
        # model object is shared with PEFT, which stays eager).
        self.compiled = compiled_layers(model) if compiled else None

    def step(self, rows: list[tuple[list[int], list[int]]]) -> float:
        from softprompt.inputs import rows_loss

        if self.compiled:
            for layer, impl in self.compiled:
                layer._compiled_call_impl = impl
        try:
            self.opt.zero_grad(set_to_none=False)  # as softprompt.training does
            loss_sum, n_targets = rows_loss(self.model, self.soft(), rows, self.pad,
                                            self.bos_offset, self.device)
            loss = loss_sum / n_targets
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.soft.parameters(), 1.0)
            self.opt.step()
        finally:
            if self.compiled:
                for layer, _ in self.compiled:
                    layer._compiled_call_impl = None
        return loss.item()


def compiled_layers(model) -> list:
    """``(layer, compiled call)`` for each decoder layer, as ``train(compile=True)`` makes them;
    the layers are left eager."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from softprompt.training import layer_modes

    with layer_modes(model, compile=True):
        return [(m, m._compiled_call_impl) for m in model.modules()
                if isinstance(m, GradientCheckpointingLayer)]


def right_pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The collate a PEFT user writes: right-pad to the batch's longest row, labels -100."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class Peft:
    """PEFT prompt tuning, trained the natural way."""

    def __init__(self, model, tokenizer, prompt: torch.Tensor, device):
        self.pm = common.peft_model(model, prompt)
        self.device, self.pad = device, tokenizer.pad_token_id
        self.params = [p for p in self.pm.parameters() if p.requires_grad]
        assert len(self.params) == 1, "PEFT prompt tuning should train only its prompt"
        self.opt = torch.optim.Adam(self.params, lr=common.LR)

    def loader(self, rows, batch_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True,
                                           generator=gen,
                                           collate_fn=lambda b: right_pad(b, self.pad))

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.pm(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()


# How each method of benchmark 1 gets its batches (printed, and written to the JSON).
BATCHING = {
    "ours": "softprompt.batching.step_order (length-grouped), right-padded to the batch's "
            "longest row",
    "peft": "plain shuffled DataLoader (DataLoader(shuffle=True)), right-padded to the "
            "batch's longest row",
    "peft_length_grouped": "the same softprompt.batching.step_order batches as ours, "
                           "right-padded to the batch's longest row (PEFT's best case)",
}


def bench_train(model, tokenizer, task, args, max_tokens: int, label: str = "[1]") -> dict:
    """Benchmark 1: an epoch over the subset, ours vs two PEFT loops, steps interleaved.

    ``max_tokens`` caps each row's text tokens (the trainer's ``max_length`` is ``P`` more).
    The goal is judged against PEFT with a plain shuffled DataLoader (``peft``); PEFT fed our
    length-grouped batches (``peft_length_grouped``) gets its own ratio beside it.
    """
    from softprompt.batching import step_order
    from softprompt.encode import encode_dataset

    records = common.read_subset(common.TRAIN_FILE, args.examples)
    max_length = common.NUM_VIRTUAL_TOKENS + max_tokens
    data = encode_dataset(task, records, tokenizer, common.NUM_VIRTUAL_TOKENS, max_length,
                          "training")
    rows = data.rows
    lengths = [len(ids) for ids, _ in rows]
    n_targets = sum(sum(1 for x in lab if x != -100) for _, lab in rows)
    prompt = common.our_prompt(model, tokenizer, task).embeddings.detach()
    ours = Ours(model, tokenizer, prompt, args.device, compiled=args.compile)
    peft = Peft(model, tokenizer, prompt, args.device)
    grouped = Peft(model, tokenizer, prompt, args.device)  # its own prompt and Adam state
    pad = tokenizer.pad_token_id
    say(f"{label} training throughput: {len(rows)} examples (first {args.examples} of "
        f"{common.TRAIN_FILE.name}, max_length {max_length}: {data.truncated} truncated to "
        f"{max_tokens} text tokens), "
        f"{n_targets} target tokens, batch {args.batch_size}, P={common.NUM_VIRTUAL_TOKENS}, "
        f"Adam lr={common.LR}")
    for name, how in BATCHING.items():
        say(f"  {name}: {how}")

    # Warm-up: one step each (first-call allocations, kernel selection).
    ours.step([rows[i] for i in range(min(args.batch_size, len(rows)))])
    peft.step(right_pad(rows[:args.batch_size], pad))
    grouped.step(right_pad(rows[:args.batch_size], pad))

    names = list(BATCHING)
    times: dict[str, list[float]] = {n: [] for n in names}
    padded = dict.fromkeys(names, 0)
    for rep in range(args.reps):
        our_steps = step_order(lengths, args.batch_size, seed=0, epoch=rep)
        peft_batches = list(peft.loader(rows, args.batch_size, seed=rep))
        assert len(our_steps) == len(peft_batches)
        total = dict.fromkeys(names, 0.0)
        for k, (indices, batch) in enumerate(zip(our_steps, peft_batches, strict=True)):
            step_rows = [rows[i] for i in indices]
            grouped_batch = right_pad(step_rows, pad)
            fns = {"ours": lambda r=step_rows: ours.step(r),
                   "peft": lambda b=batch: peft.step(b),
                   "peft_length_grouped": lambda b=grouped_batch: grouped.step(b)}
            # Rotate the order every step, so no method always runs first or last.
            order = names[k % 3:] + names[:k % 3]
            for name in (order if (rep + k) % 2 == 0 else order[::-1]):
                total[name] += common.timed(fns[name], args.device)
            if rep == 0:
                padded["ours"] += len(step_rows) * max(len(r[0]) for r in step_rows)
                padded["peft"] += batch["input_ids"].numel()
                padded["peft_length_grouped"] += grouped_batch["input_ids"].numel()
        for name in total:
            times[name].append(total[name])
        say(f"  epoch {rep + 1}/{args.reps}: ours {total['ours']:.2f}s, PEFT (shuffled) "
            f"{total['peft']:.2f}s ({total['peft'] / total['ours']:.2f}x), PEFT "
            f"(length-grouped) {total['peft_length_grouped']:.2f}s "
            f"({total['peft_length_grouped'] / total['ours']:.2f}x)")

    ratio = common.paired_ratio(times["peft"], times["ours"])
    ratio_grouped = common.paired_ratio(times["peft_length_grouped"], times["ours"])
    rates = {name: {"target_tokens_per_s": n_targets / common.median(times[name]),
                    "examples_per_s": len(rows) / common.median(times[name])}
             for name in names}
    result = {
        "examples": len(rows), "target_tokens": n_targets, "real_tokens": sum(lengths),
        "batch_size": args.batch_size, "max_tokens": max_tokens, "max_length": max_length,
        "truncated_examples": data.truncated,
        "num_virtual_tokens": common.NUM_VIRTUAL_TOKENS, "steps_per_epoch": math.ceil(
            len(rows) / args.batch_size), "epochs_timed": args.reps,
        "batching": BATCHING,
        "padded_tokens_per_epoch": padded,
        "seconds_per_epoch": times,
        **rates,
        "ratio": ratio,
        "ratio_is": "ours / PEFT with a plain shuffled DataLoader (target tokens per second); "
                    "the goal is judged on this ratio",
        "ratio_vs_peft_length_grouped": ratio_grouped,
        "goal": GOAL_THROUGHPUT, "higher_is_better": True,
        "verdict": common.verdict(ratio, GOAL_THROUGHPUT, True),
    }
    say("  target tok/s (ex/s): " + ", ".join(
        f"{name} {rates[name]['target_tokens_per_s']:.1f} ({rates[name]['examples_per_s']:.2f})"
        for name in names) + "; padded tokens/epoch: "
        + ", ".join(f"{name} {padded[name]}" for name in names))
    say(f"  RATIO training throughput ours / PEFT (plain shuffled DataLoader) = {ratio:.2f}x "
        f"(goal >= {GOAL_THROUGHPUT}x, judged on this ratio) {result['verdict']}")
    say(f"  ratio ours / PEFT (length-grouped, our step_order batches) = {ratio_grouped:.2f}x "
        f"(no goal)")
    return result


def fixed_batch(tokenizer, task, rows_n: int, tokens: int, targets: int, offset: int = 0):
    """``rows_n`` rows of exactly ``tokens`` real tokens, the last ``targets`` labelled.

    Each row is consecutive training examples (input + target ids) joined and cut, so the
    tokens are real text; no padding anywhere.
    """
    from softprompt.encode import encode_example
    from softprompt.tasks import make_examples

    records = common.read_subset(common.TRAIN_FILE, offset + 50 * rows_n)[offset:]
    stream: list[int] = []
    for ex in make_examples(task, records):
        enc = encode_example(task, ex, tokenizer)
        stream.extend(enc.input_ids + enc.target_ids)
        if len(stream) >= rows_n * tokens:
            break
    assert len(stream) >= rows_n * tokens, "not enough text for the fixed batch"
    rows = []
    for r in range(rows_n):
        ids = stream[r * tokens:(r + 1) * tokens]
        rows.append((ids, [-100] * (tokens - targets) + ids[tokens - targets:]))
    return rows


def bench_step_ratio(model, tokenizer, task, args) -> dict:
    """Benchmark 2: step time / no-grad forward time on one fixed batch.

    Two denominators, timed interleaved with the steps: the forward with full-vocabulary
    logits (``forward_logits``, the goal's) and the base model's forward without the head
    (``forward_base``, hidden states only: the floor).
    """
    rows = fixed_batch(tokenizer, task, args.batch_size, args.step_tokens, args.target_tokens)
    prompt = common.our_prompt(model, tokenizer, task).embeddings.detach()
    ours = Ours(model, tokenizer, prompt, args.device, compiled=args.compile)
    peft = Peft(model, tokenizer, prompt, args.device)
    peft_batch = right_pad(rows, tokenizer.pad_token_id)  # no pads: every row is full
    ids = peft_batch["input_ids"].to(args.device)
    mask = peft_batch["attention_mask"].to(args.device)

    @torch.no_grad()
    def forward_logits():
        return model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]

    @torch.no_grad()
    def forward_base():
        return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]

    # Same prompt, same batch, before any update: the two losses must agree.
    loss_ours, loss_peft = ours.step(rows), peft.step(peft_batch)
    say(f"[2] step / forward on {args.batch_size} x {args.step_tokens} tokens "
        f"({args.target_tokens} target tokens per row, P={common.NUM_VIRTUAL_TOKENS}); "
        f"first-step loss ours {loss_ours:.5f} vs PEFT {loss_peft:.5f}")
    forward_logits()
    forward_base()
    times = common.interleaved({"ours_step": lambda: ours.step(rows),
                                "peft_step": lambda: peft.step(peft_batch),
                                "forward_logits": forward_logits,
                                "forward_base": forward_base}, args.step_reps, args.device, say)
    ratio = common.paired_ratio(times["ours_step"], times["forward_logits"])
    ratio_base = common.paired_ratio(times["ours_step"], times["forward_base"])
    peft_ratio = common.paired_ratio(times["peft_step"], times["forward_logits"])
    peft_ratio_base = common.paired_ratio(times["peft_step"], times["forward_base"])
    result = {
        "batch": [args.batch_size, args.step_tokens], "target_tokens_per_row": args.target_tokens,
        "num_virtual_tokens": common.NUM_VIRTUAL_TOKENS, "reps": args.step_reps,
        "first_step_loss": {"ours": loss_ours, "peft": loss_peft},
        "seconds": times, "median_seconds": {k: common.median(v) for k, v in times.items()},
        "forward_logits": "model(input_ids, attention_mask).logits under no_grad: full [B, T, V] "
                          "logits at every position, no prompt",
        "forward_base": "model.base_model(input_ids, attention_mask).last_hidden_state under "
                        "no_grad: [B, T, H] hidden states, no vocabulary head, no prompt",
        "ratio": ratio,
        "ratio_is": "our step / forward_logits; the goal is judged on this ratio",
        "ratio_vs_forward_base": ratio_base,
        "peft_ratio": peft_ratio, "peft_ratio_vs_forward_base": peft_ratio_base,
        "goal": GOAL_STEP_RATIO, "higher_is_better": False,
        "verdict": common.verdict(ratio, GOAL_STEP_RATIO, False),
    }
    med = result["median_seconds"]
    say(f"  median: our step {med['ours_step']:.2f}s, PEFT step {med['peft_step']:.2f}s, "
        f"forward with logits {med['forward_logits']:.2f}s, forward without head "
        f"{med['forward_base']:.2f}s")
    say(f"  RATIO our step / no-grad forward with full logits = {ratio:.2f} "
        f"(goal <= {GOAL_STEP_RATIO}, judged on this ratio) {result['verdict']}  "
        f"[PEFT step / it = {peft_ratio:.2f}]")
    say(f"  ratio our step / no-grad base-model forward without head = {ratio_base:.2f} "
        f"(no goal; the floor)  [PEFT step / it = {peft_ratio_base:.2f}]")
    return result


def main(argv: list[str] | None = None) -> dict:
    from softprompt.config import TrainConfig

    P = common.NUM_VIRTUAL_TOKENS  # noqa: N806
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--examples", type=int, default=16, help="training subset size (bench 1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=TrainConfig().max_length - P,
                   help="bench 1: text tokens per row; default: the trainer's max_length - P")
    p.add_argument("--also-max-tokens", type=int, default=256,
                   help="bench 1 again with this cap, reported beside it (0: skip)")
    p.add_argument("--step-tokens", type=int, default=256, help="bench 2: tokens per row")
    p.add_argument("--target-tokens", type=int, default=40, help="targets per row (bench 2)")
    p.add_argument("--reps", type=int, default=3, help="timed epochs per method (bench 1)")
    p.add_argument("--step-reps", type=int, default=5, help="timed steps per method (bench 2)")
    p.add_argument("--compile", action="store_true",
                   help="ours with --compile (compiled decoder layers); PEFT and the plain "
                        "forward stay eager")
    p.add_argument("--only", choices=["train", "step"], default=None)
    p.add_argument("--out", type=Path, default=common.OUT_DIR / "train.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer, task = common.load(args.model, args.dtype, args.device)
    result: dict = {"model": args.model, "dtype": args.dtype, "device": args.device,
                    "compile": args.compile, "machine": common.machine()}
    if args.only in (None, "train"):
        result["train_throughput"] = bench_train(model, tokenizer, task, args, args.max_tokens)
        if args.also_max_tokens:
            result["train_throughput"]["also"] = bench_train(
                model, tokenizer, task, args, args.also_max_tokens, "[1b]")
    if args.only in (None, "step"):
        result["step_over_forward"] = bench_step_ratio(model, tokenizer, task, args)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
