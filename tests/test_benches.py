"""The benchmarks are deliverables: each script in bench/, run from the repo root as
bench/README.md says, prints ONE JSON object on its last stdout line with the keys that
README and the results table promise. Here each runs as a real subprocess at the smallest
settings its options allow (a few training steps, prompts and samples), in a scratch
GFN_HOME that sees the built demo model and nothing else of the developer's .gfn. The
figures are checked for sanity only (fractions in [0, 1], finite numbers), not for goals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_env(demo_model: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a bench run: GFN_HOME is a scratch home whose models/ holds a link
    to the built demo model (world.base_model.build returns a cached build as it is), so the
    bench store, runs and adapters land under tmp_path, as do temporary files (TMPDIR); no
    GFN_* setting of the developer's (GFN_STORE, GFN_REDIS_URL, ...) leaks in."""
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    (home / "models").mkdir(parents=True)
    (home / "models" / demo_model.name).symlink_to(demo_model.resolve(), target_is_directory=True)
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GFN_")}
    return env | {"GFN_HOME": str(home), "TMPDIR": str(scratch)}


def run_bench(env: dict[str, str], script: str, *args: str) -> dict:
    """`python bench/<script> args` from the repo root; its last stdout line, parsed."""
    done = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"bench/{script} exited {done.returncode}:\n{done.stderr[-6000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"bench/{script} printed nothing on stdout:\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict), lines[-1]
    return result


def used_bench_store(env: dict[str, str]) -> bool:
    """The bench store (bench/adapter_cache.py) is under the scratch home, not the developer's."""
    return any((Path(env["GFN_HOME"]) / "bench").glob("*/adapters"))


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fractions(table: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        assert is_number(table[key]) and 0 <= table[key] <= 1, f"{where}.{key}: {table[key]!r}"


def check_numbers(table: dict, keys: tuple[str, ...], where: str, low: float = -math.inf) -> None:
    for key in keys:
        assert is_number(table[key]) and table[key] >= low, f"{where}.{key}: {table[key]!r}"


def check_goals(result: dict, goals: set[str]) -> None:
    assert set(result["goals"]) == goals and all(isinstance(v, bool) for v in result["goals"].values()), \
        result["goals"]


@pytest.mark.slow
def test_base_model_bench_reports_build_size_perplexity_and_rng_bias(bench_env: dict[str, str], demo_model: Path):
    """`base_model.py --cached` reads the cached build (no rebuild) and reports its build time,
    size, per-section held-out perplexity and the bias of its random numbers."""
    result = run_bench(bench_env, "base_model.py", "--cached", "--samples", "200")
    assert result["cached"] is True and demo_model.name == f"demo-{result['digest']}"
    recorded = json.loads((demo_model / "world.json").read_text())
    assert result["build_seconds"] == recorded["build_seconds"] and result["parameters"] == recorded["parameters"]
    assert isinstance(result["parameters"], int) and result["parameters"] > 0
    perplexity = result["heldout_perplexity"]
    assert perplexity and set(perplexity) == set(result["heldout_lines"]), result
    check_numbers(perplexity, tuple(perplexity), "heldout_perplexity", low=1.0)
    assert result["rng_samples"] == 200
    check_fractions(result, ("rng_valid_fraction", "rng_tv_uniform"), "base_model")
    check_numbers(result, ("rng_kl_uniform",), "base_model", low=0.0)


@pytest.mark.slow
def test_rng_fidelity_bench_reports_adapter_base_rl_and_the_noise_floor(bench_env: dict[str, str]):
    """`rng_fidelity.py` trains the rng adapter and the RLOO baseline (two steps each here) on
    the target it is given and scores them, the base model and exact draws against it."""
    result = run_bench(bench_env, "rng_fidelity.py", "--target", "{kind: binomial, n: 99, p: 0.3}",
                       "--samples", "200", "--set", "steps=2", "--set", "samples_per_prompt=8")
    assert result["samples"] == 200 and result["target"]["kind"] == "binomial", result
    check_numbers(result, ("train_seconds",), "rng_fidelity", low=0.0)
    for method in ("adapter", "base", "rl"):
        check_fractions(result[method], ("tv", "valid_fraction"), method)
        check_numbers(result[method], ("kl",), method, low=0.0)
    check_fractions(result["exact_sample"], ("tv",), "exact_sample")
    check_numbers(result["exact_sample"], ("kl",), "exact_sample", low=0.0)


@pytest.mark.slow
def test_reasoning_bench_reports_accuracy_by_operand_count_for_every_method(bench_env: dict[str, str]):
    """`reasoning.py` trains gfn, rl and sft (two steps each here), then reports the vote
    accuracy of all five methods at 3, 4 and 5 operands, the weighted and single-rationale
    accuracies, the base model's diagnostics and the goals."""
    result = run_bench(bench_env, "reasoning.py", "--questions", "2", "--rationales", "2", "--sft-steps", "2",
                       "--set", "steps=2", "--set", "prompts_per_step=2", "--set", "samples_per_prompt=4")
    counts = ("3", "4", "5")
    assert result["questions"] == {c: 2 for c in counts} and result["rationales"] == 2, result
    check_numbers(result, ("train_seconds", "sft_train_seconds", "rl_train_seconds"), "reasoning", low=0.0)
    assert set(result["accuracy"]) == {"gfn", "sft", "fewshot", "direct", "rl"}
    for table in ("accuracy", "accuracy_weighted", "rationale_accuracy"):
        assert set(result[table]) >= {"gfn", "sft", "fewshot", "rl"}, result[table]
        for method, by_count in result[table].items():
            assert set(by_count) == set(counts), by_count
            check_fractions(by_count, counts, f"{table}.{method}")
    diagnostics = result["diagnostics"]
    check_fractions(diagnostics, ("base_reads_answer", "posterior_prefers_full"), "diagnostics")
    check_numbers(diagnostics, ("operand_log_prob",), "diagnostics")
    assert diagnostics["operand_log_prob"] <= 0 and diagnostics["chance_log_prob"] == round(-math.log(10), 3)
    check_goals(result, {"gfn_beats_sft_by_0.15_at_4_and_5", "gfn_beats_direct_and_fewshot"})
    assert used_bench_store(bench_env)


@pytest.mark.slow
def test_continuation_bench_reports_every_method_and_reuses_its_adapter(bench_env: dict[str, str]):
    """`continuation.py` reports log-likelihood and diversity for gfn and the four decoding
    baselines; a second run reuses the adapter the first trained (bench/adapter_cache.py)."""
    args = ("--prompts", "2", "--samples", "4", "--set", "steps=2")
    result = run_bench(bench_env, "continuation.py", *args)
    assert result["cached"] is False and result["prompts"] == 2 and result["samples"] == 4, result
    check_numbers(result, ("train_seconds", "temperature"), "continuation", low=0.0)
    assert set(result["methods"]) == {"gfn", "temperature", "nucleus", "beam", "diverse_beam"}
    for name, method in result["methods"].items():
        check_numbers(method, ("mean_loglik", "max_loglik"), name)
        assert method["mean_loglik"] <= method["max_loglik"] <= 0, method
        check_fractions(method, ("distinct2", "diversity"), name)
        check_numbers(method, ("seconds",), name, low=0.0)
    check_numbers(result["gfn_minus_temperature"], ("mean",), "gfn_minus_temperature")
    check_numbers(result["gfn_minus_temperature"], ("stderr",), "gfn_minus_temperature", low=0.0)
    check_goals(result, {"gfn_mean_loglik_above_temperature", "gfn_distinct2_above_beam"})
    again = run_bench(bench_env, "continuation.py", *args)
    assert again["cached"] is True and again["train_seconds"] == result["train_seconds"], again
    assert used_bench_store(bench_env)


@pytest.mark.slow
def test_infill_posterior_bench_reports_tv_and_ess_for_every_method(bench_env: dict[str, str]):
    """`infill_posterior.py` trains gfn and sft (two steps each here) and reports each method's
    distance to the exact posterior, ESS per second, BLEU-4 and distinct-2, with the
    sampling-noise floor."""
    result = run_bench(bench_env, "infill_posterior.py", "--prompts", "2", "--samples", "4", "--sft-steps", "2",
                       "--set", "steps=2")
    assert result["prompts"] == 2 and result["samples"] == 4, result
    check_numbers(result, ("train_seconds", "sft_train_seconds"), "infill", low=0.0)
    check_fractions(result, ("exact_sample_tv",), "infill")
    assert set(result["methods"]) == {"gfn", "prior", "prompted", "importance", "sft"}
    for name, method in result["methods"].items():
        check_fractions(method, ("tv", "bleu4", "distinct2", "off_support"), name)
        check_numbers(method, ("ess_per_second", "seconds"), name, low=0.0)
    check_goals(result, {"gfn_tv_at_most_0.15", "prior_tv_at_least_0.5", "gfn_ess_per_second_10x_importance"})
    assert used_bench_store(bench_env)


@pytest.mark.slow
def test_constrained_bench_reports_satisfaction_loglik_and_speed_for_every_method(bench_env: dict[str, str]):
    """`constrained.py` trains gfn (two steps here) and reports constraint satisfaction,
    log-likelihood, distinct-2 and sentences per second for gfn, rejection, mask and bias;
    rejection also its acceptance rate."""
    result = run_bench(bench_env, "constrained.py", "--prompts", "2", "--samples", "4", "--max-batches", "2",
                       "--set", "steps=2")
    assert result["prompts"] == 2 and result["samples"] == 4, result
    check_numbers(result, ("train_seconds",), "constrained", low=0.0)
    assert set(result["methods"]) == {"gfn", "rejection", "mask", "bias"}
    for name, method in result["methods"].items():
        check_numbers(method, ("samples_per_second",), name, low=0.0)
        if name != "rejection":  # every other method returns all it draws
            assert method["returned"] == method["drawn"] == 2 * 4, method
        if method["returned"] == 0:  # rejection accepted nothing: None, not a figure that reads as a score
            assert method["satisfaction"] is method["loglik"] is method["distinct2"] is None, method
            continue
        check_fractions(method, ("satisfaction", "distinct2"), name)
        check_numbers(method, ("loglik",), name)
        assert method["loglik"] <= 0, method
    check_fractions(result["methods"]["rejection"], ("acceptance_rate",), "rejection")
    check_numbers(result["methods"]["rejection"], ("seconds_per_accepted",), "rejection", low=0.0)
    check_goals(result, {"gfn_satisfaction_at_least_0.95", "gfn_loglik_within_2_nats_of_rejection",
                         "gfn_faster_than_rejection"})
    assert used_bench_store(bench_env)


@pytest.mark.slow
def test_cache_bench_reports_miss_and_hit_latency_against_a_real_redis(bench_env: dict[str, str]):
    """`cache.py` serves a reasoning adapter (trained two steps here) with a real redis-server
    and reports /reason p50 latency on a miss and on a hit, and their ratio."""
    result = run_bench(bench_env, "cache.py", "--questions", "2", "--rationales", "2", "--train-steps", "2")
    assert result["questions"] == 2 and result["n_rationales"] == 2 and result["engine"] == "transformers", result
    check_numbers(result, ("miss_p50_ms", "hit_p50_ms", "speedup"), "cache", low=0.0)
    assert result["hit_p50_ms"] > 0 and result["speedup"] > 0, result
    assert used_bench_store(bench_env)


@pytest.mark.slow  # vLLM's start takes most of a minute
def test_serve_load_bench_reports_throughput_for_both_engines_without_errors(bench_env: dict[str, str]):
    """`serve_load.py`, with its default engines, serves an infill adapter (trained one step
    here) and reports throughput, latency, errors and the raw and sequential references per
    engine: a handful of requests, every one answered."""
    result = run_bench(bench_env, "serve_load.py", "--requests", "4", "--n", "2", "--concurrency", "2",
                       "--sequential", "2", "--train-steps", "1")
    assert result["requests"] == 4 and result["n"] == 2 and result["concurrency"] == 2, result
    assert set(result["engines"]) == set(result["goals"]) == {"vllm", "transformers"}, result
    for engine, figures in result["engines"].items():
        assert figures["errors"] == 0, (engine, figures)
        check_numbers(figures, ("throughput_rps", "p50_ms", "p99_ms", "raw_rps", "sequential_rps"), engine, low=0.0)
        assert figures["p50_ms"] <= figures["p99_ms"] and figures["throughput_rps"] > 0, figures
        assert set(result["goals"][engine]) == {"throughput_vs_raw", "throughput_vs_sequential", "no_errors"}
    assert used_bench_store(bench_env)
