"""The model folder's tokenizer without transformers: ``tokenizers`` for the ids, jinja2 for the template.

transformers' tokenizer classes import torch, which costs a llama.cpp process more memory than the
model itself (SmolLM2 at F16: 258 MB of weights; torch + transformers about 300 MB of RSS). This
reads the same files (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and
renders the chat template the way transformers does (a sandboxed jinja2 environment with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps
non-ASCII text), so prompts are the same ids on both runtimes (tested against transformers).
Grammar-constrained answers need transformers' tokenizer for llguidance: :meth:`hf` loads it then.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from langchain_adaptquant.errors import InvalidValueError


@dataclass(frozen=True)
class Encoding:
    input_ids: list[int]


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _generation_tag() -> Any:
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): rendered as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    return Generation


class FolderTokenizer:
    """What the chat model and the engine use of a tokenizer: encode, decode, the chat template."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise InvalidValueError("model", str(folder), "a folder with tokenizer.json (a fast tokenizer)")
        self._tokenizer = Tokenizer.from_file(str(path))
        config_path = self.folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = self.folder / "chat_template.jinja"
        self.chat_template: Optional[str] = (template_path.read_text(encoding="utf-8") if template_path.is_file()
                                             else config.get("chat_template"))
        self.special_tokens = {name: _token_text(config.get(name)) for name in
                               ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token = self.special_tokens["eos_token"]
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.special_tokens["pad_token"])
        self._hf: Any = None
        self._hf_lock = threading.Lock()
        self._template: Any = None

    def _id(self, token: Optional[str]) -> Optional[int]:
        return self._tokenizer.token_to_id(token) if token else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = False) -> Encoding:
        return Encoding(self.encode(text, add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: index for index, token in self._tokenizer.get_added_tokens_decoder().items()}

    def _compiled(self) -> Any:
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                from jinja2.exceptions import TemplateError

                raise TemplateError(message)

            def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                       sort_keys: bool = False) -> str:
                return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols, _generation_tag()])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            if not self.chat_template:
                raise InvalidValueError("model", str(self.folder), "a tokenizer with a chat template")
            self._template = env.from_string(self.chat_template)
        return self._template

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, **kwargs: Any) -> Any:
        """The rendered conversation (``tokenize=False``) or its ids, as transformers renders it."""
        text = self._compiled().render(messages=list(conversation), tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs)
        return self.encode(text) if tokenize else text

    def hf(self) -> Any:
        """transformers' tokenizer of the same folder (imports torch): what llguidance's grammars read."""
        with self._hf_lock:
            if self._hf is None:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(str(self.folder))
            return self._hf
