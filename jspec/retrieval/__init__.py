"""Drafting from text instead of (or besides) a model: `lookup` (prompt lookup in the row's own
prompt and output; `LookupDrafter`, a drafter of the protocol with no model; `Retrieval`, the
drafter argument of retrieval strategies), `datastore` (REST's suffix-array datastore, searched on
device) and `trie` (retrieval tries and RASD's longest-prefix tree fusion)."""

from jspec.retrieval.datastore import (
    Datastore,
    RetrievedTree,
    build_datastore,
    load_datastore,
    match_range,
    retrieve,
    save_datastore,
)
from jspec.retrieval.lookup import LookupDrafter, LookupState, Retrieval, latest_match, latest_matches
from jspec.retrieval.trie import fuse_trees, trie_from_sequences

__all__ = [
    "Datastore",
    "LookupDrafter",
    "LookupState",
    "Retrieval",
    "RetrievedTree",
    "build_datastore",
    "fuse_trees",
    "latest_match",
    "latest_matches",
    "load_datastore",
    "match_range",
    "retrieve",
    "save_datastore",
    "trie_from_sequences",
]
