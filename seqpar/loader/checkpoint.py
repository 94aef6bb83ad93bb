"""Opening safetensors checkpoint files, with errors that name the file at fault."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open


def open_safetensors(path: str | Path):
    """safe_open(path) for torch tensors (use it as a context manager). It reads only the header,
    and checks that the header is valid and the file as long as the header says: a truncated or
    corrupt file raises a ValueError naming it (safetensors' own error names no path)."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                         f"({e})") from None


def open_checkpoint(path: str | Path):
    """A checkpoint file as a context manager with keys() and get_slice(name): safe_open for
    safetensors, loader/gguf.py's GGUFCheckpoint (HF names, read in place) for a .gguf file."""
    if Path(path).suffix == ".gguf":
        from seqpar.loader.gguf import GGUFCheckpoint  # the gguf library: only for GGUF files
        return GGUFCheckpoint(Path(path))
    return open_safetensors(path)


def check_safetensors(model_dir: Path) -> None:
    """Open every *.safetensors file of model_dir once, so a bad one fails before any rank starts."""
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open_safetensors(file):
            pass
