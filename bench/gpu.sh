#!/usr/bin/env bash
# Benchmarks 1 (training throughput, with 2: step / forward), 3 (evaluation throughput) and
# 5 (serving many prompts) against PEFT on one NVIDIA GPU, with a GPT-2-small-sized model in bfloat16.
#
#   bash bench/gpu.sh            # from the repository root, on the GPU machine
#
# Python: uses $PYTHON (default python3) when it already imports torch with CUDA,
# transformers, peft and softprompt; otherwise makes a virtual environment in $VENV (default
# /tmp/softprompt-gpu-venv) and pip-installs them from PyPI (the default Linux torch wheel
# carries CUDA). The model is GPT2Config() with random weights (GPT-2 small's shapes; no hub
# access needed); TOKENIZER=gpt2 uses GPT-2's real tokenizer where the hub or a local cache
# has it, otherwise a byte-level BPE is trained locally on the summarization training data.
# The data is read from $SOFTPROMPT_DATA (default ../shared/data next to the repository).
# The benchmarks import softprompt from this tree (PYTHONPATH=src), never an installed copy,
# and run on $DEVICE (default cuda, i.e. cuda:0; set e.g. DEVICE=cuda:1 to pick another GPU).
# Results go to bench/out/gpu-*.json; the whole script takes a few minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DEVICE=${DEVICE:-cuda}

PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/softprompt-gpu-venv}
MODEL_DIR=${MODEL_DIR:-/tmp/softprompt-gpt2-small}
TOKENIZER=${TOKENIZER:-local}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$TOKENIZER" = gpt2 ] && echo 0 || echo 1)}

ready() {
  "$1" - <<'EOF' 2>/dev/null
import os, torch, transformers, peft, softprompt
assert torch.cuda.is_available(), "no CUDA device"
src = os.path.realpath("src") + os.sep  # this tree, not an installed copy
assert os.path.realpath(softprompt.__file__).startswith(src), softprompt.__file__
torch.zeros(1, device=os.environ["DEVICE"])
EOF
}

# 1. An environment with CUDA torch, transformers, peft and this package.
if ready "$PYTHON"; then
  PY=$PYTHON
elif [ -x "$VENV/bin/python" ] && ready "$VENV/bin/python"; then
  PY=$VENV/bin/python
else
  echo "setting up $VENV from PyPI" >&2
  "$PYTHON" -m venv "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch
  "$PY" -m pip install -q -e ".[bench]"
  ready "$PY" || { echo "$VENV cannot use $DEVICE with this tree's softprompt" >&2; exit 1; }
fi
"$PY" - <<'EOF'
import os, torch, transformers, peft, softprompt
device = torch.device(os.environ["DEVICE"])
print(f"GPU ({device}): {torch.cuda.get_device_name(device)}; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; softprompt from "
      f"{os.path.dirname(softprompt.__file__)}")
EOF

# 2. GPT-2 small, random weights, bfloat16 at load time.
[ -f "$MODEL_DIR/config.json" ] || "$PY" bench/make_gpt2.py "$MODEL_DIR" --tokenizer "$TOKENIZER"
COMMON=(--model "$MODEL_DIR" --device "$DEVICE" --dtype bfloat16)

# 3. Benchmark 1 (+2): 256 training examples (first of train.jsonl), batch 8, up to 512 text
#    tokens + 20 virtual tokens (the trainer's max_length 512), 3 timed epochs per method, steps interleaved.
"$PY" bench/train_throughput.py "${COMMON[@]}" --examples 256 --batch-size 8 --max-tokens 492 \
  --also-max-tokens 0 --step-tokens 512 --reps 3 --step-reps 10 --out bench/out/gpu-train.json

# 3b. The same with the trainer's --compile (ours only); a failure here does not stop the rest.
"$PY" bench/train_throughput.py "${COMMON[@]}" --examples 256 --batch-size 8 --max-tokens 492 \
  --also-max-tokens 0 --step-tokens 512 --reps 2 --step-reps 5 --compile \
  --out bench/out/gpu-train-compile.json || echo "--compile run failed (see above)" >&2

# 4. Benchmark 3: 64 test inputs of at most 512 tokens, batch 16, 60 new tokens, greedy.
"$PY" bench/eval_throughput.py "${COMMON[@]}" --examples 64 --batch-size 16 --max-tokens 512 \
  --max-new-tokens 60 --reps 3 --identity-examples 4 --out bench/out/gpu-eval.json

# 5. Benchmark 5: 64 requests over 8 prompts, ours (mixed batching) vs PEFT one adapter at a
#    time; a failure here does not stop the summary.
"$PY" bench/serve.py "${COMMON[@]}" --requests 64 --prompts 8 --max-new-tokens 32 --reps 3 \
  --out bench/out/gpu-serve.json || echo "serving benchmark failed (see above)" >&2

"$PY" - <<'EOF'
import json
t = json.load(open("bench/out/gpu-train.json"))
e = json.load(open("bench/out/gpu-eval.json"))["eval_throughput"]
tr, st = t["train_throughput"], t["step_over_forward"]
print("\n=== GPU summary (GPT-2 small, bf16) ===")
print(f"1 training: ours {tr['ours']['target_tokens_per_s']:.0f} target tok/s, PEFT (plain "
      f"shuffled DataLoader) {tr['peft']['target_tokens_per_s']:.0f} target tok/s -> "
      f"{tr['ratio']:.2f}x (goal >= {tr['goal']}, judged on this) {tr['verdict']}")
print(f"  PEFT fed our length-grouped batches "
      f"{tr['peft_length_grouped']['target_tokens_per_s']:.0f} target tok/s -> "
      f"{tr['ratio_vs_peft_length_grouped']:.2f}x (no goal)")
print(f"2 step / no-grad forward with full logits: {st['ratio']:.2f} (goal <= {st['goal']}, "
      f"judged on this) {st['verdict']}; PEFT {st['peft_ratio']:.2f}")
print(f"  step / no-grad base-model forward without the head (the floor): "
      f"{st['ratio_vs_forward_base']:.2f}; PEFT {st['peft_ratio_vs_forward_base']:.2f}")
for name, rate in e["examples_per_s"].items():
    extra = f", {e['new_tokens_per_s'][name]:.0f} new tok/s" if "new_tokens_per_s" in e else ""
    print(f"3 eval {name}: {rate:.2f} ex/s{extra}")
print(f"3 eval ratio vs {e['judged_against']}: {e['ratio']:.2f}x (goal >= {e['goal']}) "
      f"{e['verdict']}")
try:
    c = json.load(open("bench/out/gpu-train-compile.json"))
    print(f"with --compile: training {c['train_throughput']['ratio']:.2f}x PEFT (shuffled), "
          f"{c['train_throughput']['ratio_vs_peft_length_grouped']:.2f}x PEFT (length-grouped);"
          f" step / forward {c['step_over_forward']['ratio']:.2f} with logits, "
          f"{c['step_over_forward']['ratio_vs_forward_base']:.2f} without the head")
except (OSError, KeyError, ValueError):
    print("with --compile: no result")
EOF
