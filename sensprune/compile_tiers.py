"""Two compile tiers: a pass's programs start on a quick build and move to XLA's full build once hot.

On a CPU, most of a program's XLA compile time is LLVM optimising the code of
its fusions. A prune call runs most of its programs only a few times (the
capture once per chunk of S, a conv kernel once per layer of its shape
bucket and chunk, the zeroing's gradient once per searched budget and
chunk), so on a first call the compile, not the run, is what the user waits
for: ResNet20's first ``sp.prune`` took 3.9 s of wall time, in which XLA
compiled for 4.3 s (summed over two threads) and the programs ran for 0.5 s.

A :class:`TieredJit` is ``jax.jit`` with two builds of every specialisation
(static arguments and argument shapes):

- *quick*: compiled with XLA options that skip most of LLVM's work
  (:data:`QUICK`: backend optimisation level 0 and XLA's older, simpler
  fusion emitters; :data:`LIGHT`: level 1, for small kernels whose inner
  loop needs some optimisation). About 5x faster to compile, 1.1-3x slower
  to run.
- *full*: XLA's default options.

A specialisation runs its quick build for its first ``promote_after`` calls
in the process and its full build from then on, so which build runs is a
deterministic function of the call sequence. The full build is compiled in
a background thread from the call ``compile_ahead`` calls before the switch
(XLA compiles without the GIL, so on a second core it overlaps those calls);
the switching call waits for it if it is not done.

Both builds run the same operations; XLA may order the sums of a dot or
reduce differently between them, so values can differ in the last bit, as
between XLA versions or backends (``tests/test_compile_tiers.py``:
sensitivities within 1e-6, the same masks).

Only on the CPU backend; elsewhere every call runs the full build. Set the
environment variable ``SENSPRUNE_COMPILE_TIERS=0`` before importing
sensprune to always use the full build (e.g. to compare).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import os
import re
import threading
import weakref
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import jax

QUICK: Mapping[str, Any] = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
LIGHT: Mapping[str, Any] = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
ENABLED = os.environ.get("SENSPRUNE_COMPILE_TIERS", "1").strip().lower() not in ("0", "false", "off", "no")
_LEVEL = re.search(r"--xla_backend_optimization_level=(\d+)", os.environ.get("XLA_FLAGS", ""))


def _no_higher(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the optimisation level no higher than ``XLA_FLAGS`` sets for every build
    (a quick build never takes longer to compile than the full one, e.g. in the test suite)."""
    out = dict(options)
    if _LEVEL is not None and "xla_backend_optimization_level" in out:
        out["xla_backend_optimization_level"] = min(int(out["xla_backend_optimization_level"]), int(_LEVEL.group(1)))
    return out


_INSTANCES: "weakref.WeakSet[TieredJit]" = weakref.WeakSet()  # for :func:`settle`


def _leaf_signature(leaf: Any) -> Hashable:
    """What jit specialises a dynamic argument on: its shape and dtype (or, for a Python scalar, its type)."""
    shape = getattr(leaf, "shape", None)
    if shape is None:
        return type(leaf).__name__
    return tuple(shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False))


@dataclasses.dataclass
class _Specialisation:
    calls: int = 0
    promoted: bool = False
    compiling: Optional[concurrent.futures.Future] = None


# one background compile at a time (a second one would only compete for the same cores)
_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensprune-tiers")


def _drop_pending() -> None:
    """At interpreter exit: cancel the background compiles not yet started (their builds would never run;
    the executor would otherwise run them all before the process ends)."""
    _BACKGROUND.shutdown(wait=False, cancel_futures=True)


# threading's exit hooks run before concurrent.futures joins its workers: a private hook of threading, the one
# concurrent.futures itself registers through (plain atexit, which runs after that join, where it is missing)
getattr(threading, "_register_atexit", atexit.register)(_drop_pending)


def _compile(jitted: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Compiles ``jitted`` for these arguments, filling its cache (the call then reuses the executable)."""
    jitted.lower(*args, **kwargs).compile()


class TieredJit:
    """``jax.jit(fun, static_argnames=...)`` with a quick and a full build (module docstring)."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        static_argnames: Sequence[str] = (),
        quick_options: Mapping[str, Any] = QUICK,
        promote_after: int = 8,
        compile_ahead: Optional[int] = None,
    ) -> None:
        if promote_after < 0:
            raise ValueError(f"promote_after must be >= 0, got {promote_after!r}")
        ahead = promote_after // 2 if compile_ahead is None else compile_ahead
        if not 0 <= ahead <= promote_after:
            raise ValueError(f"compile_ahead must be in [0, promote_after={promote_after}], got {compile_ahead!r}")
        self.static_argnames = tuple(static_argnames)
        self.promote_after = int(promote_after)
        self.compile_ahead = int(ahead)
        self.full = jax.jit(fun, static_argnames=self.static_argnames)
        self.quick = jax.jit(fun, static_argnames=self.static_argnames, compiler_options=_no_higher(quick_options))
        self._specs: dict[Hashable, _Specialisation] = {}
        self.__wrapped__ = fun
        self.__name__ = getattr(fun, "__name__", type(self).__name__)
        _INSTANCES.add(self)

    def _key(self, args: tuple, kwargs: Mapping[str, Any]) -> Hashable:
        static = tuple((k, kwargs[k]) for k in self.static_argnames if k in kwargs)
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, treedef = jax.tree_util.tree_flatten((args, dynamic))
        return static, treedef, tuple(_leaf_signature(leaf) for leaf in leaves)

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """The jitted build the next call with these arguments runs (without counting a call)."""
        if not tiered_backend():
            return self.full
        spec = self._specs.get(self._key(args, kwargs))
        return self.full if spec is not None and self._full_next(spec) else self.quick

    def _full_next(self, spec: _Specialisation) -> bool:
        """Whether the specialisation's next call runs the full build."""
        return spec.promoted or spec.calls >= self.promote_after

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not tiered_backend():
            return self.full(*args, **kwargs)
        spec = self._specs.setdefault(self._key(args, kwargs), _Specialisation())
        spec.promoted = self._full_next(spec)
        spec.calls += 1
        if spec.promoted:
            if spec.compiling is not None:  # never compile one build twice at once; a failed one is redone here
                concurrent.futures.wait([spec.compiling])
                spec.compiling = None
            return self.full(*args, **kwargs)
        if spec.compiling is None and spec.calls > self.promote_after - self.compile_ahead:
            try:
                spec.compiling = _BACKGROUND.submit(_compile, self.full, args, dict(kwargs))
            except RuntimeError:  # the interpreter is exiting: the switching call compiles it, if it comes
                pass
        return self.quick(*args, **kwargs)

    def promote(self) -> None:
        """Every specialisation seen so far runs its full build from its next call on."""
        for spec in self._specs.values():
            spec.promoted = True

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` of the build the next call would run (e.g. to compile it ahead)."""
        return self.build(*args, **kwargs).lower(*args, **kwargs)


def tiered_backend() -> bool:
    """Whether quick builds are used: tiers enabled and the default backend a CPU."""
    return ENABLED and jax.default_backend() == "cpu"


def tiered_jit(
    fun: Callable[..., Any] | None = None,
    *,
    static_argnames: Sequence[str] = (),
    quick_options: Mapping[str, Any] = QUICK,
    promote_after: int = 8,
    compile_ahead: Optional[int] = None,
) -> Any:
    """:class:`TieredJit` as a decorator (``@tiered_jit(static_argnames=...)``) or a call."""
    def wrap(f: Callable[..., Any]) -> TieredJit:
        return TieredJit(f, static_argnames=static_argnames, quick_options=quick_options,
                         promote_after=promote_after, compile_ahead=compile_ahead)

    return wrap if fun is None else wrap(fun)


def settle() -> None:
    """Promotes every specialisation seen in this process: later calls run full builds (a benchmark
    calls this before timing steady calls, so they time the builds a long job ends up on)."""
    for tiered in list(_INSTANCES):
        tiered.promote()
