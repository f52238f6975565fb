"""infer.hf_compare: Hugging Face greedy and assisted generation emit exactly jspec's tokens on the
exported models (the code models, and SmolLM2 with its untrimmed drafter, float32), and the
report holds every decoder's speed."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from infer import hf_compare  # noqa: E402


def test_hugging_face_greedy_and_assisted_generation_equal_jspec(tmp_path, capsys):
    result = hf_compare.main(
        [
            "--models",
            "code",
            "--prompts",
            "2",
            "--max-new-tokens",
            "16",
            "--k",
            "3",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "hf.json"),
        ]
    )
    assert result["identical"] is True
    assert json.loads((tmp_path / "hf.json").read_text()) == result
    assert set(result["tokens_per_s"]) == {"hf_greedy", "hf_assisted", "jspec_greedy", "jspec_chain"}
    assert all(math.isfinite(v) and v > 0 for v in result["tokens_per_s"].values())
    assert 1 <= result["jspec_tau"] <= 4
    assert "all four decoders emitted identical tokens: True" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        hf_compare.main(["--k", "0"])


@pytest.mark.slow
def test_smollm2_head_to_head_in_float32(tmp_path):
    result = hf_compare.main(["--prompts", "1", "--max-new-tokens", "12", "--k", "3", "--repeats", "1"])
    assert result["identical"] is True and result["dtype"] == "float32"
    assert "untrim_drafter" in result["models"] and 1 <= result["jspec_tau"] <= 4
