"""train.sh's preflight: settings that cannot run here fail in seconds, with the reason."""
from __future__ import annotations

import json


from tests.model.support import OK_ENV
from tools.model.preflight import main, problems
from tools.task import HIGH_RISK, Layout

def test_settings_that_can_run_pass(out, capsys):
    assert problems(Layout(out), ["stage1", "stage2"], ["final"], OK_ENV) == []


def test_each_setting_that_cannot_run_is_named(out, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    empty_model = tmp_path / "empty"
    empty_model.mkdir()
    env = {**OK_ENV, "TORCH_DTYPE": "bfloat16", "USE_LIGER_KERNEL_STAGE2": "true", "ATTN_IMPL": "flash_attn",
           "MODEL_STAGE1": str(empty_model), "DEEPSPEED": "zero2"}
    found = "\n".join(problems(Layout(out), ["stage1", "stage2"], ["final"], env))
    assert "TORCH_DTYPE=bfloat16 on a machine without a CUDA GPU" in found
    assert "USE_LIGER_KERNEL_STAGE2=true" in found and "USE_LIGER_KERNEL_STAGE1" not in found
    assert "STAGE2_TUNER=hr_amplifier adds a bias to the attention logits" in found
    assert f"MODEL_STAGE1={empty_model}: not a model folder" in found
    assert "DEEPSPEED=zero2" in found
    # only the stages train.sh trains are checked
    assert "USE_LIGER_KERNEL_STAGE2" not in "\n".join(problems(Layout(out), ["stage1"], ["final"], {**env, "TORCH_DTYPE": "float32"}))


def test_the_stack_is_checked_installed_without_importing_it(out, monkeypatch):
    """swift's stack is looked up, not imported (swift imports it seconds later anyway); a missing package is named."""
    import importlib
    import importlib.util

    from tools.model import preflight

    imported = []
    real_import, real_find = importlib.import_module, importlib.util.find_spec
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qwen_vl_utils" else real_find(name, *a))
    found = problems(Layout(out), ["stage1", "stage2"], ["final"], OK_ENV)
    assert found == ["qwen_vl_utils is not installed (ModuleNotFoundError: No module named 'qwen_vl_utils'): "
                     "run init.sh"]
    assert not set(imported) & set(preflight.STACK)


def test_a_deepspeed_that_does_not_import_is_said_once_for_both_stages(out, monkeypatch):
    from tools.model import preflight

    monkeypatch.setattr(preflight, "_importable", lambda module: "ImportError: broken" if module == "deepspeed" else None)
    found = problems(Layout(out), ["stage1", "stage2"], ["final"], {**OK_ENV, "DEEPSPEED": "zero2"})
    assert sum("deepspeed does not import (ImportError: broken)" in line for line in found) == 1


def test_a_stage_2_set_without_high_risk_is_refused_before_training(out, capsys):
    layout = Layout(out)
    rows = [json.loads(line) for line in layout.train_jsonl("stage2").read_text(encoding="utf-8").splitlines()]
    kept = [r for r in rows if r["messages"][-1]["content"] != HIGH_RISK]
    layout.train_jsonl("stage2").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                                            encoding="utf-8")
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))  # as if data-pre.sh wrote it so
    from tools.state import file_digest

    manifest["files"][str(layout.train_jsonl("stage2").relative_to(layout.root))] = file_digest(layout.train_jsonl("stage2"))
    layout.manifest.write_text(json.dumps(manifest), encoding="utf-8")
    found = problems(layout, ["stage1", "stage2"], ["final"], OK_ENV)
    assert len(found) == 1 and f"has no {HIGH_RISK} row" in found[0]
    assert main(["--output-dir", str(out), "--stages", "stage2", "--runs", "final"]) == 1
    assert "cannot train with these settings" in capsys.readouterr().err


def test_native_builds_need_a_compiler_and_python_headers(monkeypatch, tmp_path):
    import shutil
    import sysconfig

    import torch

    from tools.model import preflight

    env = {**OK_ENV, "USE_LIGER_KERNEL_STAGE1": "true", "FIRESAFE_COMPILE_LAYERS": "1"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    found = preflight.build_problems(["stage1", "stage2"], env)
    assert len(found) == 2
    assert found[0].startswith("USE_LIGER_KERNEL_STAGE1=true and FIRESAFE_COMPILE_LAYERS=1: no C compiler")
    assert f"Python's C headers are missing ({tmp_path / 'Python.h'})" in found[1]
    (tmp_path / "Python.h").write_text("")
    assert preflight.build_problems(["stage1"], {**env, "CC": "cc"}) == []
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert preflight.build_problems(["stage1"], env) == []
    # a CPU: liger is refused elsewhere; compiled layers need C++ (inductor's CPU code)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found = preflight.build_problems(["stage1"], env)
    assert len(found) == 1 and found[0].startswith("FIRESAFE_COMPILE_LAYERS=1: no C++ compiler")
    assert preflight.build_problems(["stage1"], {**env, "FIRESAFE_COMPILE_LAYERS": "0"}) == []


def test_float8_training_needs_a_gpu_with_float8_matmuls(monkeypatch):
    import torch

    from tools.model import fp8, preflight

    env = {**OK_ENV, "FP8_BASE_STAGE1": "1"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    found = preflight.stage_problems("stage1", env)
    assert found == [f"FP8_BASE_STAGE1=1 needs float8 matmuls: {fp8.supported()}; set FP8_BASE_STAGE1=0"]
    assert "8.0 < 8.9" in found[0]
    assert preflight.stage_problems("stage2", env) == []  # the knob is per stage
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert preflight.stage_problems("stage1", env) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU: torch's float8 matmul (slow) works
    assert preflight.stage_problems("stage1", env) == []
