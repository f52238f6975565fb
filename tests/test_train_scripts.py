"""The train/ command lines run end to end and resume."""

from __future__ import annotations

import json
import pathlib
import shutil
import sysconfig

import numpy as np
from flax import nnx

import jspec
from train import pretrain

FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py",
         "keyword.py", "fnmatch.py", "shlex.py", "glob.py", "copy.py"]


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
    common = ["--preset", "tiny", "--corpus", corpus, "--held-out-fraction", "0.3", "--steps", "8", "--batch-size", "2",
              "--seq-len", "32", "--warmup-steps", "1", "--eval-every", "4", "--eval-batches", "2",
              "--checkpoint-every", "2", "--no-progress"]
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
