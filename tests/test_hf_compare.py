"""infer.hf_compare: Hugging Face greedy and assisted generation emit exactly jspec's tokens on the
exported code models, the report holds every decoder's speed, and the default pair (SmolLM2 with
its untrimmed drafter) is one Hugging Face can run."""

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


def test_the_default_pair_is_smollm2_with_a_drafter_hugging_face_can_run():
    """The script's default models: SmolLM2 and its drafter with a full-vocabulary head. The
    four-decoder comparison itself runs here on the code models (above); SmolLM2's parity with
    transformers is tested in test_smollm2 and `untrim_drafter` in test_training_self_distill, so the
    SmolLM2 head-to-head (minutes of CPU: an export, two libraries' compilations) runs as the
    script, not as a test."""
    target, drafter = hf_compare.smollm2_pair()
    assert target.config.n_layers == 30 and drafter.config.head_tokens is None
    assert drafter.config.vocab_size == target.config.vocab_size
