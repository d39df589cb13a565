"""Read a model's weight files into the page cache ahead of loading them (SCORE_PREFETCH, default 1; 0 turns it off).

transformers loads safetensors through mmap: on a cold page cache (after a reboot, or when the machine's memory held
other things since training) each tensor's pages fault in from disk as they are copied, after Python has spent
~10-16 s importing torch, transformers and swift. tools.model.infer.load starts a daemon thread that reads the files
once, front to back, while the main thread imports, and the scoring loop reads the next model's files while one
scores. Reads release the GIL. A model whose files are larger than 3/4 of the available memory is not read ahead
(the page cache could not keep them until the load).

Measured on an H200 host (16 cores, disk 1.4-1.7 GB/s; run AE, bench/README.md): a cold 7B load 36.9 -> 28.5 s
(its weights 14.1 -> 5.0 s), a cold 3B load 29.2 -> 22.2 s, test.sh on 40 photos with both models cold 61.0 -> 41.7 s;
with the files already cached, no difference beyond the loads' own spread. On this project's 2-core CPU machine
(disk 0.65 GB/s) a cold load took as long with it as without (25.4 against 25.5 s, farm-bench medians) for ~10 s
more CPU time: two cores and that disk leave nothing to overlap, and nothing is lost either. The kernel's own
read-ahead advice (posix_fadvise WILLNEED) read nothing on the H200 host (run AD), hence plain reads.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from tools.knobs import switch

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def wanted() -> bool:
    """SCORE_PREFETCH: 1 (the default) or 0; any other value is an error naming the knob. Not read by
    tools.model.speedups.knob: that module imports torch, and the read-ahead starts before the imports."""
    return switch("SCORE_PREFETCH", "read the weight files ahead of loading them", default=True)


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


def read_ahead(files: list[Path], chunk: int = 16 << 20) -> int:
    """Read each file once, in order, into one reused buffer (the page cache keeps the pages); the bytes read. Files
    that cannot be read are skipped."""
    buffer = bytearray(chunk)
    done = 0
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    done += n
        except OSError:
            continue
    return done


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (free memory plus what the page cache can give back); None where
    there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# Read ahead only what the page cache can keep until the load reads it: on a machine with less memory the early
# files would be dropped again before the load reaches them, and it would read them twice.
MEMORY_SHARE = 0.75


def start(swift_argv: list[str]) -> threading.Thread | None:
    """Read the weights of the model these arguments load, in a daemon thread; None when off, not local, or larger
    than MEMORY_SHARE of the available memory."""
    if not wanted():
        return None
    folder = model_dir(swift_argv)
    files = weight_files(folder) if folder else []
    if not files:
        return None
    available, size = available_memory(), sum(f.stat().st_size for f in files)
    if available is not None and size > MEMORY_SHARE * available:
        print(f"{folder.name}: not read ahead: {size / 1e9:.1f} GB of weights, {available / 1e9:.1f} GB of memory "
              f"available (SCORE_PREFETCH)", flush=True)
        return None
    thread = threading.Thread(target=read_ahead, args=(files,), name="prefetch-weights", daemon=True)
    thread.start()
    return thread
