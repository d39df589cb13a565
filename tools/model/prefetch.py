"""Read a model's weight files into the page cache ahead of loading them.

transformers loads safetensors through mmap: on a cold page cache each tensor's pages fault in from disk as they are
copied, after Python has spent ~12-16 s importing torch, transformers and swift (bench/README.md, runs AA-AC). One
posix_fadvise(WILLNEED) per file at the start of tools.model.infer.load asks the kernel to read them during those
imports instead. It is advice: nothing happens when the files are cached, and the kernel reads less when memory is
short. Runs in a daemon thread (the call releases the GIL, but submitting many GB of reads can take a while).
SCORE_PREFETCH=0 turns it off.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def wanted() -> bool:
    return os.environ.get("SCORE_PREFETCH", "1").strip() != "0" and hasattr(os, "posix_fadvise")


def _flag(argv: list[str], name: str) -> str | None:
    """The last value of `--name value` or `--name=value` in argv (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def model_dir(swift_argv: list[str]) -> Path | None:
    """The local base-model folder swift will load for these `swift infer` arguments: --model if it is a folder,
    else the model_dir that the first --adapters checkpoint's args.json records; None when neither is local."""
    model = _flag(swift_argv, "--model")
    if model:
        return Path(model) if Path(model).is_dir() else None
    adapters = _flag(swift_argv, "--adapters")
    if not adapters:
        return None
    try:
        recorded = json.loads((Path(adapters) / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("model_dir", "model"):
        if isinstance(recorded.get(key), str) and Path(recorded[key]).is_dir():
            return Path(recorded[key])
    return None


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def advise(files: list[Path]) -> int:
    """WILLNEED for each file, in order; the bytes advised (files that cannot be opened are skipped)."""
    advised = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            advised += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return advised


def start(swift_argv: list[str]) -> threading.Thread | None:
    """Advise the weights of the model these arguments load, in a daemon thread; None when off or not local."""
    if not wanted():
        return None
    folder = model_dir(swift_argv)
    files = weight_files(folder) if folder else []
    if not files:
        return None
    thread = threading.Thread(target=advise, args=(files,), name="prefetch-weights", daemon=True)
    thread.start()
    return thread
