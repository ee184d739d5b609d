"""Records -> token ids and labels: the template filled, one field truncated to fit.

The input is tokenized as the tokenizer tokenizes a whole text (BOS first where it adds one),
or, for a task with ``chat_template`` (``--chat-template``), as the user's message in the
tokenizer's chat template followed by the assistant turn's generation prompt. The target
follows (after a space, or right after the generation prompt) with EOS, and its labels are the
only ones that carry loss. Training, evaluation, generation and serving all encode here.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.errors import SoftPromptError
from softprompt.tasks import Example, Task, make_examples, render_input

IGNORE_INDEX = -100  # label of tokens that carry no loss (pads, prompt, input)


@dataclass
class Encoded:
    """Token ids of one example. ``input_ids`` starts with BOS where the tokenizer adds one."""

    input_ids: list[int]
    target_ids: list[int]  # target tokens + EOS (empty when encoding for generation)
    truncated: bool = False

    def ids_and_labels(self) -> tuple[list[int], list[int]]:
        """Concatenated ids and labels (IGNORE_INDEX on the input)."""
        ids = self.input_ids + self.target_ids
        return ids, [IGNORE_INDEX] * len(self.input_ids) + self.target_ids


def adds_bos(tokenizer) -> bool:
    """Does ``tokenizer(text)`` put BOS first?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def chat_text(tokenizer, text: str) -> str:
    """``text`` as the user's message in the tokenizer's chat template, followed by the
    assistant turn's generation prompt (the template's own special tokens included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SoftPromptError("--chat-template: this model's tokenizer has no chat template; "
                              "drop --chat-template (or use a model whose tokenizer has one)")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def input_token_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """The ids of a rendered input: the whole text as the tokenizer tokenizes it (BOS first
    where it adds one), or with ``chat`` its :func:`chat_text`, which carries its own special
    tokens (BOS is put first where the tokenizer adds one and the template does not, so the
    prompt still goes right after BOS)."""
    if not chat:
        return tokenizer(text).input_ids
    ids = tokenizer(chat_text(tokenizer, text), add_special_tokens=False).input_ids
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_example(task: Task, example: Example, tokenizer, *, instruction: str = "",
                   num_virtual_tokens: int = 0, max_length: int | None = None,
                   with_target: bool = True, chat: bool = False) -> Encoded | None:
    """Tokenize one example, cutting ``task.truncate_field`` (never the target) to fit.

    The budget is ``max_length - num_virtual_tokens``. Returns None when even an empty source
    leaves no room (the target alone is too long). With ``task.chat_template`` (or ``chat``:
    the chat hard-prompt baseline) the rendered input is wrapped in the tokenizer's chat
    template (:func:`input_token_ids`) and the target follows its generation prompt directly;
    otherwise the target's ids are those it has in the whole text ``input + " " + target``
    (:func:`target_token_ids`).
    """
    chat = chat or task.chat_template

    def tokenize(text: str) -> list[int]:
        return input_token_ids(tokenizer, text, chat)

    text = render_input(task, example, instruction)
    input_ids = tokenize(text)
    target_ids: list[int] = []
    if with_target:
        if chat:
            whole = chat_text(tokenizer, text)
            target_ids = target_token_ids(
                tokenizer, whole, tokenizer(whole, add_special_tokens=False).input_ids,
                example.target, add_special_tokens=False, separator="")
        else:
            target_ids = target_token_ids(tokenizer, text, input_ids, example.target)
    if max_length is None:
        return Encoded(input_ids, target_ids)
    budget = max_length - num_virtual_tokens - len(target_ids)
    if len(input_ids) <= budget:
        return Encoded(input_ids, target_ids)
    name = task.truncate_field
    if name is None or name not in example.fields:
        return None
    # Cut the field's tokens by the overflow, re-render, and repeat while tokenization at the
    # cut still leaves the input too long.
    field_ids = tokenizer(example.fields[name], add_special_tokens=False).input_ids
    keep = len(field_ids) - (len(input_ids) - budget)
    while keep > 0:
        text = tokenizer.decode(field_ids[:keep]).rstrip()
        input_ids = tokenize(render_input(task, example, instruction,
                                          {**example.fields, name: text}))
        if len(input_ids) <= budget:
            return Encoded(input_ids, target_ids, truncated=True)
        keep -= max(1, len(input_ids) - budget)
    return None


def target_token_ids(tokenizer, text: str, input_ids: list[int], target: str, *,
                     add_special_tokens: bool = True, separator: str = " ") -> list[int]:
    """The ids of ``target`` as they follow ``text`` (tokenized as ``input_ids``) in the whole
    text ``text + separator + target``, then EOS.

    Tokenizing ``" " + target`` on its own is right for byte-level BPE (GPT-2, Llama 3), but a
    SentencePiece tokenizer that prepends "▁" to every text makes it "▁▁target": a lone "▁"
    piece before "▁target", a doubled space the model never sees between words. Cutting the
    whole text's ids after the input's is right for both. Where the tokenizer merges across
    that boundary (or ends every text with a special token), the target is tokenized after a
    one-letter word instead (on its own with ``separator=""``: after a chat template's
    generation prompt, which ends in special tokens or a newline).
    """
    whole = tokenizer(text + separator + target, add_special_tokens=add_special_tokens).input_ids
    if len(whole) > len(input_ids) and whole[:len(input_ids)] == input_ids:
        ids = whole[len(input_ids):]
    elif not separator:
        ids = tokenizer(target, add_special_tokens=False).input_ids
    else:
        anchor = tokenizer("a", add_special_tokens=False).input_ids
        ids = tokenizer("a" + separator + target, add_special_tokens=False).input_ids
        ids = ids[len(anchor):] if ids[:len(anchor)] == anchor else tokenizer(
            separator + target, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id]


def encode_for_generation(task: Task, example: Example, tokenizer, *, num_virtual_tokens: int,
                          max_new_tokens: int, max_length: int | None) -> list[int]:
    """Input ids that leave ``num_virtual_tokens + max_new_tokens`` of ``max_length`` free,
    ``task.truncate_field`` cut to fit as in training (None: no limit, nothing cut).

    Where nothing can be cut, the whole input's ids come back and ``generation.generate``
    refuses them with a one-line error that says how to fit them.
    """
    enc = encode_example(task, example, tokenizer, num_virtual_tokens=num_virtual_tokens
                         + max_new_tokens, max_length=max_length, with_target=False)
    if enc is None:
        return input_token_ids(tokenizer, render_input(task, example), task.chat_template)
    return enc.input_ids


@dataclass
class EncodedDataset:
    """Encoded rows of a dataset and how many examples were cut or skipped to fit."""

    rows: list[tuple[list[int], list[int]]]  # (ids, labels)
    truncated: int
    skipped: int


def encode_dataset(task: Task, records: list[dict], tokenizer, num_virtual_tokens: int,
                   max_length: int, what: str) -> EncodedDataset:
    """Records -> (ids, labels) rows; reports truncation and examples too long to keep."""
    rows, truncated, skipped = [], 0, 0
    for example in make_examples(task, records):
        enc: Encoded | None = encode_example(task, example, tokenizer,
                                             num_virtual_tokens=num_virtual_tokens,
                                             max_length=max_length)
        if enc is None:
            skipped += 1
            continue
        truncated += enc.truncated
        rows.append(enc.ids_and_labels())
    if not rows:
        raise SoftPromptError(f"no {what} example fits in --max-length {max_length} with "
                              f"{num_virtual_tokens} virtual tokens; raise --max-length")
    return EncodedDataset(rows, truncated, skipped)


def context_limit(model) -> int | None:
    """The most positions the model can attend over (GPT-2's learned 1,024, Llama's
    ``max_position_embeddings``), or None where its config names no limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None
