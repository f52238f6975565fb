"""The demo scripts run end to end on the tiny random preset and report what they promise."""

import json
import math

import jspec
from infer import bench, generate
from infer.models import RANDOM_MODELS_NOTE, default_models

SMALL_RUN = ["--preset", "tiny", "--max-new-tokens", "8", "--batch-size", "2", "--prompt-len", "4", "--repeats", "1"]


def test_generate_greedy_outputs_identical(capsys):
    result = generate.main([*SMALL_RUN, "--k", "2", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert result["identical"] is True
    assert "greedy outputs identical (all 2 rows): True" in printed
    assert RANDOM_MODELS_NOTE in printed
    assert result["tau"] >= 1
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in ("ar_tokens_per_s", "spec_tokens_per_s", "speedup"))


def test_generate_loads_checkpoints(tmp_path, capsys):
    target, drafter, _ = default_models(preset="tiny")
    jspec.models.save(target, tmp_path / "target")
    jspec.models.save(drafter, tmp_path / "drafter")
    result = generate.main([*SMALL_RUN, "--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter")])
    assert result["identical"] is True
    assert capsys.readouterr().out.startswith("models: checkpoints")


def test_bench_writes_records(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main([
        *SMALL_RUN, "--json", str(path), "--ks", "2", "--verifiers", "sampling", "--temperatures", "1",
    ])
    records = json.loads(path.read_text())
    assert [r["method"] for r in records] == ["ar", "chain-sampling-k2"]
    numeric = [
        "temperature", "tau", "tokens_per_s", "speedup_vs_ar", "target_passes", "t_target_1_ms", "t_draft_ms",
        "theoretical_speedup", "achieved_over_theoretical",
    ]
    for record in records:
        for key in numeric:
            assert math.isfinite(record[key]), (record["method"], key)
        assert record["models"].startswith(RANDOM_MODELS_NOTE)
        assert record["machine"]
    ar, chain = records
    assert ar["speedup_vs_ar"] == 1.0
    assert ar["k"] is None and ar["tau"] == 1.0
    assert chain["k"] == 2 and chain["verifier"] == "sampling"
    assert 1 <= chain["tau"] <= 3
    assert math.isfinite(chain["t_target_k1_ms"])
    assert "| chain-sampling-k2 |" in capsys.readouterr().out
