"""Train a soft prompt on a frozen causal LM: setup -> fit one epoch -> validate -> save.

:func:`train` is those steps in order. :func:`setup` checks the output directory and encodes
the data before anything is written (:class:`Run`: what the run holds fixed);
:func:`start_state` builds the method module (softprompt/methods/: prompt, ptuning, residual
or prefix) and its optimizer or restores them from the newest checkpoint
(:class:`~softprompt.checkpoint.TrainState`: what changes); then each epoch :func:`fit_epoch`
takes the optimizer steps (validating every ``--eval-steps`` too), :func:`end_epoch`
validates and keeps the best prompt, and :func:`save` writes the checkpoint and the best
prompt so far. The method is trained as a whole (all its parameters, one Adam); what is
saved is its ``export()``: a ``[P, H]`` prompt or a KV prefix.

Runs as one process or under ``accelerate launch`` (data parallel: each process takes a slice
of every optimizer step's examples and the prompt gradient is summed across processes). The
loss of a step is the summed cross-entropy over all its target tokens divided by their count
over the whole step, so 1 process x batch 8 and 2 processes x batch 4 compute the same gradient.
With ``--shard-model`` the model may arrive on the CPU: its decoder layers are sharded onto
each process's device and the rest follows (:func:`~softprompt.distributed.shard_layers`);
the prompt and the batches live on the process's device.

Selection: every validation (each epoch end, and every ``--eval-steps`` steps) scores the
prompt by ``--metric-for-best``: the validation loss, or the task's primary metric of greedy
generation on the validation records (every process generates for all of them, so all agree
on the best). ``--patience`` counts validations without improvement.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt import atomic, checkpoint, methods
from softprompt.batching import length_sorted_batches, step_order
from softprompt.checkpoint import Best, EpochStats, GlobalBatch, TrainState
from softprompt.config import (
    GenerationConfig,
    Method,
    PromptConfig,
    Scheduler,
    TrainConfig,
    resolved_lr,
)
from softprompt.distributed import all_reduce_sum, distributed_state, same_count, shard_layers
from softprompt.encode import IGNORE_INDEX, EncodedDataset, adds_bos, encode_dataset
from softprompt.errors import SoftPromptError
from softprompt.faults import crash_point
from softprompt.inputs import rows_loss
from softprompt.methods import PromptMethod
from softprompt.models import decoder_layers, freeze
from softprompt.prefix import KVPrefix, PromptLike, kv_shape
from softprompt.prompt import CONFIG_FILE, PROMPT_FILE, PromptMeta, prompt_exists, save_prompt
from softprompt.tasks import Task

LOG_FILE = "log.jsonl"

Rows = list[tuple[list[int], list[int]]]  # encoded (ids, labels) rows
EpochCallback = Callable[[int, PromptLike], dict[str, Any]]  # (epoch, exported prompt)


@dataclass
class TrainResult:
    """What :func:`train` returns; the same is on disk in ``output_dir``."""

    prompt: PromptLike  # [P, H] or a KVPrefix: the best (or last) prompt
    meta: PromptMeta
    log: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None


@dataclass
class Run:
    """What one training run holds fixed: model, encoded data, settings, process layout."""

    model: Any
    tokenizer: Any
    task: Task
    out: Path
    prompt_config: PromptConfig
    config: TrainConfig
    model_name: str
    train_data: EncodedDataset
    val_data: EncodedDataset | None
    val_records: list[dict] | None  # for --metric-for-best by generation
    batch: GlobalBatch  # examples per optimizer step, and how they are split
    rank: int
    main: bool  # the process that writes files and prints
    sharded: bool  # --shard-model with several processes
    device: torch.device  # where the prompt and the batches live
    bos_offset: int  # 1 if the tokenizer puts BOS first (the prompt goes after it)
    progress: bool

    @property
    def world(self) -> int:
        return self.batch.processes

    @property
    def total_steps(self) -> int:
        return math.ceil(len(self.train_data.rows) / self.batch.size) * self.config.epochs


def check_output_dir(out: str | Path, overwrite: bool, resume: bool) -> None:
    """Refuse a file, or a directory that already holds a prompt (unless told otherwise)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoftPromptError(f"--output {out} is a file; give a directory")
    if prompt_exists(out) and not (overwrite or resume):
        raise SoftPromptError(f"{out} already holds a prompt; pass --overwrite to replace it or "
                              f"--resume to continue training")


def train(model, tokenizer, task: Task, train_records: list[dict], output_dir: str | Path, *,
          validation_records: list[dict] | None = None, prompt_config: PromptConfig | None = None,
          train_config: TrainConfig | None = None, model_name: str = "?",
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train a soft prompt for ``task`` and save the best one to ``output_dir``.

    Args:
        model, tokenizer: the frozen model and its tokenizer (see :func:`softprompt.load_model`).
            With ``--shard-model`` over several processes the model may be on the CPU.
        task: the task (template, target field, ...).
        train_records / validation_records: records as read by :func:`read_records`.
        output_dir: where ``prompt.safetensors``, ``softprompt.json``, ``log.jsonl`` and
            ``checkpoint-<step>/`` go.
        overwrite: replace a prompt already in ``output_dir``.
        resume: continue from the newest good checkpoint in ``output_dir``.
        on_epoch_end: called as ``f(epoch, prompt)`` (the exported PromptLike) after each
            epoch, on the main process (on every process with a sharded model, whose forwards
            need them all); the metrics it returns are added to that epoch's log record.
    """
    # 1. Check and encode everything before touching the output directory.
    run = setup(model, tokenizer, task, train_records, output_dir, validation_records,
                prompt_config or PromptConfig(), train_config or TrainConfig(), model_name,
                overwrite=overwrite, resume=resume, progress=progress)
    state = start_state(run, resume=resume, overwrite=overwrite)
    prepare_model(run)
    cfg = run.config
    # 2. Fit, validate and save epoch by epoch; the caller's model is restored however it ends.
    with layer_modes(model, checkpointing=cfg.gradient_checkpointing, compile=cfg.compile):
        run.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=run.total_steps, initial=state.global_step, desc="train", unit="step",
                   disable=not (progress and run.main), dynamic_ncols=True, file=sys.stderr)
        while state.epoch < cfg.epochs and not state.best.out_of_patience(cfg.patience):
            fit_epoch(run, state, bar)
            if state.best.out_of_patience(cfg.patience):
                break  # a validation within the epoch ran out of patience (and saved)
            record = end_epoch(run, state, on_epoch_end)
            if run.main:
                bar.write(" ".join(f"{k}={v}" for k, v in record.items() if k != "event"),
                          file=sys.stderr)
            save(run, state)
        bar.close()
    # 3. The final prompt and log (the same as the last epoch's, unless no epoch was left).
    meta = prompt_meta(run, state)
    if run.main:
        atomic.write_jsonl(run.out / LOG_FILE, state.log)
        save_prompt(run.out, state.best_prompt, meta)
    distributed_state().wait_for_everyone()
    return TrainResult(state.best_prompt.to("cpu"), meta, state.log, run.out)


# --- setup ------------------------------------------------------------------------------------


def setup(model, tokenizer, task: Task, train_records: list[dict], output_dir: str | Path,
          validation_records: list[dict] | None, prompt_config: PromptConfig,
          config: TrainConfig, model_name: str, *, overwrite: bool, resume: bool,
          progress: bool) -> Run:
    """Check the output directory, encode the data and fix the process layout; writes nothing.

    With a sharded model the prompt goes to the process's device (the model may still be on
    the CPU); otherwise to the model's device.
    """
    check_output_dir(output_dir, overwrite, resume)
    config = check_flags(config, prompt_config, task, bool(validation_records))
    records = (train_records[: config.max_train_examples] if config.max_train_examples
               else train_records)
    train_data = encode_dataset(task, records, tokenizer, prompt_config.num_virtual_tokens,
                                config.max_length, "training")
    val_data, val_records = None, None
    if validation_records:
        val_records = validation_records[: config.max_eval_examples]
        val_data = encode_dataset(task, val_records, tokenizer, prompt_config.num_virtual_tokens,
                                  config.max_length, "validation")
    procs = distributed_state()
    sharded = config.shard_model and procs.num_processes > 1
    batch = GlobalBatch(config.batch_size, procs.num_processes, config.gradient_accumulation_steps)
    run = Run(model, tokenizer, task, Path(output_dir), prompt_config, config, model_name,
              train_data, val_data, val_records, batch, procs.process_index,
              procs.is_main_process, sharded, procs.device if sharded else model.device,
              int(adds_bos(tokenizer)), progress)
    if run.main:
        for name, data in (("training", train_data), ("validation", val_data)):
            _report_cuts(run, name, data)
    return run


def check_flags(config: TrainConfig, prompt_config: PromptConfig, task: Task,
                    validation: bool) -> TrainConfig:
    """Refuse flags the run cannot honour; fill in the method's default ``--lr``."""
    allowed = ("loss", task.primary_metric)
    if config.metric_for_best not in allowed:
        raise SoftPromptError(f"--metric-for-best must be {' or '.join(allowed)} for task "
                              f"{task.name}, got {config.metric_for_best!r}")
    for flag, given in (("--eval-steps", config.eval_steps),
                        ("--metric-for-best", config.metric_for_best != "loss")):
        if given and not validation:
            raise SoftPromptError(f"{flag} needs validation data; give --validation PATH")
    if config.gradient_checkpointing and prompt_config.method is Method.PREFIX:
        # transformers' checkpointed layers drop the past cache (a recompute would append to
        # it twice), so the prefix would vanish from every layer.
        raise SoftPromptError("--gradient-checkpointing does not work with --method prefix "
                              "yet; drop it (or use --bf16 to save memory)")
    return replace(config, lr=resolved_lr(config, prompt_config))


def _report_cuts(run: Run, name: str, data: EncodedDataset | None) -> None:
    """One stderr line if examples were truncated or skipped to fit ``--max-length``."""
    if not data or not (data.truncated or data.skipped):
        return
    # Without a truncate_field nothing is cut: an input too long is skipped whole.
    field_name = run.task.truncate_field or "input"
    why = "target too long" if run.task.truncate_field else "too long; the task cuts no field"
    skipped = f"; {data.skipped} skipped ({why})" if data.skipped else ""
    print(f"{name}: {data.truncated} of {len(data.rows) + data.skipped} examples had their "
          f"{field_name} truncated to fit --max-length {run.config.max_length}{skipped}",
          file=sys.stderr)


def start_state(run: Run, *, resume: bool, overwrite: bool) -> TrainState:
    """A fresh prompt and optimizer, or with ``resume`` those of the newest good checkpoint.

    A fresh run with ``overwrite`` deletes the old run's checkpoints (a later ``--resume``
    would otherwise continue the old run).
    """
    pcfg = run.prompt_config
    init_ids = methods.init_token_ids(pcfg, run.task, run.tokenizer)
    prompt = methods.build(pcfg, run.model, init_ids, run.config.seed,
                           run.model_name).to(run.device)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=run.config.lr,
                                 weight_decay=run.config.weight_decay)
    state = TrainState(prompt, optimizer, prompt.export(), run.batch)
    if overwrite and not resume and run.main:
        for _, path in checkpoint.list_checkpoints(run.out):
            shutil.rmtree(path, ignore_errors=True)
    if resume:
        ckpt = checkpoint.latest(run.out)
        if ckpt is not None:
            checkpoint.restore(ckpt, state)
        if run.main:
            print(f"no checkpoint in {run.out}; starting from scratch" if ckpt is None else
                  f"resuming from {ckpt.path} (epoch {state.epoch + 1}, step "
                  f"{state.global_step})", file=sys.stderr)
    return state


def prepare_model(run: Run) -> None:
    """Freeze the model (whoever loaded it) and, with ``--shard-model``, shard it."""
    freeze(run.model)
    if run.sharded:
        shard_layers(run.model, run.device)
    if run.config.compile and run.main and run.progress:
        print("--compile: the first step and the first validation also compile the decoder "
              "layers (once per run)", file=sys.stderr)


@contextlib.contextmanager
def layer_modes(model, *, checkpointing: bool = False, compile: bool = False) -> Iterator[None]:
    """Gradient checkpointing and/or ``torch.compile`` of the decoder layers, undone on exit.

    Checkpointing keeps the model in eval mode (no dropout anywhere): transformers only
    checkpoints layers whose ``training`` flag is set, so we set it on the decoder layers
    alone; their attention/MLP/dropout children stay in eval mode.

    Compiling: the layers share their code, so with dynamic shapes one compiled graph serves
    every layer and every batch length (plus one more for no-grad validation). On SmolLM2-135M
    (2 CPU cores) a step is 6-17% faster at 4 x 276 tokens and 24-44% at 8 x 532, after ~15 s
    of compiling (BENCHMARKS.md, 2c and 4c).
    """
    layers = decoder_layers(model)
    with contextlib.ExitStack() as undo:
        if checkpointing:
            _set_checkpointing(model, layers, on=True)
            undo.callback(_set_checkpointing, model, layers, on=False)
        if compile:
            undo.callback(_uncompile, layers)
            for layer in layers:
                layer.compile(dynamic=True)
        yield


def _set_checkpointing(model, layers: list[torch.nn.Module], on: bool) -> None:
    # transformers 5 renamed it (the old name warns on stderr); 4.x has only the old one.
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
    for layer in layers:
        layer.training = on


def _uncompile(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile() set


# --- fit --------------------------------------------------------------------------------------


def fit_epoch(run: Run, state: TrainState, bar) -> None:
    """Take the optimizer steps of ``state.epoch`` not yet taken, checkpointing every
    ``--save-steps``. The step order depends on (seed, epoch, global batch size) only."""
    cfg = run.config
    if state.step_in_epoch == 0:
        state.epoch_stats = EpochStats()
    lengths = [len(ids) for ids, _ in run.train_data.rows]
    order = step_order(lengths, run.batch.size, cfg.seed, state.epoch)
    for indices in order[state.step_in_epoch:]:
        record = train_step(run, state, [run.train_data.rows[i] for i in indices])
        state.log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        # The epoch's last step is validated by end_epoch.
        if (cfg.eval_steps and state.global_step % cfg.eval_steps == 0
                and state.step_in_epoch < len(order)):
            mid_epoch_validation(run, state, bar)
            if state.best.out_of_patience(cfg.patience):
                return
        if cfg.save_steps and state.global_step % cfg.save_steps == 0:
            save_checkpoint(run, state)


def train_step(run: Run, state: TrainState, rows: Rows) -> dict[str, Any]:
    """One optimizer step on a global batch of ``rows``; returns its log record."""
    t0 = time.perf_counter()
    n_targets = sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in rows)
    n_tokens = sum(len(ids) for ids, _ in rows)
    loss_sum = accumulate_gradient(run, state.prompt, rows, n_targets)
    loss = loss_sum / n_targets
    if not math.isfinite(loss):
        last = checkpoint.list_checkpoints(run.out)
        where = f"; the last good checkpoint is {last[-1][1]}" if last else ""
        raise SoftPromptError(f"loss became {loss} at step {state.global_step + 1} (epoch "
                              f"{state.epoch + 1}); lower --lr (now {run.config.lr}){where}")
    params, cfg = list(state.prompt.parameters()), run.config
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                 if cfg.max_grad_norm > 0 else torch.nn.utils.get_total_norm(
                     [p.grad for p in params]))
    lr = lr_at(state.global_step, run.total_steps, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    crash_point("step")
    state.optimizer.step()
    # Autocast keeps its bfloat16 copies of the trainable weights (an encoder's Linear layers)
    # until the outermost autocast region ends; under an enclosing one (compare() evaluates
    # and trains inside its precision context) the next forward would read the weights from
    # before this step, and an encoder would never move. Drop them now that they are stale.
    torch.clear_autocast_cache()
    state.global_step += 1
    state.step_in_epoch += 1
    state.epoch_stats.loss_sum += loss_sum
    state.epoch_stats.target_tokens += n_targets
    elapsed = time.perf_counter() - t0
    return {"event": "step", "step": state.global_step, "epoch": state.epoch + 1,
            "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
            "tokens": n_tokens, "target_tokens": n_targets,
            "tokens_per_s": round(n_tokens / elapsed, 1), "seconds": round(elapsed, 4)}


def accumulate_gradient(run: Run, prompt: PromptMethod, rows: Rows, n_targets: int) -> float:
    """Set every parameter's gradient to that of the step's mean target loss, summed over
    processes.

    Each process takes its ``--batch-size`` slice of every micro-batch of ``rows``; one whose
    slice is empty (the short last micro-batch of a step) adds nothing, but still has a zero
    gradient to join the all-reduce. With a sharded model it runs a zero-weighted forward and
    backward instead, so that it joins every layer's all-gather. Returns the step's summed
    target loss over all processes.
    """
    params = list(prompt.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    size = run.config.batch_size
    micro = size * run.world
    loss_sum = 0.0
    for start in range(0, len(rows), micro):
        mine = rows[start:start + micro][run.rank * size:(run.rank + 1) * size]
        if not mine and not run.sharded:
            continue
        weight = 1.0 if mine else 0.0
        loss = batch_loss(run, prompt, mine or rows[:1])[0] / n_targets
        (loss * weight).backward()
        loss_sum += loss.item() * n_targets * weight
    if run.world > 1:
        for p in params:
            all_reduce_sum(p.grad, run.world)
        total = torch.tensor([loss_sum], dtype=torch.float64, device=run.device)
        loss_sum = all_reduce_sum(total, run.world).item()
    return loss_sum


def batch_loss(run: Run, prompt: PromptMethod, rows: Rows) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of ``rows`` behind the prompt, and the number of targets."""
    try:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.config.bf16):
            return rows_loss(run.model, prompt(), rows, run.tokenizer.pad_token_id,
                             run.bos_offset, run.device)
    except torch._dynamo.exc.TorchDynamoException as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise SoftPromptError(f"--compile failed ({lines[0][:200]}); run without "
                              f"--compile") from err


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then linear or cosine decay to zero at ``total`` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(1, total - cfg.warmup_steps)
    done = min(1.0, (step - cfg.warmup_steps) / remaining)  # 0 -> 1 after warm-up
    if cfg.lr_scheduler is Scheduler.COSINE:
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
    return cfg.lr * max(0.0, 1 - done)


# --- validate ---------------------------------------------------------------------------------


def end_epoch(run: Run, state: TrainState, on_epoch_end: EpochCallback | None) -> dict[str, Any]:
    """Validate, keep the best prompt, log the epoch and move ``state`` to the next one."""
    record: dict[str, Any] = {"event": "epoch", "epoch": state.epoch + 1,
                              "step": state.global_step,
                              "train_loss": round(state.epoch_stats.mean_loss, 6)}
    if run.val_data is not None:
        record.update(keep_best(run, state, validation_scores(run, state)))
    else:  # without validation the last epoch is the best
        state.best = Best(math.inf, state.global_step, state.epoch + 1)
        state.best_prompt = state.prompt.export()
    if on_epoch_end is not None and (run.main or run.sharded):
        record.update(on_epoch_end(state.epoch + 1, state.prompt.export()))
    state.log.append(record)
    state.epoch += 1
    state.step_in_epoch = 0
    return record


def mid_epoch_validation(run: Run, state: TrainState, bar) -> None:
    """``--eval-steps``: validate, keep the best, log an ``eval`` record and save."""
    record = {"event": "eval", "epoch": state.epoch + 1, "step": state.global_step,
              **keep_best(run, state, validation_scores(run, state))}
    state.log.append(record)
    if run.main and run.progress:
        bar.write(" ".join(f"{k}={v}" for k, v in record.items() if k != "event"),
                  file=sys.stderr)
    save(run, state)


def validation_scores(run: Run, state: TrainState) -> dict[str, float]:
    """``val_loss`` and, with ``--metric-for-best`` a metric, ``val_<metric>`` (unrounded)."""
    scores = {"val_loss": validate(run, state.prompt)}
    metric = run.config.metric_for_best
    if metric != "loss":
        scores[f"val_{metric}"] = generation_metric(run, state.prompt.export())
    return scores


def keep_best(run: Run, state: TrainState, scores: dict[str, float]) -> dict[str, float]:
    """Make the current prompt the best if its score beats the best's (else count a bad
    validation); returns the scores rounded for the log."""
    metric = run.config.metric_for_best
    score = -scores["val_loss"] if metric == "loss" else scores[f"val_{metric}"]
    if score > state.best.score:
        state.best = Best(scores["val_loss"], state.global_step, state.epoch + 1, 0, score)
        state.best_prompt = state.prompt.export()
    else:
        state.best.bad_evals += 1
    return {k: round(v, 6) for k, v in scores.items()}


@torch.no_grad()
def generation_metric(run: Run, prompt) -> float:
    """The ``--metric-for-best`` metric of greedy generation behind ``prompt`` on the
    validation records (at most ``--max-eval-examples``), as ``softprompt evaluate`` scores."""
    from softprompt.evaluation import SOFT, System, evaluate

    gen = GenerationConfig(max_new_tokens=run.task.max_new_tokens)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.config.bf16):
        result = evaluate(run.model, run.tokenizer, run.task, run.val_records,
                          System(SOFT, prompt), generation=gen, max_length=run.config.max_length)
    return float(result.metrics[run.config.metric_for_best])


@torch.no_grad()
def validate(run: Run, prompt: PromptMethod) -> float:
    """Mean target cross-entropy over the validation rows, split across processes."""
    assert run.val_data is not None
    rows = run.val_data.rows[run.rank::run.world]
    # Similar lengths share a batch (the sum does not depend on the order): fewer pads.
    batches = length_sorted_batches([len(ids) for ids, _ in rows], run.config.batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # [loss sum, targets]
    for i in range(same_count(len(batches), run.device, run.sharded)):
        chunk = [rows[j] for j in batches[i]] if i < len(batches) else []
        # A sharded model needs every rank in every forward: idle ranks run a dummy row.
        loss_sum, count = batch_loss(run, prompt, chunk or run.val_data.rows[:1])
        if chunk:
            total += torch.tensor([loss_sum.item(), count], dtype=torch.float64,
                                  device=run.device)
    total = all_reduce_sum(total, run.world)
    return (total[0] / total[1]).item()


# --- save -------------------------------------------------------------------------------------


def save(run: Run, state: TrainState) -> None:
    """At an epoch end: the checkpoint, then the best prompt so far; every process waits."""
    save_checkpoint(run, state)
    if run.main:
        save_prompt(run.out, state.best_prompt, prompt_meta(run, state))
    distributed_state().wait_for_everyone()


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Write ``checkpoint-<step>`` and the log, keep the newest ``--save-total-limit`` (and the
    best); main process only."""
    if not run.main:
        return
    checkpoint.save(run.out, state)
    checkpoint.prune(run.out, run.config.save_total_limit, protect={state.best.step})
    atomic.write_jsonl(run.out / LOG_FILE, state.log)


def prompt_meta(run: Run, state: TrainState) -> PromptMeta:
    """``softprompt.json`` for the best prompt so far."""
    pcfg = run.prompt_config
    prefix = isinstance(state.best_prompt, KVPrefix)
    layers, kv_heads, head_dim = kv_shape(run.model.config) if prefix else (None, None, None)
    return PromptMeta(model=run.model_name, task=run.task.to_dict(),
                      num_virtual_tokens=pcfg.num_virtual_tokens,
                      hidden_size=run.model.get_input_embeddings().weight.shape[1],
                      init=(pcfg.prefix_init if prefix else pcfg.init).value,
                      train_args={**_plain(asdict(run.config)), **_plain(asdict(pcfg)),
                                  "world_size": run.world},
                      metrics={**final_metrics(run, state.best, state.log),
                               "trainable_parameters": sum(
                                   p.numel() for p in state.prompt.parameters()
                                   if p.requires_grad)},
                      method=pcfg.method.value, num_layers=layers,
                      num_key_value_heads=kv_heads, head_dim=head_dim)


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Config fields for JSON: enums as their values."""
    return {k: getattr(v, "value", v) for k, v in options.items()}


def final_metrics(run: Run, best: Best, log: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's summary for ``softprompt.json``: best epoch and step, losses (and the metric
    for best), steps, time."""
    epochs = [r for r in log if r["event"] == "epoch"]
    steps = [r for r in log if r["event"] == "step"]
    metrics: dict[str, Any] = {"best_epoch": best.epoch, "best_step": best.step,
                               "epochs_run": len(epochs), "steps": len(steps),
                               "train_seconds": round(sum(r["seconds"] for r in steps), 2)}
    if math.isfinite(best.val_loss):
        metrics["val_loss"] = round(best.val_loss, 6)
    if run.config.metric_for_best != "loss" and math.isfinite(best.score):
        metrics[f"val_{run.config.metric_for_best}"] = round(best.score, 6)
    if epochs:
        metrics["train_loss"] = epochs[-1]["train_loss"]
    return metrics


__all__ = ["train", "TrainResult", "check_output_dir", "layer_modes", "encode_dataset",
           "LOG_FILE", "PROMPT_FILE", "CONFIG_FILE"]
