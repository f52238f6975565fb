"""Build a REST retrieval datastore (`jspec.retrieval.datastore`) from a token corpus and save it.

    python -m train.datastore --stdlib --out runs/datastore-smollm2-stdlib
    python -m train.datastore --tokens corpus.npy --out runs/datastore-mine

Sources:
  --tokens FILE   token ids of any tokenizer: a .npy 1-D integer array with -1 between documents,
                  or a .npz whose arrays are the documents (in the file's order);
  --stdlib        the Python standard library's source files (`jspec.training.corpus`, one document
                  per file, sorted by path), tokenized with --tokenizer (smollm2: SmolLM2's tokenizer
                  from its GGUF file, or a .gguf path). The files held out by the corpus split
                  (`split_corpus(..., 0.05, seed=0)`, where the demo prompts come from) are left out
                  unless --include-held-out, so a datastore never contains a held-out prompt's file.
--max-tokens bounds the corpus (separators included; the last document is cut). Writes
OUT/datastore.npz (`load_datastore(OUT)`) and OUT/summary.json; refuses an OUT that already holds one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jspec.retrieval.datastore import SEPARATOR, build_datastore, save_datastore

# The whole stdlib (training side of the split: about 8.7M SmolLM2 tokens) fits: tokenizing it and
# sorting its suffixes take about 40 s on 2 CPU cores.
DEFAULT_MAX_TOKENS = 10_000_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.datastore", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="a .npy of token ids with -1 between documents, or a .npz of documents")
    source.add_argument("--stdlib", action="store_true", help="the Python standard library's source files")
    p.add_argument("--tokenizer", default="smollm2", help="for --stdlib: smollm2 or a .gguf file (default: smollm2)")
    p.add_argument("--include-held-out", action="store_true", help="for --stdlib: keep the corpus split's held-out files")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"corpus bound (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--key-length", type=int, default=16, help="tokens the suffix sort looks at (default: 16)")
    p.add_argument("--out", required=True, help="output directory")
    return p


def _bounded(documents, max_tokens: int) -> list[np.ndarray]:
    """The documents in order until the corpus (a separator after each) would exceed max_tokens."""
    kept, total = [], 0
    for document in documents:
        document = np.asarray(document)
        if document.size == 0:
            continue
        room = max_tokens - total - 1
        if room <= 0:
            break
        kept.append(document[:room])
        total += min(document.size, room) + 1
    return kept


def token_documents(path: str) -> list[np.ndarray]:
    """The documents of a --tokens file: a .npz's arrays, or a .npy split at its -1 entries."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return [f[name] for name in f.files]
    ids = np.load(path, allow_pickle=False)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"{path} must hold a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if (ids < SEPARATOR).any():
        raise SystemExit(f"{path} holds token ids below {SEPARATOR}; only -1 (a document separator) may be negative")
    return np.split(ids, np.flatnonzero(ids == SEPARATOR))  # each later piece starts with its separator


def stdlib_documents(tokenizer_name: str, max_tokens: int, include_held_out: bool, batch: int = 64) -> list[np.ndarray]:
    """The stdlib's source files tokenized, in path order, until max_tokens (tokenized in batches
    so a small bound does not tokenize the whole library)."""
    from jspec.models.gguf_tokenizer import gguf_tokenizer
    from jspec.training.corpus import STDLIB, read_corpus, split_corpus

    if tokenizer_name == "smollm2":
        from jspec.demo.smollm2 import gguf_path

        tokenizer = gguf_tokenizer(gguf_path())
    else:
        tokenizer = gguf_tokenizer(tokenizer_name)
    docs = read_corpus(STDLIB)
    if not include_held_out:
        docs, _ = split_corpus(docs, 0.05, seed=0)
    out, total = [], 0
    for start in range(0, len(docs), batch):
        if total >= max_tokens:
            break
        for ids in tokenizer.encode_batch([d.text for d in docs[start : start + batch]]):
            out.append(np.asarray(ids, np.int32))
            total += len(ids) + 1
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 2:
        raise SystemExit(f"--max-tokens must be >= 2, got {args.max_tokens}")
    target = os.path.join(args.out, "datastore.npz")
    if os.path.exists(target):
        raise SystemExit(f"{target} already exists; refusing to overwrite it")
    started = time.time()
    if args.stdlib:
        documents = stdlib_documents(args.tokenizer, args.max_tokens, args.include_held_out)
        source = f"stdlib ({args.tokenizer})"
    else:
        documents = [d[d != SEPARATOR] for d in token_documents(args.tokens)]
        source = args.tokens
    documents = _bounded(documents, args.max_tokens)
    read_s = time.time() - started
    started = time.time()
    datastore = build_datastore(documents, key_length=args.key_length)
    build_s = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    save_datastore(datastore, target)
    summary = {
        "source": source,
        "documents": len(documents),
        "corpus_tokens": datastore.num_tokens,
        "suffixes": datastore.num_suffixes,
        "key_length": datastore.key_length,
        "read_seconds": round(read_s, 2),
        "build_seconds": round(build_s, 2),
        "saved_bytes": os.path.getsize(target),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"{source}: {summary['documents']} documents, {summary['corpus_tokens']} corpus tokens "
        f"({summary['suffixes']} suffixes); read/tokenized in {read_s:.1f} s, suffix array built in {build_s:.1f} s; "
        f"saved {summary['saved_bytes']} bytes to {target}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
