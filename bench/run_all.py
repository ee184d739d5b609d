"""Run the five PEFT comparison benchmarks and summarise them: ``python bench/run_all.py``.

Each benchmark runs in its own process (bench/train_throughput.py for 1 and 2,
bench/eval_throughput.py for 3, bench/memory.py for 4, which starts one more process per
method, bench/serve.py for 5), prints its measurements and ratio, and writes
bench/out/<name>.json; this script then prints every ratio with its goal and PASS/FAIL and
writes bench/out/results.json.

A full run (not ``--quick``, not ``--no-record``) then appends its ratios, with the commit,
command, machine, date and load average, to bench/history.jsonl, and regenerates the headline
tables of BENCHMARKS.md from that history (bench/report.py: medians over the recorded runs).
About 10 minutes on a 2-core CPU; ``--quick`` is a smoke test with smaller sizes (its ratios
are not the benchmark's, and it records nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import report  # noqa: E402

HERE = Path(__file__).resolve().parent

QUICK = {
    "train_throughput.py": ["--examples", "8", "--reps", "1", "--step-reps", "1",
                            "--max-tokens", "64", "--also-max-tokens", "32",
                            "--step-tokens", "64", "--target-tokens", "16"],
    "eval_throughput.py": ["--examples", "4", "--batch-size", "2", "--max-new-tokens", "4",
                           "--reps", "1", "--identity-examples", "1"],
    "memory.py": ["--batch-size", "2", "--max-tokens", "64", "--target-tokens", "16"],
    "serve.py": ["--requests", "8", "--prompts", "4", "--max-new-tokens", "4", "--reps", "1"],
}


def run(script: str, out: Path, extra: list[str]) -> tuple[dict, float, str]:
    cmd = [sys.executable, str(HERE / script), "--out", str(out), *extra]
    shown = "python bench/" + script + "".join(" " + shlex.quote(a) for a in extra)
    common.say(f"\n$ {shown}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode})")
    return json.loads(out.read_text(encoding="utf-8")), time.perf_counter() - t0, shown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="skip the extra memory run of ours with gradient checkpointing")
    p.add_argument("--no-record", action="store_true",
                   help="do not append this run to bench/history.jsonl (e.g. a busy machine)")
    args = p.parse_args()
    command = " ".join(["python bench/run_all.py", *map(shlex.quote, sys.argv[1:])])
    commit = report.git_commit()
    out = common.OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = common.machine()
    common.say(f"commit {commit}; machine: {machine['cpu']} ({machine['cpu_count']} CPUs, "
               f"torch threads {machine['torch_threads']}, "
               f"OMP_WAIT_POLICY={machine['omp_wait_policy']}), "
               f"torch {machine['torch']}, transformers {machine['transformers']}, peft "
               f"{machine['peft']}; load average {machine['load_average_at_start']}")

    def extra(script: str, more: list[str] | None = None) -> list[str]:
        return (QUICK[script] if args.quick else []) + (more or [])

    train, t_train, c_train = run("train_throughput.py", out / "train.json",
                                  extra("train_throughput.py"))
    # The same with the trainer's --compile (ours only; PEFT stays eager): not a goal figure.
    compiled, _, c_compiled = run("train_throughput.py", out / "train_compile.json",
                                  extra("train_throughput.py",
                                        ["--compile", "--also-max-tokens", "0", "--reps", "2",
                                         "--step-reps", "3"]))
    evals, t_eval, c_eval = run("eval_throughput.py", out / "eval.json",
                                extra("eval_throughput.py"))
    memory, t_mem, c_mem = run("memory.py", out / "memory.json",
                               extra("memory.py", ["--compile"] + ([] if args.no_checkpointing
                                                    else ["--checkpointing"])))

    serve, t_serve, c_serve = run("serve.py", out / "serve.json", extra("serve.py"))

    figures = {
        "1_training_throughput": (train["train_throughput"], c_train, t_train,
                                  "ours / PEFT plain shuffled DataLoader, target tok/s", ">="),
        "2_step_over_forward": (train["step_over_forward"], c_train, t_train,
                                "our step / no-grad forward with full logits", "<="),
        "3_eval_throughput": (evals["eval_throughput"], c_eval, t_eval,
                              "ours / PEFT examples per second (identical outputs)", ">="),
        "4_step_peak_memory": (memory["memory"], c_mem, t_mem,
                               "ours / PEFT peak RSS increase of one step", "<="),
        "5_serving_throughput": (serve["serve_throughput"], c_serve, t_serve,
                                 "ours / PEFT one adapter at a time, requests per second", ">="),
    }
    results = {"command": command, "commit": commit, "quick": args.quick, "machine": machine,
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
               "seconds": round(time.perf_counter() - t0, 1), "figures": {}}
    common.say("\n=== summary " + ("(--quick: smoke-test sizes, not the benchmark) " if args.quick
                                  else "") + "=" * 40)
    for key, (res, cmd, secs, what, sign) in figures.items():
        results["figures"][key] = {"what": what, "ratio": round(res["ratio"], 3),
                                   "goal": f"{sign} {res['goal']}", "verdict": res["verdict"],
                                   "command": cmd, "script_seconds": round(secs, 1),
                                   "details": res}
        common.say(f"{key:24s} {res['ratio']:6.2f}  goal {sign} {res['goal']:<4}  "
                   f"{res['verdict']}   ({what})")
    extra_lines = []
    ev = evals["eval_throughput"]
    for name, base in ev["baselines"].items():
        extra_lines.append(f"  eval vs {name}: {base['ratio']:.2f}x, identical "
                           f"{base['identical']['all_rows'][0]}/{base['identical']['all_rows'][1]}"
                           f" rows, {base['identical']['batch_size_1'][0]}/"
                           f"{base['identical']['batch_size_1'][1]} at batch size 1")
    if "ceiling" in ev:
        extra_lines.append(f"  eval ceiling (ours at its GEMM time alone): "
                           f"{ev['ceiling']['ratio_if_only_gemm_cost_time']:.2f}x")
    if "ratio_with_compile" in memory["memory"]:
        extra_lines.append(f"  memory with --compile: "
                           f"{memory['memory']['ratio_with_compile']:.2f} of PEFT")
    if "ratio_with_checkpointing" in memory["memory"]:
        extra_lines.append(f"  memory with --gradient-checkpointing: "
                           f"{memory['memory']['ratio_with_checkpointing']:.2f} of PEFT")
    tt, st = train["train_throughput"], train["step_over_forward"]
    extra_lines.append(f"  training throughput ours / PEFT fed our length-grouped batches "
                       f"(PEFT's best case; no goal): {tt['ratio_vs_peft_length_grouped']:.2f}x")
    also = tt.get("also")
    if also:
        extra_lines.append(f"  training throughput with rows cut to {also['max_tokens']} "
                           f"tokens: {also['ratio']:.2f}x PEFT shuffled, "
                           f"{also['ratio_vs_peft_length_grouped']:.2f}x PEFT length-grouped")
    extra_lines.append(f"  our step / no-grad base-model forward without the head (the floor; "
                       f"no goal, the goal is judged on the forward with logits): "
                       f"{st['ratio_vs_forward_base']:.2f}")
    extra_lines.append(f"  PEFT step / no-grad forward: {st['peft_ratio']:.2f} with logits, "
                       f"{st['peft_ratio_vs_forward_base']:.2f} without the head")
    ct, cs = compiled["train_throughput"], compiled["step_over_forward"]
    extra_lines.append(f"  with --compile ({c_compiled}): training throughput "
                       f"{ct['ratio']:.2f}x PEFT shuffled, "
                       f"{ct['ratio_vs_peft_length_grouped']:.2f}x PEFT length-grouped; step / "
                       f"eager forward {cs['ratio']:.2f} with logits, "
                       f"{cs['ratio_vs_forward_base']:.2f} without the head")
    sv = serve["serve_throughput"]
    extra_lines.append(f"  serving: ours / ours with mixed batching off "
                       f"{sv['ratio_vs_unmixed']:.2f}x;"
                       f" PEFT outputs identical {serve['peft']['identical_to_ours'][0]}/"
                       f"{serve['peft']['identical_to_ours'][1]} (unpadded "
                       f"{serve['peft']['identical_unpadded_rows'][0]}/"
                       f"{serve['peft']['identical_unpadded_rows'][1]}); lone-request TTFT "
                       f"prefix recomputed / cached "
                       f"{serve['prefix_ttft']['ratio_recomputed_over_cached']:.2f}x")
    for line in extra_lines:
        common.say(line)
    results["notes"] = [line.strip() for line in extra_lines]
    results["ratios"] = report.figures_from_run(train, compiled, evals, memory, serve)
    common.write_json(out / "results.json", results)
    common.say(f"wrote {out / 'results.json'} ({results['seconds']:.0f}s)")
    if args.quick or args.no_record:
        common.say("not recorded in bench/history.jsonl ("
                   + ("--quick: smoke-test sizes" if args.quick else "--no-record")
                   + "); BENCHMARKS.md left as it is")
        return
    report.append_history({
        "date": machine["date"], "commit": commit, "command": command, "machine": machine,
        "load_average": {"start": machine["load_average_at_start"],
                         "end": results["load_average_at_end"]},
        "seconds": results["seconds"], "figures": results["ratios"],
        "checks": {"eval_outputs_match_where_unpadded": {
            name: base["outputs_match_where_unpadded"] for name, base in ev["baselines"].items()}},
        "source": "bench/run_all.py"})
    common.say(f"appended this run to {report.HISTORY}")
    report.main([])


if __name__ == "__main__":
    main()
