"""Continuous batching over many KV prefixes: one frozen model, any mix of prompts per step.

For inference every trained prompt is a key/value prefix (:class:`inputs.PromptCache`: per
layer keys/values ``[1, kv_heads, C, head_dim]``, the next token at position ``C``). A prefix
is computed once per prompt, on first use, and kept in an LRU cache bounded in bytes
(:class:`PrefixCache`), keyed by the sha256 of the prompt's tensor, so two prompts never share
an entry by accident.

The running batch holds one KV cache for all its rows, aligned on the right:

    row r: [masked slots | prefix_r (C_r) | masked slots | input_r (T_r) | generated ...]

Masked slots carry attention mask 0 and position ids come from each row's own count, so a
row sees exactly what it would see alone: its prefix at positions ``0..C_r-1`` and its tokens
from ``C_r`` on (tests/test_engine.py checks every output against the row decoded alone).
Requests that arrive while a batch decodes are prefilled together (each behind its own
prefix, in groups of similar input length) and join at the next step. A finished or cancelled
request completes at once; its row leaves the cache together with others, once a quarter of
the batch is done (each leave copies every layer's cache), and slots that no remaining row
uses are trimmed from the left.

Decoding controls (repetition penalty, no-repeat n-grams, minimum new tokens) apply to each
row with its own settings and history (its input ids and its output). A beam-search request
(``num_beams > 1``) does not join the batch: the worker runs it alone through the batched beam
search (softprompt.beam_search) when it is admitted, between two decoding steps, so the running
rows wait for it; its text arrives as one delta.

The engine knows nothing of HTTP: ``submit`` returns a :class:`Handle` whose events a server
streams; :meth:`Engine.generate` is the plain Python entry point.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from softprompt.config import check_controls
from softprompt.decoding import apply_controls, controls_active
from softprompt.encode import adds_bos, context_limit
from softprompt.errors import SoftPromptError
from softprompt.generation import check_inputs, cut_at_stop, next_tokens
from softprompt.inputs import (
    PromptCache,
    build_prompt_cache,
    cached_forward,
    concat_rows,
    drop_leading_slots,
    fill_prefixes,
    left_pad_mask,
    reserved_cache,
)
from softprompt.prefix import (
    KVPrefix,
    PromptLike,
    check_fits,
    content_key,
    num_virtual_tokens,
)

__all__ = ["Engine", "Handle", "Completion", "PrefixCache", "SamplingParams"]



def _prefix_bytes(prefix: PromptCache) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
               for k, v in prefix.layers)


class PrefixCache:
    """KV prefixes by key, least recently used evicted past ``max_bytes``.

    A prefix larger than the whole budget is built on every use and never kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PromptCache] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str, build: Callable[[], PromptCache | None]) -> PromptCache | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        prefix = build()
        if prefix is None:
            return None
        size = _prefix_bytes(prefix)
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= _prefix_bytes(old)
                self.evictions += 1
            self._entries[key] = prefix
            self.bytes += size
        return prefix

    def discard(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _prefix_bytes(old)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SamplingParams:
    """Decoding settings of one request (greedy unless ``temperature > 0``), with the
    decoding controls of softprompt.decoding (applied to this request's row alone) and
    ``num_beams`` (> 1: the request runs through the batched beam search on its own, see
    :class:`Engine`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    penalize_output_only: bool = False
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise SoftPromptError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SoftPromptError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SoftPromptError(f"top_p must be in (0, 1], got {self.top_p}")
        problem = check_controls(self, flag=str)
        if problem:
            raise SoftPromptError(problem)
        if self.num_beams < 1:
            raise SoftPromptError(f"num_beams must be positive, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise SoftPromptError(f"num_beams {self.num_beams} searches deterministically; "
                                  f"send temperature 0 (or num_beams 1 to sample)")
        self.stop = [s for s in self.stop if s]


@dataclass
class Completion:
    """What a finished request produced."""

    text: str  # cut at the first stop string, stripped (as generation.generate returns)
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    error: str | None = None
    queue_seconds: float = 0.0  # submitted -> prefill started
    first_token_seconds: float = 0.0  # submitted -> first token
    seconds: float = 0.0  # submitted -> finished


class Handle:
    """A submitted request: stream its text deltas with :meth:`next_event` (or a listener),
    or wait for :meth:`result`. Thread-safe; :meth:`cancel` frees its batch row at the next step."""

    def __init__(self, ident: int, prompt: str | None, input_ids: list[int],
                 params: SamplingParams,
                 listener: Callable[[str, str | Completion], None] | None = None):
        self.id, self.prompt, self.input_ids, self.params = ident, prompt, input_ids, params
        self._listener = listener  # called from the engine's thread with every event
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        self.cancelled = False
        self._events: queue.Queue[tuple[str, str | Completion]] = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, kind: str, value: str | Completion) -> None:
        self._events.put((kind, value))
        if self._listener is not None:
            self._listener(kind, value)

    def _delta(self, text: str) -> None:
        self._emit("delta", text)

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._done.set()
        self._emit("done", completion)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        assert self._completion is not None
        return self._completion

    def next_event(self, timeout: float | None = None) -> tuple[str, str | Completion]:
        """``("delta", text)`` or ``("done", Completion)``; raises ``queue.Empty`` on timeout."""
        return self._events.get(timeout=timeout)


@dataclass
class _Prompt:
    """A servable prompt: its ``[P, H]`` tensor or KV prefix (None: the bare model) and cache
    key."""

    name: str
    tensor: PromptLike | None
    key: str


class _Row:
    """Decoding state of one request in the running batch."""

    def __init__(self, handle: Handle, prefix_length: int):
        self.handle = handle
        self.params = handle.params
        self.generated: list[int] = []
        self.sent = ""  # the output text already streamed
        self.next_pos = prefix_length + len(handle.input_ids)
        self.gen = None
        if self.params.temperature > 0:
            self.gen = torch.Generator().manual_seed(self.params.seed)
        self.controlled = controls_active(self.params)
        self.reason: str | None = None  # why it finished: "stop", "length" or "cancelled"

    @property
    def finished(self) -> bool:
        """Completed; its slot leaves the batch's cache at the next compaction."""
        return self.reason is not None


class Engine:
    """One worker that owns the model and decodes every request in shared steps.

    Args:
        model, tokenizer: the frozen model (see :func:`softprompt.load_model`).
        max_batch_size: rows decoded together at most; further requests wait.
        prefix_cache_bytes: bound of the KV prefix cache.
        mixed: let rows of different prompts share a batch. Off, the engine batches one
            prompt's requests at a time (what adapter-per-batch servers do; a benchmark
            reference).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32,
                 prefix_cache_bytes: int = 512 << 20, mixed: bool = True):
        if max_batch_size <= 0:
            raise SoftPromptError(f"--max-batch-size must be positive, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.max_batch_size = max_batch_size
        self.mixed = mixed
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.limit = context_limit(model)  # positions the model has (None: no known limit)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._prompts: dict[str | None, _Prompt] = {None: _Prompt("", None, "bare")}
        self._waiting: list[Handle] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._next_id = 0
        # The running batch: rows, their KV cache ([B, kv, S, d] per layer), mask [B, S], and
        # the token each row sampled last (not yet fed).
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()
        self.on_step: Callable[[int], None] | None = None  # called with each step's batch size

    # --- prompts -------------------------------------------------------------------------------

    def add_prompt(self, name: str, tensor: PromptLike) -> str:
        """Register a trained prompt (``[P, H]`` or a :class:`KVPrefix`) under ``name``; returns
        its cache key."""
        values = tensor.kv if isinstance(tensor, KVPrefix) else tensor
        if not isinstance(tensor, KVPrefix) and tensor.dim() != 2:
            raise SoftPromptError(f"prompt {name!r} is {list(tensor.shape)}; a prompt is [P, H]")
        check_fits(tensor, self.model, f"prompt {name!r}")
        if not torch.isfinite(values).all():
            raise SoftPromptError(f"prompt {name!r} holds non-finite values")
        key = content_key(tensor)  # the prefix cache's key
        with self._lock:
            stored = (tensor.detach() if isinstance(tensor, KVPrefix)
                      else tensor.detach().float().cpu())
            self._prompts[name] = _Prompt(name, stored, key)
        return key

    def remove_prompt(self, name: str) -> None:
        """Forget a prompt; running rows finish, waiting requests for it fail."""
        with self._lock:
            entry = self._prompts.pop(name, None)
        if entry is None:
            raise SoftPromptError(f"no prompt named {name!r}")
        if not any(p.key == entry.key for p in self._prompts.values()):
            self.prefixes.discard(entry.key)

    def prompt_names(self) -> list[str]:
        return sorted(n for n in self._prompts if n is not None)

    def virtual_tokens(self, prompt: str | None) -> int:
        """``P`` of a registered prompt (0 for the bare model)."""
        entry = self._prompts.get(prompt)
        if entry is None:
            raise SoftPromptError(f"no prompt named {prompt!r}; known: {self.prompt_names()}")
        return num_virtual_tokens(entry.tensor)

    def _prefix(self, entry: _Prompt) -> PromptCache | None:
        if entry.tensor is None and self.bos is None:
            return None  # the bare model without BOS: nothing stands before the input
        return self.prefixes.get(entry.key, lambda: build_prompt_cache(
            self.model, None if entry.tensor is None else entry.tensor.to(self.device),
            self.bos))

    # --- requests ------------------------------------------------------------------------------

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of an input text as :meth:`submit` takes them (BOS lives in the prefix).

        ``special_tokens=False`` for text that carries its own (a chat template's output).
        """
        return self._without_bos(self.tokenizer(text, add_special_tokens=special_tokens)
                                 .input_ids)

    def _without_bos(self, ids: list[int]) -> list[int]:
        return ids[1:] if self.bos is not None and ids[:1] == [self.bos] else list(ids)

    def submit(self, prompt: str | None, inputs: str | list[int],
               params: SamplingParams | None = None,
               listener: Callable[[str, str | Completion], None] | None = None) -> Handle:
        """Queue one request behind ``prompt`` (a registered name, or None for the bare
        model); ``inputs`` is the rendered input text or its ids (a leading BOS is dropped:
        the prefix carries it). ``listener``
        is called from the engine's thread with each ``("delta", text)`` and the final
        ``("done", Completion)``."""
        ids = self.encode(inputs) if isinstance(inputs, str) else self._without_bos(inputs)
        params = params or SamplingParams()
        check_inputs([ids], self.virtual_tokens(prompt), params.max_new_tokens, self.limit,
                     bos=self.bos is not None)
        with self._lock:
            handle = Handle(self._next_id, prompt, ids, params, listener)
            self._next_id += 1
            self._waiting.append(handle)
        self._wake.set()
        return handle

    def generate(self, inputs: Sequence[str | list[int]], prompts: Sequence[str | None],
                 params: SamplingParams | None = None) -> list[str]:
        """Generate for each input behind its own prompt, all batched together."""
        if len(inputs) != len(prompts):
            raise SoftPromptError(f"{len(inputs)} inputs but {len(prompts)} prompts; give one "
                                  f"prompt per input")
        handles = [self.submit(p, x, params) for x, p in zip(inputs, prompts)]
        if self._thread is None:
            self.run_until_idle()
        return [h.result().text for h in handles]

    @property
    def busy(self) -> bool:
        return bool(self._live() or self._waiting)

    def stats(self) -> dict[str, int]:
        return {"running": self._live(), "waiting": len(self._waiting),
                "prefix_hits": self.prefixes.hits, "prefix_misses": self.prefixes.misses,
                "prefix_evictions": self.prefixes.evictions, "prefix_bytes": self.prefixes.bytes,
                "prefixes_cached": len(self.prefixes)}

    # --- the loop ------------------------------------------------------------------------------

    def _live(self) -> int:
        return sum(not r.finished for r in self._rows)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"engine still busy after {max_steps} steps")

    def start(self) -> None:
        """Run the loop in a background thread (what a server does)."""
        if self._thread is not None:
            return
        self._stop_thread.clear()
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_thread.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop_thread.is_set():
            try:
                worked = self.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                self._fail_all(f"{type(exc).__name__}: {exc}")
                worked = True
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    @torch.no_grad()
    def step(self) -> bool:
        """One decoding step for the running rows, then admit waiting requests.

        Returns False when there was nothing to do.
        """
        self._drop_rows([i for i, r in enumerate(self._rows)
                         if r.handle.cancelled and not r.finished],
                        "cancelled")
        worked = False
        if self._rows:
            if self.on_step is not None:
                self.on_step(len(self._rows))
            self._decode()
            worked = True
        admitted = self._admit()
        for handle, prefix in [a for a in admitted if a[0].params.num_beams > 1]:
            handle.started = time.perf_counter()
            self._beam_search(handle, prefix)  # the running batch waits meanwhile
            worked = True
        admitted = [a for a in admitted if a[0].params.num_beams == 1]
        if admitted:
            self._prefill(admitted)
            worked = True
        return worked

    def _admit(self) -> list[tuple[Handle, PromptCache | None]]:
        room = self.max_batch_size - self._live()
        with self._lock:
            if self.mixed:
                taken, self._waiting = self._waiting[:room], self._waiting[room:]
            else:  # only the running prompt's requests (or the oldest waiting one's)
                live = [r for r in self._rows if not r.finished]
                current = live[0].handle.prompt if live else (
                    self._waiting[0].prompt if self._waiting else None)
                taken = [h for h in self._waiting if h.prompt == current][:room]
                chosen = {id(h) for h in taken}
                self._waiting = [h for h in self._waiting if id(h) not in chosen]
            entries = [self._prompts.get(h.prompt) for h in taken]
        admitted = []
        for handle, entry in zip(taken, entries):
            if handle.cancelled:
                handle._finish(Completion("", [], "cancelled", len(handle.input_ids)))
            elif entry is None:
                self._fail(handle, f"prompt {handle.prompt!r} was removed")
            else:
                admitted.append((handle, self._prefix(entry)))
        return admitted

    def _prefill(self, admitted: list[tuple[Handle, PromptCache | None]]) -> None:
        """Prefill newcomers, each behind its own prefix, then join them to the batch.

        Newcomers are sorted by input length and prefilled in groups whose padding stays under
        a quarter of their tokens (a short input padded to a long one costs as much as the
        long one); the groups then join the running batch together.
        """
        now = time.perf_counter()
        for handle, _ in admitted:
            handle.started = now
        admitted = sorted(admitted, key=lambda a: len(a[0].input_ids))
        parts = [self._prefill_group(group) for group in _length_groups(admitted)]
        tokens = torch.cat([part[3] for part in parts])  # [n], in row order
        self._join([r for part in parts for r in part[0]], [part[1] for part in parts],
                   [part[2] for part in parts], tokens)
        self._after_sampling(tokens)

    def _prefill_group(self, admitted: list[tuple[Handle, PromptCache | None]]):
        """One forward for newcomers: newcomer ``i`` (prefix ``C_i``, input ``T_i``) becomes
        the row ``[masked | prefix_i | masked | input_i]`` of width ``max C + max T``.

        Returns ``(rows, cache, mask [n, width], first tokens [n])``.
        """
        n = len(admitted)
        lengths = [0 if p is None else p.length for _, p in admitted]
        width_c = max(lengths)
        width_t = max(len(h.input_ids) for h, _ in admitted)
        ids = torch.full((n, width_t), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width_c + width_t), dtype=torch.long)
        positions = torch.zeros((n, width_t), dtype=torch.long)
        for i, (handle, _) in enumerate(admitted):
            t, c = len(handle.input_ids), lengths[i]
            ids[i, width_t - t:] = torch.tensor(handle.input_ids)
            mask[i, width_c - c:width_c] = 1
            mask[i, width_c + width_t - t:] = 1
            positions[i, width_t - t:] = torch.arange(c, c + t)
        remaining = max(h.params.max_new_tokens for h, _ in admitted)
        cache = reserved_cache(width_c + width_t + remaining)
        if width_c:
            fill_prefixes(cache, [p for _, p in admitted], width_c)
        mask = mask.to(self.device)
        logits, cache = cached_forward(self.model, cache, ids.to(self.device), mask,
                                       positions.to(self.device))
        rows = [_Row(h, c) for (h, _), c in zip(admitted, lengths)]
        return rows, cache, mask, self._sample(rows, logits)

    def _decode(self) -> None:
        """Feed every row's pending token; sample the next one."""
        assert self._mask is not None and self._pending is not None
        bsz = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(bsz, 1)], 1)
        positions = torch.tensor([[r.next_pos] for r in self._rows], device=self.device)
        logits, self._cache = cached_forward(self.model, self._cache, self._pending.unsqueeze(1),
                                             self._mask, positions)
        for r in self._rows:
            r.next_pos += 1
        tokens = self._sample(self._rows, logits)
        self._pending = tokens
        self._after_sampling(tokens)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B]`` next tokens: plain greedy rows at once; each row with
        decoding controls or sampling with its own settings, history and generator
        (decoding.apply_controls, generation.next_tokens)."""
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            scores = logits[i:i + 1]  # [1, V]
            if row.controlled:
                lead = [] if self.bos is None else [self.bos]
                weighed = ([] if row.params.penalize_output_only
                           else lead + row.handle.input_ids)
                history = torch.tensor([weighed + row.generated], dtype=torch.long,
                                       device=logits.device)  # [1, L]
                scores = apply_controls(scores, history, len(row.generated), row.params,
                                        self.eos)
            if row.controlled or row.params.temperature > 0:
                tokens[i] = next_tokens(scores, row.params, row.gen)[0]
        return tokens

    def _beam_search(self, handle: Handle, prefix: PromptCache | None) -> None:
        """Run a ``num_beams > 1`` request alone through the batched beam search
        (softprompt.beam_search) and complete it; its text arrives as one delta."""
        from softprompt.beam_search import beam_search

        try:
            (ids,) = beam_search(self.model, self.tokenizer, prefix, [handle.input_ids],
                                 handle.params, handle.params.stop, self.bos)
        except Exception as exc:  # the request fails, not the engine
            self._fail(handle, f"{type(exc).__name__}: {exc}")
            return
        handle.first_token = time.perf_counter()
        text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True),
                                    handle.params.stop)
        reason = "length" if len(ids) >= handle.params.max_new_tokens and not stopped else "stop"
        if text:
            handle._delta(text)
        handle._finish(Completion(text, ids, reason, len(handle.input_ids),
                                  queue_seconds=(handle.started or handle.submitted)
                                  - handle.submitted,
                                  first_token_seconds=handle.first_token - handle.submitted,
                                  seconds=time.perf_counter() - handle.submitted))

    def _after_sampling(self, tokens: torch.Tensor) -> None:
        """Record each row's new token, stream its text, and drop rows that finished.

        ``tokens`` are the last ``len(tokens)`` rows' tokens (all rows after a decode step,
        the newcomers after a prefill).
        """
        offset = len(self._rows) - len(tokens)
        done: list[int] = []
        now = time.perf_counter()
        for j, tok in enumerate(tokens.tolist()):
            i = offset + j
            row = self._rows[i]
            if row.finished:  # still in the batch until it compacts; its token is ignored
                continue
            if row.handle.first_token is None:
                row.handle.first_token = now
            if tok == self.eos:
                row.reason = "stop"
            else:
                row.generated.append(tok)
                if self._stream(row):
                    row.reason = "stop"
                elif len(row.generated) >= row.params.max_new_tokens:
                    row.reason = "length"
            if row.reason is not None:
                done.append(i)
        self._drop_rows(done, None)

    def _stream(self, row: _Row) -> bool:
        """Send the row's new text; True when a stop string has appeared."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if cut_at_stop(text, row.params.stop)[1]:
            return True
        body = text.lstrip()
        # Hold back what a stop string, trailing whitespace (stripped at the end) or a
        # half-decoded character could still change.
        hold = max((len(s) for s in row.params.stop), default=1) - 1
        safe = body[:len(body) - hold].rstrip().rstrip("\ufffd")
        if len(safe) > len(row.sent) and safe.startswith(row.sent):
            row.handle._delta(safe[len(row.sent):])
            row.sent = safe
        return False

    def _final_text(self, row: _Row) -> str:
        """The output cut at its earliest stop string (after leading whitespace), stripped."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        return cut_at_stop(text, row.params.stop)[0]

    def _drop_rows(self, indices: list[int], reason: str | None) -> None:
        """Finish rows ``indices``: their handles get the completion at once; the rows leave
        the batch's cache when compacting pays (:meth:`_compact`)."""
        for i in indices:
            row = self._rows[i]
            row.reason = reason or row.reason or "stop"
            h = row.handle
            text = self._final_text(row)
            if len(text) > len(row.sent) and text.startswith(row.sent):
                h._delta(text[len(row.sent):])
            h._finish(Completion(text, list(row.generated), row.reason, len(h.input_ids),
                                 queue_seconds=(h.started or h.submitted) - h.submitted,
                                 first_token_seconds=(h.first_token or h.submitted)
                                 - h.submitted,
                                 seconds=time.perf_counter() - h.submitted))
        finished = sum(r.finished for r in self._rows)
        # A finished row still costs its share of each step until it leaves; leaving copies
        # every layer's cache (measured: about 30 row-steps of the bundled model's decoding),
        # so rows leave together, once a quarter of the batch is done.
        if finished and (finished == len(self._rows) or 4 * finished >= len(self._rows)):
            self._compact()

    def _compact(self) -> None:
        """Take finished rows out of the batch and its cache."""
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._pending = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        if self._pending is not None:
            self._pending = self._pending[index]
        self._trim()

    def _trim(self) -> None:
        """Drop leading slots that no row attends to (left by rows that left)."""
        assert self._mask is not None
        used = self._mask.sum(0) > 0
        lead = int(used.long().argmax()) if bool(used.any()) else 0
        if lead > 0:
            drop_leading_slots(self._cache, lead)
            self._mask = self._mask[:, lead:]

    def _join(self, rows: list[_Row], caches: list, masks: list[torch.Tensor],
              tokens: torch.Tensor) -> None:
        """Append prefilled newcomers to the running batch: every cache right-aligned in one."""
        if any(r.finished for r in self._rows):
            self._compact()  # the join copies every cache anyway
        if self._rows:
            assert self._mask is not None and self._pending is not None
            caches, masks = [self._cache, *caches], [self._mask, *masks]
            tokens = torch.cat([self._pending, tokens])
            rows = self._rows + rows
        if len(caches) == 1:
            self._cache, self._mask = caches[0], masks[0]
        else:
            width = max(m.shape[1] for m in masks)
            remaining = max(r.params.max_new_tokens - len(r.generated) for r in rows)
            self._cache = concat_rows(caches, width, width + remaining + 1)
            self._mask = torch.cat([left_pad_mask(m, width) for m in masks], 0)
        self._rows, self._pending = rows, tokens

    def _fail(self, handle: Handle, message: str) -> None:
        handle._finish(Completion("", [], "error", len(handle.input_ids), error=message))

    def _fail_all(self, message: str) -> None:
        for row in self._rows:
            if not row.finished:
                self._fail(row.handle, message)
        self._rows, self._cache, self._mask, self._pending = [], None, None, None


def _length_groups(admitted: list[tuple[Handle, PromptCache | None]],
                   slack: float = 1.25) -> list[list[tuple[Handle, PromptCache | None]]]:
    """Split newcomers sorted by input length so that each group, padded to its longest
    input, computes at most ``slack`` times its real tokens."""
    groups: list[list[tuple[Handle, PromptCache | None]]] = []
    real = 0
    for item in admitted:
        t = len(item[0].input_ids)
        if groups and (len(groups[-1]) + 1) * t <= slack * (real + t):
            groups[-1].append(item)
            real += t
        else:
            groups.append([item])
            real = t
    return groups
