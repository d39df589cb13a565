"""tools.fileio's atomic writer: the file appears whole or not at all, and with the mode open() would give it (the
umask honoured; mkstemp alone made every output 0600, b-submit.txt included: issue 13)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tools.fileio import atomic_open, read_json, write_json, write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_mode_is_what_open_would_give(tmp_path):
    write_text(tmp_path / "a.txt", "x\n")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x\n")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt")
    (tmp_path / "b.txt").write_text("old")
    os.chmod(tmp_path / "b.txt", 0o600)
    write_text(tmp_path / "b.txt", "new")  # replaced: a new file, with the new file's mode
    assert mode(tmp_path / "b.txt") == mode(tmp_path / "plain.txt")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_each_umask(tmp_path, umask):
    code = ("import sys; from tools.fileio import write_text, write_json, atomic_open\n"
            "write_text(sys.argv[1] + '/t.txt', 'x')\nwrite_json(sys.argv[1] + '/j.json', {})\n"
            "with atomic_open(sys.argv[1] + '/b.bin', 'wb') as f: f.write(b'x')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=lambda: os.umask(umask))
    for name in ("t.txt", "j.json", "b.bin"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "a.json", {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "a.json") as f:
            f.write('{"new": ')
            raise RuntimeError("interrupted")
    assert read_json(tmp_path / "a.json") == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
