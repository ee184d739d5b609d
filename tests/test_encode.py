"""Records -> token ids: where the input ends and the target begins, for BPE and SentencePiece."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import _corpus, build_tokenizer

from softprompt.encode import (
    IGNORE_INDEX,
    adds_bos,
    encode_example,
    encode_for_generation,
    target_token_ids,
)
from softprompt.errors import SoftPromptError
from softprompt.tasks import get_task, make_example, make_examples, render_input

TRANSLATION = get_task("translation")
RECORD = {"source": "A dog runs on the beach.", "target": "Ein Hund rennt am Strand."}


def build_sentencepiece_tokenizer():
    """A tiny Llama-2-style SentencePiece tokenizer, built locally.

    Its pipeline is the one Llama 2 / Mistral ``tokenizer.json`` files carry: a normalizer that
    prepends "▁" to every text and turns spaces into "▁", no pre-tokenizer, BOS first, and a
    decoder that drops the leading space. The pieces are trained word by word (as
    SentencePiece does), so none spans a word boundary.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=600,
                                  special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


TOKENIZERS = {"bpe": lambda: build_tokenizer(add_bos=False),
              "bpe+bos": lambda: build_tokenizer(add_bos=True),
              "sentencepiece": build_sentencepiece_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def test_input_and_target_ids_are_the_whole_text_tokenized(tokenizer):
    example = make_example(TRANSLATION, RECORD)
    enc = encode_example(TRANSLATION, example, tokenizer)
    text = "English: A dog runs on the beach.\nGerman:"
    whole = tokenizer(text + " " + RECORD["target"]).input_ids
    assert enc.input_ids == tokenizer(text).input_ids  # what generation feeds
    assert enc.input_ids + enc.target_ids == whole + [tokenizer.eos_token_id]
    ids, labels = enc.ids_and_labels()
    assert labels == [IGNORE_INDEX] * len(enc.input_ids) + enc.target_ids
    # The target decodes to itself, one space in front at most; no lone "▁" piece starts it.
    first = tokenizer.convert_ids_to_tokens(enc.target_ids[:1])[0]
    assert first not in ("▁", "Ġ")
    assert tokenizer.decode(enc.target_ids, skip_special_tokens=True).strip() == RECORD["target"]


def test_sentencepiece_target_has_no_doubled_space_token():
    tok = build_sentencepiece_tokenizer()
    ids = target_token_ids(tok, "German:", tok("German:").input_ids, "Ein Hund")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0].startswith("▁") and pieces[0] != "▁" and pieces[-1] == "</s>"
    assert "".join(pieces[:-1]) == "▁Ein▁Hund"
    # Tokenizing " " + target on its own would have put a lone "▁" first.
    assert tok.convert_ids_to_tokens(tok(" Ein", add_special_tokens=False).input_ids)[0] == "▁"


def test_target_after_a_tokenizer_that_ends_texts_with_eos_falls_back_cleanly():
    from tokenizers import processors

    tok = build_tokenizer(add_bos=False)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)])
    text = "German:"
    input_ids = tok(text).input_ids
    assert input_ids[-1] == tok.eos_token_id  # the whole text is no longer input + target
    ids = target_token_ids(tok, text, input_ids, "Ein Hund")
    assert ids == tok(" Ein Hund", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_truncated_input_keeps_the_target_boundary(tokenizer):
    record = {"source": " ".join(["The big brown dog sleeps under the table."] * 30),
              "target": RECORD["target"]}
    example = make_example(TRANSLATION, record)
    enc = encode_example(TRANSLATION, example, tokenizer, num_virtual_tokens=4, max_length=64)
    assert enc.truncated and 4 + len(enc.input_ids) + len(enc.target_ids) <= 64
    text = tokenizer.decode(enc.input_ids, skip_special_tokens=True)
    whole = tokenizer(text + " " + RECORD["target"]).input_ids
    assert enc.input_ids + enc.target_ids == whole + [tokenizer.eos_token_id]


# --- --chat-template --------------------------------------------------------------------------

# A chat template in the style of ChatML (SmolLM2, Qwen): no BOS of its own, the user's turn
# closed by EOS, the assistant's generation prompt ending in a newline.
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = replace(TRANSLATION, chat_template=True)


@pytest.fixture(params=sorted(TOKENIZERS))
def chat_tokenizer(request):
    tok = TOKENIZERS[request.param]()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _chat(text: str) -> str:
    return f"<|user|>\n{text}</s>\n<|assistant|>\n"


def test_chat_template_wraps_the_input_and_the_target_follows_the_generation_prompt(
        chat_tokenizer):
    tok = chat_tokenizer
    example = make_example(CHAT, RECORD)
    enc = encode_example(CHAT, example, tok)
    wrapped = _chat("English: A dog runs on the beach.\nGerman:")
    bos = [tok.bos_token_id] if adds_bos(tok) else []  # the prompt still goes after BOS
    assert enc.input_ids == bos + tok(wrapped, add_special_tokens=False).input_ids
    # The target is the assistant's reply: right after the generation prompt, then EOS.
    whole = tok(wrapped + RECORD["target"], add_special_tokens=False).input_ids
    assert bos + whole + [tok.eos_token_id] == enc.input_ids + enc.target_ids
    assert tok.decode(enc.target_ids, skip_special_tokens=True) == RECORD["target"]
    # Generation encodes the same input.
    assert encode_for_generation(CHAT, make_example(CHAT, RECORD, with_target=False), tok,
                                 num_virtual_tokens=4, max_new_tokens=8,
                                 max_length=None) == enc.input_ids


def test_chat_template_truncation_cuts_the_source_inside_the_template(chat_tokenizer):
    tok = chat_tokenizer
    record = {"source": " ".join(["The big brown dog sleeps under the table."] * 30),
              "target": RECORD["target"]}
    example = make_example(CHAT, record)
    whole = encode_example(CHAT, example, tok)
    enc = encode_example(CHAT, example, tok, num_virtual_tokens=4, max_length=80)
    assert enc.truncated and 4 + len(enc.input_ids) + len(enc.target_ids) <= 80
    # The template's head and tail (from "\nGerman:" to the generation prompt) are whole.
    tail = len(tok("German:</s>\n<|assistant|>\n", add_special_tokens=False).input_ids) - 1
    assert enc.input_ids[:8] == whole.input_ids[:8]
    assert enc.input_ids[-tail:] == whole.input_ids[-tail:]
    assert enc.target_ids == whole.target_ids


def test_a_tokenizer_without_a_chat_template_is_refused_in_one_line():
    tok = build_tokenizer(add_bos=False)
    with pytest.raises(SoftPromptError, match="this model's tokenizer has no chat template; "
                                              "drop --chat-template") as err:
        encode_example(CHAT, make_example(CHAT, RECORD), tok)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def chat_model(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Llama (BOS first) saved with a tokenizer that has :data:`CHAT_TEMPLATE`."""
    from softprompt.models import load_model

    model, tok = load_model(str(tiny_dirs["llama"]))
    tok.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("chat-llama")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_chat_template_is_trained_stored_and_reused_by_evaluate_generate_and_serve(chat_model,
                                                                                  tmp_path):
    from softprompt import api
    from softprompt.config import GenerationConfig
    from softprompt.data import read_records
    from softprompt.encode import encode_dataset
    from softprompt.engine import Engine
    from softprompt.evaluation import SOFT, System, _encode
    from softprompt.generation import generate
    from softprompt.serving import protocol
    from softprompt.serving.app import Server, ServerConfig

    samples = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
    train = samples / "translation" / "train.jsonl"
    out = tmp_path / "prompts" / "chat"
    result = api.train("translation", train, out, model=str(chat_model), device="cpu",
                       precision="fp32", chat_template=True, epochs=1, batch_size=4,
                       num_virtual_tokens=4, max_train_examples=4, progress=False)
    assert result.meta.task["chat_template"] is True
    assert json.loads((out / "softprompt.json").read_text())["task"]["chat_template"] is True
    # One encoding for training, evaluation and generation: the chat-wrapped input.
    pm = api.load_prompt(out, device="cpu", precision="fp32")
    assert pm.task.chat_template
    records = read_records(train, limit=4)
    examples = make_examples(pm.task, records)
    rows = encode_dataset(pm.task, records, pm.tokenizer, 4, 512, "training").rows
    evaluated = _encode(pm.task, examples, pm.tokenizer, System(SOFT, pm.prompt), 512,
                        with_target=False)
    for (ids, labels), ex, ev in zip(rows, examples, evaluated):
        wrapped = _chat(render_input(pm.task, ex))
        expected = [pm.tokenizer.bos_token_id] + pm.tokenizer(
            wrapped, add_special_tokens=False).input_ids
        assert ids[:len(expected)] == expected and labels[len(expected) - 1] == IGNORE_INDEX
        assert labels[len(expected)] != IGNORE_INDEX
        assert ev.input_ids == expected
    # generate (stored setting, no flag) = the generation of the wrapped ids.
    item = {"source": records[0]["source"]}
    wrapped_ids = evaluated[0].input_ids
    cfg = GenerationConfig(max_new_tokens=5)
    direct = generate(pm.model, pm.tokenizer, [wrapped_ids], pm.prompt, cfg, stop=pm.task.stop)
    assert pm.generate(item, max_new_tokens=5) == direct[0]
    assert api.generate(out, item, device="cpu", precision="fp32", max_new_tokens=5) == direct[0]
    # evaluate reads the stored setting too.
    ev = api.evaluate(train, prompt=out, limit=1, device="cpu", precision="fp32",
                      max_new_tokens=5)
    assert ev.predictions[0]["prediction"] == direct[0]
    overridden = api.evaluate(train, prompt=out, task="translation", limit=1, device="cpu",
                              precision="fp32", max_new_tokens=5)  # --task keeps the wrapping
    assert overridden.predictions[0]["prediction"] == direct[0]
    # serve feeds the engine the same ids (BOS lives in the engine's prefix).
    server = Server(Engine(pm.model, pm.tokenizer), ServerConfig(out.parent, "base"))
    server.load("chat")
    _, ids, _ = server.prepare(protocol.CompletionRequest(model="chat", prompt=item["source"]),
                               item["source"])
    assert ids == wrapped_ids[1:]


def test_training_with_chat_template_on_a_model_without_one_is_refused(tiny_dirs, tmp_path):
    from softprompt import api

    samples = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
    with pytest.raises(SoftPromptError, match="has no chat template"):
        api.train("translation", samples / "translation" / "train.jsonl", tmp_path / "x",
                  model=str(tiny_dirs["gpt2"]), device="cpu", chat_template=True, epochs=1,
                  num_virtual_tokens=4, max_train_examples=4, progress=False)
    assert not (tmp_path / "x" / "softprompt.json").exists()
