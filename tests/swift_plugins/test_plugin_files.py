"""swift_plugins/: which files train.sh passes to --external_plugins, and that each registers into swift's maps
when swift imports it by path (no sys.path edits: the installed project makes tools and swift_plugins importable)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, clean_env


def test_plugin_list_is_every_public_file_then_the_patches():
    from swift_plugins import PLUGIN_DIR, plugin_files

    out = subprocess.run([sys.executable, "-m", "swift_plugins", "--list"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")[:-1]
    registry = sorted(str(p) for p in PLUGIN_DIR.glob("*.py") if not p.name.startswith("_"))
    patches = sorted(str(p) for p in (PLUGIN_DIR / "patches").glob("*.py") if not p.name.startswith("_"))
    assert out == registry + patches == [str(p) for p in plugin_files()]
    assert {Path(p).name for p in registry} == {"loss.py", "tuner.py", "metric.py", "callback.py", "optimizer.py"}
    assert [Path(p).name for p in patches] == ["checkpoint_layers.py", "compile_layers.py", "fp8_base.py", "liger_logits_to_keep.py", "lora_addmm.py",
                                                  "process_group_exit.py", "shared_memory.py", "trainer_flos.py",
                                                  "vision_attention.py"] and "__init__.py" not in out
    assert all(Path(p).is_absolute() for p in out)
    assert subprocess.run([sys.executable, "-m", "swift_plugins"], cwd=ROOT, capture_output=True).returncode == 2


def test_plugin_files_of_another_folder(tmp_path):
    from swift_plugins import plugin_files

    for name in ("b.py", "a.py", "_shared.py", "notes.txt", "patches/z.py", "patches/_x.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert plugin_files(tmp_path) == [(tmp_path / n).resolve() for n in ("a.py", "b.py", "patches/z.py")]


def test_plugins_register_into_swift_maps():
    from swift.callbacks import callbacks_map
    from swift.loss import loss_map
    from swift.metrics import eval_metrics_map
    from swift.optimizers import optimizers_map
    from swift.tuner_plugin import tuners_map
    from swift.utils import import_external_file

    for path in ("loss.py", "tuner.py", "metric.py", "callback.py", "optimizer.py"):
        import_external_file(str(ROOT / "swift_plugins" / path))  # the way --external_plugins loads them
    assert loss_map["weighted_ce"].__name__ == "WeightedCrossEntropy"
    assert tuners_map["hr_amplifier"].__name__ == "HighRiskAmplifierTuner"
    assert eval_metrics_map["weighted_f1"].__name__ == "WeightedF1Metrics"
    assert callbacks_map["amplifier_stats"].__name__ == "AmplifierStatsCallback"
    assert optimizers_map["hr_amplifier"].__name__ == "HighRiskAmplifierOptimizer"


def test_swift_loads_every_plugin_file_from_elsewhere(tmp_path):
    """As `swift sft --external_plugins ...` run from another folder without PYTHONPATH: every file imports."""
    code = ("import sys\nfrom swift.utils import import_external_file\n"
            "for path in sys.argv[1:]:\n    import_external_file(path)\n"
            "from swift.loss import loss_map\nfrom swift_plugins._amplifier import find_amplifier\n"
            "import swift_plugins.patches.vision_attention as va\n"
            "print(loss_map['weighted_ce'].__module__, va.__name__)\n")
    from swift_plugins import plugin_files

    proc = subprocess.run([sys.executable, "-c", code, *map(str, plugin_files())], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "swift_plugins.patches.vision_attention" in proc.stdout
