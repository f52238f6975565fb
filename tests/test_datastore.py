"""jspec.retrieval.datastore (REST's suffix-array datastore): the index, match_range and retrieve
against brute force, save/load, argument checks and the train.datastore CLI."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.retrieval.datastore import (
    Datastore,
    RetrievedTree,
    build_datastore,
    load_datastore,
    match_range,
    retrieve,
    save_datastore,
)
from jspec.trees.tree import Tree

KEY = 8  # key_length of the random datastores
TOTAL, DOCS = 240, 6  # tokens and documents of every random corpus: one shape, one compile


def _documents(seed: int, vocab: int) -> list[np.ndarray]:
    """DOCS non-empty documents of TOTAL tokens in all, over a small vocabulary (matches are common)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, TOTAL), DOCS - 1, replace=False))
    tokens = rng.integers(0, vocab, TOTAL)
    tokens[rng.random(TOTAL) < 0.3] = 0  # one frequent token: long shared continuations
    return np.split(tokens, cuts)


def _corpus(documents) -> np.ndarray:
    return np.concatenate([np.append(d, -1) for d in documents]).astype(np.int32)


def _reference_suffixes(corpus: np.ndarray, key_length: int) -> list[int]:
    """Positions sorted by their first key_length tokens, separator (and all after it) first, ties by position."""

    def key(p):
        out, ended = [], False
        for d in range(key_length):
            token = corpus[p + d] if p + d < len(corpus) else -1
            ended |= token < 0
            out.append(-1 if ended else int(token))
        return tuple(out), p

    return sorted((p for p in range(len(corpus)) if corpus[p] >= 0), key=key)


def _occurs_at(corpus: np.ndarray, p: int, query) -> bool:
    return p + len(query) <= len(corpus) and list(corpus[p : p + len(query)]) == list(query)


def _count(corpus: np.ndarray, query) -> int:
    """Corpus positions followed by `query`, by a scan over the corpus itself."""
    return sum(_occurs_at(corpus, p, query) for p in range(len(corpus)))


def _reference_retrieve(corpus, suffixes, context, *, max_context, depth, size, max_occurrences):
    """(matched, root count, [(path, count)] of the kept nodes in (depth, path) order, sampled?) by brute force."""
    for n in range(min(max_context, len(context)), 0, -1):
        suffix = list(context[-n:])
        occurrences = [j for j, p in enumerate(suffixes) if _occurs_at(corpus, p, suffix)]
        continuing = [j for j in occurrences if corpus[suffixes[j] + n] >= 0]
        if continuing:
            break
    else:
        return 0, 0, [], False
    assert continuing == list(range(continuing[0], continuing[-1] + 1))  # one contiguous range
    c, m = len(continuing), max_occurrences
    sampled = continuing if c <= m else [continuing[0] + i * c // m for i in range(m)]
    paths = set()
    for j in sampled:
        path = []
        for k in range(depth):
            token = int(corpus[suffixes[j] + n + k])
            if token < 0:
                break
            path.append(token)
            paths.add(tuple(path))
    counted = [(path, _count(corpus, suffix + list(path))) for path in paths]
    kept = sorted(counted, key=lambda pc: (-pc[1], len(pc[0]), pc[0]))[: size - 1]
    return n, len(occurrences), sorted(kept, key=lambda pc: (len(pc[0]), pc[0])), c > m


def _contexts(corpus: np.ndarray, seed: int, b: int, l: int, vocab: int):
    """Ragged rows: corpus snippets (long matches), random tokens, unseen tokens (no match)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, l)).astype(np.int32)
    lengths = rng.integers(1, l + 1, b).astype(np.int32)
    for r in range(b):
        if r % 3 == 0:  # a corpus snippet, separators replaced
            start = rng.integers(0, len(corpus) - l)
            tokens[r] = np.where(corpus[start : start + l] < 0, 1, corpus[start : start + l])
        if r % 4 == 1:  # ends in a token the corpus never holds
            tokens[r, lengths[r] - 1] = vocab + 3
    lengths[0] = 1
    return tokens, lengths


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_build_sorts_suffixes_by_their_key(seed):
    documents = _documents(seed, vocab=4)
    ds = build_datastore(documents, key_length=KEY)
    corpus = _corpus(documents)
    np.testing.assert_array_equal(ds.corpus, corpus)
    assert ds.suffixes.dtype == np.int32 and ds.corpus.dtype == np.int32
    assert list(ds.suffixes) == _reference_suffixes(corpus, KEY)
    assert ds.num_tokens == TOTAL + DOCS and ds.num_suffixes == TOTAL


def test_build_with_a_large_vocabulary_packs_keys_in_order():
    rng = np.random.default_rng(3)
    documents = [rng.integers(0, 3, 50) * 40_000 + rng.integers(0, 2, 50) for _ in range(3)]
    ds = build_datastore(documents, key_length=12)
    assert list(ds.suffixes) == _reference_suffixes(_corpus(documents), 12)


@pytest.mark.parametrize("seed,vocab", [(0, 4), (1, 6)])
def test_match_range_equals_a_scan_over_all_suffixes(seed, vocab):
    documents = _documents(seed, vocab)
    ds = jax.device_put(build_datastore(documents, key_length=KEY))
    corpus, suffixes = _corpus(documents), np.asarray(ds.suffixes)
    rng = np.random.default_rng(seed + 10)
    b, q = 48, KEY
    query = rng.integers(0, vocab, (b, q)).astype(np.int32)
    query_len = rng.integers(0, q + 1, b).astype(np.int32)
    for r in range(0, b, 2):  # half the queries: corpus substrings, some running into a document end
        start = rng.integers(0, len(corpus) - q)
        query[r] = np.where(corpus[start : start + q] < 0, 0, corpus[start : start + q])
    query[5, 0] = vocab + 1  # no match
    ends = np.flatnonzero(corpus < 0)
    query[7, :3], query_len[7] = corpus[ends[1] - 3 : ends[1]], 3  # a document's last tokens
    query_len[9] = 0  # matches everything
    lo, hi = map(np.asarray, jax.jit(match_range)(ds, query, query_len))
    matched_any = 0
    for r in range(b):
        hits = [j for j, p in enumerate(suffixes) if _occurs_at(corpus, p, query[r, : query_len[r]])]
        if hits:
            assert (lo[r], hi[r]) == (hits[0], hits[-1] + 1), r
            assert len(hits) == hi[r] - lo[r]
            matched_any += query_len[r] > 1
        else:
            assert lo[r] == hi[r], r
    assert matched_any > 10 and hi[5] == lo[5] and hi[7] > lo[7] and (lo[9], hi[9]) == (0, TOTAL)


def _check_tree(out: RetrievedTree, row: int, tokens, lengths, expected, size):
    """One row of `retrieve` against the reference: root, nodes and counts in order, structure."""
    matched, root_count, kept, _ = expected
    tok, par, dep, val, cnt = (np.asarray(x)[row] for x in (out.tokens, out.parent, out.depth, out.valid, out.count))
    assert out.matched[row] == matched
    assert tok[0] == tokens[row, lengths[row] - 1] and par[0] == -1 and dep[0] == 0 and val[0]
    assert cnt[0] == root_count
    n_valid = 1 + len(kept)
    assert val.tolist() == [True] * n_valid + [False] * (size - n_valid)  # valid nodes first, padding after
    assert (
        (tok[n_valid:] == 0).all() and (par[n_valid:] == -1).all() and (dep[n_valid:] == 0).all() and (cnt[n_valid:] == 0).all()
    )
    paths = [()]
    for i in range(1, n_valid):
        assert 0 <= par[i] < i and dep[i] == dep[par[i]] + 1  # parents precede children; depths agree
        paths.append(paths[par[i]] + (int(tok[i]),))
        assert cnt[i] <= cnt[par[i]]
    assert list(zip(paths[1:], cnt[1:n_valid].tolist())) == kept
    assert set(paths[1:]) | {()} >= {p[:-1] for p in paths[1:]}  # ancestor-closed


@functools.partial(jax.jit, static_argnames=("max_context", "depth", "size", "max_occurrences"))
def _jit_retrieve(ds, tokens, lengths, **kw):
    return retrieve(ds, tokens, lengths, **kw)


@pytest.mark.parametrize(
    "seed,vocab,max_occurrences,size",
    [(0, 4, 1000, 12), (1, 5, 1000, 40), (2, 4, 3, 9), (3, 6, 5, 7)],  # all occurrences / sampled
)
def test_retrieve_equals_a_brute_force_reference(seed, vocab, max_occurrences, size):
    documents = _documents(seed, vocab)
    ds = jax.device_put(build_datastore(documents, key_length=KEY))
    corpus, suffixes = _corpus(documents), np.asarray(ds.suffixes)
    b, l = 9, 12
    tokens, lengths = _contexts(corpus, seed, b, l, vocab)
    kw = dict(max_context=5, depth=3, size=size, max_occurrences=max_occurrences)
    out = _jit_retrieve(ds, jnp.asarray(tokens), jnp.asarray(lengths), **kw)
    assert out.tokens.shape == (b, size) and out.matched.shape == (b,)
    sampled, unmatched = 0, 0
    for r in range(b):
        expected = _reference_retrieve(corpus, suffixes, list(tokens[r, : lengths[r]]), **kw)
        _check_tree(out, r, tokens, lengths, expected, size)
        sampled += bool(expected[3])
        unmatched += expected[0] == 0
        for i in np.flatnonzero(np.asarray(out.valid[r]))[1:]:  # every kept path really occurs, as often as counted
            path, node = [], i
            while node > 0:
                path.insert(0, int(out.tokens[r, node]))
                node = int(out.parent[r, node])
            suffix = list(tokens[r, lengths[r] - int(out.matched[r]) : lengths[r]])
            assert _count(corpus, suffix + path) == out.count[r, i] > 0
    assert unmatched >= 1  # rows ending in an unseen token keep only their root
    if max_occurrences < 10:
        assert sampled >= 1  # sampling kicked in (counts stayed exact: checked above)
    tree = out.tree
    assert isinstance(tree, Tree) and tree.tokens is out.tokens and tree.valid is out.valid


def test_retrieve_small_budget_and_edge_rows():
    documents = [np.array([1, 2, 3, 1, 2, 4]), np.array([1, 2, 3, 5]), np.array([7])]
    ds = build_datastore(documents, key_length=8)
    tokens = jnp.array([[7, 1, 2, 0], [1, 2, 3, 5], [7, 7, 7, 7], [9, 9, 9, 9]], jnp.int32)
    lengths = jnp.array([3, 4, 1, 4], jnp.int32)
    out = retrieve(ds, tokens, lengths, max_context=3, depth=3, size=6, max_occurrences=4)
    # Row 0: "1 2" occurs 3 times, continued by "3 1 2", "4", "3 5".
    assert out.matched.tolist() == [2, 0, 0, 0]  # "5" and "7" are only followed by a separator
    np.testing.assert_array_equal(out.tokens[0], [2, 3, 4, 1, 5, 2])
    np.testing.assert_array_equal(out.parent[0], [-1, 0, 0, 1, 1, 3])
    np.testing.assert_array_equal(out.depth[0], [0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(out.count[0], [3, 2, 1, 1, 1, 1])
    assert out.valid[1:].sum(axis=1).tolist() == [1, 1, 1] and out.count[1:, 0].tolist() == [0, 0, 0]
    one = retrieve(ds, tokens, lengths, max_context=3, depth=2, size=1, max_occurrences=4)
    assert one.tokens.shape == (4, 1) and one.valid.all() and one.count[0, 0] == 3
    two = retrieve(ds, tokens, lengths, max_context=3, depth=2, size=3, max_occurrences=1)  # one sample: "3 1"
    np.testing.assert_array_equal(two.tokens[0], [2, 3, 1])
    np.testing.assert_array_equal(two.count[0], [3, 2, 1])


def test_save_load_round_trip_and_no_overwrite(tmp_path):
    ds = build_datastore(_documents(0, 4), key_length=KEY)
    path = tmp_path / "sub" / "datastore.npz"
    save_datastore(ds, path)
    for loaded in (load_datastore(path), load_datastore(path.parent)):
        assert isinstance(loaded, Datastore) and loaded.key_length == KEY
        np.testing.assert_array_equal(loaded.corpus, ds.corpus)
        np.testing.assert_array_equal(loaded.suffixes, ds.suffixes)
    with pytest.raises(ValueError, match="datastore.npz already exists"):
        save_datastore(ds, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["datastore.npz"]  # no temporary left behind


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="negative"):
        build_datastore([np.array([1, -2, 3])])
    with pytest.raises(ValueError, match="empty"):
        build_datastore([np.array([], np.int32)])
    with pytest.raises(ValueError, match="key_length"):
        build_datastore([np.array([1])], key_length=0)
    with pytest.raises(ValueError, match="1-D"):
        build_datastore([np.ones((2, 2), np.int32)])
    ds = build_datastore([np.array([1, 2, 3])], key_length=4)
    with pytest.raises(ValueError, match="key_length 4"):
        match_range(ds, jnp.zeros((1, 5), jnp.int32), jnp.array([1]))
    tokens, lengths = jnp.zeros((1, 4), jnp.int32), jnp.array([2])
    good = dict(max_context=2, depth=2, size=4, max_occurrences=8)
    for name, value in [("max_context", 0), ("depth", 0), ("size", 0), ("max_occurrences", 0), ("depth", 1.5), ("size", True)]:
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {value!r}"):
            retrieve(ds, tokens, lengths, **{**good, name: value})
    with pytest.raises(ValueError, match="max_context=3, depth=2"):
        retrieve(ds, tokens, lengths, **{**good, "max_context": 3})
    with pytest.raises(ValueError, match="tokens must be"):
        retrieve(ds, jnp.zeros((4,), jnp.int32), lengths, **good)


def test_cli_builds_a_loadable_datastore(tmp_path, capsys):
    from train.datastore import main

    documents = [np.array([5, 6, 7, 5, 6]), np.array([6, 7]), np.array([5, 6, 8])]
    flat = np.concatenate([documents[0], [-1], documents[1], [-1], documents[2]]).astype(np.int64)
    np.save(tmp_path / "tokens.npy", flat)
    out = tmp_path / "ds"
    summary = main(["--tokens", str(tmp_path / "tokens.npy"), "--out", str(out), "--key-length", "6"])
    assert summary["corpus_tokens"] == 13 and summary["documents"] == 3
    assert "13 corpus tokens" in capsys.readouterr().out
    loaded, expected = load_datastore(out), build_datastore(documents, key_length=6)
    np.testing.assert_array_equal(loaded.corpus, expected.corpus)
    np.testing.assert_array_equal(loaded.suffixes, expected.suffixes)
    with pytest.raises(SystemExit, match="already exists"):
        main(["--tokens", str(tmp_path / "tokens.npy"), "--out", str(out)])
    np.savez(tmp_path / "docs.npz", *documents)  # a .npz of documents, bounded by --max-tokens
    summary = main(["--tokens", str(tmp_path / "docs.npz"), "--out", str(tmp_path / "ds2"), "--max-tokens", "8"])
    np.testing.assert_array_equal(load_datastore(tmp_path / "ds2").corpus, [5, 6, 7, 5, 6, -1, 6, -1])
