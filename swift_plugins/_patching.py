"""How the files in patches/ replace a function of transformers, PEFT, liger or swift, so that importing a patch
twice (swift imports plugin files by path; tests import them as modules) never wraps a wrapper: the replaced
function is kept on the replacement as `__wrapped_original__`."""
from __future__ import annotations

import os


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


def switch(env: str, meaning: str) -> bool:
    """A patch's 0/1 knob from the environment (unset or empty: 0); anything else is an error naming it."""
    text = (os.environ.get(env) or "0").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{env}={text!r}: expected 0 or 1 ({meaning})")
    return text == "1"
