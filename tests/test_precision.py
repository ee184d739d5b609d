"""--precision: where bfloat16 is native, how --precision and --dtype resolve, and that bf16
training and inference on the tiny real models stay close to float32 while the trained prompt
and its optimizer state stay float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt import api, cli
from softprompt.checkpoint import TENSORS_FILE
from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.models import (
    Precision,
    bf16_native,
    cpu_bf16_native,
    cpuinfo_flags,
    load_model,
    resolve_precision,
)

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TRAIN_OPTIONS = dict(epochs=1, batch_size=4, num_virtual_tokens=4, init="random",
                     warmup_steps=0, max_train_examples=8, progress=False)


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, native", [
    ({"sse4_2", "avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
    ({"avx512f", "amx_tile", "amx_bf16"}, True),  # Sapphire Rapids
    ({"sse4_2", "avx2", "avx512f", "avx512_vnni"}, False),  # Cascade Lake: bf16 emulated
    ({"fp", "asimd"}, False),
    (set(), False),
])
def test_cpu_bf16_native_means_avx512_bf16_or_amx(flags, native):
    assert cpu_bf16_native(flags) is native


@pytest.mark.skipif(not cpuinfo_flags(), reason="no /proc/cpuinfo flags on this system")
def test_torch_detection_agrees_with_the_kernel_flags_here():
    assert cpu_bf16_native() == cpu_bf16_native(cpuinfo_flags())
    assert bf16_native(CPU) == cpu_bf16_native()


# --- resolution -------------------------------------------------------------------------------

# (precision, dtype, training) -> (weights, autocast) on a CPU
TABLE = [
    ("fp32", "auto", False, F32, None),
    ("fp32", "auto", True, F32, None),
    ("fp32", "float32", True, F32, None),
    ("bf16", "auto", False, BF16, None),  # inference: bfloat16 weights, no per-step casts
    ("bf16", "auto", True, F32, BF16),  # training: float32 weights under autocast
    ("bf16", "float32", False, F32, BF16),
    ("bf16", "float32", True, F32, BF16),
    ("bf16", "bfloat16", True, BF16, None),
    ("auto", "bfloat16", False, BF16, None),  # an explicit --dtype is kept
    ("auto", "float16", False, F16, None),
    ("auto", "float32", False, F32, None),  # pinned float32 inference computes as it is
]


@pytest.mark.parametrize("precision, dtype, training, weights, autocast", TABLE)
def test_precision_and_dtype_resolve_to_weights_and_autocast(precision, dtype, training,
                                                             weights, autocast):
    assert resolve_precision(precision, dtype, CPU, training=training) == Precision(weights,
                                                                                 autocast)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
@pytest.mark.parametrize("training", [False, True])
def test_auto_is_bf16_exactly_where_the_device_has_native_bfloat16(dtype, training):
    auto = resolve_precision("auto", dtype, CPU, training=training)
    if dtype == "float32" and not training:
        assert auto == Precision(F32, None)
    else:
        expected = "bf16" if bf16_native(CPU) else "fp32"
        assert auto == resolve_precision(expected, dtype, CPU, training=training)


def test_bf16_flag_is_an_alias_of_precision_bf16():
    for training in (False, True):
        assert (resolve_precision("auto", "auto", CPU, training=training, bf16=True)
                == resolve_precision("bf16", "auto", CPU, training=training))


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="half"), "--precision 'half' is not supported; use auto, bf16, fp32"),
    (dict(precision="fp32", dtype="bfloat16"), "--precision fp32 and --dtype bfloat16 "
                                               "contradict each other"),
    (dict(precision="bf16", dtype="float16"), "--precision bf16 and --dtype float16 contradict"),
    (dict(precision="fp32", bf16=True), "--bf16 is --precision bf16; drop one"),
])
def test_contradictions_are_refused_in_one_line(kwargs, message):
    with pytest.raises(SoftPromptError, match=message) as err:
        resolve_precision(device=CPU, **kwargs)
    assert "\n" not in str(err.value)


def test_the_context_autocasts_only_when_asked():
    with Precision(F32, BF16).context(CPU):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == BF16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == BF16
    with Precision(BF16, None).context(CPU):
        assert not torch.is_autocast_enabled("cpu")


# --- training ---------------------------------------------------------------------------------


def _train(model_dir: Path, out: Path, **kw):
    train_file = SAMPLES / "translation" / "train.jsonl"
    return api.train("translation", train_file, out, model=str(model_dir), device="cpu",
                     overwrite=True, **TRAIN_OPTIONS, **kw)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_training_keeps_float32_state_and_a_loss_close_to_float32(tiny_dirs, tmp_path,
                                                                       kind):
    results = {p: _train(tiny_dirs[kind], tmp_path / p, precision=p) for p in ("fp32", "bf16")}
    losses = {}
    for precision, result in results.items():
        losses[precision] = [r["loss"] for r in result.log if r["event"] == "step"]
        assert result.prompt.dtype == F32
        meta = json.loads((result.output_dir / "softprompt.json").read_text())
        assert meta["train_args"]["bf16"] is (precision == "bf16")  # what actually ran
        ckpt = next(result.output_dir.glob("checkpoint-*"))
        tensors = load_file(str(ckpt / TENSORS_FILE))
        assert tensors and {t.dtype for t in tensors.values() if t.is_floating_point()} == {F32}
    # Same data, same start: the first step's loss (before any update) differs only by
    # bfloat16 rounding, and autocast really ran (the losses are not identical).
    assert losses["bf16"][0] != losses["fp32"][0]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)


def test_auto_training_autocasts_where_bf16_is_native(tiny_dirs, tmp_path):
    result = _train(tiny_dirs["gpt2"], tmp_path / "auto")
    assert result.meta.train_args["bf16"] is bf16_native(CPU)


def test_training_with_bf16_and_precision_fp32_is_refused_before_loading(tmp_path):
    with pytest.raises(SoftPromptError, match="--bf16 is --precision bf16"):
        _train(tmp_path / "no-model-here", tmp_path / "x", precision="fp32", bf16=True)
    assert not (tmp_path / "x").exists()


# --- inference --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """A prompt trained on each tiny model, its weight matrices scaled by 10 first: a fresh
    model (std 0.02) predicts an almost uniform distribution, whose loss bfloat16 hardly
    moves; with larger weights rounding shows in the loss's fourth decimal."""
    out = {}
    for kind in ("gpt2", "llama"):
        model, tokenizer = load_model(str(tiny_dirs[kind]))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(10)
        model_dir = tmp_path_factory.mktemp(f"responsive-{kind}")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        out[kind] = tmp_path_factory.mktemp(f"prompt-{kind}")
        _train(model_dir, out[kind], precision="fp32")
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_evaluation_scores_close_to_float32(trained, kind):
    test = SAMPLES / "translation" / "test.jsonl"
    results = {}
    for name, options in {"fp32": dict(precision="fp32"),
                          "bf16 weights": dict(precision="bf16"),
                          "autocast": dict(precision="bf16", dtype="float32")}.items():
        results[name] = api.evaluate(test, prompt=trained[kind], limit=4, device="cpu",
                                     max_new_tokens=4, **options)
    fp32 = results["fp32"].metrics["loss"]
    for name in ("bf16 weights", "autocast"):
        loss = results[name].metrics["loss"]
        assert loss != fp32 and loss == pytest.approx(fp32, rel=2e-2), name
        assert all(isinstance(r["prediction"], str) for r in results[name].predictions)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_generation_loads_bf16_weights_and_matches_their_uncached_reference(trained,
                                                                                kind):
    """Inference in bf16 is the same cached pipeline on bfloat16 weights: its greedy tokens
    equal the uncached reference's on those weights."""
    from softprompt.config import GenerationConfig
    from softprompt.generation import generate, generate_reference

    pm = api.load_prompt(trained[kind], device="cpu", precision="bf16")
    assert {p.dtype for p in pm.model.parameters()} == {BF16}
    assert pm.prompt.dtype == F32  # the prompt stays float32; inputs.py casts it
    texts = [pm.render(x) for x in ("The dog sleeps.", "Two cats play in the garden.")]
    fast = generate(pm.model, pm.tokenizer, texts, pm.prompt,
                    GenerationConfig(max_new_tokens=6, batch_size=2))
    for text, out in zip(texts, fast):
        ref = pm.tokenizer.decode(generate_reference(pm.model, pm.tokenizer, text, pm.prompt, 6),
                                  skip_special_tokens=True).strip()
        assert out == ref


def test_bf16_weights_halve_the_model_bytes(tiny_dirs):
    sizes = {}
    for precision in ("fp32", "bf16"):
        model, _ = load_model(str(tiny_dirs["llama"]),
                              dtype=resolve_precision(precision, "auto", CPU).weights)
        sizes[precision] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sizes["bf16"] * 2 == sizes["fp32"]


def test_prompt_pool_refuses_autocast_it_cannot_apply(trained):
    with pytest.raises(SoftPromptError, match="PromptPool computes bfloat16 with bfloat16 "
                                              "weights"):
        api.load_prompts([trained["gpt2"]], device="cpu", precision="bf16", dtype="float32")


# --- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "compare", "serve"])
def test_every_command_that_runs_the_model_takes_precision(command):
    parser = cli.build_parser()
    required = {"train": ["--task", "qa", "--train", "t", "--output", "o"],
                "generate": ["--prompt", "p", "--input", "x"],
                "evaluate": ["--test", "t", "--output", "o", "--no-instruction"],
                "compare": ["--task", "qa", "--test", "t", "--output", "o"],
                "serve": ["--prompts", "p"]}[command]
    assert parser.parse_args([command, *required]).precision == "auto"
    assert parser.parse_args([command, *required, "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--precision", "fp16"])


def test_cli_refuses_bf16_with_precision_fp32_in_one_line(tmp_path, capsys):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--task", "translation", "--train", str(train), "--output",
                  str(tmp_path / "o"), "--bf16", "--precision", "fp32"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --bf16 is --precision bf16; drop one of --bf16 and --precision fp32\n"


def test_records_read_for_the_tests_exist():
    assert read_records(SAMPLES / "translation" / "test.jsonl", limit=4)


# --- both kinds of prompt ---------------------------------------------------------------------


def _prompts(model) -> dict[str, object]:
    """A ``[P, H]`` prompt and a KV prefix for ``model`` (what every method compiles to)."""
    from softprompt.prefix import KVPrefix, kv_shape

    gen = torch.Generator().manual_seed(1)
    hidden = model.get_input_embeddings().weight.shape[1]
    layers, kv_heads, head_dim = kv_shape(model.config)
    return {"prompt": torch.randn(4, hidden, generator=gen) * 0.5,
            "prefix": KVPrefix(torch.randn(layers, 2, kv_heads, 4, head_dim, generator=gen))}


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_autocast_training_loss_and_gradient_are_close_to_float32_for_both_kinds(tiny, kind):
    """The training layout under bfloat16 autocast (float32 weights): loss and the float32
    gradient of the trained tensor within bfloat16 rounding of float32's."""
    from softprompt.encode import adds_bos
    from softprompt.inputs import rows_loss
    from softprompt.prefix import KVPrefix

    model, tok, _ = tiny
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)  # a fresh model's losses hardly depend on anything
    base = _prompts(model)[kind]
    rows = []
    for text in ("A dog runs on the beach.", "Two children play football in a park."):
        ids = tok(text).input_ids
        rows.append((ids, [-100] * (len(ids) // 2) + ids[len(ids) // 2:]))
    results = {}
    for name, precision in {"fp32": Precision(F32, None), "bf16": Precision(F32, BF16)}.items():
        tensor = (base.kv if kind == "prefix" else base).clone().requires_grad_()
        prompt = KVPrefix(tensor) if kind == "prefix" else tensor
        with precision.context(CPU):
            loss, _ = rows_loss(model, prompt, rows, tok.pad_token_id, int(adds_bos(tok)))
        loss.backward()
        assert tensor.grad.dtype == F32
        results[name] = (loss.item(), tensor.grad)
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cosine > 0.98


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_bf16_weights_cached_generation_matches_uncached_reference_for_both_kinds(tiny_dirs,
                                                                                 kind):
    from softprompt.config import GenerationConfig
    from softprompt.generation import generate, generate_reference

    for arch in ("gpt2", "llama"):
        model, tok = load_model(str(tiny_dirs[arch]), dtype=BF16)
        prompt = _prompts(model)[kind]
        texts = ["A dog runs on the beach.", "Rain."]
        outs = generate(model, tok, texts, prompt, GenerationConfig(max_new_tokens=6,
                                                                     batch_size=2))
        for text, out in zip(texts, outs):
            ref = generate_reference(model, tok, text, prompt, 6)
            assert out == tok.decode(ref, skip_special_tokens=True).strip(), arch


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_autocast_generation_runs_for_both_kinds(tiny, kind):
    """Float32 weights under autocast (--precision bf16 --dtype float32): the prompt's cache
    is float32, the tokens' keys bfloat16; generation runs and gives text."""
    from softprompt.config import GenerationConfig
    from softprompt.generation import generate

    model, tok, _ = tiny
    prompt = _prompts(model)[kind]
    with Precision(F32, BF16).context(CPU):
        outs = generate(model, tok, ["A dog runs on the beach.", "Rain."], prompt,
                        GenerationConfig(max_new_tokens=6, batch_size=2))
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
