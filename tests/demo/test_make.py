"""tools.demo.make: the CLI's model path and the model cache (a complete entry is reused, never rebuilt)."""
from __future__ import annotations

from tools.demo import make
from tools.demo.models import cached_models_dir


def test_print_model_names_the_cache_entry(tmp_path, capsys):
    assert make.main(["--models-dir", str(tmp_path), "--seed", "3", "--print-model", "stage2"]) == 0
    assert capsys.readouterr().out.strip() == str((cached_models_dir(tmp_path, 3) / "stage2").resolve())
    assert make.main(["--models-dir", str(tmp_path), "--quick", "--print-model", "stage1"]) == 0
    assert capsys.readouterr().out.strip().endswith("-seed0-quick/stage1")
    assert not any(tmp_path.iterdir())  # printing builds nothing


def test_a_complete_cache_entry_is_reused(tmp_path, capsys, monkeypatch):
    root = cached_models_dir(tmp_path, 0)
    for stage in ("stage1", "stage2"):
        (root / stage).mkdir(parents=True)
        (root / stage / "config.json").write_text("{}")
        (root / stage / "DONE").write_text("{}")
    monkeypatch.setattr(make, "build_tiny_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert make.make_models(tmp_path, seed=0) == root
    assert capsys.readouterr().out.count("cached at") == 2
    assert make.main(["--models-dir", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--skip-data"]) == 0
