"""Patch (on import): a small /dev/shm switches torch's DataLoader workers to passing batches through files.

Docker's default /dev/shm is 64 MB; swift's DataLoader workers (DATALOADER_WORKERS) pass each batch of
pixel values (tens of MB at 1,280 visual tokens) through it and die with "Bus error". See tools/model/shm.py.
Nothing changes when /dev/shm is large enough.
"""
from tools.model.shm import use_files_if_shm_is_small

use_files_if_shm_is_small()
