"""ms-swift plugins for this task, one module per swift registry, loaded with `--external_plugins FILE`.

    python -m swift_plugins --list      # the files train.sh passes to --external_plugins, one a line

Every `*.py` in this folder whose name does not start with `_` is a plugin file: swift imports it by path
and it registers into swift's own maps on import (loss.py -> swift.loss.loss_map, tuner.py ->
swift.tuner_plugin.tuners_map, optimizer.py -> swift.optimizers.optimizers_map, metric.py ->
swift.metrics.eval_metrics_map, callback.py -> swift.callbacks.callbacks_map). Files starting with `_` hold
the code they share (imported as `swift_plugins._x`, so a class has one identity however the registering file
was imported). The files in `patches/` are patches to transformers and PEFT (speed only), passed to swift the
same way, after the plugins.
See docs/plugins.md.
"""
from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent


def plugin_files(folder: str | Path = PLUGIN_DIR) -> list[Path]:
    """Absolute paths of the plugin files in `folder`, then of its patches/, each sorted by name (so the import
    order is stable)."""
    def public(d: Path) -> list[Path]:
        return sorted(p.resolve() for p in d.glob("*.py") if not p.name.startswith("_"))

    return public(Path(folder)) + public(Path(folder) / "patches")
