"""Argument checks for the decode entry points.

Everything here runs in Python before anything is traced or compiled and raises a `ValueError`
naming the argument and the bad value. Value checks (token ids, lengths) run only on concrete
arrays; inside a user's `jax.jit` the shapes and dtypes are still checked.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jspec.models import ModelConfig


def check_real(name: str, value, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    """`value` as a float if it is a finite real scalar (not a bool) in [low, high] ((low, high] with
    low_open); else a ValueError naming `name`."""
    ok = not isinstance(value, (bool, np.bool_)) and np.ndim(value) == 0
    if ok:
        try:
            ok = np.isrealobj(value) and isinstance(np.asarray(value).item(), numbers.Real)
            x = float(value) if ok else math.nan
        except (TypeError, ValueError):
            ok = False
    if not ok or not math.isfinite(x) or x < low or x > high or (low_open and x == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite real number in {bound}, got {value!r}")
    return x


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int, if it is an integer (not a bool) >= minimum; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _concrete(x) -> np.ndarray | None:
    """The value of x if it is known now (not a tracer) and readable here, else None.

    An array spanning other hosts' devices (multi-host sharding) cannot be read by one process;
    its values are checked by no one rather than gathered to every host.
    """
    if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return None
    return np.asarray(x)


def _integer_array(name: str, x, rank: int) -> jax.Array:
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
        raise ValueError(f"{name} must be an integer array, got {type(x).__name__}")
    if not (jnp.issubdtype(x.dtype, jnp.integer)) or x.dtype == bool:
        raise ValueError(f"{name} must have an integer dtype (int32), got dtype {x.dtype}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    return jnp.asarray(x, jnp.int32)


def check_prompts(prompts, prompt_lengths, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """prompts int `[B, P]` and prompt_lengths int `[B]` (None: every row full) -> int32 arrays."""
    prompts = _integer_array("prompts", prompts, 2)
    b, p = prompts.shape
    if b < 1 or p < 1:
        raise ValueError(f"prompts must have shape [B, P] with B, P >= 1, got {tuple(prompts.shape)}")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((b,), p, jnp.int32)
    else:
        prompt_lengths = _integer_array("prompt_lengths", prompt_lengths, 1)
        if prompt_lengths.shape[0] != b:
            raise ValueError(f"prompt_lengths must have shape [{b}] to match prompts, got {tuple(prompt_lengths.shape)}")
    lengths = _concrete(prompt_lengths)
    if lengths is not None and (lengths.min() < 1 or lengths.max() > p):
        bad = lengths[(lengths < 1) | (lengths > p)][0]
        raise ValueError(f"prompt_lengths must lie in [1, {p}] (the prompts' width), got {int(bad)}")
    tokens = _concrete(prompts)
    if tokens is not None:
        row_lengths = lengths if lengths is not None else np.full((b,), p)
        used = tokens[np.arange(p)[None, :] < row_lengths[:, None]]  # padding may hold anything
        if used.size and (used.min() < 0 or used.max() >= vocab_size):
            bad = used[(used < 0) | (used >= vocab_size)][0]
            raise ValueError(f"prompts hold token id {int(bad)} outside the vocabulary [0, {vocab_size})")
    return prompts, prompt_lengths


def check_budget(name: str, config: ModelConfig, prompt_width: int, max_new_tokens) -> None:
    """Prompt width plus max_new_tokens must fit the model's max_seq_len."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if prompt_width + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompts of width {prompt_width} plus max_new_tokens={max_new_tokens} need "
            f"{prompt_width + max_new_tokens} positions, more than the {name}'s max_seq_len={config.max_seq_len}"
        )


def check_vocab(target: ModelConfig, drafter: ModelConfig) -> None:
    if target.vocab_size != drafter.vocab_size:
        raise ValueError(
            f"drafter vocab_size={drafter.vocab_size} differs from the target's vocab_size={target.vocab_size}; "
            "speculative decoding needs distributions over the same tokens"
        )


def check_eos(eos_id, vocab_size: int) -> int:
    """eos_id: None or a token id. Returns -1 for None (never matches a token)."""
    if eos_id is None:
        return -1
    if isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab_size}), got {eos_id!r}")
    return int(eos_id)


def check_rng(rng, greedy: bool) -> jax.Array:
    """A typed PRNG key (or raw uint32 [2] key data); None only for greedy decoding."""
    if rng is None:
        if not greedy:
            raise ValueError("rng is required when sampling.temperature > 0, got None (pass jax.random.key(seed))")
        return jax.random.key(0)  # unused by greedy decoding
    if not hasattr(rng, "dtype"):
        raise ValueError(f"rng must be a JAX PRNG key, got {type(rng).__name__}")
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.ndim != 0:
            raise ValueError(f"rng must be a single key (shape ()), got shape {tuple(rng.shape)}")
        return rng
    if rng.dtype == jnp.uint32 and rng.shape == (2,):
        return jax.random.wrap_key_data(rng)
    raise ValueError(f"rng must be a JAX PRNG key, got an array of dtype {rng.dtype} and shape {tuple(rng.shape)}")
