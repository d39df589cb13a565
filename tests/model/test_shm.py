"""A small /dev/shm switches DataLoader workers to file-based sharing, with a message; a large one changes nothing."""
from __future__ import annotations

import torch.multiprocessing as mp

from tools.model import shm


def test_small_shm_switches_to_files(monkeypatch, tmp_path, capsys):
    original = mp.get_sharing_strategy()
    try:
        monkeypatch.setattr(shm, "shm_bytes", lambda path=shm.SHM: 64 << 20)  # Docker's default
        assert shm.use_files_if_shm_is_small() is True
        assert mp.get_sharing_strategy() == "file_system"
        assert "--shm-size" in capsys.readouterr().err
        mp.set_sharing_strategy(original)
        monkeypatch.setattr(shm, "shm_bytes", lambda path=shm.SHM: 16 << 30)
        assert shm.use_files_if_shm_is_small() is False and mp.get_sharing_strategy() == original
        monkeypatch.setattr(shm, "shm_bytes", lambda path=shm.SHM: None)  # no /dev/shm at all
        assert shm.use_files_if_shm_is_small() is False
    finally:
        mp.set_sharing_strategy(original)


def test_shm_bytes_reads_a_real_folder(tmp_path):
    assert shm.shm_bytes(str(tmp_path)) > 0
    assert shm.shm_bytes(str(tmp_path / "missing")) is None
