"""The benchmarks behind every published figure, as one package so that they share one measuring module.

``benchmarks.common`` holds each measuring fact once (peak and anonymous memory around an action,
model resolution, machine facts, copy bandwidth, held-out inputs, tables and JSON); every script
imports it instead of keeping a copy. Run a script from the repository root as a module::

    python -m benchmarks.levels --quick

This package is not installed with ``langchain_adaptquant`` (pyproject's package discovery takes
``langchain_adaptquant*`` only).
"""
