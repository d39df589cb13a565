"""Shared memory for DataLoader workers: Docker's default /dev/shm is 64 MB, and one batch of phone photos at
1,280 visual tokens (pixel values of 4 to 8 images) is about 25-100 MB, so workers die with "Bus error". With a
small /dev/shm, tensors go through files instead (torch's file_system sharing strategy): slower to hand over,
nothing else changes. Used by tools.model.score and, for training, by swift_plugins/patches/shared_memory.py."""
from __future__ import annotations

import shutil
import sys

SHM = "/dev/shm"
SHM_MIN_BYTES = 2 << 30  # below this, a few prefetched batches of large images do not fit


def shm_bytes(path: str = SHM) -> int | None:
    try:
        return shutil.disk_usage(path).total
    except OSError:
        return None


def use_files_if_shm_is_small(path: str = SHM, minimum: int = SHM_MIN_BYTES) -> bool:
    """Switch torch.multiprocessing to the file_system strategy when `path` is smaller than `minimum` (say so on
    stderr); returns whether it switched."""
    size = shm_bytes(path)
    if size is None or size >= minimum:
        return False
    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")
        print(f"warning: {path} holds only {size / 2**20:.0f} MiB (a container's default?): DataLoader workers pass "
              "batches through files instead (torch's file_system strategy); run the container with "
              "--shm-size=8g for the faster path", file=sys.stderr)
    return True
