"""The demo scripts run end to end (on the tiny random preset, and on the bundled demo models) and
report what they promise."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

import jspec
from infer import bench, generate, methods
from infer.models import (
    CHAT_MODELS_NOTE,
    DEMO_MODELS_NOTE,
    RANDOM_MODELS_NOTE,
    Preset,
    random_models,
    random_target,
    truncated_drafter,
)

SIZES = ["--max-new-tokens", "8", "--batch-size", "2", "--prompt-len", "4", "--repeats", "1"]
COSTS = ["--cost-passes", "4", "--cost-runs", "2"]
SMALL_RUN = ["--preset", "tiny", *SIZES]


def test_generate_greedy_outputs_identical(capsys):
    result = generate.main([*SMALL_RUN, "--k", "2", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert result["identical"] is True
    assert "greedy outputs identical (all 2 rows): True" in printed
    assert RANDOM_MODELS_NOTE in printed
    assert result["tau"] >= 1
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in ("ar_tokens_per_s", "spec_tokens_per_s", "speedup"))


def test_generate_compares_target_dtypes_against_the_fastest_ar(capsys):
    result = generate.main([*SMALL_RUN, "--k", "2", "--compare-dtypes", "float32", "bfloat16"])
    printed = capsys.readouterr().out
    by_dtype = result["by_dtype"]["tokens_per_s"]
    assert list(by_dtype) == [(d, m) for d in ("float32", "bfloat16") for m in ("ar", "speculative")]
    assert all(math.isfinite(v) and v > 0 for v in by_dtype.values())
    assert result["by_dtype"]["identical"] == {"float32": True, "bfloat16": True}  # greedy: each dtype against its own AR
    fastest = max(by_dtype["float32", "ar"], by_dtype["bfloat16", "ar"])
    assert "target dtype comparison" in printed
    for (dtype, method), value in by_dtype.items():
        assert f"{dtype:9s} {method:12s} {value:8.1f} tokens/s  {value / fastest:.2f}x" in printed
    assert "greedy output identical to bfloat16 AR: True" in printed


def test_generate_with_a_tree_method(capsys):
    """--tree sequoia: the acceptance vector is measured on the prompts, then the DP tree decodes."""
    result = generate.main([*SMALL_RUN, "--tree", "sequoia", "--nodes", "5", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert result["identical"] is True
    assert "strategy SequoiaTree(" in printed


def test_generate_rejects_a_node_budget_the_tree_cannot_use():
    with pytest.raises(SystemExit):
        generate.main([*SMALL_RUN, "--tree", "eagle", "--nodes", "4"])


def test_generate_on_the_code_models_uses_code_prompts(capsys):
    result = generate.main(
        ["--target", "target", "--max-new-tokens", "16", "--batch-size", "2", "--prompt-len", "24", "--repeats", "1"]
    )
    printed = capsys.readouterr().out
    assert printed.startswith(DEMO_MODELS_NOTE)
    assert "drafter: drafter-distilled" in printed
    assert result["identical"] is True
    # The prompt is printed as text: the end of the first held-out snippet.
    assert jspec.demo.prompts()[0].splitlines()[-1] in printed


def test_generate_rejects_mixed_model_flags():
    with pytest.raises(SystemExit):
        generate.main(["--preset", "tiny", "--target", "a", "--drafter", "b"])


def test_generate_loads_checkpoints(tmp_path, capsys):
    target, drafter, _ = random_models(preset="tiny")
    jspec.models.save(target, tmp_path / "target")
    jspec.models.save(drafter, tmp_path / "drafter")
    result = generate.main([*SIZES, "--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter")])
    assert result["identical"] is True
    assert capsys.readouterr().out.startswith("models: checkpoints")


def _tiny_hf_checkpoints(directory: Path) -> list[str]:
    """A tiny random target and its truncated drafter as Hugging Face checkpoints, the target with
    the demo tokenizer's tokenizer.json; returns the --target/--drafter flags."""
    config = jspec.models.ModelConfig(
        vocab_size=8192, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=256, tie_embeddings=False
    )
    target = random_target(Preset(config, drafter_layers=1), seed=0)
    jspec.models.to_hf(target, directory / "target")
    jspec.models.to_hf(truncated_drafter(target, 1), directory / "drafter")
    jspec.demo.tokenizer().save(str(directory / "target" / "tokenizer.json"))
    return ["--target", str(directory / "target"), "--drafter", str(directory / "drafter")]


def test_generate_loads_hugging_face_checkpoints_and_their_tokenizer(tmp_path, capsys):
    result = generate.main([*SIZES, *_tiny_hf_checkpoints(tmp_path)])
    assert result["identical"] is True
    out = capsys.readouterr().out
    assert "encoded with" in out and "----- row 0, prompt -----" in out  # demo code prompts, decoded output


def test_bench_writes_records(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(
        [
            *SMALL_RUN,
            *COSTS,
            "--json",
            str(path),
            "--ks",
            "2",
            "--verifiers",
            "sampling",
            "--temperatures",
            "1",
            "--prompt-batches",
            "2",
            "--node-budgets",
            "3",
            "--trees",
            "specinfer",
            "sequoia",
            "--calibration-batches",
            "1",
        ]
    )
    records = json.loads(path.read_text())
    assert [r["method"] for r in records] == ["ar", "chain-sampling-k2", "specinfer-n3", "sequoia-n3"]
    numeric = [
        "temperature",
        "tau",
        "tokens_per_s",
        "speedup_vs_ar",
        "target_passes",
        "t_target_1_ms",
        "t_draft_ms",
        "theoretical_speedup",
        "achieved_over_theoretical",
    ]
    for record in records:
        for key in numeric:
            assert math.isfinite(record[key]), (record["method"], key)
        assert record["models"].startswith(RANDOM_MODELS_NOTE)
        assert record["machine"]
    ar, chain, tree, sequoia = records
    assert ar["speedup_vs_ar"] == 1.0
    assert ar["k"] is None and ar["tau"] == 1.0
    assert chain["k"] == 2 and chain["verifier"] == "sampling" and chain["nodes"] == 3
    assert 1 <= chain["tau"] <= 3
    assert tree["family"] == "tree" and tree["nodes"] == 3 and tree["strategy"].startswith("StaticTree")
    assert 1 <= tree["tau"] <= 2  # a (2,) tree emits at most 2 tokens per round
    assert sequoia["strategy"].startswith("SequoiaTree") and sequoia["nodes"] == 3 and 1 <= sequoia["tau"] <= 3
    assert ar["prompt_batches"] == 2 and ar["target_passes"] == 7.0  # per row: 8 tokens, the first from prefill
    assert "3 batch(es) of 2" in ar["prompts"] and "the last 1 calibrate Sequoia only" in ar["prompts"]
    assert math.isfinite(chain["t_verify_ms"]) and math.isfinite(tree["t_draft_round_ms"])
    assert "| chain-sampling-k2 |" in capsys.readouterr().out


def test_bench_reports_spec_bench_categories_acceptance_and_plots(tmp_path, capsys):
    lines = [
        {"question_id": 1, "category": "coding", "turns": ["def add(a, b):\n    return a + b\n\nprint(add("]},
        {"question_id": 2, "category": "coding", "turns": ["import os\nfor name in os.listdir('.'):\n"]},
        {"question_id": 3, "category": "coding", "turns": ["a third prompt, beyond --per-category"]},
        {"question_id": 4, "category": "writing", "turns": ["Write a short poem about the sea.", "A second turn."]},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = bench.main(
        [
            *SIZES,
            *COSTS,
            *_tiny_hf_checkpoints(tmp_path),
            "--json",
            str(tmp_path / "bench.json"),
            "--ks",
            "3",
            "--verifiers",
            "sampling",
            "--temperatures",
            "0",
            "--node-budgets",
            "--prompts-jsonl",
            str(tmp_path / "q.jsonl"),
            "--per-category",
            "2",
            "--plots",
            str(tmp_path / "plots"),
            "--dtypes",
            "float32",
            "bfloat16",
        ]
    )
    assert [(r["method"], r["dtype"]) for r in records] == [
        ("ar", "float32"), ("chain-sampling-k3", "float32"), ("ar", "bfloat16"), ("chain-sampling-k3", "bfloat16"),
    ]  # fmt: skip
    assert set(records[3]["by_category"]) == {"coding", "writing"} and 1 <= records[3]["tau"] <= 4
    ar, chain = records[:2]
    assert {c: v["rows"] for c, v in chain["by_category"].items()} == {"coding": 2, "writing": 1}
    assert ar["by_category"]["writing"]["speedup_vs_ar"] == 1.0 and ar["acceptance_by_position"] == []
    a = chain["acceptance_by_position"]
    assert 1 <= len(a) <= 3 and all(0 < x <= 1 for x in a) and a == sorted(a, reverse=True)
    # tau = 1 + the summed acceptance (every round emits one token past its accepted drafts)
    assert chain["tau"] == pytest.approx(1 + sum(a))
    for name in ("speedup.png", "acceptance.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "speedup over AR by prompt category" in out and "| chain-sampling-k3 | 0 |" in out


def test_rounds_at_least_counts_acceptance_by_position():
    emitted = [[1, 3, 2, 0], [4, 1, 0, 0]]  # 0: rounds after the row finished
    assert bench.rounds_at_least(emitted) == (5, 3, 2, 1)
    measured = bench.Measured(1.0, 10, 11, 5, 2, bench.rounds_at_least(emitted))
    assert measured.acceptance_by_position() == [3 / 5, 2 / 5, 1 / 5]


@pytest.mark.parametrize("budget", [3, 5, 9, 17])
def test_bench_builds_every_tree_method_at_exactly_its_node_budget(budget):
    """What `infer.bench --trees` runs: each tree strategy, scoring exactly `budget` nodes per round."""
    strategies = {
        name: methods.tree_method(name, budget, lambda width: (0.6, 0.3, 0.1)[:width]).strategy for name in methods.TREE_METHODS
    }
    assert {type(s).__name__ for s in strategies.values()} == {
        "StaticTree",
        "RSD",
        "SequoiaTree",
        "DynamicTree",
        "MultiCandidate",
        "EagleTree",
    }
    assert all(s.size == budget for s in strategies.values())
    assert strategies["rsd-s"].beam and strategies["rsd-c"].branching  # both RSD variants


def test_bench_rejects_a_node_budget_no_tree_fits():
    with pytest.raises(ValueError, match="node budget"):
        methods.tree_method("eagle", 8)


@pytest.mark.slow
def test_model_cards_measure_every_model(tmp_path):
    from infer import model_cards

    results = model_cards.main(
        [
            "--json",
            str(tmp_path / "cards.json"),
            "--cards",
            str(tmp_path / "cards"),
            "--prompts",
            "1",
            "--max-new-tokens",
            "8",
            "--repeats",
            "1",
            "--eval-batches",
            "1",
            "--alpha-batches",
            "1",
            "--bench",
            str(Path(__file__).parents[1] / "docs" / "bench_cpu_demo.json"),
        ]
    )
    assert json.loads((tmp_path / "cards.json").read_text()) == json.loads(json.dumps(results))
    for name in jspec.demo.CODE_MODELS:
        row = results["models"][name]
        assert math.isfinite(row["held_out_loss"]) and 0 < row["held_out_covered"] <= 1
        card = (tmp_path / "cards" / f"{name}.md").read_text()
        assert f"Held-out loss {row['held_out_loss']:.3f}" in card
        if name != "target":
            assert 0 <= row["alpha_t0"] <= 1 and 1 <= row["tau_t1"] <= 5
            assert f"| 1 | {row['alpha_t1']:.3f} | {row['tau_t1']:.2f} |" in card
    assert "## infer.bench" in (tmp_path / "cards" / "target.md").read_text()  # the bundled docs/bench_cpu_demo.json

    # --cards-only rewrites the cards from the JSON without measuring.
    (tmp_path / "cards" / "target.md").unlink()
    model_cards.main(["--json", str(tmp_path / "cards.json"), "--cards", str(tmp_path / "cards"), "--cards-only"])
    assert f"Held-out loss {results['models']['target']['held_out_loss']:.3f}" in (tmp_path / "cards" / "target.md").read_text()


# --- The SmolLM2 default (the README's demo command). -------------------------------------------


@pytest.mark.slow
def test_generate_defaults_to_smollm2_and_answers_a_chat_prompt(capsys):
    result = generate.main(["--max-new-tokens", "24", "--repeats", "1", "--prompt", "Name three fruits."])
    printed = capsys.readouterr().out
    assert printed.startswith(CHAT_MODELS_NOTE)
    assert "----- user -----\nName three fruits." in printed and "----- assistant (speculative) -----" in printed
    assert result["identical"] is True and result["tau"] >= 1


@pytest.mark.slow
def test_generate_interactive_streams_each_answer_and_reports_tau(monkeypatch, capsys):
    # The conversation is 257-320 tokens long at both turns (274 and about 300: a long first question,
    # short answers), one prompt-width bucket: the second turn reuses the first turn's compiled program.
    context = "I am painting the walls of a small room and cannot decide on the colour. " * 15
    turns = iter([context + "Name a colour.", "Name another one.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    generate.main(["--interactive", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.count("[tau ") == 2
    first_answer = out.split("assistant> ")[1].split("\n[tau")[0]
    assert first_answer.strip()  # the streamed text of the first answer


def test_interactive_needs_a_chat_target():
    with pytest.raises(SystemExit):
        generate.main([*SMALL_RUN, "--interactive"])


@pytest.mark.slow
def test_bench_on_smollm2_renders_chat_prompts_in_bfloat16(tmp_path):
    lines = [
        {"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea."]},
        {"question_id": 2, "category": "writing", "turns": ["beyond --per-category"]},
        {"question_id": 3, "category": "qa", "turns": ["What is the capital of Italy?"]},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = bench.main([
        "--json", str(tmp_path / "bench.json"), "--prompts-jsonl", str(tmp_path / "q.jsonl"), "--per-category", "1",
        "--ks", "2", "--verifiers", "sampling", "--temperatures", "0", "--node-budgets", "--max-new-tokens", "8",
        "--repeats", "1", "--dtypes", "bfloat16", "--cost-passes", "2", "--cost-runs", "1",
    ])  # fmt: skip
    assert [(r["method"], r["dtype"]) for r in records] == [("ar", "bfloat16"), ("chain-sampling-k2", "bfloat16")]
    assert records[0]["models"].startswith(CHAT_MODELS_NOTE) and "chat template" in records[0]["prompts"]
    assert set(records[1]["by_category"]) == {"writing", "qa"} and records[1]["rows"] == 2
    assert all(1 <= r["tau"] <= 3 and r["tokens_per_s"] > 0 for r in records)


def test_jsonl_prompts_of_chosen_categories_and_an_unknown_category_is_an_error(tmp_path):
    lines = [("rag", "r1"), ("qa", "q1"), ("rag", "r2"), ("summarization", "s1"), ("rag", "r3")]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"category": c, "turns": [t]}) for c, t in lines) + "\n")
    parser = argparse.ArgumentParser()
    path = str(tmp_path / "q.jsonl")
    assert bench.read_jsonl_prompts(parser, path, 2) == {"rag": ["r1", "r2"], "qa": ["q1"], "summarization": ["s1"]}
    chosen = bench.read_jsonl_prompts(parser, path, 5, ["summarization", "rag"])
    assert chosen == {"rag": ["r1", "r2", "r3"], "summarization": ["s1"]}
    with pytest.raises(SystemExit):
        bench.read_jsonl_prompts(parser, path, 1, ["rag", "math"])


def test_chat_batches_pad_to_a_bucket_of_at_least_min_width():
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(apply_chat_template=lambda messages: list(range(len(messages[0]["content"]))))
    texts = {"qa": ["a" * 70, "b" * 10], "rag": ["c" * 300]}
    widths = lambda **kw: [b.prompts.shape[1] for b in bench.chat_batches(tokenizer, texts, 1, 1000, None, **kw)]  # noqa: E731
    assert widths() == [80, 64, 320]  # jspec.decode.bucket_size, at least 64
    assert widths(min_width=256) == [256, 256, 320]


def test_measure_interleaved_times_every_method_on_each_batch_in_turn():
    from types import SimpleNamespace

    calls = []

    def method(name, emitted):
        def fn(batch):
            calls.append((name, batch.category, batch.shape))
            stats = SimpleNamespace(emitted_per_round=np.array([[emitted, 1]]), target_passes=np.array([2]))
            return SimpleNamespace(lengths=np.array([emitted + 1]), stats=stats)

        return fn

    prompts = lambda width: np.zeros((1, width), np.int32)  # noqa: E731
    batches = [
        bench.Batch(prompts(4), np.array([4]), "qa"),
        bench.Batch(prompts(4), np.array([3]), "qa"),
        bench.Batch(prompts(8), np.array([8]), "rag"),
    ]
    lines = []
    out = bench.measure_interleaved({"ar": method("ar", 1), "x": method("x", 3)}, batches, repeats=2, progress=lines.append)
    # Per batch: a compiling call of each method for a new shape, then the methods in turn, twice.
    qa, rag = [("ar", "qa", (1, 4)), ("x", "qa", (1, 4))], [("ar", "rag", (1, 8)), ("x", "rag", (1, 8))]
    assert calls == qa * 3 + qa * 2 + rag * 3
    assert list(out) == ["ar", "x"] and list(out["x"]) == ["qa", "rag"] and len(lines) == 3
    assert (out["x"]["qa"].tokens, out["x"]["qa"].emitted, out["x"]["qa"].passes, out["x"]["qa"].rows) == (8, 8, 4, 2)
    assert out["x"]["qa"].tau == 2.0 and out["ar"]["rag"].tokens == 2 and out["x"]["rag"].seconds >= 0


def test_retrieval_bench_writes_a_record_per_method_and_temperature(tmp_path):
    from infer import retrieval_bench
    from train import datastore as datastore_cli

    lines = [{"question_id": i, "category": c, "turns": [t]} for i, (c, t) in enumerate([("rag", "a b a b a b"), ("qa", "x y")])]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    np.save(tmp_path / "corpus.npy", np.arange(200, dtype=np.int32) % 37)
    datastore_cli.main(["--tokens", str(tmp_path / "corpus.npy"), "--out", str(tmp_path / "ds")])
    records = retrieval_bench.main([
        "--target", "target", "--json", str(tmp_path / "r.json"), "--prompts-jsonl", str(tmp_path / "q.jsonl"),
        "--datastore", str(tmp_path / "ds"), "--max-new-tokens", "6", "--temperatures", "1",
        "--methods", "pld-k4", "rest-n8", "adaptive-k4", "smartspec-k4",
    ])  # fmt: skip
    methods = [("ar", 1.0), ("pld-k4", 1.0), ("rest-n8", 1.0), ("adaptive-k4", 1.0), ("smartspec-k4", 1.0)]
    assert [(r["method"], r["temperature"]) for r in records] == methods
    # The adaptive strategies' chosen k: one count per round of each of the 2 prompts (batches of 1).
    for adaptive, ks in zip(records[-2:], (["1", "2", "3", "4"], ["0", "1", "2", "3", "4"])):
        assert list(adaptive["rounds_per_k"]) == ks
        assert sum(adaptive["rounds_per_k"].values()) == round(2 * adaptive["target_passes"])
    assert all("rounds_per_k" not in r for r in records[:-2])
    assert json.loads((tmp_path / "r.json").read_text()) == records
    for r in records:
        assert set(r["by_category"]) == {"rag", "qa"} and r["tokens_per_s"] > 0 and r["target_passes"] > 0
        assert 1 <= r["tau"] <= 9 and r["costs_ms"]["t_target_1"] > 0
        assert all(r["by_category"][c]["prefill_s"] > 0 for c in ("rag", "qa")) and "decode_speedup_vs_ar" in r
    assert records[0]["decode_speedup_vs_ar"] in (1.0, None)


def test_decoding_alone_subtracts_each_categorys_prefill():
    from infer.bench import Measured
    from infer.retrieval_bench import decode_rate

    by_category = {"a": Measured(3.0, 20, 0, 0, 1), "b": Measured(2.0, 10, 0, 0, 1)}
    assert decode_rate(by_category, {"a": 1.0, "b": 1.5}) == 30 / 2.5
    assert decode_rate({"a": Measured(1.0, 5, 0, 0, 1)}, {"a": 1.0}) is None  # no decoding time left


def test_ssm_bench_times_tree_and_chain_passes_and_both_rollbacks(tmp_path, capsys):
    from infer import ssm_bench

    result = ssm_bench.main(
        ["--json", str(tmp_path / "ssm.json"), "--preset", "hybrid-tiny", "--node-budgets", "4", "--passes", "2", "--runs", "1"]
    )
    assert json.loads((tmp_path / "ssm.json").read_text()) == json.loads(json.dumps(result))
    assert result["layers"] == {"mamba": [1, 2], "attention": [0]}
    (row,) = result["rows"]
    assert row["nodes"] == 4 and row["tree_depth"] == 2  # a binary tree of 4 nodes
    for key in ("chain_pass", "tree_pass", "recompute", "keep"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["keep_bytes_per_row"] > row["recompute_bytes_per_row"]
    assert "| 4 |" in capsys.readouterr().out


def test_ssm_bench_needs_a_target_with_mamba_layers(tmp_path):
    from infer import ssm_bench

    with pytest.raises(SystemExit):
        ssm_bench.main(["--json", str(tmp_path / "x.json"), "--preset", "tiny"])


def test_serve_bench_measures_every_method_at_every_concurrency(tmp_path):
    from infer import serve_bench

    records = serve_bench.main([
        "--preset", "tiny", "--json", str(tmp_path / "s.json"), "--concurrency", "2", "--max-new-tokens", "6",
        "--max-len", "64", "--min-requests", "3", "--requests-per-client", "1", "--plots", str(tmp_path / "plots"),
    ])  # fmt: skip
    assert [(r["method"], r["concurrency"]) for r in records] == [("ar", 2), ("chain", 2), ("smartspec", 2)]
    assert json.loads((tmp_path / "s.json").read_text()) == records
    for r in records:
        # 2 clients, at least 3 requests: 2 each, 6 tokens per request.
        assert r["requests"] == 4 and r["completion_tokens"] == 24 and r["tokens_per_second"] > 0
        assert r["ttft_ms"]["p50"] > 0 and r["outputs_equal_first"]  # greedy: every method's outputs are AR's
        assert r["speedup"] > 0 and 1 <= r["tau"] <= 3
    smartspec = [r for r in records if r["method"] == "smartspec"]
    assert all(sum(r["rounds_per_k"]) > 0 and r["predicted_speedup"] > 0 and len(r["round_ms"]) == 4 for r in smartspec)
    assert (tmp_path / "plots" / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_bench_divides_by_ar_s_mean():
    from infer.serve_bench import add_speedups

    records = [
        {"method": m, "concurrency": c, "pass": p, "tokens_per_second": t}
        for c, p, m, t in [
            (2, 0, "ar", 10.0),
            (2, 0, "smartspec", 12.0),
            (2, 1, "smartspec", 9.0),
            (2, 1, "ar", 8.0),
            (4, 0, "chain", 5.0),
        ]
    ]
    add_speedups(records)
    assert [r.get("speedup") for r in records] == [10 / 9, 12 / 9, 1.0, 8 / 9, None]  # over AR's mean, 9; none without AR
    assert records[1]["mean_speedup"] == records[2]["mean_speedup"] == 10.5 / 9


def test_serve_bench_warms_up_every_width_a_drafter_restart_can_take():
    """A SmartSpec row restarted mid-request restarts on its prompt and output: the widths up to
    the longest prompt plus max_new_tokens are compiled before the timing, not during it."""
    from infer.serve_bench import warm_up
    from jspec.serve import Engine

    class Recorder:
        slots, max_len, completions = 1, 512, {}
        prompt_width = Engine.prompt_width

        def warm_up(self, widths):
            self.widths = widths

        def submit(self, prompt, **kwargs):
            pass

        def run(self):
            pass

    engine = Recorder()
    warm_up(engine, [[1] * 20, [1] * 40], eos_id=None, max_new_tokens=64)
    assert engine.widths == {32, 64, 128}  # prompts of 20 and 40 tokens, then up to 103 tokens


def test_cpu_model_names_the_cpu_and_the_dtype_relevant_features(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 avx512f amx_bf16\n"
    )
    described = bench.cpu_model(str(cpuinfo))
    assert described.startswith("Example CPU (")
    assert "avx2, avx512f, amx_bf16" in described and "avx512_bf16" not in described
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert "none of avx2/avx512f/avx512_bf16/amx_bf16" in bench.cpu_model(str(cpuinfo))
    assert bench.cpu_model(str(tmp_path / "missing"))  # not Linux: the architecture
