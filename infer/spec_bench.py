"""Where Spec-Bench's questions are (evaluation only: nothing trains on them). Imports no jax, so
the load tester, an HTTP client, can use it."""

from __future__ import annotations

import os


def default_spec_bench() -> str | None:
    """Spec-Bench's question.jsonl: `$JSPEC_SPEC_BENCH`, else shared/data/spec_bench beside this
    repository (where the project keeps it), else None."""
    env = os.environ.get("JSPEC_SPEC_BENCH")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(here), "shared", "data", "spec_bench", "question.jsonl")
    return path if os.path.exists(path) else None
