"""swift_plugins._patching.when_imported: a patch for a module that only some runs import runs at that import."""
from __future__ import annotations

import sys

from swift_plugins._patching import cancel, when_imported


def test_the_callback_runs_after_the_modules_code_at_its_first_import(tmp_path, monkeypatch):
    (tmp_path / "later_pkg").mkdir()
    (tmp_path / "later_pkg" / "__init__.py").write_text("")
    (tmp_path / "later_pkg" / "mod.py").write_text("def forward():\n    return 'original'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("later_pkg", "later_pkg.mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    seen = []

    def patch(module):
        seen.append(module.forward())  # the module's own code has run
        module.forward = lambda: "patched"

    hook = when_imported("later_pkg.mod", patch)
    assert seen == [] and "later_pkg.mod" not in sys.modules  # installing imports nothing
    from later_pkg.mod import forward  # a `from` import binds the patched name

    assert seen == ["original"] and forward() == "patched"
    assert hook not in sys.meta_path  # one-shot
    again = when_imported("later_pkg.mod", patch)  # already imported: now
    assert again is None and seen == ["original", "patched"]


def test_a_cancelled_hook_does_nothing(tmp_path, monkeypatch):
    (tmp_path / "never_pkg.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "never_pkg", raising=False)
    hook = when_imported("never_pkg", lambda module: setattr(module, "value", 2))
    cancel(hook)
    cancel(hook)  # twice, or None: nothing
    cancel(None)
    import never_pkg

    assert never_pkg.value == 1

