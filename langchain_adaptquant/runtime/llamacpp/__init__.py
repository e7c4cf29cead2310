"""The llama.cpp runtime: GGUF weights served by llama.cpp (llama-cpp-python's low-level API).

It sits beside the torch runtime behind the same seam (``runtime.registry``): a loader with
``load_model`` / ``requantize`` / ``engine``, an engine with ``submit(GenerationRequest) ->
RequestHandle``. Levels are GGUF files made once with llama.cpp's own quantizer; a switch loads
the new level's file between decode steps and re-feeds the sequences in flight.
"""

from langchain_adaptquant.runtime.llamacpp.bindings import available, unavailable_reason

__all__ = ["available", "unavailable_reason"]
