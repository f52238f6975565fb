"""A retrieval datastore for REST (He et al., "REST: Retrieval-Based Speculative Decoding",
arXiv 2311.08252): a suffix array over a token corpus, searched on device, and the candidate token
tree it drafts.

The index. Documents are concatenated, each followed by the separator id -1, into `corpus` `[T]`;
`suffixes` `[S]` holds every position whose token is not the separator, sorted by the corpus read
from that position. The sort looks at the first `key_length` tokens only, the separator sorting
before every token and everything after a separator (or past the corpus end) reading as the
separator, so no key crosses a document boundary; ties keep position order (deterministic).
The occurrences of any token string of length <= key_length then form one contiguous range
`[lo, hi)` of `suffixes`, and a string extended by one token narrows its parent's range.

The search (`match_range`) is the `searchsorted` of that lexicographic index: for each query
position d it narrows `[lo, hi)` to the suffixes whose token at offset d equals the query's, with a
lower-bound and an upper-bound binary search of a fixed number of steps (ceil(log2(S + 1)), static)
over the gathered token `corpus[suffixes[j] + d]`. Everything is static-shaped and jit-compatible,
and the datastore is an argument (a pytree), never a compile-time constant.

Drafting (`retrieve`), per row, as in REST: the longest suffix of the context (at most
`max_context` tokens) that occurs in the corpus followed by at least one token; up to
`max_occurrences` of its occurrences (evenly spaced over the suffix-array range when there are
more, so frequent continuations stay frequent); their next `depth` tokens form a trie. Every trie
node gets its exact count, the size of the range of matched suffix + node path (one more narrowing
per level, so counts do not depend on the sampling), and the root plus the `size - 1` nodes of
highest count become a static-shape `jspec.trees.tree.Tree` for the target to verify.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import tempfile
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jspec.trees.tree import Tree

SEPARATOR = -1  # follows every document; sorts before every token id
FORMAT_VERSION = 1  # of the saved .npz


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Datastore:
    """corpus: int32 `[T]` (documents, each followed by SEPARATOR); suffixes: int32 `[S]` (the
    non-separator positions, sorted by their first `key_length` tokens; see the module docstring).

    `key_length` is static: it bounds the length of a query (`match_range`) and of matched suffix +
    drafted path (`retrieve`). Built with numpy arrays; `jax.device_put(datastore)` once keeps it
    on device between calls.
    """

    corpus: jax.Array
    suffixes: jax.Array
    key_length: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        """T, the corpus length (separators included)."""
        return int(self.corpus.shape[0])

    @property
    def num_suffixes(self) -> int:
        """S, the indexed positions (the corpus less its separators)."""
        return int(self.suffixes.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetrievedTree:
    """A drafted token tree with the corpus counts of its nodes.

    tokens, parent, depth, count: int32 `[B, N]`; valid: bool `[B, N]`; matched: int32 `[B]`.
    Node 0 is the root, the row's last context token; parents precede children, nodes are ordered
    by depth then by path (lexicographic). count[b, i] is how many corpus positions continue the
    matched suffix with node i's path (the root's: occurrences of the matched suffix; 0 for
    invalid nodes and for the root of a row with no match). matched[b] is the length of the
    matched context suffix (0: none, only the root is valid). Invalid nodes: token 0, parent -1,
    depth 0.
    """

    tokens: jax.Array
    parent: jax.Array
    depth: jax.Array
    valid: jax.Array
    count: jax.Array
    matched: jax.Array

    @property
    def tree(self) -> Tree:
        """The `jspec.trees.tree.Tree` (tokens, parent, depth, valid)."""
        return Tree(self.tokens, self.parent, self.depth, self.valid)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Building (numpy, host)


def _sort_keys(corpus: np.ndarray, positions: np.ndarray, key_length: int) -> list[np.ndarray]:
    """uint64 sort keys of `positions`, most significant first, packing several key tokens per word.

    A token reads as id + 1 and the separator (and everything after it) as 0, so the separator
    sorts first; packing big-endian keeps word order = lexicographic order while cutting the
    number of lexsort passes (16 tokens of a 49k vocabulary: 4 words instead of 16 columns).
    """
    bits = max(1, int(corpus.max(initial=0) + 1).bit_length())
    per_word = 64 // bits
    padded = np.concatenate([corpus, np.full(key_length, SEPARATOR, corpus.dtype)])
    ended = np.zeros(positions.shape, bool)
    words = []
    for start in range(0, key_length, per_word):
        word = np.zeros(positions.shape, np.uint64)
        for d in range(start, min(start + per_word, key_length)):
            token = padded[positions + d]
            ended |= token < 0
            word = (word << np.uint64(bits)) | np.where(ended, 0, token + 1).astype(np.uint64)
        words.append(word)
    return words


def build_datastore(documents: Iterable, *, key_length: int = 16) -> Datastore:
    """A `Datastore` over `documents`, an iterable of 1-D integer arrays of token ids (>= 0).

    Empty documents are skipped. Host-side numpy: one stable `np.lexsort` over packed keys
    (about 5 s for 3M tokens). Raises ValueError for a negative id, a non-1-D document, an empty
    corpus or a bad key_length.
    """
    key_length = _check_int("key_length", key_length, 1)
    parts = []
    for i, document in enumerate(documents):
        document = np.asarray(document)
        if document.ndim != 1 or not (np.issubdtype(document.dtype, np.integer) or document.size == 0):
            raise ValueError(f"documents[{i}] must be a 1-D integer array, got shape {document.shape} dtype {document.dtype}")
        if document.size == 0:
            continue
        if document.min() < 0:
            raise ValueError(f"documents[{i}] holds a negative token id {int(document.min())}; ids must be >= 0")
        if document.max() >= np.iinfo(np.int32).max:
            raise ValueError(f"documents[{i}] holds token id {int(document.max())}, too large for int32")
        parts += [document.astype(np.int32), np.array([SEPARATOR], np.int32)]
    if not parts:
        raise ValueError("the corpus is empty: no document holds a token")
    corpus = np.concatenate(parts)
    if corpus.size + key_length >= np.iinfo(np.int32).max:
        raise ValueError(f"the corpus has {corpus.size} tokens, too many for int32 positions")
    positions = np.flatnonzero(corpus >= 0).astype(np.int64)
    keys = _sort_keys(corpus, positions, key_length)
    order = np.lexsort(keys[::-1])  # lexsort's last key is the primary one; stable, so ties keep position order
    return Datastore(corpus=corpus, suffixes=positions[order].astype(np.int32), key_length=key_length)


def save_datastore(datastore: Datastore, path: str | os.PathLike) -> None:
    """Write `datastore` to the file `path` (an uncompressed .npz: corpus, suffixes, key_length).

    Written under a temporary name in the same directory and then linked into place, so an
    interrupted save leaves no partial file and an existing `path` is never replaced (ValueError).
    """
    path = os.fspath(path)
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; refusing to overwrite it")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                corpus=np.asarray(datastore.corpus, np.int32),
                suffixes=np.asarray(datastore.suffixes, np.int32),
                key_length=np.int64(datastore.key_length),
                format_version=np.int64(FORMAT_VERSION),
            )
        try:  # link fails if path appeared meanwhile: no-overwrite without a race
            os.link(partial, path)
        except FileExistsError:
            raise ValueError(f"{path} already exists; refusing to overwrite it") from None
        except OSError:  # a filesystem without hard links
            if os.path.exists(path):
                raise ValueError(f"{path} already exists; refusing to overwrite it") from None
            os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def load_datastore(path: str | os.PathLike) -> Datastore:
    """The `Datastore` saved at `path` by `save_datastore` (a directory: its datastore.npz), as
    numpy arrays."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "datastore.npz")
    with np.load(path, allow_pickle=False) as f:
        version = int(f["format_version"]) if "format_version" in f.files else None
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} is not a datastore of format {FORMAT_VERSION} (format_version {version})")
        return Datastore(
            corpus=f["corpus"].astype(np.int32), suffixes=f["suffixes"].astype(np.int32), key_length=int(f["key_length"])
        )


# ---------------------------------------------------------------------------------------------
# Searching (device, jit-compatible)


def _token_at(datastore: Datastore, j: jax.Array, d: jax.Array) -> jax.Array:
    """The token at offset d of suffix j (any broadcastable shapes), SEPARATOR past the corpus end."""
    t = datastore.corpus.shape[0]
    pos = jnp.take(datastore.suffixes, j, mode="clip") + d
    return jnp.where(pos < t, jnp.take(datastore.corpus, jnp.minimum(pos, t - 1)), SEPARATOR)


def _search_steps(datastore: Datastore) -> int:
    """Binary-search steps that settle any range of `suffixes`: ceil(log2(S + 1))."""
    return max(1, int(datastore.suffixes.shape[0]).bit_length())


def _narrow(datastore: Datastore, lo: jax.Array, hi: jax.Array, d: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The part of `[lo, hi)` whose token at offset d equals q (all broadcast to lo's shape).

    The suffixes of `[lo, hi)` must agree on offsets < d without a separator (then their tokens at
    offset d are sorted). Two binary searches in one loop: the first j with token >= q and the
    first with token > q. A negative q matches nothing (separators are never query tokens).
    """

    def step(_, bounds):
        l1, h1, l2, h2 = bounds
        m1, m2 = (l1 + h1) // 2, (l2 + h2) // 2
        below1 = _token_at(datastore, m1, d) < q  # the lower bound lies right of m1
        below2 = _token_at(datastore, m2, d) <= q
        l1, h1 = jnp.where((l1 < h1) & below1, m1 + 1, l1), jnp.where((l1 < h1) & ~below1, m1, h1)
        l2, h2 = jnp.where((l2 < h2) & below2, m2 + 1, l2), jnp.where((l2 < h2) & ~below2, m2, h2)
        return l1, h1, l2, h2

    lo, hi, d, q = jnp.broadcast_arrays(lo, hi, d, q)
    new_lo, _, new_hi, _ = jax.lax.fori_loop(0, _search_steps(datastore), step, (lo, hi, lo, hi))
    return jnp.where(q >= 0, new_lo, lo), jnp.where(q >= 0, new_hi, lo)


def _continuation_start(datastore: Datastore, lo: jax.Array, hi: jax.Array, d: jax.Array) -> jax.Array:
    """The first j of `[lo, hi)` whose token at offset d is not the separator (the separator sorts
    first, so `[result, hi)` are the suffixes that continue past offset d)."""

    def step(_, bounds):
        l, h = bounds
        m = (l + h) // 2
        ended = _token_at(datastore, m, d) < 0
        return jnp.where((l < h) & ended, m + 1, l), jnp.where((l < h) & ~ended, m, h)

    lo, hi, d = jnp.broadcast_arrays(lo, hi, d)
    return jax.lax.fori_loop(0, _search_steps(datastore), step, (lo, hi))[0]


def _match(datastore: Datastore, query: jax.Array, query_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`match_range` over any leading shape: query `[..., Q]`, query_len `[...]`."""
    lo = jnp.zeros(query_len.shape, jnp.int32)
    hi = jnp.full(query_len.shape, datastore.suffixes.shape[0], jnp.int32)

    def level(d, bounds):  # query position d narrows the range of rows still that long
        lo, hi = bounds
        new_lo, new_hi = _narrow(datastore, lo, hi, d, query[..., d])
        active = d < query_len
        return jnp.where(active, new_lo, lo), jnp.where(active, new_hi, hi)

    return jax.lax.fori_loop(0, query.shape[-1], level, (lo, hi))


@jax.jit
def _match_range(datastore: Datastore, query: jax.Array, query_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _match(datastore, query, query_len)


def match_range(datastore: Datastore, query: jax.Array, query_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The suffix-array range of each query: query int32 `[B, Q]`, query_len int32 `[B]` (clipped
    to [0, Q]) -> lo, hi int32 `[B]`.

    `suffixes[lo[b]:hi[b]]` are the corpus positions whose next query_len[b] tokens are
    `query[b, :query_len[b]]` (lo == hi: none; a query of length 0 matches every position).
    Jit-compatible; Q <= datastore.key_length (ValueError otherwise).
    """
    query, query_len = jnp.asarray(query), jnp.asarray(query_len)
    if query.ndim != 2 or query_len.shape != query.shape[:1]:
        raise ValueError(f"query must be [B, Q] and query_len [B], got shapes {query.shape} and {query_len.shape}")
    if query.shape[1] > datastore.key_length:
        raise ValueError(f"query length {query.shape[1]} exceeds the datastore's key_length {datastore.key_length}")
    query_len = jnp.clip(query_len.astype(jnp.int32), 0, query.shape[1])
    return _match_range(datastore, query.astype(jnp.int32), query_len)


# ---------------------------------------------------------------------------------------------
# Drafting


def _longest_match(
    datastore: Datastore, tokens: jax.Array, lengths: jax.Array, max_context: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The longest context suffix (length n <= max_context) occurring with a continuation.

    Every candidate length is searched at once: query `[B, C, C]` holds suffix n left-aligned.
    Returns matched int32 `[B]` (0: none) and its range lo, hi and continuing part start `[B]`.
    """
    b, l = tokens.shape
    c = max_context
    n = jnp.arange(1, c + 1, dtype=jnp.int32)
    start = lengths[:, None, None] - n[None, :, None] + jnp.arange(c, dtype=jnp.int32)[None, None, :]  # [B, C, C]
    query = jnp.take_along_axis(tokens, jnp.clip(start, 0, l - 1).reshape(b, c * c), axis=1).reshape(b, c, c)
    query_len = jnp.where(n[None, :] <= lengths[:, None], n[None, :], 0)  # [B, C]
    lo, hi = _match(datastore, query, query_len)
    cont = _continuation_start(datastore, lo, hi, query_len)
    found = (query_len > 0) & (cont < hi)
    matched = jnp.max(jnp.where(found, n[None, :], 0), axis=1)
    pick = jnp.maximum(matched - 1, 0)[:, None]
    take = lambda x: jnp.take_along_axis(x, pick, axis=1)[:, 0]  # noqa: E731
    return matched, take(lo), take(hi), take(cont)


def _sample_occurrences(start: jax.Array, stop: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Up to m suffix indices of `[start, stop)` `[B]`: all of them if they fit, else m evenly
    spaced ones (start + floor(i * count / m), exact in int32). Returns indices and valid `[B, M]`."""
    count = (stop - start)[:, None]
    i = jnp.arange(m, dtype=jnp.int32)[None, :]
    spaced = i * (count // m) + (i * (count % m)) // m
    return start[:, None] + jnp.where(count <= m, i, spaced), i < count


def _trie(continuation: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The trie of lexicographically sorted continuations `[B, M, D]` (SEPARATOR-padded).

    Node (i, k) is the prefix continuation[i, :k + 1]; it is new (a trie node of its own) if it
    holds no separator and differs from row i - 1's prefix (sorted rows: equal prefixes are
    adjacent). Returns new `[B, M, D]` and first `[B, M, D]`, the row of the prefix's first
    occurrence (its trie node).
    """
    b, m, d = continuation.shape
    previous = jnp.concatenate([jnp.full((b, 1, d), SEPARATOR - 1, jnp.int32), continuation[:, :-1]], axis=1)
    differs = jax.lax.cummax((continuation != previous).astype(jnp.int32), axis=2) > 0
    new = differs & (continuation >= 0)
    rows = jnp.arange(m, dtype=jnp.int32)[None, :, None]
    first = jax.lax.cummax(jnp.where(new, rows, 0), axis=1)
    return new, first


@functools.partial(jax.jit, static_argnames=("max_context", "depth", "size", "max_occurrences"))
def _retrieve(
    datastore: Datastore, tokens: jax.Array, lengths: jax.Array, max_context: int, depth: int, size: int, max_occurrences: int
) -> RetrievedTree:
    b, l = tokens.shape
    m, dd = max_occurrences, depth
    rows = jnp.arange(b)[:, None]
    lengths = jnp.clip(lengths, 0, l)
    matched, lo, hi, cont = _longest_match(datastore, tokens, lengths, max_context)
    has = matched > 0
    occurrence, occ_valid = _sample_occurrences(cont, jnp.where(has, hi, cont), m)  # [B, M]

    # Their next `depth` tokens, the separator and everything after it read as SEPARATOR. In
    # suffix-array order these rows are sorted (matched + depth <= key_length).
    offset = matched[:, None, None] + jnp.arange(dd, dtype=jnp.int32)[None, None, :]
    continuation = _token_at(datastore, occurrence[:, :, None], offset)
    ended = jax.lax.cummax((continuation < 0).astype(jnp.int32), axis=2) > 0
    continuation = jnp.where(ended | ~occ_valid[:, :, None], SEPARATOR, continuation)  # [B, M, D]
    new, first = _trie(continuation)

    # Exact counts: narrow the matched range one path token per level, for every sampled row.
    def level(k, carry):
        node_lo, node_hi, counts = carry
        q = jax.lax.dynamic_index_in_dim(continuation, k, axis=2, keepdims=False)
        node_lo, node_hi = _narrow(datastore, node_lo, node_hi, matched[:, None] + k, q)
        return node_lo, node_hi, jax.lax.dynamic_update_index_in_dim(counts, node_hi - node_lo, k, axis=2)

    start = (jnp.broadcast_to(lo[:, None], (b, m)), jnp.broadcast_to(hi[:, None], (b, m)), jnp.zeros((b, m, dd), jnp.int32))
    counts = jax.lax.fori_loop(0, dd, level, start)[2]

    # Candidates in (depth, path) order: flat index f = k * M + i (rows are path-sorted), padded
    # with candidates that are never new when the budget exceeds them.
    p, keep = dd * m, size - 1
    w = max(p, keep)
    flat = lambda x, fill: jnp.pad(jnp.swapaxes(x, 1, 2).reshape(b, p), ((0, 0), (0, w - p)), constant_values=fill)  # noqa: E731
    level_of = jnp.broadcast_to(jnp.arange(dd, dtype=jnp.int32)[None, :, None], (b, dd, m)).swapaxes(1, 2)
    parent_row = jnp.concatenate([jnp.zeros((b, m, 1), jnp.int32), first[:, :, :-1]], axis=2)  # its parent's row, level k - 1
    cand_new = flat(new & has[:, None, None], False)
    cand_count, cand_token, cand_level = flat(counts, 0), flat(continuation, 0), flat(level_of, 0)
    cand_parent = flat(jnp.where(level_of > 0, (level_of - 1) * m + parent_row, -1), -1)  # -1: the root
    f = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))

    # Keep the size - 1 best: count desc, then shallower, then path order (= flat index). A parent
    # counts at least as much as its child and is shallower, so the kept set is ancestor-closed.
    best = jax.lax.sort((~cand_new, -cand_count, f), dimension=1, num_keys=3)[2][:, :keep]
    best_new = jnp.take_along_axis(cand_new, best, axis=1)
    chosen = jnp.sort(jnp.where(best_new, best, w), axis=1)  # kept nodes in (depth, path) order, then padding
    valid = chosen < w
    chosen = jnp.where(valid, chosen, 0)
    slot = jnp.full((b, w), -1, jnp.int32).at[rows, jnp.where(valid, chosen, w)].set(jnp.arange(1, keep + 1), mode="drop")
    get = lambda x: jnp.take_along_axis(x, chosen, axis=1)  # noqa: E731
    parent_f = get(cand_parent)
    parent = jnp.where(parent_f >= 0, jnp.take_along_axis(slot, jnp.maximum(parent_f, 0), axis=1), 0)

    root_token = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
    column = lambda root, rest: jnp.concatenate([root, rest], axis=1).astype(rest.dtype)  # noqa: E731
    return RetrievedTree(
        tokens=column(root_token, jnp.where(valid, get(cand_token), 0)),
        parent=column(jnp.full((b, 1), -1, jnp.int32), jnp.where(valid, parent, -1)),
        depth=column(jnp.zeros((b, 1), jnp.int32), jnp.where(valid, get(cand_level) + 1, 0)),
        valid=column(jnp.ones((b, 1), bool), valid),
        count=column(jnp.where(has, hi - lo, 0)[:, None], jnp.where(valid, get(cand_count), 0)),
        matched=matched,
    )


def retrieve(
    datastore: Datastore,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    max_context: int,
    depth: int,
    size: int,
    max_occurrences: int,
) -> RetrievedTree:
    """REST's draft tree for each row of tokens int32 `[B, L]` with context lengths int32 `[B]`
    (row b's context is `tokens[b, :lengths[b]]`, lengths >= 1 so that the root exists).

    Finds the longest context suffix of length n in max_context..1 that occurs in the corpus
    followed by a token (matched = n, 0: none); reads the next `depth` tokens of up to
    `max_occurrences` of its continuing occurrences (evenly spaced over its suffix-array range
    when there are more); and keeps the root plus the `size - 1` trie nodes of highest exact count
    (ties: shallower, then lexicographically smaller path). Returns a `RetrievedTree` `[B, size]`.

    Static arguments are checked here (ValueError naming the argument): all ints >= 1 and
    max_context + depth <= datastore.key_length (the index orders suffixes by that many tokens).
    Jit-compatible with max_context, depth, size and max_occurrences static.
    """
    max_context = _check_int("max_context", max_context, 1)
    depth = _check_int("depth", depth, 1)
    size = _check_int("size", size, 1)
    max_occurrences = _check_int("max_occurrences", max_occurrences, 1)
    if max_context + depth > datastore.key_length:
        raise ValueError(
            f"max_context + depth must be <= the datastore's key_length {datastore.key_length}, "
            f"got max_context={max_context}, depth={depth}"
        )
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if tokens.ndim != 2 or tokens.shape[1] < 1 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [B, L] with L >= 1 and lengths [B], got shapes {tokens.shape} and {lengths.shape}")
    return _retrieve(
        datastore,
        tokens.astype(jnp.int32),
        lengths.astype(jnp.int32),
        max_context=max_context,
        depth=depth,
        size=size,
        max_occurrences=max_occurrences,
    )


__all__ = [
    "SEPARATOR",
    "Datastore",
    "RetrievedTree",
    "build_datastore",
    "load_datastore",
    "match_range",
    "retrieve",
    "save_datastore",
]
