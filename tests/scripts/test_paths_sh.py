"""Where the scripts write and with what modes (issue 13): the default output folder is outputs/ beside the scripts
whatever the caller's directory (and printed), a relative OUTPUT_DIR is the caller's, and every output file honours
the umask. The scripts run from a copy of the repository, so the real outputs/ is never touched."""
from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from tests.helpers import (ROOT, fake_model, make_official, run_data_pre, run_script, score_calls, swift_calls,
                           value)
from tools.fileio import read_json
from tools.task import LABELS, STAGES, Layout


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The scripts with what they run (tools/, swift_plugins/, recipes/), copied to tmp_path/repo."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("data-pre.sh", "train.sh", "test.sh"):
        shutil.copy2(ROOT / name, copy / name)
    for folder in ("tools", "swift_plugins", "recipes"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def data_env(tmp_path: Path, labelled: bool = False) -> dict[str, str]:
    data = make_official(tmp_path / "data", n_per_label=6)
    if labelled:
        (data / "B.txt").write_text("".join(f"t{i}.jpg\t{label}\n" for i, label in enumerate(LABELS)),
                                    encoding="utf-8")
    return {"DATA_DIR": str(data), "AUGMENT": "0", "VAL_RATIO": "0.25",
            "MODEL_STAGE1": str(fake_model(tmp_path / "m1")), "MODEL_STAGE2": str(fake_model(tmp_path / "m2"))}


def test_the_default_output_folder_is_beside_the_scripts(tmp_path, repo_copy):
    real_outputs = (ROOT / "outputs").exists()
    elsewhere = tmp_path / "elsewhere"  # `cd /tmp && bash /path/to/test.sh`
    elsewhere.mkdir()
    outputs = repo_copy / "outputs"
    env = data_env(tmp_path)
    log = run_data_pre(env, root=repo_copy, cwd=elsewhere)
    assert f"output: {outputs}" in log and Layout(outputs).manifest.exists()
    log = run_script("train.sh", tmp_path, None, root=repo_copy, cwd=elsewhere)
    assert f"output: {outputs}" in log
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(outputs / f"{s}.training")
                                                                         for s in STAGES]
    log = run_script("test.sh", tmp_path, None, root=repo_copy, cwd=elsewhere)
    assert f"submission: {outputs / 'b-submit.txt'}" in log and (outputs / "b-submit.txt").exists()
    assert len(score_calls(tmp_path)) == 1
    assert list(elsewhere.iterdir()) == []  # nothing in the caller's directory
    assert (ROOT / "outputs").exists() == real_outputs

    # an OUTPUT_DIR given relative is the caller's, as any path argument is
    log = run_data_pre({**env, "OUTPUT_DIR": "rel out"}, root=repo_copy, cwd=elsewhere)
    assert f"output: {elsewhere / 'rel out'}" in log and Layout(elsewhere / "rel out").manifest.exists()


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o027, 0o640, 0o750)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "out"
    env = {**data_env(tmp_path, labelled=True), "OUTPUT_DIR": str(out)}
    run_data_pre(env, umask=umask)
    run_script("train.sh", tmp_path, out, umask=umask)
    log = run_script("test.sh", tmp_path, out, umask=umask)
    assert "report done" in log
    layout = Layout(out)
    found = modes(out)
    for path in (layout.submission, layout.probabilities, layout.manifest, layout.test_jsonl, layout.val_list,
                 layout.fusion_params, layout.report, layout.confusion_png, layout.checkpoint_pointer("stage1"),
                 layout.trained_on("stage2")):
        assert found[str(path.relative_to(out))] == file_mode, path
    for name, mode in found.items():  # everything else too: no file more private or more open than asked
        expected = dir_mode if (out / name).is_dir() else file_mode
        assert mode == expected, (name, oct(mode))


def test_a_relative_model_folder_is_the_callers(tmp_path, repo_copy):
    """MODEL_STAGE1/2 given as folders relative to the caller's directory (`./models/m1`, or `models/m2`, which
    also looks like a hub id) are resolved there, before the scripts' `cd`, by data-pre.sh and by train.sh; a hub id
    that names no folder here is recorded as it is."""
    elsewhere = tmp_path / "elsewhere"
    m1, m2 = fake_model(elsewhere / "models" / "m1"), fake_model(elsewhere / "models" / "m2")
    out = tmp_path / "out"
    env = {**data_env(tmp_path), "MODEL_STAGE1": "./models/m1", "MODEL_STAGE2": "models/m2", "OUTPUT_DIR": str(out)}
    run_data_pre(env, root=repo_copy, cwd=elsewhere)
    settings = read_json(Layout(out).manifest)["settings"]
    assert settings["model_stage1"] == str(m1) and settings["model_stage2"] == str(m2)
    run_script("train.sh", tmp_path, out, root=repo_copy, cwd=elsewhere)
    assert [value(a, "--model") for a in swift_calls(tmp_path)] == [str(m1), str(m2)]
    # train.sh's own MODEL_STAGE2 (the environment wins over the record), relative to where it is called from
    m3 = fake_model(tmp_path / "other" / "m3")
    run_script("train.sh", tmp_path, out, root=repo_copy, cwd=tmp_path / "other", STAGES="stage2", MODEL_STAGE2="m3")
    assert [value(a, "--model") for a in swift_calls(tmp_path)] == [str(m3)]
    # a hub id: no such folder here, kept as given
    run_data_pre({**env, "MODEL_STAGE2": "Qwen/Qwen2.5-VL-3B-Instruct"}, root=repo_copy, cwd=elsewhere)
    assert read_json(Layout(out).manifest)["settings"]["model_stage2"] == "Qwen/Qwen2.5-VL-3B-Instruct"
