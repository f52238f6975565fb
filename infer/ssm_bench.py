"""What speculation costs on a state-space or hybrid target (Mamba-2 layers): a tree pass against a
chain pass of the same size, and the two ways to recover the accepted path's SSM state.

    python -m infer.ssm_bench --json FILE [--target hybrid --drafter drafter] [--node-budgets 4 8 16]

Measured, each as the median of compiled loops (`infer.timing`), on the demo prompts:

    pass      t_target(1), and for each node budget N a chain pass over N tokens (causal mask)
              and a tree pass over an N-node tree (its ancestor mask). STree (arXiv 2505.14969)
              scores a tree in one pass; here the tree's pass computes what the chain's does.
    rollback  per round, over all Mamba-2 layers: "recompute", the state after the accepted path
              recomputed at commit from the committed state and the path's stored terms
              (`jspec.models.kv_cache.advance_ssm`, what jspec does), against "keep", every
              node's state computed during the pass and the accepted one selected
              (`jspec.models.mamba2.node_states`), with the memory each needs per row.

Chain and tree speculation themselves (tau, tokens/s, speedup over AR) are measured by
`python -m infer.bench --target hybrid` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.bench import machine
from infer.models import add_model_arguments, models_from_args, prompts_from_args
from infer.timing import forward_seconds, prefill_cache, time_calls
from jspec import demo
from jspec.decode import bucket_size
from jspec.models.kv_cache import SsmCache, advance_ssm
from jspec.models.mamba2 import node_states, window
from jspec.trees import Tree, tree_ancestor_mask, tree_from_parents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.ssm_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    add_model_arguments(parser)
    parser.set_defaults(target=None)  # the hybrid demo target, unless --preset
    parser.add_argument("--node-budgets", type=int, nargs="+", default=[4, 8, 16], help="tokens per pass N (default: 4 8 16)")
    parser.add_argument("--passes", type=int, default=32, help="passes per timed loop (default: 32)")
    parser.add_argument("--runs", type=int, default=7, help="timed loops per cost, median (default: 7)")
    return parser


def heap_tree(n: int, b: int) -> Tree:
    """An n-node binary tree (node i's parent (i - 1) // 2), the same in every row."""
    parents = jnp.asarray([-1] + [(i - 1) // 2 for i in range(1, n)], jnp.int32)
    parents = jnp.broadcast_to(parents, (b, n))
    return tree_from_parents(jnp.zeros((b, n), jnp.int32), parents, jnp.ones((b, n), bool))


@functools.partial(jax.jit, static_argnames=("passes",), donate_argnames=("ssm",))
def _recompute_loop(ssm: SsmCache, slots: jax.Array, n: jax.Array, passes: int) -> SsmCache:
    return jax.lax.fori_loop(0, passes, lambda _, s: advance_ssm(s, slots, n), ssm)


@functools.partial(jax.jit, static_argnames=("passes",), donate_argnames=("ssm",))
def _keep_loop(ssm: SsmCache, lengths: jax.Array, mask: jax.Array, node: jax.Array, passes: int) -> SsmCache:
    w, rows = mask.shape[-1], jnp.arange(mask.shape[0])

    def body(_, s):
        states = [
            node_states(
                window(s.log_decay[i], lengths, w), window(s.x[i], lengths, w), window(s.b[i], lengths, w), s.state[i], mask
            )[rows, node]
            for i in range(s.state.shape[0])
        ]
        return dataclasses.replace(s, state=jnp.stack(states))

    return jax.lax.fori_loop(0, passes, body, ssm)


def rollback_seconds(target, prompts: jax.Array, cache_size: int, tree: Tree, passes: int, runs: int) -> dict[str, float]:
    """Median seconds per round of "recompute" (a path as deep as the tree) and "keep" (every node's
    state, then the deepest node's), over all of the target's Mamba-2 layers."""
    graph, state = nnx.split(target)
    cache = prefill_cache(graph, state, prompts, cache_size)
    b, n = tree.tokens.shape
    deepest = jnp.argmax(tree.depth, axis=1)
    path_length = tree.depth[jnp.arange(b), deepest] + 1
    depth = int(path_length.max())
    slots = cache.lengths[:, None] + jnp.broadcast_to(
        jnp.arange(depth), (b, depth)
    )  # a path's slots (which ones does not matter)
    ssm = cache.ssm

    def recompute():
        nonlocal ssm
        ssm = _recompute_loop(ssm, slots, path_length, passes)
        return ssm.state

    recompute_s = statistics.median(time_calls(recompute, runs)[0]) / passes
    ssm = prefill_cache(graph, state, prompts, cache_size).ssm
    mask = tree_ancestor_mask(tree)

    def keep():
        nonlocal ssm
        ssm = _keep_loop(ssm, cache.lengths, mask, deepest, passes)
        return ssm.state

    keep_s = statistics.median(time_calls(keep, runs)[0]) / passes
    return {"recompute": recompute_s, "keep": keep_s}


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target is None:
        args.target = demo.SMOLLM2 if args.preset else demo.HYBRID  # models_from_args's "no --target"
    target, _, description = models_from_args(parser, args)
    cfg = target.config
    if not cfg.mamba_layers:
        parser.error(f"--target has no Mamba-2 layers (layer_types {cfg.layer_types})")
    prompts, prompts_description = prompts_from_args(parser, args, cfg.vocab_size)
    budgets = sorted(set(args.node_budgets))
    if budgets[0] < 2:
        parser.error(f"--node-budgets must be >= 2, got {budgets[0]}")
    cache_size = bucket_size(prompts.shape[1] + max(budgets))
    timing = dict(passes=args.passes, runs=args.runs)
    b = prompts.shape[0]
    per_node_state = len(cfg.mamba_layers) * cfg.ssm_heads * cfg.ssm_head_dim * cfg.ssm_state * 4  # float32 bytes
    per_token_terms = len(cfg.mamba_layers) * (cfg.ssm_heads * (cfg.ssm_head_dim + 1) + cfg.ssm_groups * cfg.ssm_state) * 4
    t1 = forward_seconds(target, prompts, cache_size, 1, **timing)
    result = {
        "machine": machine(),
        "models": description,
        "prompts": prompts_description,
        "layers": {"mamba": list(cfg.mamba_layers), "attention": list(cfg.attention_layers)},
        "t_target_1": t1,
        "rows": [],
    }
    print(f"t_target(1) {t1 * 1e3:.2f} ms  ({description.splitlines()[1]})")
    print("| N | chain pass | tree pass | tree / chain | chain / t(1) | recompute | keep | keep / recompute | keep memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in budgets:
        tree = heap_tree(n, b)
        chain_s = forward_seconds(target, prompts, cache_size, n, **timing)
        tree_s = forward_seconds(target, prompts, cache_size, n, tree=tree, **timing)
        rollback = rollback_seconds(target, prompts, cache_size, tree, **timing)
        row = {
            "nodes": n,
            "tree_depth": int(np.asarray(tree.depth).max()),
            "chain_pass": chain_s,
            "tree_pass": tree_s,
            "tree_over_chain": tree_s / chain_s,
            "chain_over_t1": chain_s / t1,
            "recompute": rollback["recompute"],
            "keep": rollback["keep"],
            "keep_over_recompute": rollback["keep"] / rollback["recompute"],
            "keep_bytes_per_row": n * per_node_state,
            "recompute_bytes_per_row": n * per_token_terms,
        }
        result["rows"].append(row)
        print(
            f"| {n} | {chain_s * 1e3:.2f} ms | {tree_s * 1e3:.2f} ms | {row['tree_over_chain']:.2f} | "
            f"{row['chain_over_t1']:.2f} | {rollback['recompute'] * 1e3:.3f} ms | {rollback['keep'] * 1e3:.3f} ms | "
            f"{row['keep_over_recompute']:.1f} | {row['keep_bytes_per_row'] / 1024:.0f} KiB |",
            flush=True,
        )
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
