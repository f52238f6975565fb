"""The bundled demo models load, are trained, and decode losslessly with every drafter."""

from __future__ import annotations

import numpy as np
import pytest

import jspec
from jspec import demo
from jspec.training.corpus import _held_out
from jspec.training.pretrain import evaluate_covered
from jspec.training.tokenizer import EOS, eos_id


@pytest.fixture(scope="module")
def target():
    return demo.load("target")


@pytest.fixture(scope="module")
def prompts():
    return demo.encode_prompts(demo.prompts()[:4], length=32)


def test_tokenizer_round_trips_code():
    tok = demo.tokenizer()
    assert tok.get_vocab_size() == 8192
    assert tok.token_to_id(EOS) == eos_id(tok)
    for text in demo.prompts():
        assert tok.decode(tok.encode(text).ids) == text


def test_prompts_are_held_out_code():
    with open(demo.DEMO_DIR / "prompts.json") as f:
        records = __import__("json").load(f)
    assert len(records) >= 16
    # The split is a function of the file name alone (jspec.training.corpus), so this needs no corpus.
    assert all(_held_out(r["file"], 0.05, 0) for r in records)
    assert all(r["text"].endswith("\n") for r in records)


def test_encode_prompts_takes_the_last_tokens():
    texts = demo.prompts()[:3]
    out = demo.encode_prompts(texts, length=16)
    assert out.shape == (3, 16) and out.dtype == np.int32
    for text, row in zip(texts, out):
        assert demo.tokenizer().encode(text).ids[-16:] == row.tolist()
    with pytest.raises(ValueError, match="length"):
        demo.encode_prompts(texts, length=0)
    with pytest.raises(ValueError, match="texts\\[0\\]"):
        demo.encode_prompts(["x = 1\n"], length=64)


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="'drafter-huge'"):
        demo.load("drafter-huge")
    with pytest.raises(ValueError, match="name must be one of"):
        demo.card("nope")


def test_models_share_the_vocabulary(target):
    for name in demo.DRAFTERS:
        drafter = demo.load(name)
        assert drafter.config.vocab_size == target.config.vocab_size == 8192
    assert demo.load("drafter-trimmed").config.head_tokens < 8192
    assert demo.load("drafter").config.head_tokens is None


def test_models_are_trained(target, prompts):
    """Next-token loss on held-out code (64-token contexts) far below a random model's log(8192) = 9.0
    nats; the target better than every drafter; the trimmed head covers most positions.
    Measured on the bundled models: target 3.04, drafters 3.32 / 3.30."""
    batch = [np.asarray(prompts)]
    results = {name: evaluate_covered(demo.load(name) if name != "target" else target, batch) for name in demo.CODE_MODELS}
    losses = {name: loss for name, (loss, _) in results.items()}
    assert losses["target"] < 3.5, losses
    assert all(losses["target"] < losses[name] < 4.0 for name in ("drafter", "drafter-distilled")), losses
    assert results["drafter"][1] == 1.0 and 0.7 < results["drafter-trimmed"][1] < 1.0, results


@pytest.mark.parametrize("name", demo.DRAFTERS)
def test_greedy_speculative_equals_greedy_autoregressive(target, prompts, name):
    drafter = demo.load(name)
    ar = jspec.generate(target, prompts, max_new_tokens=48)
    spec = jspec.speculative_generate(target, drafter, prompts, max_new_tokens=48, strategy=jspec.Chain(k=4))
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(ar.lengths))
    # Trained models agree on much of the code: several tokens per target pass.
    assert float(spec.stats.mean_accepted) > 1.5


def test_cards_report_the_measurements():
    for name in demo.CODE_MODELS:
        card = demo.card(name)
        assert card.startswith(f"# jspec demo model: `{name}`")
        assert "Held-out loss" in card and "python -m train." in card
        if name != "target":
            assert "| 0 |" in card and "| 1 |" in card  # alpha/tau/speedup at T=0 and T=1


def test_the_hybrid_target_is_trained_and_decodes_losslessly_with_the_code_drafter(prompts):
    """The bundled hybrid (Mamba-2 and attention layers) target: better than chance on held-out
    code, and chain and tree speculation with the attention-only code drafter equal its greedy output."""
    hybrid = demo.load(demo.HYBRID)
    assert hybrid.config.mamba_layers and hybrid.config.attention_layers
    drafter = demo.load("drafter")
    ar = jspec.generate(hybrid, prompts[:2], max_new_tokens=32)
    for strategy in (jspec.Chain(k=3), jspec.StaticTree((2, 2, 1))):
        spec = jspec.speculative_generate(hybrid, drafter, prompts[:2], max_new_tokens=32, strategy=strategy)
        np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
        assert float(spec.stats.mean_accepted) > 1.5  # the drafter, trained on the same code, agrees often
    card = demo.card(demo.HYBRID)
    assert card.startswith(f"# jspec demo model: `{demo.HYBRID}`") and "python -m train.pretrain" in card
