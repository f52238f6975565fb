"""jspec.verify.tree: every lossless tree verifier emits the target's distribution (chi-square on
random context-free problems over a tiny vocabulary), and the same test rejects a broken rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec.verify.tree as tree_verify
from jspec.trees import tree_from_parents
from jspec.verify.tree import TREE_VERIFIERS

from conftest import chi_square_pvalue

VOCAB = 5
TRIALS = 100_000
# Root 0 with children 1-3; node 1 has children 4, 5; node 2: 6, 7; node 3: 8, 9.
PARENT = np.asarray([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3], np.int32)
DEPTH = np.asarray([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])


def _problem(seed: int, root_support: int = VOCAB):
    """Context-free target and drafter: p and q depend only on the depth (0, 1, 2). With
    root_support < 3 the root's q (as after a top-k warp) has fewer tokens than the root has
    children, so Gumbel-top-k must name tokens q cannot draw."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(VOCAB, 0.8), size=3).astype(np.float32)
    q = rng.dirichlet(np.full(VOCAB, 0.8), size=3).astype(np.float32)
    q[0, root_support:] = 0.0
    return p, q / q.sum(axis=1, keepdims=True)


def _draft(kind: str, q: np.ndarray, seed: int) -> jax.Array:
    """Children tokens `[TRIALS, N]` of each node, drawn from q[depth(parent)] as `kind` says."""
    key = jax.random.key(seed)
    tokens = jnp.zeros((TRIALS, len(PARENT)), jnp.int32)
    for parent in range(4):
        children = np.flatnonzero(PARENT == parent)
        logq = jnp.log(jnp.asarray(q[DEPTH[parent]]))
        key, sub = jax.random.split(key)
        if kind == "iid":
            x = jax.random.categorical(sub, logq, shape=(TRIALS, len(children)))
        elif kind == "without_replacement":  # Gumbel-top-k
            x = jax.lax.top_k(logq + jax.random.gumbel(sub, (TRIALS, VOCAB)), len(children))[1]
        else:  # deterministic: the top-k of q
            x = jnp.broadcast_to(jax.lax.top_k(logq, len(children))[1], (TRIALS, len(children)))
        tokens = tokens.at[:, children].set(x.astype(jnp.int32))
    return tokens


def _run(name: str, drafts: str, seed: int = 0, root_support: int = VOCAB):
    p, q = _problem(seed, root_support)
    tokens = _draft(drafts, q, seed + 1)
    tree = tree_from_parents(tokens, jnp.broadcast_to(PARENT, tokens.shape), jnp.ones(tokens.shape, bool))
    target = jnp.broadcast_to(jnp.asarray(p[DEPTH]), (TRIALS, len(PARENT), VOCAB))
    draft = jnp.broadcast_to(jnp.asarray(q[DEPTH]), (TRIALS, len(PARENT), VOCAB))
    verify = TREE_VERIFIERS[name]
    verdict = jax.jit(lambda *args: verify(*args))(
        jax.random.key(seed + 2), tree, draft, target
    )  # traced anew: sees monkeypatches
    node = np.asarray(verdict.node)
    depth_1 = np.where(DEPTH[node] == 2, PARENT[node], node)  # the accepted path's node at depth 1
    tokens, accepted, nxt = np.asarray(tokens), np.asarray(verdict.accepted), np.asarray(verdict.next_token)
    rows = np.arange(TRIALS)
    first = np.where(accepted >= 1, tokens[rows, depth_1], nxt)
    second = np.where(accepted >= 2, tokens[rows, node], nxt)
    return p, accepted, first, second


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iid", "without_replacement", "deterministic"])
def test_tree_verifier_emits_the_target_distribution(name):
    p, accepted, first, second = _run(name, drafts=name)
    assert chi_square_pvalue(first, p[0]) > 1e-3
    assert chi_square_pvalue(second[accepted >= 1], p[1]) > 1e-3  # given a kept first draft
    assert 0.3 < np.mean(accepted >= 1) and np.mean(accepted == 2) > 0.01  # the trees are really used


@pytest.mark.slow
def test_children_outside_the_drafters_support_are_never_accepted():
    """Three children without replacement from a q with 2 tokens: the third is a token q gives 0
    (top_k of -inf), not a draw. Accepting it because the residual has mass there would bias the
    output; the rule must reject it and emit from the residual."""
    p, accepted, first, second = _run("without_replacement", drafts="without_replacement", root_support=2)
    assert chi_square_pvalue(first, p[0]) > 1e-3
    assert chi_square_pvalue(second[accepted >= 1], p[1]) > 1e-3


@pytest.mark.slow
def test_a_rule_without_the_residual_update_is_rejected(monkeypatch):
    """Negative control: after a rejected child, keep sampling from p_u instead of norm((p - q)+)."""
    monkeypatch.setattr(tree_verify, "residual", lambda r, q: r)
    p, _, first, _ = _run("iid", drafts="iid")
    assert chi_square_pvalue(first, p[0]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name, drafts", [("iid", "without_replacement"), ("iid", "deterministic")])
def test_a_rule_for_other_drafts_is_rejected(name, drafts):
    """Negative control: the i.i.d. rule is not lossless for children drawn without replacement or
    chosen by value, which is why those drafts have their own rules."""
    p, _, first, _ = _run(name, drafts=drafts)
    assert chi_square_pvalue(first, p[0]) < 1e-6


def test_greedy_tree_follows_the_target_argmax():
    p, q = _problem(3)
    tokens = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]], jnp.int32)
    tree = tree_from_parents(tokens, jnp.asarray(PARENT)[None], jnp.ones((1, len(PARENT)), bool))
    target = jnp.asarray(p[DEPTH])[None]
    verdict = TREE_VERIFIERS["greedy"](jax.random.key(0), tree, jnp.asarray(q[DEPTH])[None], target)
    # Walk by hand: the child of the current node whose token is the argmax of p at that depth.
    node, depth = 0, 0
    while True:
        want = int(np.argmax(p[depth]))
        match = [c for c in np.flatnonzero(PARENT == node) if int(tokens[0, c]) == want]
        if not match:
            break
        node, depth = match[0], depth + 1
    assert int(verdict.node[0]) == node and int(verdict.accepted[0]) == depth
    assert int(verdict.next_token[0]) == int(np.argmax(p[depth]))
