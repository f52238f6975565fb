"""jspec.parallel: the drafter and the target on devices of their own. The decoding checks run on
2 simulated CPU devices in a subprocess (tests/parallel_decode_check.py), since this process's JAX
already has one device; the argument checks run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jspec.parallel import SEQUENTIAL, Placement, parallel_generate


@pytest.mark.slow
def test_parallel_decoding_on_2_devices():
    """Weights and caches on their own devices; SSD's output equals greedy decoding and the
    one-device run token for token (T=0 and T=1); the T=1 law of the first 3 tokens holds."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(root / "tests" / "parallel_decode_check.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "PARALLEL DECODE OK" in result.stdout, result.stdout + result.stderr[-6000:]


def test_a_placement_needs_two_devices_on_one_axis():
    with pytest.raises(ValueError, match="at least 2 devices"):
        Placement.two_devices(jax.devices()[:1])
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        Placement(Mesh(np.asarray(jax.devices()[:1]), ("stage",)))


def test_parallel_generate_takes_placed_models():
    with pytest.raises(ValueError, match="placed must be"):
        parallel_generate(object(), np.zeros((1, 4), np.int32), max_new_tokens=4, strategy=None)


def test_sequential_stages_run_in_place():
    assert SEQUENTIAL.on_target(lambda x: x + 1, 1) == 2
    assert SEQUENTIAL.on_drafter(lambda: 3) == 3
    assert SEQUENTIAL.share((1, 2)) == (1, 2)
