"""tools.model.prefetch: which files are read ahead, for which arguments, and that it can be turned off."""
import json
import os

import pytest

from tools.model import prefetch as P


@pytest.fixture
def base(tmp_path):
    """A base-model folder: two weight shards, an index and a config (only the shards are weights)."""
    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir()
    for name, size in (("model-00002-of-00002.safetensors", 3000), ("model-00001-of-00002.safetensors", 5000),
                       ("model.safetensors.index.json", 10), ("config.json", 10)):
        (folder / name).write_bytes(b"x" * size)
    return folder


def checkpoint(tmp_path, recorded: dict):
    ckpt = tmp_path / "stage1" / "checkpoint-9"
    ckpt.mkdir(parents=True)
    (ckpt / "args.json").write_text(json.dumps(recorded), encoding="utf-8")
    return ckpt


def test_the_model_folder_comes_from_model_or_from_the_adapters_record(tmp_path, base):
    ckpt = checkpoint(tmp_path, {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "model_dir": str(base)})
    assert P.model_dir(["--adapters", str(ckpt), "--max_pixels", "1003520"]) == base
    assert P.model_dir([f"--adapters={ckpt}"]) == base
    other = tmp_path / "other"
    other.mkdir()
    assert P.model_dir(["--adapters", str(ckpt), "--model", str(other)]) == other  # --model overrides the record
    assert P.model_dir(["--model", str(base), "--model", str(other)]) == other  # the last one wins
    assert P.model_dir(["--model", "Qwen/Qwen2.5-VL-7B-Instruct"]) is None  # a hub id: nothing local to read
    assert P.model_dir(["--adapters", str(tmp_path / "missing")]) is None
    assert P.model_dir(["--adapters", str(checkpoint(tmp_path / "b", {"model_dir": str(tmp_path / "gone")}))]) is None
    assert P.model_dir([]) is None


def test_only_weight_files_are_read_whole_in_name_order(base, monkeypatch):
    opened = []
    monkeypatch.setattr(P, "open", lambda path, *a, **k: opened.append(path.name) or open(path, *a, **k), raising=False)
    files = P.weight_files(base)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    missing = base / "model-00003-of-00002.safetensors"
    assert P.read_ahead([*files, missing], chunk=1024) == 8000  # every byte, in chunks; a missing file skipped
    assert opened == [f.name for f in files] + [missing.name]


def test_start_reads_ahead_in_the_background_unless_turned_off(tmp_path, base, monkeypatch):
    advised = []
    monkeypatch.setattr(P, "read_ahead", lambda files: advised.append([f.name for f in files]))
    ckpt = checkpoint(tmp_path, {"model_dir": str(base)})
    monkeypatch.setenv("SCORE_PREFETCH", "0")
    assert P.start(["--adapters", str(ckpt)]) is None and advised == []  # turned off
    monkeypatch.setenv("SCORE_PREFETCH", "on")
    with pytest.raises(ValueError, match="SCORE_PREFETCH='on'"):
        P.start(["--adapters", str(ckpt)])
    monkeypatch.delenv("SCORE_PREFETCH")  # on by default
    assert P.start(["--model", "Qwen/Qwen2.5-VL-7B-Instruct"]) is None  # nothing local
    thread = P.start(["--adapters", str(ckpt)])
    thread.join(10)
    assert thread.daemon and advised == [[f.name for f in P.weight_files(base)]]


def test_no_read_ahead_of_more_than_the_page_cache_can_keep(tmp_path, base, monkeypatch, capsys):
    """The two shards are 8,000 bytes: read ahead when 3/4 of the available memory holds them, not otherwise."""
    advised = []
    monkeypatch.setattr(P, "read_ahead", lambda files: advised.append(len(files)))
    monkeypatch.delenv("SCORE_PREFETCH", raising=False)
    ckpt = checkpoint(tmp_path, {"model_dir": str(base)})
    monkeypatch.setattr(P, "available_memory", lambda: 10_000)
    assert P.start(["--adapters", str(ckpt)]) is None and advised == []
    assert "not read ahead: 0.0 GB of weights, 0.0 GB of memory available" in capsys.readouterr().out
    monkeypatch.setattr(P, "available_memory", lambda: 11_000)
    P.start(["--adapters", str(ckpt)]).join(10)
    monkeypatch.setattr(P, "available_memory", lambda: None)  # no /proc/meminfo: read ahead
    P.start(["--adapters", str(ckpt)]).join(10)
    assert advised == [2, 2]


def test_available_memory_is_read_from_meminfo():
    available = P.available_memory()
    assert available is None or 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
