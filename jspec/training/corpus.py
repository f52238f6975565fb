"""Text corpora split into train and held-out sets by file, deterministically.

The default corpus is the Python standard library's source (`sysconfig.get_paths()["stdlib"]`,
without `site-packages`), present on every machine: code completion is a classic speculative
decoding workload. Any folder of text files or a JSONL file (one `{"text": ...}` per line) works too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sysconfig

import numpy as np

STDLIB = "stdlib"


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # a stable identifier: the path relative to the corpus root, or "line N" of a JSONL
    text: str


def _held_out(name: str, fraction: float, seed: int) -> bool:
    """A file's split depends only on its name and the seed, never on listing order or machine."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _folder_documents(root: pathlib.Path, suffixes: tuple[str, ...], skip_parts: frozenset[str]) -> list[Document]:
    docs = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in suffixes or skip_parts & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), text))
    return docs


def read_corpus(source: str = STDLIB) -> list[Document]:
    """All documents of `source`: "stdlib", a folder (files ending .py/.txt/.md), or a .jsonl file."""
    if source == STDLIB:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        return _folder_documents(root, (".py",), frozenset({"site-packages", "__pycache__"}))
    path = pathlib.Path(source)
    if path.is_dir():
        return _folder_documents(path, (".py", ".txt", ".md"), frozenset({"__pycache__"}))
    if path.is_file() and path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                docs.append(Document(f"line {i}", json.loads(line)["text"]))
        return docs
    raise ValueError(f"source must be 'stdlib', a folder or a .jsonl file, got {source!r}")


def split_corpus(docs: list[Document], held_out_fraction: float = 0.05, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, held_out), split by document so no file contributes to both."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction!r}")
    train = [d for d in docs if not _held_out(d.name, held_out_fraction, seed)]
    held = [d for d in docs if _held_out(d.name, held_out_fraction, seed)]
    if not train or not held:
        raise ValueError(f"the split of {len(docs)} documents left an empty side; use more documents")
    return train, held


def code_prompts(docs: list[Document], n: int, lines: int = 12, seed: int = 0) -> list[dict[str, str]]:
    """n code-completion prompts from n different documents: `lines` consecutive lines from a
    seeded position past each file's first quarter (its imports and docstring), the last line not
    blank, ending with a newline so the model writes the next line. Returns [{"file", "text"}]."""
    rng = np.random.default_rng(seed)
    prompts = []
    for index in rng.permutation(len(docs)):
        doc = docs[int(index)]
        body = doc.text.splitlines()
        if len(body) < 4 * lines:
            continue
        start = int(rng.integers(len(body) // 4, len(body) - lines))
        snippet = body[start : start + lines]
        if not snippet[-1].strip() or sum(len(line) for line in snippet) < 200:
            continue
        prompts.append({"file": doc.name, "text": "\n".join(snippet) + "\n"})
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise ValueError(f"found only {len(prompts)} prompts of {lines} lines in {len(docs)} documents; n={n}")
    return prompts
