#!/usr/bin/env python
"""Train the small reference chat model shipped in ``langchain_adaptquant/assets/reference-llama``.

Why it exists: tests, benchmarks and the demo need a real *trained* model (random weights make every
quantization level look equally good) that is small, loads offline and speaks our chat/tool format.

Corpus, and why: the documentation that ships with every CPython install, so the model can be rebuilt on any
machine with Python and no network:

* docstrings of public standard-library modules (module, public function, class and method docstrings).
  Pure-Python modules are read with ``ast`` from their source (no import, so no side effects such as
  ``antigravity`` opening a browser); C modules (``builtins``, ``math``, ``itertools`` ...) are imported and
  read with ``inspect``. Private (``_name``) and test modules are skipped, and so are ``idlelib``,
  ``turtledemo``, ``lib2to3`` and ``ensurepip`` (application/data code, not library documentation).
  Order is deterministic (sorted module names, source order within a module).
* every topic of ``pydoc_data.topics`` (the language reference text behind ``help("assert")``).

One document = one module or one pydoc topic. At least 5% of documents *and* of characters are held out,
chosen by a seeded hash of the document id, and never used for the tokenizer, pre-training or fine-tuning.
The split (held-out ids, corpus SHA-256, Python version) goes to ``split.json`` next to the model.

Steps: byte-level BPE tokenizer (8192 tokens, incl. ChatML and tool-call tokens) -> Llama pre-training from
scratch -> brief chat fine-tune on generated examples (stdlib Q/A and tool calls; loss on assistant tokens
only, interleaved with pre-training batches so held-out perplexity does not drift) -> evaluation (held-out
perplexity vs an add-one unigram model) -> bf16 safetensors, tokenizer, model card.

Run (about 30 minutes on 2 CPU cores)::

    nice -n 10 python scripts/train_reference_model.py

``--smoke`` runs the whole pipeline in about a minute into a temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import random
import shutil
import sys
import sysconfig
import time
import tokenize
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Sleep instead of spinning while waiting for the other OpenMP thread: on a shared, niced run a spinning
# thread burns the small CPU share the training gets.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "langchain_adaptquant" / "assets" / "reference-llama"

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]
# Ordinary added tokens (kept by decode(skip_special_tokens=True)) so tool calls are cheap to emit and parse.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
SKIP_PACKAGES = {"antigravity", "this", "idlelib", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "test", "tests"}

CHAT_TEMPLATE = """\
{%- if messages and messages[0].role == 'system' %}
    {%- set system_message = messages[0].content if messages[0].content is string else '' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if system_message %}{{- system_message + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nYou may call functions. Their signatures are inside <tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nTo call a function, answer with <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>\\n' }}
{%- elif system_message %}
    {{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- set content = message.content if message.content is string else ((message.content | tojson) if message.content is defined else '') %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- content }}
            {%- for tool_call in message.tool_calls | default([], true) %}
                {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
                {%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
                {{- '<tool_call>{"name": ' + (call.name | tojson) + ', "arguments": ' }}
                {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
                {{- '}</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@dataclass
class Settings:
    """Every knob of one run; written into the model card so the run can be repeated."""

    seed: int = 1234
    heldout_fraction: float = 0.05
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 2048
    seq_len: int = 256
    batch_size: int = 4  # small batches: more updates from the few tokens a shared 2-core CPU can process
    pretrain_steps: int = 2800
    pretrain_lr: float = 2.5e-3
    warmup_steps: int = 60
    finetune_examples: int = 480
    finetune_batch_size: int = 8
    finetune_steps: int = 400
    finetune_lr: float = 5e-4
    finetune_mix_every: int = 3  # every n-th fine-tune step is a pre-training batch
    # Wall-time budgets. On a fast enough machine they never bind and the run is deterministic; on a busy,
    # shared one the LR schedule is compressed to finish in time (the card then says "time-limited").
    pretrain_minutes: float = 22.0
    finetune_minutes: float = 8.0
    sample_chars: int = 4000


@dataclass
class ApiEntry:
    """A documented public function, used to generate fine-tuning Q/A and tool-call examples."""

    doc_id: str
    name: str
    summary: str
    params: list[tuple[str, str, bool]] = field(default_factory=list)  # (name, json type, required)


@dataclass
class Document:
    doc_id: str
    text: str


# ----------------------------------------------------------------------------------------------- corpus


def _is_public_module(name: str) -> bool:
    """Private and test modules are not documentation a user reads."""
    return not (
        name.startswith("_")
        or name in SKIP_PACKAGES
        or name.startswith("test_")
        or name.endswith("_test")
        or name.endswith("_tests")
    )


def _walk_source_modules(path: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yield (dotted name, source file) of public pure-Python stdlib modules, sorted, without importing."""
    for info in sorted(pkgutil.iter_modules([path]), key=lambda m: m.name):
        if not _is_public_module(info.name):
            continue
        full = prefix + info.name
        sub = os.path.join(path, info.name)
        origin = os.path.join(sub, "__init__.py") if info.ispkg else sub + ".py"
        if os.path.isfile(origin):
            yield full, origin
        if info.ispkg:
            yield from _walk_source_modules(sub, full + ".")


def _json_type(default: ast.expr | None) -> str:
    if isinstance(default, ast.Constant):
        if isinstance(default.value, bool):
            return "boolean"
        if isinstance(default.value, int):
            return "integer"
        if isinstance(default.value, float):
            return "number"
    return "string"


def _params_of(args: ast.arguments) -> list[tuple[str, str, bool]]:
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, _json_type(d), d is None) for a, d in zip(positional, defaults)]
    out += [(a.arg, _json_type(d), d is None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return [p for p in out if p[0] not in ("self", "cls")]


def _summary(doc: str, limit: int = 260) -> str:
    """First paragraph, cut at a sentence end: a short answer a tiny model can learn to give."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) <= limit:
        return para
    cut = para[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + "..."


def _source_document(name: str, path: str) -> tuple[Document | None, list[ApiEntry]]:
    """Module docstring plus public function/class/method docstrings, each headed by its signature."""
    try:
        with tokenize.open(path) as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None, []
    doc_id = f"module:{name}"
    parts, entries = [], []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(f"Module {name}\n\n{module_doc}")

    def visit(body: list[ast.stmt], qual: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                full = f"{qual}.{node.name}"
                if isinstance(node, ast.ClassDef):
                    if doc:
                        parts.append(f"class {full}\n\n{doc}")
                    visit(node.body, full)
                elif doc:
                    parts.append(f"{full}({ast.unparse(node.args)})\n\n{doc}")
                    entries.append(ApiEntry(doc_id, full, _summary(doc), _params_of(node.args)))

    visit(tree.body, name)
    return (Document(doc_id, "\n\n".join(parts)) if parts else None), entries


def _c_module_names() -> list[str]:
    dynload = os.path.join(sysconfig.get_paths()["stdlib"], "lib-dynload")
    names = set(sys.builtin_module_names) | {m.name for m in pkgutil.iter_modules([dynload])}
    return sorted(n for n in names if _is_public_module(n) and not n.startswith("xx"))


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def _c_module_document(name: str) -> tuple[Document | None, list[ApiEntry]]:
    """C modules have no source to parse; their docstrings come from the imported objects."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, []
    if getattr(module, "__file__", "") and str(module.__file__).endswith(".py"):
        return None, []  # pure Python: already read from source
    doc_id, parts, entries = f"module:{name}", [], []
    if module.__doc__:
        parts.append(f"Module {name}\n\n{inspect.cleandoc(module.__doc__)}")
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not getattr(obj, "__doc__", None):
            continue
        if inspect.isclass(obj) and obj.__module__ == name:
            parts.append(f"class {name}.{attr}\n\n{inspect.cleandoc(obj.__doc__)}")
            for meth, fn in sorted(vars(obj).items()):
                if not meth.startswith("_") and callable(fn) and getattr(fn, "__doc__", None):
                    parts.append(f"{name}.{attr}.{meth}{_signature(fn)}\n\n{inspect.cleandoc(fn.__doc__)}")
        elif inspect.isbuiltin(obj):
            doc = inspect.cleandoc(obj.__doc__)
            parts.append(f"{name}.{attr}{_signature(obj)}\n\n{doc}")
            entries.append(ApiEntry(doc_id, f"{name}.{attr}", _summary(doc)))
    return (Document(doc_id, "\n\n".join(parts)) if parts else None), entries


def collect_corpus() -> tuple[list[Document], list[ApiEntry]]:
    """All documents in a fixed order, plus the documented functions found on the way."""
    import pydoc_data.topics

    docs, entries = [], []
    sources = list(_walk_source_modules(sysconfig.get_paths()["stdlib"]))
    for name, path in tqdm(sources, desc="stdlib sources", unit="mod"):
        doc, found = _source_document(name, path)
        if doc:
            docs.append(doc)
            entries += found
    for name in _c_module_names():
        doc, found = _c_module_document(name)
        if doc:
            docs.append(doc)
            entries += found
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        docs.append(Document(f"topic:{topic}", text.strip()))
    return docs, entries


def corpus_sha256(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.doc_id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def split_documents(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out documents in seeded-hash order until both >= fraction of documents and of characters."""
    key = {d.doc_id: hashlib.sha256(f"{seed}:{d.doc_id}".encode()).hexdigest() for d in docs}
    total_chars = sum(len(d.text) for d in docs)
    held: set[str] = set()
    chars = 0
    for d in sorted(docs, key=lambda d: key[d.doc_id]):
        if len(held) >= fraction * len(docs) and chars >= fraction * total_chars:
            break
        held.add(d.doc_id)
        chars += len(d.text)
    return [d for d in docs if d.doc_id not in held], [d for d in docs if d.doc_id in held]


# -------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens) with ChatML specials; total vocab exactly ``vocab_size``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=EOT,
        unk_token=None,
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------------- model


def build_model(s: Settings, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    eot, im_end = tok.convert_tokens_to_ids([EOT, IM_END])
    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.hidden_size // s.num_heads,
        max_position_embeddings=s.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def token_stream(tok: PreTrainedTokenizerFast, docs: list[Document]) -> list[int]:
    """Documents joined by <|endoftext|>, the same separator evaluation uses as first context token."""
    eot = tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for enc in tok([d.text for d in docs], add_special_tokens=False)["input_ids"]:
        ids.append(eot)
        ids.extend(enc)
    return ids


def chunk_batches(ids: list[int], seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of fixed-length windows, reshuffled every epoch with a seeded generator."""
    n = len(ids) // seq_len
    chunks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, n - batch_size + 1, batch_size):
            yield chunks[order[i : i + batch_size]]
        epoch += 1


def train_step(model, opt, input_ids, labels, attention_mask=None) -> float:
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


class Progress:
    """Training progress in [0, 1]: the step fraction, or the wall-time fraction when that is larger.

    Schedules follow it, so a slow (shared) machine still ends with a decayed learning rate inside its budget.
    """

    def __init__(self, steps: int, minutes: float, desc: str) -> None:
        self.steps, self.budget, self.start = steps, minutes * 60, time.time()
        self.step, self.time_limited = 0, False
        self.bar = tqdm(total=steps, desc=desc, unit="step")

    def fraction(self) -> float:
        by_steps, by_time = self.step / self.steps, (time.time() - self.start) / self.budget
        self.time_limited |= by_time > by_steps
        return max(by_steps, by_time)

    def advance(self, **postfix: str) -> None:
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(**postfix)

    def summary(self, **extra: float) -> dict:
        self.bar.close()
        return {"steps": self.step, "seconds": round(time.time() - self.start, 1),
                "time_limited": self.time_limited, **extra}


def cosine_lr(fraction: float, step: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    cosine = peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))
    return cosine * min(1.0, (step + 1) / warmup)


def pretrain(model, batches: Iterator[torch.Tensor], s: Settings) -> dict:
    model.train()
    opt = make_optimizer(model, s.pretrain_lr)
    progress, ema = Progress(s.pretrain_steps, s.pretrain_minutes, "pretrain"), None
    while (fraction := progress.fraction()) < 1:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(fraction, progress.step, s.pretrain_lr, s.warmup_steps)
        x = next(batches)
        loss = train_step(model, opt, x, x)
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        progress.advance(loss=f"{ema:.3f}")
    return progress.summary(final_loss_ema=round(ema or 0, 4))


# ------------------------------------------------------------------------------------ chat fine-tuning

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Toronto", "Sydney", "Delhi"]
WORDS = ["alpha", "data.txt", "hello world", "spam", "eggs", "report.csv", "/tmp/x", "utf-8", "abc", "python"]
SIMPLE_TOOLS = {
    "get_weather": ("Get the current weather for a city.", {"location": "string"}),
    "add": ("Add two integers.", {"a": "integer", "b": "integer"}),
    "multiply": ("Multiply two integers.", {"a": "integer", "b": "integer"}),
    "search": ("Search the documentation for a query.", {"query": "string"}),
    "magic_function": ("Apply a magic function to an input.", {"input": "integer"}),
}


def tool_schema(name: str, description: str, params: dict[str, str], required: list[str]) -> dict:
    """OpenAI/Hermes function schema, the shape LangChain's ``bind_tools`` produces."""
    props = {p: {"type": t} for p, t in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


def _value(kind: str, rng: random.Random):
    return {"integer": rng.randint(0, 99), "number": round(rng.uniform(0, 10), 2), "boolean": rng.random() < 0.5}.get(
        kind, rng.choice(WORDS)
    )


def _simple_request(name: str, args: dict) -> str:
    if name == "get_weather":
        return f"What is the weather in {args['location']}?"
    if name in ("add", "multiply"):
        verb = "plus" if name == "add" else "times"
        return f"What is {args['a']} {verb} {args['b']}?"
    if name == "search":
        return f"Search the docs for {args['query']}."
    return f"What is magic_function({args['input']})?"


def _simple_result(name: str, args: dict, rng: random.Random) -> tuple[str, str]:
    if name == "get_weather":
        t, sky = rng.randint(-5, 35), rng.choice(["sunny", "cloudy", "rainy", "windy"])
        return json.dumps({"temperature": t, "sky": sky}), f"It is {t} degrees and {sky} in {args['location']}."
    if name == "add":
        r = args["a"] + args["b"]
        return str(r), f"{args['a']} plus {args['b']} is {r}."
    if name == "multiply":
        r = args["a"] * args["b"]
        return str(r), f"{args['a']} times {args['b']} is {r}."
    if name == "search":
        return "No results.", f"I found no results for {args['query']}."
    r = args["input"] + 2
    return str(r), f"magic_function({args['input']}) is {r}."


def _tool_name(api_name: str) -> str:
    return api_name.replace(".", "_")


def _api_tool(e: ApiEntry) -> dict:
    params = {p: t for p, t, _ in e.params}
    return tool_schema(_tool_name(e.name), e.summary, params, [p for p, _, req in e.params if req])


def _call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


def qa_example(e: ApiEntry, rng: random.Random) -> dict:
    q = rng.choice(["What does {n} do?", "Explain {n}.", "Describe the function {n}.", "What is {n} for?"])
    msgs = [{"role": "user", "content": q.format(n=f"`{e.name}`" if rng.random() < 0.5 else e.name)},
            {"role": "assistant", "content": e.summary}]
    if rng.random() < 0.4:
        msgs.insert(0, {"role": "system", "content": "You are a helpful assistant for the Python standard library."})
    return {"messages": msgs}


def api_tool_example(e: ApiEntry, distractors: list[ApiEntry], rng: random.Random) -> dict:
    args = {p: _value(t, rng) for p, t, req in e.params if req}
    tools = [_api_tool(x) for x in distractors] + [_api_tool(e)]
    rng.shuffle(tools)
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    ask = rng.choice(["Call {n} with {a}.", "Please run {n} using {a}.", "Use the {n} tool with {a}."])
    user = ask.format(n=_tool_name(e.name), a=shown or "no arguments")
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": "", "tool_calls": [_call(_tool_name(e.name), args)]}],
            "tools": tools}


def simple_tool_example(rng: random.Random, with_result: bool) -> dict:
    names = sorted(SIMPLE_TOOLS)
    name = rng.choice(names)
    shown = [name] + rng.sample([n for n in names if n != name], rng.randint(0, 2))
    rng.shuffle(shown)
    tools = [tool_schema(n, SIMPLE_TOOLS[n][0], SIMPLE_TOOLS[n][1], list(SIMPLE_TOOLS[n][1])) for n in shown]
    params = SIMPLE_TOOLS[name][1]
    args = {p: (rng.choice(CITIES) if p == "location" else _value(t, rng)) for p, t in params.items()}
    msgs = [{"role": "user", "content": _simple_request(name, args)},
            {"role": "assistant", "content": "", "tool_calls": [_call(name, args)]}]
    if with_result:
        result, answer = _simple_result(name, args, rng)
        msgs += [{"role": "tool", "content": result}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return {"messages": msgs, "tools": tools}


def no_call_example(e: ApiEntry, rng: random.Random) -> dict:
    """Tools offered but not needed: answer in text, so the model does not call tools for everything."""
    ex = qa_example(e, rng)
    name = rng.choice(sorted(SIMPLE_TOOLS))
    ex["tools"] = [tool_schema(name, SIMPLE_TOOLS[name][0], SIMPLE_TOOLS[name][1], list(SIMPLE_TOOLS[name][1]))]
    return ex


def make_chat_examples(entries: list[ApiEntry], n: int, seed: int) -> list[dict]:
    """Q/A about stdlib functions (35%), tool calls (stdlib 20%, simple tools 35%), tools-but-no-call (10%)."""
    rng = random.Random(seed)
    good = [e for e in entries if 20 <= len(e.summary) and not e.summary.endswith(":")]
    callable_ = [e for e in good if 1 <= len(e.params) <= 3 and any(req for *_, req in e.params)]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(qa_example(rng.choice(good), rng))
        elif r < 0.55:
            e = rng.choice(callable_)
            out.append(api_tool_example(e, rng.sample(callable_, rng.randint(0, 2)), rng))
        elif r < 0.9:
            out.append(simple_tool_example(rng, with_result=rng.random() < 0.4))
        else:
            out.append(no_call_example(rng.choice(good), rng))
    return out


def encode_chats(tok: PreTrainedTokenizerFast, examples: list[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with labels only on assistant tokens (content, tool calls, <|im_end|>)."""
    out = []
    for ex in examples:
        enc = tok.apply_chat_template(ex["messages"], tools=ex.get("tools"), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        if len(ids) <= max_len:
            out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def _length_grouped(encoded, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (sorted within pools of 8 batches): less padding, less CPU."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    pool = 8 * batch_size
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda j: len(encoded[j][0]))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def chat_batches(encoded, batch_size: int, pad_id: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless right-padded (input_ids, labels, attention_mask) batches."""
    rng = random.Random(seed)
    while True:
        for batch in _length_grouped(encoded, batch_size, rng):
            items = [encoded[j] for j in batch]
            width = max(len(ids) for ids, _ in items)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (x, y) in enumerate(items):
                ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield ids, labels, mask


def finetune(model, chats: Iterator, plain: Iterator[torch.Tensor], s: Settings) -> dict:
    """Linear decay from ``finetune_lr``; every ``finetune_mix_every``-th step is a pre-training batch."""
    model.train()
    opt = make_optimizer(model, s.finetune_lr)
    progress, ema = Progress(s.finetune_steps, s.finetune_minutes, "finetune"), None
    while (fraction := progress.fraction()) < 1:
        for g in opt.param_groups:
            g["lr"] = s.finetune_lr * (1 - fraction)
        if s.finetune_mix_every and progress.step % s.finetune_mix_every == s.finetune_mix_every - 1:
            x = next(plain)
            train_step(model, opt, x, x)
        else:
            ids, labels, mask = next(chats)
            loss = train_step(model, opt, ids, labels, mask)
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        progress.advance(chat_loss=f"{ema:.3f}")
    return progress.summary(final_chat_loss_ema=round(ema or 0, 4))


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def document_nll(model, ids: list[int], window: int) -> tuple[float, int]:
    """Summed NLL of ids[1:] given ids[0] (<|endoftext|>), in windows of ``window`` predicted tokens.

    The test recomputes exactly this on ``heldout_sample.txt`` (fp32 weights loaded from the bf16 file).
    """
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        logits = model(input_ids=chunk).logits[0, :-1].float()
        total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return total, count


def perplexity(model, tok, texts: list[str], window: int) -> tuple[float, int]:
    model.eval()
    eot = tok.convert_tokens_to_ids(EOT)
    total, count = 0.0, 0
    for text in texts:
        nll, n = document_nll(model, [eot] + tok(text, add_special_tokens=False)["input_ids"], window)
        total, count = total + nll, count + n
    return math.exp(total / count), count


def unigram_perplexity(train_ids: list[int], tok, texts: list[str], vocab_size: int) -> float:
    """Add-one smoothed unigram over the training tokens, on the same predicted tokens as ``perplexity``."""
    counts, n = Counter(train_ids), len(train_ids)
    nll, count = 0.0, 0
    for text in texts:
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            nll -= math.log((counts[t] + 1) / (n + vocab_size))
            count += 1
    return math.exp(nll / count)


def heldout_sample(heldout: list[Document], chars: int) -> str:
    """A few KB of held-out text for the fast test: whole paragraphs from the first held-out documents."""
    out = ""
    for d in heldout:
        for para in d.text.split("\n\n"):
            if len(out) + len(para) + 2 > chars:
                return out.strip() + "\n"
            out += para + "\n\n"
    return out.strip() + "\n"


@torch.no_grad()
def generate(model, tok, prompt_ids: list[int], n: int, sample: bool, seed: int) -> str:
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=sample, top_k=40 if sample else None,
                         temperature=0.8 if sample else None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=False)


def sample_generations(model, tok, seed: int) -> dict:
    plain = tok("The json module", add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "What does json.dumps do?"}]
    tools_chat = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [tool_schema("get_weather", SIMPLE_TOOLS["get_weather"][0], {"location": "string"}, ["location"])]
    chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    tool_ids = tok.apply_chat_template(tools_chat, tools=tools, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    return {
        "plain_prompt": "The json module",
        "plain_greedy": generate(model, tok, plain, 40, False, seed),
        "plain_sampled": generate(model, tok, plain, 40, True, seed),
        "chat_prompt": chat[0]["content"],
        "chat_greedy": generate(model, tok, chat_ids, 60, False, seed),
        "tool_prompt": tools_chat[0]["content"] + "  (tools: get_weather)",
        "tool_greedy": generate(model, tok, tool_ids, 40, False, seed),
    }


# -------------------------------------------------------------------------------------------- output


def save_model(model, tok, out: Path) -> None:
    """bf16 safetensors + config + generation config + tokenizer (chat template inside tokenizer_config)."""
    eot, im_end = tok.convert_tokens_to_ids([EOT, IM_END])
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(out, save_jinja_files=False)
    for file in out.iterdir():
        file.chmod(0o644)  # save_pretrained writes the weights 0600; they ship inside a package


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def write_model_card(out: Path, info: dict) -> None:
    s, ev, gen = info["settings"], info["eval"], info["samples"]
    text = f"""# reference-llama

A tiny Llama chat model trained from scratch on the documentation that ships with CPython, so that
`langchain_adaptquant` has a real, trained model for tests, benchmarks and the demo that loads offline.
It is not a useful assistant: it knows the *style* of Python docs and the chat/tool-call format.

## Architecture

`LlamaForCausalLM`, {info['params']:,} parameters ({info['params'] / 1e6:.2f}M), stored in bf16
(`model.safetensors`, folder {info['folder_mb']:.1f} MB).

| field | value |
|---|---|
| hidden size | {s['hidden_size']} |
| intermediate size | {s['intermediate_size']} |
| layers | {s['num_layers']} |
| attention heads / kv heads | {s['num_heads']} / {s['num_kv_heads']} (head dim {s['hidden_size'] // s['num_heads']}) |
| vocab | {s['vocab_size']} (byte-level BPE) |
| lm_head | untied |
| max positions | {s['max_positions']} (trained on {s['seq_len']}-token windows) |

Every Linear dimension is a multiple of 64, so every quantization backend (group sizes 32/64) applies to every layer.

## Corpus and split

Docstrings of the public Python {info['python']} standard library (pure-Python modules parsed with `ast`,
C modules read with `inspect`; private `_modules`, tests, `idlelib`, `turtledemo`, `lib2to3`, `ensurepip` skipped),
plus all `pydoc_data.topics` topics. Chosen because it exists offline on every machine with Python, is English
prose about a single domain, and is license-compatible (PSF).

{info['n_docs']} documents (one per module or topic), {info['n_chars']:,} characters, corpus SHA-256
`{info['corpus_sha256']}`. Held out: {info['n_heldout']} documents ({info['heldout_char_fraction']:.1%} of characters),
chosen by `sha256(f"{{seed}}:{{doc_id}}")` order; never used for the tokenizer, pre-training or fine-tuning.
Ids in `split.json`. Training tokens: {info['train_tokens']:,}; held-out tokens: {ev['heldout_tokens']:,}.
The corpus differs between Python versions; the hash tells whether a rebuild saw the same text.

## Training

```
{info['command']}
```

Seed {s['seed']}. Pre-training: {info['pretrain']['steps']} steps (of {s['pretrain_steps']} planned) x {s['batch_size']} x {s['seq_len']} tokens,
AdamW (lr {s['pretrain_lr']}, cosine, warmup {s['warmup_steps']}), {info['pretrain']['seconds'] / 60:.1f} min.
Chat fine-tune: {info['finetune']['steps']} steps (of {s['finetune_steps']} planned, batch {s['finetune_batch_size']}) on {info['n_chat_examples']} generated examples (stdlib Q/A from
docstrings, tool calls, tool results), loss on assistant tokens only, 1 step in {s['finetune_mix_every']} on a
pre-training batch; {info['finetune']['seconds'] / 60:.1f} min. Total wall time {info['total_minutes']:.1f} min on
{info['machine']}.

Learning-rate schedules follow max(step fraction, wall-time fraction of a {s['pretrain_minutes']:g} / {s['finetune_minutes']:g}
minute budget), so a busy machine still finishes in time. Time-limited in this run: pre-training
{'yes' if info['pretrain']['time_limited'] else 'no'}, fine-tune {'yes' if info['finetune']['time_limited'] else 'no'}
(when "no", the run is repeatable from the seed).

## Quality

Token-level perplexity on the held-out documents (windows of {s['seq_len']} tokens, fp32 compute on the bf16 weights):

| model | held-out perplexity |
|---|---|
| this model (after chat fine-tune) | {ev['heldout_perplexity']:.2f} |
| this model after pre-training only | {ev['pretrain_heldout_perplexity']:.2f} |
| add-one unigram over training tokens | {ev['unigram_perplexity']:.2f} |

On `heldout_sample.txt` (what the test checks, figures in `eval.json`): {ev['heldout_sample_perplexity']:.2f}
vs unigram {ev['sample_unigram_perplexity']:.2f}.

Sample generations (greedy unless noted):

- prompt `{gen['plain_prompt']}` -> {json.dumps(gen['plain_greedy'])}
- same, sampled (top-k 40, T 0.8) -> {json.dumps(gen['plain_sampled'])}
- chat `{gen['chat_prompt']}` -> {json.dumps(gen['chat_greedy'])}
- chat with tools `{gen['tool_prompt']}` -> {json.dumps(gen['tool_greedy'])}

## Chat format

ChatML (`<|im_start|>role\\n...<|im_end|>`); `<|im_end|>` is eos / end of turn, `<|endoftext|>` is pad and
document separator. Tools follow the Hermes/Qwen convention: the system turn lists JSON function schemas in
`<tools></tools>`, the assistant answers `<tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>`, and tool
results come back in a user turn as `<tool_response>...</tool_response>`. `<tool_call>`, `</tool_call>`,
`<tool_response>`, `</tool_response>` are single (non-special) tokens. The template is in `tokenizer_config.json`.

## Quality per quantization level

Filled in by `benchmarks/levels.py` once the loader exists.

| level | backend | stored MB | held-out perplexity | top-1 agreement with 16-bit |
|---|---|---|---|---|
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Settings, Path, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=None, help=f"model folder (default {DEFAULT_OUTPUT})")
    p.add_argument("--smoke", action="store_true", help="tiny run of the whole pipeline into a temp folder")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--pretrain-steps", type=int, default=Settings.pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=Settings.finetune_steps)
    p.add_argument("--pretrain-minutes", type=float, default=Settings.pretrain_minutes)
    p.add_argument("--finetune-minutes", type=float, default=Settings.finetune_minutes)
    a = p.parse_args(argv)
    s = Settings(seed=a.seed, pretrain_steps=a.pretrain_steps, finetune_steps=a.finetune_steps,
                 pretrain_minutes=a.pretrain_minutes, finetune_minutes=a.finetune_minutes)
    if a.smoke:
        s.pretrain_steps, s.finetune_steps, s.warmup_steps, s.finetune_examples = 12, 8, 4, 60
        s.pretrain_minutes = s.finetune_minutes = 1.0
    out = a.output or (Path("/tmp/reference-llama-smoke") if a.smoke else DEFAULT_OUTPUT)
    return s, out, a.smoke


def main(argv: list[str] | None = None) -> None:
    s, out, smoke = parse_args(argv)
    t0 = time.time()
    random.seed(s.seed)
    torch.manual_seed(s.seed)

    docs, entries = collect_corpus()
    train_docs, held_docs = split_documents(docs, s.heldout_fraction, s.seed)
    held_ids = {d.doc_id for d in held_docs}
    print(f"corpus: {len(docs)} docs, {sum(len(d.text) for d in docs):,} chars; held out {len(held_docs)}", flush=True)

    tok = train_tokenizer([d.text for d in train_docs], s.vocab_size)
    train_ids = token_stream(tok, train_docs)
    print(f"train tokens: {len(train_ids):,}", flush=True)

    model = build_model(s, tok)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)
    plain = chunk_batches(train_ids, s.seq_len, s.batch_size, s.seed)
    pre = pretrain(model, plain, s)

    eval_texts = [d.text for d in held_docs][: 3 if smoke else None]
    pre_ppl, _ = perplexity(model, tok, eval_texts, s.seq_len)
    print(f"held-out perplexity after pre-training: {pre_ppl:.2f}", flush=True)

    train_entries = [e for e in entries if e.doc_id not in held_ids]
    examples = make_chat_examples(train_entries, s.finetune_examples, s.seed)
    encoded = encode_chats(tok, examples, max_len=512)
    ft = finetune(model, chat_batches(encoded, s.finetune_batch_size, tok.pad_token_id, s.seed), plain, s)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_model(model, tok, out)
    # Evaluate what was shipped: bf16 weights, fp32 compute (as the test does).
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ppl, n_tokens = perplexity(model, tok, eval_texts, s.seq_len)
    uni = unigram_perplexity(train_ids, tok, eval_texts, s.vocab_size)
    sample = heldout_sample(held_docs, s.sample_chars)
    (out / "heldout_sample.txt").write_text(sample, encoding="utf-8")
    sample_ppl, sample_tokens = perplexity(model, tok, [sample], s.seq_len)
    sample_uni = unigram_perplexity(train_ids, tok, [sample], s.vocab_size)
    ev = {
        "heldout_sample_perplexity": round(sample_ppl, 4),
        "unigram_perplexity": round(sample_uni, 4),
        "sample_tokens": sample_tokens,
        "method": f"exp(mean NLL) of the sample's tokens after a leading <|endoftext|>, windows of {s.seq_len} "
        "predicted tokens, float32 compute on the bf16 weights",
        "heldout_perplexity": round(ppl, 4),
        "heldout_tokens": n_tokens,
        "heldout_unigram_perplexity": round(uni, 4),
        "pretrain_heldout_perplexity": round(pre_ppl, 4),
        "window": s.seq_len,
    }
    (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    split = {
        "seed": s.seed,
        "heldout_fraction_min": s.heldout_fraction,
        "rule": "documents sorted by sha256(f'{seed}:{doc_id}'); take until >= fraction of documents and chars",
        "corpus_sha256": corpus_sha256(docs),
        "python": platform.python_version(),
        "n_documents": len(docs),
        "heldout_ids": sorted(held_ids),
    }
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    samples = sample_generations(model, tok, s.seed)
    for k, v in samples.items():
        print(f"{k}: {v!r}", flush=True)
    total_minutes = (time.time() - t0) / 60
    info = {
        "settings": s.__dict__, "params": params, "folder_mb": 0.0, "python": platform.python_version(),
        "n_docs": len(docs), "n_chars": sum(len(d.text) for d in docs), "corpus_sha256": split["corpus_sha256"],
        "n_heldout": len(held_docs),
        "heldout_char_fraction": sum(len(d.text) for d in held_docs) / sum(len(d.text) for d in docs),
        "train_tokens": len(train_ids), "command": "nice -n 10 python " + " ".join(["scripts/train_reference_model.py"] + sys.argv[1:]),
        "pretrain": pre, "finetune": ft, "n_chat_examples": len(encoded), "total_minutes": total_minutes,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}",
        "eval": {**ev, "unigram_perplexity": uni, "sample_unigram_perplexity": sample_uni}, "samples": samples,
    }
    write_model_card(out, info)
    info["folder_mb"] = folder_mb(out)
    write_model_card(out, info)  # again, now with the final folder size
    print(json.dumps({"params": params, "folder_mb": round(info["folder_mb"], 2), "pretrain": pre, "finetune": ft,
                      "total_minutes": round(total_minutes, 1), **ev}, indent=1), flush=True)


if __name__ == "__main__":
    main()
