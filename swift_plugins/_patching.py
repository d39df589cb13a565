"""How the files in patches/ replace a function of transformers, PEFT, liger or swift, so that importing a patch
twice (swift imports plugin files by path; tests import them as modules) never wraps a wrapper: the replaced
function is kept on the replacement as `__wrapped_original__`."""
from __future__ import annotations

import importlib.util
import sys

from tools.knobs import switch  # noqa: F401  (the patches' 0/1 knobs: one reader for every such knob)


def original_of(fn):
    """The function a patch replaced (fn itself where no patch did)."""
    return getattr(fn, "__wrapped_original__", fn)


def install(owner, name: str, wrapper) -> None:
    """owner.name = wrapper, which reaches the unpatched function as wrapper.__wrapped_original__."""
    wrapper.__wrapped_original__ = original_of(getattr(owner, name))
    setattr(owner, name, wrapper)


def install_on_swift(name: str, wrapper) -> None:
    """SwiftMixin.name = wrapper (install); nothing without swift, which is what loads the patch files."""
    try:
        from swift.trainers.mixin import SwiftMixin
    except ImportError:
        return
    install(SwiftMixin, name, wrapper)


class _AfterImport:
    """A sys.meta_path finder for one module name: it lets the other finders find the module and runs the callback
    on the module right after its code has run (one-shot: it leaves sys.meta_path at that first import)."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        cancel(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            self.callback(module)

        spec.loader.exec_module = run
        return spec


def when_imported(name: str, callback):
    """callback(module) now if `name` is imported, else right after something imports it; the pending hook (or None),
    for cancel(). For a patch of a module that only some runs import (liger's): installing it must not import it."""
    if name in sys.modules:
        callback(sys.modules[name])
        return None
    hook = _AfterImport(name, callback)
    sys.meta_path.insert(0, hook)
    return hook


def cancel(hook) -> None:
    """Drop a pending when_imported hook (nothing if it ran or there is none)."""
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)
