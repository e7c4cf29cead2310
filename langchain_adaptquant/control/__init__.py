"""Control: what level a model should be at, decided from numbers alone.

Levels and priorities, memory probes and snapshots, the load tracker, model sizes, the pure
policy (the documented decision matrix, hysteresis, quality floors) and the manager that feeds it
live measurements. Nothing here touches weights: control imports neither ``runtime`` nor
``backends``; it receives KV-cache bytes and quality figures as plain numbers, and which levels the
device offers (with their backend settings) as a catalog (:mod:`.capabilities`).
"""
