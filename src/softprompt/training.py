"""Train a soft prompt on a frozen causal LM: setup -> fit -> validate -> save.

Runs as one process or under ``accelerate launch`` (data parallel: each process takes a slice
of every optimizer step's examples and the prompt gradient is summed across processes). The
loss of a step is the summed cross-entropy over all its target tokens divided by their count
over the whole step, so 1 process x batch 8 and 2 processes x batch 4 compute the same gradient.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt import atomic, checkpoint
from softprompt.batching import length_sorted_batches, step_order
from softprompt.config import PromptConfig, TrainConfig
from softprompt.distributed import all_reduce_sum, distributed_state, same_count, shard_layers
from softprompt.encode import adds_bos, encode_dataset
from softprompt.errors import SoftPromptError
from softprompt.faults import crash_point
from softprompt.inputs import rows_loss
from softprompt.models import decoder_layers, freeze
from softprompt.prompt import (
    CONFIG_FILE,
    PROMPT_FILE,
    PromptMeta,
    init_prompt,
    prompt_exists,
    save_prompt,
)
from softprompt.tasks import Task

LOG_FILE = "log.jsonl"


@dataclass
class TrainResult:
    """What :func:`train` returns; the same is on disk in ``output_dir``."""

    prompt: torch.Tensor  # [P, H], the best (or last, without validation) prompt
    meta: PromptMeta
    log: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None


def check_output_dir(out: str | Path, overwrite: bool, resume: bool) -> None:
    """Refuse a file, or a directory that already holds a prompt (unless told otherwise)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoftPromptError(f"--output {out} is a file; give a directory")
    if prompt_exists(out) and not (overwrite or resume):
        raise SoftPromptError(f"{out} already holds a prompt; pass --overwrite to replace it or "
                              f"--resume to continue training")


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then linear decay to zero at ``total`` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(1, total - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1 - (step - cfg.warmup_steps) / remaining)


def _enable_checkpointing(model) -> None:
    """Gradient checkpointing with the model still in eval mode (no dropout anywhere).

    transformers only checkpoints layers whose ``training`` flag is set, so we set it on the
    decoder layers alone; their attention/MLP/dropout children stay in eval mode.
    """
    # transformers 5 renamed it (the old name warns on stderr); 4.x has only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in decoder_layers(model):
        module.training = True


def _compile_layers(model, on: bool) -> None:
    """``torch.compile`` every decoder layer (``on``), or put them back to eager.

    The layers share their code, so with dynamic shapes one compiled graph serves every layer
    and every batch length (plus one more for no-grad validation). On SmolLM2-135M (2 CPU
    cores) a step is 6-17% faster at 4 x 276 tokens and 35-45% at 8 x 532, after ~15 s of
    compiling (BENCHMARKS.md, 2c and 4c).
    """
    for module in decoder_layers(model):
        if on:
            module.compile(dynamic=True)
        else:
            module._compiled_call_impl = None  # what nn.Module.compile() set


def _disable_checkpointing(model) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None)
    (disable or model.gradient_checkpointing_disable)()
    for module in decoder_layers(model):
        module.training = False


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = opt.state_dict()["state"].get(0, {})
    return {f"adam.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone()
            for k, v in state.items()}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    inner = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
    if inner:
        sd = opt.state_dict()
        sd["state"] = {0: inner}
        opt.load_state_dict(sd)


def train(model, tokenizer, task: Task, train_records: list[dict], output_dir: str | Path, *,
          validation_records: list[dict] | None = None, prompt_config: PromptConfig | None = None,
          train_config: TrainConfig | None = None, model_name: str = "?",
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          on_epoch_end: Callable[[int, torch.Tensor], dict[str, Any]] | None = None,
          ) -> TrainResult:
    """Train a soft prompt for ``task`` and save the best one to ``output_dir``.

    Args:
        model, tokenizer: the frozen model and its tokenizer (see :func:`softprompt.load_model`).
        task: the task (template, target field, ...).
        train_records / validation_records: records as read by :func:`read_records`.
        output_dir: where ``prompt.safetensors``, ``softprompt.json``, ``log.jsonl`` and
            ``checkpoint-<step>/`` go.
        overwrite: replace a prompt already in ``output_dir``.
        resume: continue from the newest good checkpoint in ``output_dir``.
        on_epoch_end: called on the main process as ``f(epoch, prompt [P, H])`` after each
            epoch; the metrics it returns are added to that epoch's log record.
    """
    pcfg = prompt_config or PromptConfig()
    cfg = train_config or TrainConfig()
    out = Path(output_dir)
    state = distributed_state()
    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    device = model.device

    # 1. Validate everything before touching the output directory: bad input loses nothing.
    check_output_dir(out, overwrite, resume)
    records = train_records[: cfg.max_train_examples] if cfg.max_train_examples else train_records
    train_data = encode_dataset(task, records, tokenizer, pcfg.num_virtual_tokens,
                                cfg.max_length, "training")
    val_data = None
    if validation_records:
        val_data = encode_dataset(task, validation_records[: cfg.max_eval_examples], tokenizer,
                                  pcfg.num_virtual_tokens, cfg.max_length, "validation")
    # Without a truncate_field nothing is cut: an input too long is skipped whole.
    why = "target too long" if task.truncate_field else "too long; the task cuts no field"
    for name, data in (("training", train_data), ("validation", val_data)):
        if data and main and (data.truncated or data.skipped):
            print(f"{name}: {data.truncated} of {len(data.rows) + data.skipped} examples had "
                  f"their {task.truncate_field or 'input'} truncated to fit --max-length "
                  f"{cfg.max_length}" + (f"; {data.skipped} skipped ({why})" if data.skipped
                                         else ""),
                  file=sys.stderr)
    embeddings = model.get_input_embeddings().weight
    init_ids = None
    if pcfg.init.value == "text":
        init_text = pcfg.init_text or task.instruction or task.template
        init_ids = tokenizer(init_text, add_special_tokens=False).input_ids
    soft = init_prompt(embeddings, pcfg.num_virtual_tokens, pcfg.init, init_ids, cfg.seed)
    soft.to(device)
    bos_offset = int(adds_bos(tokenizer))

    # 2. Optimiser and position in the data; restored from a checkpoint when resuming.
    opt = torch.optim.Adam(soft.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step_size = cfg.batch_size * world * cfg.gradient_accumulation_steps
    lengths = [len(ids) for ids, _ in train_data.rows]
    steps_per_epoch = math.ceil(len(lengths) / step_size)
    total_steps = steps_per_epoch * cfg.epochs
    global_step, epoch, step_in_epoch = 0, 0, 0
    log: list[dict[str, Any]] = []
    best = {"val_loss": math.inf, "step": -1, "epoch": -1, "bad_epochs": 0}
    best_prompt = soft.embeddings.detach().clone()
    if overwrite and not resume and main:
        for _, path in checkpoint.list_checkpoints(out):
            shutil.rmtree(path, ignore_errors=True)
    if resume:
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            if main:
                print(f"no checkpoint in {out}; starting from scratch", file=sys.stderr)
        else:
            restored = ckpt.tensors["prompt"]
            if list(restored.shape) != list(soft.embeddings.shape):
                raise SoftPromptError(f"{ckpt.path}: prompt shape {list(restored.shape)} does not "
                                      f"match --num-virtual-tokens/model "
                                      f"{list(soft.embeddings.shape)}")
            with torch.no_grad():
                soft.embeddings.copy_(restored)
            _restore_optimizer(opt, ckpt.tensors)
            checkpoint.restore_rng(ckpt.tensors)
            s = ckpt.state
            global_step = s["global_step"]
            # Position is kept in examples, so a run can resume on another process count.
            epoch, consumed = s["epoch"], s["examples_in_epoch"]
            step_in_epoch = consumed // step_size
            log, best = s["log"], s["best"]
            best_prompt = ckpt.tensors.get("best_prompt", soft.embeddings.detach()).clone()
            if main:
                print(f"resuming from {ckpt.path} (epoch {epoch + 1}, step {global_step})",
                      file=sys.stderr)
    freeze(model)  # whoever loaded it: no weight of the base model gets a gradient
    sharded = cfg.shard_model and world > 1
    if sharded:
        shard_layers(model)

    def save_checkpoint() -> None:
        if not main:
            return
        tensors = {"prompt": soft.embeddings.detach(), "best_prompt": best_prompt,
                   **_optimizer_tensors(opt), **checkpoint.rng_state()}
        st = {"global_step": global_step, "epoch": epoch,
              "examples_in_epoch": step_in_epoch * step_size, "log": log, "best": best,
              "world_size": world}
        checkpoint.save(out, global_step, tensors, st)
        checkpoint.prune(out, cfg.save_total_limit, protect={best["step"]})
        atomic.write_jsonl(out / LOG_FILE, log)

    def meta(tensor_metrics: dict[str, Any]) -> PromptMeta:
        return PromptMeta(model=model_name, task=task.to_dict(),
                          num_virtual_tokens=pcfg.num_virtual_tokens,
                          hidden_size=soft.hidden_size, init=pcfg.init.value,
                          train_args={**asdict(cfg), "num_virtual_tokens": pcfg.num_virtual_tokens,
                                      "init": pcfg.init.value, "init_text": pcfg.init_text,
                                      "world_size": world},
                          metrics=tensor_metrics)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def step_loss(rows: list[tuple[list[int], list[int]]],
                  denom: float) -> tuple[torch.Tensor, int]:
        try:
            with autocast:
                loss_sum, count = rows_loss(model, soft(), rows, tokenizer.pad_token_id,
                                            bos_offset, device)
        except torch._dynamo.exc.TorchDynamoException as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise SoftPromptError(f"--compile failed ({lines[0][:200]}); run without "
                                  f"--compile") from err
        return loss_sum / denom, count

    @torch.no_grad()
    def validation_loss() -> float:
        assert val_data is not None
        rows = val_data.rows[rank::world]
        # Similar lengths share a batch (the sum does not depend on the order): fewer pads.
        batches = length_sorted_batches([len(ids) for ids, _ in rows], cfg.batch_size)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(same_count(len(batches), device, sharded)):
            chunk = [rows[j] for j in batches[i]] if i < len(batches) else []
            # A sharded model needs every rank in every forward: idle ranks run a dummy row.
            loss_sum, count = step_loss(chunk or val_data.rows[:1], 1.0)
            if chunk:
                total += torch.tensor([loss_sum.item(), count], dtype=torch.float64,
                                      device=device)
        total = all_reduce_sum(total, world)
        return (total[0] / total[1]).item()

    # 3. Fit. Checkpointing/compiling change the caller's model object: undone however the
    # fit ends.
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if cfg.compile:
        _compile_layers(model, on=True)
        if main and progress:
            print("--compile: the first step and the first validation also compile the decoder "
                  "layers (once per run)", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total_steps, initial=global_step, disable=not (progress and main),
                   desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        while epoch < cfg.epochs and not best.get("stopped"):
            order = step_order(lengths, step_size, cfg.seed, epoch)
            if step_in_epoch == 0:
                best["epoch_loss"], best["epoch_tokens"] = 0.0, 0
            for indices in order[step_in_epoch:]:
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=False)  # every rank has a gradient to all-reduce
                rows = [train_data.rows[i] for i in indices]
                n_targets = sum(sum(1 for x in lab if x != -100) for _, lab in rows)
                n_tokens = sum(len(ids) for ids, _ in rows)
                step_sum = 0.0
                micro = cfg.batch_size * world
                for start in range(0, len(rows), micro):
                    mine = rows[start:start + micro][rank * cfg.batch_size:
                                                     (rank + 1) * cfg.batch_size]
                    if not mine and not sharded:
                        continue
                    # With a sharded model an idle rank still runs (a zero-weighted) forward and
                    # backward, so that every rank joins every all-gather.
                    weight = 1.0 if mine else 0.0
                    loss, _ = step_loss(mine or rows[:1], n_targets)
                    (loss * weight).backward()
                    step_sum += loss.item() * n_targets * weight
                if world > 1:
                    all_reduce_sum(soft.embeddings.grad, world)
                    total = torch.tensor([step_sum], dtype=torch.float64, device=device)
                    step_sum = all_reduce_sum(total, world).item()
                step_loss_value = step_sum / n_targets
                if not math.isfinite(step_loss_value):
                    last = checkpoint.list_checkpoints(out)
                    where = f"; the last good checkpoint is {last[-1][1]}" if last else ""
                    raise SoftPromptError(f"loss became {step_loss_value} at step "
                                          f"{global_step + 1} (epoch {epoch + 1}); lower --lr "
                                          f"(now {cfg.lr}){where}")
                grad_norm = (torch.nn.utils.clip_grad_norm_(soft.parameters(), cfg.max_grad_norm)
                             if cfg.max_grad_norm > 0 else soft.embeddings.grad.norm())
                lr = _lr_at(global_step, total_steps, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                crash_point("step")
                opt.step()
                global_step += 1
                step_in_epoch += 1
                elapsed = time.perf_counter() - t0
                best["epoch_loss"] += step_sum
                best["epoch_tokens"] += n_targets
                log.append({"event": "step", "step": global_step, "epoch": epoch + 1,
                            "loss": round(step_loss_value, 6), "lr": lr,
                            "grad_norm": round(float(grad_norm), 6), "tokens": n_tokens,
                            "target_tokens": n_targets,
                            "tokens_per_s": round(n_tokens / elapsed, 1),
                            "seconds": round(elapsed, 4)})
                bar.set_postfix(loss=f"{step_loss_value:.3f}", tok_s=f"{n_tokens / elapsed:.0f}")
                bar.update(1)
                if cfg.save_steps and global_step % cfg.save_steps == 0:
                    save_checkpoint()

            # 4. Validate at each epoch end; keep the best prompt; stop when it stops improving.
            record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": global_step,
                                      "train_loss": round(best["epoch_loss"]
                                                          / max(1, best["epoch_tokens"]), 6)}
            if val_data is not None:
                val = validation_loss()
                record["val_loss"] = round(val, 6)
                if val < best["val_loss"]:
                    best.update(val_loss=val, step=global_step, epoch=epoch + 1, bad_epochs=0)
                    best_prompt = soft.embeddings.detach().clone()
                else:
                    best["bad_epochs"] += 1
                    best["stopped"] = best["bad_epochs"] >= cfg.patience
            else:
                best.update(step=global_step, epoch=epoch + 1)
                best_prompt = soft.embeddings.detach().clone()
            if on_epoch_end is not None and main:
                record.update(on_epoch_end(epoch + 1, soft.embeddings.detach()))
            log.append(record)
            if main:
                bar.write(" ".join(f"{k}={v}" for k, v in record.items() if k != "event"),
                          file=sys.stderr)
            epoch += 1
            step_in_epoch = 0
            save_checkpoint()
            if main:
                save_prompt(out, best_prompt, meta(_final_metrics(best, log)))
            state.wait_for_everyone()
        bar.close()
    finally:
        if cfg.gradient_checkpointing:
            _disable_checkpointing(model)
        if cfg.compile:
            _compile_layers(model, on=False)
    result_meta = meta(_final_metrics(best, log))
    if main:
        atomic.write_jsonl(out / LOG_FILE, log)
        save_prompt(out, best_prompt, result_meta)
    state.wait_for_everyone()
    return TrainResult(best_prompt.cpu(), result_meta, log, out)


def _final_metrics(best: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    epochs = [r for r in log if r["event"] == "epoch"]
    steps = [r for r in log if r["event"] == "step"]
    metrics: dict[str, Any] = {"best_epoch": best["epoch"], "best_step": best["step"],
                               "epochs_run": len(epochs), "steps": len(steps),
                               "train_seconds": round(sum(r["seconds"] for r in steps), 2)}
    if math.isfinite(best["val_loss"]):
        metrics["val_loss"] = round(best["val_loss"], 6)
    if epochs:
        metrics["train_loss"] = epochs[-1]["train_loss"]
    return metrics


__all__ = ["train", "TrainResult", "encode_dataset", "LOG_FILE", "PROMPT_FILE", "CONFIG_FILE"]
