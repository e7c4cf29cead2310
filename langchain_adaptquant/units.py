"""Byte units, defined once: memory is counted in binary units (GiB, MiB) everywhere in the package."""

from __future__ import annotations

#: One gibibyte: budgets, thresholds and snapshots are in GiB.
GIB = 1024**3
#: One mebibyte: status and benchmark tables report MB as 2**20 bytes.
MIB = 1024**2
