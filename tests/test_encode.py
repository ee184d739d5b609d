"""Records -> token ids: where the input ends and the target begins, for BPE and SentencePiece."""

from __future__ import annotations

import pytest
from conftest import _corpus, build_tokenizer

from softprompt.encode import IGNORE_INDEX, encode_example, target_token_ids
from softprompt.tasks import get_task, make_example

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
