"""The Triton interpreter, patching the language once per launch instead of once per device-function call.

The interpreter runs a kernel as Python over numpy. At a launch it swaps triton.language's builtins for
interpreted ones, and it swaps them again, through `inspect.getmembers` of four modules, on every call of a
@triton.jit helper inside the kernel: the decoders call thousands of helpers per launch, and that re-patching
was about a third of their tests' time. Within one launch, the language modules a helper sees need patching only
the first time; a helper whose module sees one not yet patched (triton.language.core, say) still patches it.
Results are unchanged: the same interpreted builtins run.
"""

from __future__ import annotations

import inspect

import triton.language as tl
from triton.runtime import interpreter


def _languages(fn) -> frozenset[int]:
    """The language modules `fn`'s globals hold, those the interpreter patches for it."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def patch_languages_once_per_launch() -> None:
    """Install the once-per-launch patching, where this Triton's interpreter has the parts it wraps."""
    grid_executor = getattr(interpreter, "GridExecutor", None)
    function = getattr(interpreter, "InterpretedFunction", None)
    if grid_executor is None or function is None or not hasattr(function, "rewrite"):
        return
    launch, call = grid_executor.__call__, function.__call__
    patched: list[set[int]] = []  # per launch in progress: the language modules patched so far
    languages: dict[int, frozenset[int]] = {}

    def launch_patching_once(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def call_without_repatching(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if key not in languages:
            languages[key] = _languages(self.fn)
        needed = languages[key]
        if not patched or not needed <= patched[-1]:
            if patched:
                patched[-1] |= needed
            return call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    grid_executor.__call__ = launch_patching_once
    function.__call__ = call_without_repatching
