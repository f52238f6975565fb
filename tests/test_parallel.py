"""jspec.parallel: the drafter and the target on devices of their own. The decoding checks run on
2 simulated CPU devices in a subprocess (tests/parallel_decode_check.py), since this process's JAX
already has one device; the argument checks run here."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jspec.parallel import SEQUENTIAL, Placement, parallel_generate

from conftest import run_on_simulated_devices


@pytest.mark.slow
def test_parallel_decoding_on_2_devices():
    """Weights and caches on their own devices; SSD's output equals greedy decoding and the
    one-device run token for token at T=1; the T=1 law of the first 3 tokens holds."""
    run_on_simulated_devices("parallel_decode_check.py", 2, "PARALLEL DECODE OK")


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
