"""The train/ command lines run end to end and resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sysconfig

import numpy as np
from flax import nnx

import jspec
from train import demo_models, distill, pretrain, vocab_trim

FILES = [
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
    "keyword.py",
    "fnmatch.py",
    "shlex.py",
    "glob.py",
    "copy.py",
]


def _corpus(tmp_path) -> str:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path / "corpus"
    for name in FILES:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, target)
    return str(folder)


def test_pretrain_cli_trains_resumes_and_saves(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    common = [
        "--preset",
        "tiny",
        "--corpus",
        corpus,
        "--held-out-fraction",
        "0.3",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup-steps",
        "1",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "2",
        "--no-progress",
    ]
    full = pretrain.main(["--out", str(tmp_path / "full"), *common])
    assert [h["step"] for h in full["history"]] == [4, 8]

    out = str(tmp_path / "resumed")
    partial = pretrain.main(["--out", out, *common, "--stop-after", "5"])
    assert not (pathlib.Path(out) / "model").exists()  # unfinished: no final model yet
    assert [h["step"] for h in partial["history"]] == [4]
    resumed = pretrain.main(["--out", out, *common])
    assert "resumed from step 4" in capsys.readouterr().out
    assert resumed["history"] == full["history"]

    a, b = jspec.models.load(tmp_path / "full" / "model"), jspec.models.load(pathlib.Path(out) / "model")
    for x, y in zip(nnx.state(a).flat_state(), nnx.state(b).flat_state()):
        np.testing.assert_array_equal(x[1].get_value(), y[1].get_value())
    summary = json.loads((pathlib.Path(out) / "summary.json").read_text())
    assert summary["model_config"]["vocab_size"] == 512 and (pathlib.Path(out) / "tokenizer.json").exists()


def test_distill_cli_reports_agreement_and_resumes(tmp_path, capsys):
    from jspec.models import Transformer, preset
    from jspec.training.corpus import read_corpus
    from jspec.training.tokenizer import save_tokenizer, train_tokenizer
    from train import distill

    corpus = _corpus(tmp_path)
    save_tokenizer(train_tokenizer([d.text for d in read_corpus(corpus)], 512), tmp_path / "tok.json")
    jspec.models.save(Transformer(preset("tiny"), rngs=nnx.Rngs(0)), tmp_path / "target")
    small = dataclasses.replace(preset("tiny"), n_layers=1, d_model=32, d_ff=64)
    jspec.models.save(Transformer(small, rngs=nnx.Rngs(1)), tmp_path / "drafter")
    common = [
        "--target",
        str(tmp_path / "target"),
        "--drafter",
        str(tmp_path / "drafter"),
        "--tokenizer",
        str(tmp_path / "tok.json"),
        "--corpus",
        corpus,
        "--held-out-fraction",
        "0.3",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--prompt-len",
        "8",
        "--warmup-steps",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "3",
        "--data",
        "mix",
        "--k",
        "2",
        "--tau-prompts",
        "2",
        "--tau-new-tokens",
        "8",
        "--no-progress",
    ]
    out = str(tmp_path / "distilled")
    partial = distill.main(["--out", out, *common, "--stop-after", "4"])
    assert "after" not in partial
    summary = distill.main(["--out", out, *common])
    printed = capsys.readouterr().out
    assert "resumed from step 3" in printed and "after:" in printed
    assert [h["step"] for h in summary["history"]] == [3, 6]
    for key in ("alpha_t0", "alpha_t1", "tau_t0", "tau_t1"):
        assert 0 <= summary["after"][key] and summary["before"][key] >= 0
    assert jspec.models.load(pathlib.Path(out) / "model").config == small


def test_vocab_trim_cli_keeps_output_exact(tmp_path, capsys):
    from jspec.models import Transformer, preset
    from jspec.training.corpus import read_corpus
    from jspec.training.tokenizer import save_tokenizer, train_tokenizer
    from train import vocab_trim

    corpus = _corpus(tmp_path)
    save_tokenizer(train_tokenizer([d.text for d in read_corpus(corpus)], 512), tmp_path / "tok.json")
    target = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
    jspec.models.save(target, tmp_path / "target")
    jspec.models.save(Transformer(dataclasses.replace(preset("tiny"), n_layers=1), rngs=nnx.Rngs(1)), tmp_path / "drafter")
    report = vocab_trim.main(
        [
            "--target",
            str(tmp_path / "target"),
            "--drafter",
            str(tmp_path / "drafter"),
            "--tokenizer",
            str(tmp_path / "tok.json"),
            "--out",
            str(tmp_path / "trimmed"),
            "--keep",
            "128",
            "--corpus",
            corpus,
            "--held-out-fraction",
            "0.3",
            "--count-prompts",
            "4",
            "--count-new-tokens",
            "16",
            "--prompt-len",
            "8",
            "--k",
            "2",
            "--eval-prompts",
            "2",
            "--eval-new-tokens",
            "8",
            "--repeats",
            "1",
        ]
    )
    assert "measured speedup of the trimmed drafter" in capsys.readouterr().out
    saved = (512 - 128) * preset("tiny").d_model
    assert report["untrimmed"]["weights_read_per_token"] - report["trimmed"]["weights_read_per_token"] == saved
    assert (
        report["trimmed"]["mbsu_t0"] * report["untrimmed"]["tau_t0"]
        > report["untrimmed"]["mbsu_t0"] * report["trimmed"]["tau_t0"]
    )
    trimmed = jspec.models.load(tmp_path / "trimmed" / "model")
    assert trimmed.config.head_tokens == 128
    prompts = np.random.default_rng(0).integers(0, 512, (2, 8)).astype(np.int32)
    greedy = jspec.generate(target, prompts, max_new_tokens=12).tokens
    np.testing.assert_array_equal(jspec.speculative_generate(target, trimmed, prompts, max_new_tokens=12).tokens, greedy)


def test_demo_recipe_commands_parse():
    """Every training command of the demo recipe is valid for its script (a typo would otherwise
    surface only after an hour of training)."""
    parsers = {"train.pretrain": pretrain, "train.distill": distill, "train.vocab_trim": vocab_trim}
    for name in demo_models.RECIPE:
        cmd = demo_models.command(name, "runs")
        assert cmd[:2] == ["python", "-m"]
        args = parsers[cmd[2]].build_parser().parse_args(cmd[3:])
        assert args.out == f"runs/{name}"


def test_demo_export_copies_models_prompts_and_summaries(tmp_path):
    runs, demo_dir = tmp_path / "runs", tmp_path / "demo"
    (runs).mkdir()
    (runs / "tokenizer.json").write_text((jspec.demo.DEMO_DIR / "tokenizer.json").read_text())
    config = jspec.models.preset("tiny")
    for i, name in enumerate(demo_models.RECIPE):
        jspec.models.save(jspec.models.Transformer(config, rngs=nnx.Rngs(i)), runs / name / "model")
        (runs / name / "summary.json").write_text(json.dumps({"seed": i}))
    demo_models.export(str(runs), str(demo_dir), n_prompts=4)
    training = json.loads((demo_dir / "training.json").read_text())
    assert training["target"] == {"command": " ".join(demo_models.command("target", "runs")), "summary": {"seed": 0}}
    assert len(json.loads((demo_dir / "prompts.json").read_text())) == 4
    for name in jspec.demo.CODE_MODELS:
        assert jspec.models.load(demo_dir / "models" / name).config == config
