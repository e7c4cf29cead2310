"""Control: what level a model should be at, decided from numbers alone.

Levels and priorities, memory probes and snapshots, the load tracker, model sizes, the pure
policy (the documented decision matrix, hysteresis, quality floors) and the manager that feeds it
live measurements. Nothing here touches weights: control never imports ``runtime``; it receives
KV-cache bytes and quality figures as plain numbers. (The manager asks the backend registry which
levels this device offers, lazily, on first use.)
"""
