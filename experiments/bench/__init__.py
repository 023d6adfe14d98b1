"""Benchmarks of sensprune, one module per concern over one timing helper.

  python -m experiments.bench --out=DIR [--benchmarks=passes,prune,...] [--models=...] [--quick]
  python -m experiments.bench.report --input=DIR --output=docs/benchmarks.md

Modules: :mod:`timing` (the timing helper: warm-up, interleaved repeats,
``block_until_ready``, medians, compile events, fresh processes),
:mod:`common` (model set-up, environment, JSON), :mod:`passes` (sensitivity
pass vs forward), :mod:`prune_e2e` (``sp.prune`` vs its pass),
:mod:`first_call` (the first ``sp.prune`` of a process split into tracing,
compiles, pass and search), :mod:`train_step` (masked vs unmasked step),
:mod:`memory` (compiled memory, peak RSS vs |S|), :mod:`mesh` (forced host
devices), :mod:`shrink` (shrunk vs dense inference), :mod:`cli` (the command
line), :mod:`report` (docs/benchmarks.md from the JSON).
"""
