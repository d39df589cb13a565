"""How the files in patches/ replace a function of transformers, PEFT, liger or swift, so that importing a patch
twice (swift imports plugin files by path; tests import them as modules) never wraps a wrapper: the replaced
function is kept on the replacement as `__wrapped_original__`."""
from __future__ import annotations


def original_of(fn):
    """The function a patch replaced (fn itself where no patch did)."""
    return getattr(fn, "__wrapped_original__", fn)


def install(owner, name: str, wrapper) -> None:
    """owner.name = wrapper, which reaches the unpatched function as wrapper.__wrapped_original__."""
    wrapper.__wrapped_original__ = original_of(getattr(owner, name))
    setattr(owner, name, wrapper)
