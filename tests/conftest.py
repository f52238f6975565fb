"""Shared tiny models and statistics helpers for the test suite."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jspec.models import ModelConfig, Transformer, causal_mask, init_cache

# A persistent compilation cache shared by the test processes (both xdist workers, the notebook
# kernels): many modules compile the same programs (the SmolLM2 decode loops above all), and a
# cache hit costs a fraction of a 30-layer compile. Keyed by the program, jax version and flags.
JAX_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
# The tests' programs are compile-bound (tiny models, few steps): XLA's backend optimisation level 0
# compiles them about 30% faster, and the SmolLM2 tests run no slower. Benchmarks never run under it.
# Set before jax initialises its backend; inherited by the notebook kernels and CLI subprocesses.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# Untied head and enlarged weights: tiny random models then produce varied, context-dependent text
# (a tied random model at standard init repeats one token, which would make greedy tests trivial).
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=False)


# Prompts for the retrieval strategies' greedy tests, ragged: rows that repeat themselves (a lookup
# finds what comes next) and rows that do not.
_rng = np.random.default_rng(0)
_base = _rng.integers(0, 64, (3, 6))
REPEATING_PROMPTS = np.concatenate([_base, _base, _base[:, :3]], 1).astype(np.int32)
PLAIN_PROMPTS = _rng.integers(0, 64, (3, 15)).astype(np.int32)
RAGGED_LENGTHS = np.array([15, 9, 12], np.int32)


def random_model(config: ModelConfig, seed: int, scale: float = 5.0) -> Transformer:
    """A random model whose matrices are `scale` times their initial size."""
    graph, state = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))
    state = jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, state)
    return nnx.merge(graph, state)


def perturbed(model: Transformer, noise: float, seed: int) -> Transformer:
    """`model` with Gaussian noise of relative size `noise` on every parameter: a drafter that
    agrees with the target often but not always."""
    graph, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + noise * x.std() * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graph, jax.tree.unflatten(treedef, leaves))


def assert_greedy_matches_target(target: Transformer, strategy, prompts, lengths, max_new_tokens: int = 20) -> None:
    """Greedy speculative decoding with `strategy` equals greedy `jspec.generate`, token for token,
    with a close (noise 0.3) and a poor (noise 1.0) perturbed drafter."""
    import jspec

    expected = jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=max_new_tokens)
    for noise in (0.3, 1.0):
        out = jspec.speculative_generate(
            target,
            perturbed(target, noise, seed=1),
            prompts,
            prompt_lengths=lengths,
            max_new_tokens=max_new_tokens,
            strategy=strategy,
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(expected.lengths))


@nnx.jit
def forward(model: Transformer, tokens, positions, mask, cache):
    """`model(tokens, positions, mask, cache)`, compiled once per shape (eager op-by-op dispatch
    of a whole transformer is slower than compiling it)."""
    return model(tokens, positions, mask, cache)


def causal_logits(model: Transformer, tokens) -> jax.Array:
    """Logits `[B, T, V]` of one causal pass over int tokens `[B, T]` from an empty cache: the
    reference every cached, chunked or tree-shaped pass (and every imported model) must match."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, _ = forward(model, tokens, positions, causal_mask(b, t), init_cache(model.config, b, t))
    return logits


def run_on_simulated_devices(script: str, devices: int, ok: str, timeout: int = 900) -> None:
    """Run tests/`script` in a fresh process whose JAX has `devices` simulated CPU devices (a
    process fixes its device count when its backend starts) and assert it printed `ok`."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(root / "tests" / script)], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0 and ok in result.stdout, result.stdout + result.stderr[-6000:]


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of integer `samples` against `probs`; bins expected below
    `min_expected` are pooled into one so the asymptotic distribution holds."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum()
    counts = np.bincount(np.asarray(samples).ravel(), minlength=len(probs)).astype(np.float64)
    expected = probs * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    if (counts[~keep] > 0).any():  # a zero-probability outcome occurred
        return 0.0
    return float(stats.chisquare(counts[keep], expected[keep]).pvalue)


# Test files that take a minute or more on one worker although they hold few tests (SmolLM2 or the
# notebooks; measured on the 2-core CI machine, cold compilation cache), heaviest first.
SLOW_FEW_TEST_FILES = (
    "test_infer.py",
    "test_notebooks.py",
    "test_train_scripts.py",
    "test_hf_compare.py",
    "test_readme.py",
    "test_sharding.py",
    "test_smollm2.py",
    "test_training_self_distill.py",
)


def pytest_configure(config):
    """Under `--dist loadfile` xdist hands out whole files, by default in order of their number of
    tests, which leaves the slow files above for last: then one worker runs them while the other
    idles. Hand them out first instead (`pytest_collection_modifyitems` orders them), so that the
    run ends on small files and both workers finish together."""
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The slow files above first, in that order, then the others by falling number of tests
    (xdist's own order); a file's tests keep their order."""
    rank = {name: i for i, name in enumerate(SLOW_FEW_TEST_FILES)}
    count: dict = {}
    for item in items:
        count[item.path] = count.get(item.path, 0) + 1
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path], first[item.path]))


@pytest.fixture(scope="session")
def tiny_target() -> Transformer:
    return random_model(TINY, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each program's code into
    memory separately (about 6 maps each), and the whole suite compiles enough programs to pass
    Linux's default limit of 65530 maps per process, where compilation aborts or segfaults."""
    yield
    jax.clear_caches()
