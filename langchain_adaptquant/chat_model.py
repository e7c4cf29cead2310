"""ChatAdaptQuant: a LangChain chat model over a local causal LM whose precision adapts at run time.

Every invocation (1) counts as load in the manager's tracker, (2) lets the loader re-decide the
level and requantize in place when conditions changed, then (3) renders the chat template and
submits the prompt to the model's generation engine, which decodes every request in flight as one
batch. ``invoke``, ``stream``, ``ainvoke`` and ``astream`` share one path over the engine's handle. Switches are dispatched as LangChain custom events (``adaptquant.requantize``), so any
callback handler or tracer sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from operator import itemgetter
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Iterator,
    Literal,
    Optional,
    Sequence,
    TypedDict,
    Union,
    cast,
)

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.callbacks.manager import ahandle_event, handle_event
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from langchain_adaptquant import chat_format
from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.pretrained.store import default_chat_model
from langchain_adaptquant.runtime.records import SwitchRecord
from langchain_adaptquant.runtime.registry import Runtime, RuntimeChoice, check_runtime, choose_runtime, log_choice
from langchain_adaptquant.runtime.registry import new_loader as _new_loader
from langchain_adaptquant.runtime.registry import shared_loader as _shared_runtime_loader
from langchain_adaptquant.runtime.requests import GenerationRequest, RequestHandle, Sampling
from langchain_adaptquant.runtime.text import GenerationResult

if TYPE_CHECKING:  # either runtime's model record: torch's LoadedModel or llama.cpp's LlamaCppModel
    from langchain_adaptquant import constrained as _constrained_types
    from langchain_adaptquant.runtime.loaded_model import LoadedModel

REQUANTIZE_EVENT = "adaptquant.requantize"

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class CallOptions:
    """One call's settings, validated by ``ChatAdaptQuant._call_options`` before anything is loaded."""

    model: str
    priority: TaskPriority
    force: Optional[QuantizationLevel]
    tools: Optional[list[dict[str, Any]]]
    tool_choice: Any  # a tool name, "auto"/"any"/"none"/"required", True or an OpenAI dict
    response_format: Optional[dict[str, Any]]
    max_tokens: int
    stop: tuple[str, ...]
    sampling: Sampling
    logits_processor: Optional[Callable[..., Any]]


class ResponseMetadata(TypedDict):
    """``AIMessage.response_metadata`` of a local answer: what served it and why (see the guide)."""

    model_name: str
    model_provider: str
    quantization_level: str  # the level the answer started at (its decision's)
    precision: str
    source_format: str
    runtime: str  # "torch" or "llamacpp": which runtime produced the answer (runtime.registry)
    backend: str  # the backend holding most layers
    backends: dict[str, int]  # layers per backend
    memory: dict[str, Any]  # MemorySnapshot.to_dict()
    model_size_mb: float
    decision_reason: str
    quality: dict[str, Any]  # measured top-1 agreement of this level with 16-bit, or "not measured"
    switches: list[dict[str, Any]]  # SwitchRecord.to_dict() of the switches this call made
    levels_used: list[str]  # the levels this answer's tokens came from, in order
    level_runs: list[list[Any]]  # [level, tokens produced at it]
    switched_during_generation: bool
    generation_seconds: float
    finish_reason: str


def shared_loader(memory_budget_gb: Optional[float] = None, runtime: str = "torch") -> Runtime:
    """One manager and loader per process (per runtime and budget): chat models on one model share one copy."""
    return cast(Runtime, _shared_runtime_loader(runtime, memory_budget_gb))


class ChatAdaptQuant(BaseChatModel):
    """Chat model over a local Hugging Face causal LM with adaptive weight precision.

    Example:
        .. code-block:: python

            from langchain_adaptquant import ChatAdaptQuant

            llm = ChatAdaptQuant(max_tokens=64)  # the embedded reference model
            msg = llm.invoke("Explain lists in one sentence.")
            msg.response_metadata["quantization_level"]  # e.g. "fp16"
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), populate_by_name=True)

    model: str = Field(default_factory=lambda: str(default_chat_model()))
    """A local model folder, a pulled catalog name (``"smollm2-135m"``: ``adaptquant models pull``) or a hub
    id already in the local cache. Default: SmolLM2-135M-Instruct when it has been pulled, else the
    embedded 8.9M reference model (a test fixture that answers like a docstring)."""
    task_priority: TaskPriority = TaskPriority.BALANCED
    """quality keeps precision longer under load; speed gives it up sooner. Per call: ``task_priority=``."""
    force_quantization: Optional[QuantizationLevel] = None
    """Pin a level (fp16/int8/int4/int2) instead of adapting; an error if no backend supports it here."""
    temperature: Optional[float] = Field(default=None, ge=0)
    """Sampling temperature; None or 0 decode greedily (deterministic)."""
    max_tokens: int = Field(default=256, gt=0)
    """Most new tokens per answer."""
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Optional[list[str]] = None
    """Stop strings (any length; generation ends as soon as one appears, and it is cut off)."""
    streaming: bool = False
    """Stream tokens from ``invoke`` as well (callbacks get every token)."""
    timeout: Optional[float] = Field(default=None, gt=0)
    """Seconds a generation may run; it then ends with finish_reason 'timeout'."""
    max_retries: int = Field(default=1, ge=0)
    """Retries after running out of memory mid-generation, each one level lower."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Decoding options for every call: ``top_k``, ``repetition_penalty``, ``min_new_tokens``,
    ``do_sample``, ``seed`` and ``logits_processor`` (a Hugging Face-style callable
    ``(input_ids [1, t], scores [1, vocab]) -> scores`` applied to this answer's row each step).
    Anything else is an error naming it, not silently ignored. Per call: the same names as kwargs."""
    memory_budget_gb: Optional[float] = Field(default=None, gt=0)
    """Cap on memory the policy may count on, in GiB (acts like a container limit)."""
    prepare_levels: Optional[list[QuantizationLevel]] = None
    """Levels to quantize into the loader's layer cache in a background thread after the model first
    loads (e.g. ``["int4", "int2"]``), so the first memory-forced switch there only reads them.
    Costs that quantization work once, in the background; levels this device lacks are skipped."""
    constrained_decoding: bool = True
    """Decode tool calls and JSON answers under a grammar (llguidance, the ``grammar`` extra), so they
    always parse and match the schema; False lets the model write them freely."""
    runtime: Literal["auto", "torch", "llamacpp"] = "auto"
    """Who runs the weights: ``"llamacpp"`` (a GGUF on llama.cpp: the fast path on a CPU),
    ``"torch"`` (Hugging Face folders, CUDA/MPS, bitsandbytes), or ``"auto"``: llama.cpp on a CPU when
    the model has a GGUF and llama-cpp-python imports, torch otherwise (``runtime.registry``).
    Ignored when ``loader`` is given (the loader is the runtime)."""
    manager: Optional[DynamicQuantizationManager] = Field(default=None, exclude=True)
    loader: Optional[Any] = Field(default=None, exclude=True)
    """A runtime's loader (``AdaptiveModelLoader`` for torch, ``LlamaCppLoader`` for llama.cpp)."""
    base_url: Optional[str] = None
    """A remote adaptquant endpoint (``adaptquant serve``, or Ray Serve's proxy), e.g.
    ``http://127.0.0.1:8000/v1``: generation runs there and its policy picks the level (see ``remote``)."""
    api_key: Optional[SecretStr] = Field(default_factory=secret_from_env("ADAPTQUANT_TOKEN", default=None))
    """Bearer token for ``base_url`` (default: the ``ADAPTQUANT_TOKEN`` environment variable)."""

    _own_loaders: dict[str, Any] = PrivateAttr(default_factory=dict)
    _choices: dict[str, RuntimeChoice] = PrivateAttr(default_factory=dict)
    _remote: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_wiring(self) -> "ChatAdaptQuant":
        """A ``loader`` brings its manager and a ``manager`` its memory budget; a second value for
        either would be silently ignored, so a conflicting one is refused here."""
        if self.loader is not None and self.manager is not None and self.manager is not self.loader.manager:
            raise InvalidValueError(
                "manager", type(self.manager).__name__,
                "None with loader= (the loader's own manager decides), or that very manager (loader.manager)",
            )
        owner = self.loader.manager if self.loader is not None else self.manager
        if owner is not None and self.memory_budget_gb is not None and self.memory_budget_gb != owner.memory_budget_gb:
            given = "loader" if self.loader is not None else "manager"
            raise InvalidValueError(
                "memory_budget_gb", self.memory_budget_gb,
                f"None with {given}= (its manager has memory_budget_gb={owner.memory_budget_gb!r}; "
                "set the budget there: DynamicQuantizationManager(memory_budget_gb=...))",
            )
        return self

    @model_validator(mode="after")
    def _check_remote(self) -> "ChatAdaptQuant":
        if self.base_url is not None:
            from langchain_adaptquant import remote

            remote.check_fields(self)
        return self

    def _remote_chat(self) -> Any:
        if self._remote is None:
            from langchain_adaptquant.remote import RemoteChat

            if self.base_url is None:
                raise RuntimeError("no base_url: this ChatAdaptQuant serves a local model")
            key = self.api_key.get_secret_value() if self.api_key else None
            self._remote = RemoteChat(self.base_url, key, self.timeout)
        return self._remote

    @field_validator("runtime", mode="before")
    @classmethod
    def _parse_runtime(cls, value: Any) -> str:
        return check_runtime(value)

    @field_validator("task_priority", mode="before")
    @classmethod
    def _parse_priority(cls, value: Any) -> TaskPriority:
        return TaskPriority.parse(value)

    @field_validator("prepare_levels", mode="before")
    @classmethod
    def _parse_prepare_levels(cls, value: Any) -> Optional[list[QuantizationLevel]]:
        if value is None:
            return None
        if isinstance(value, (str, QuantizationLevel)) or not isinstance(value, (list, tuple)):
            raise InvalidValueError("prepare_levels", value, "None or a list of levels, e.g. ['int4', 'int2']")
        return [QuantizationLevel.parse(level) for level in value]

    @field_validator("force_quantization", mode="before")
    @classmethod
    def _parse_level(cls, value: Any) -> Optional[QuantizationLevel]:
        return None if value is None else QuantizationLevel.parse(value)

    # -- LangChain conventions ------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "adaptquant"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task_priority": self.task_priority.value,
            "force_quantization": self.force_quantization.value if self.force_quantization else None,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "adaptquant"
        override = kwargs.get("model")
        params["ls_model_name"] = override if isinstance(override, str) else self.model
        params["ls_model_type"] = "chat"
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- wiring ---------------------------------------------------------------------------------
    def runtime_for(self, model: Optional[str] = None) -> RuntimeChoice:
        """Which runtime serves ``model`` (default: this chat model's) and why; chosen once per model."""
        name = model or self.model
        choice = self._choices.get(name)
        if choice is None:
            device = self.manager.device if self.manager is not None else _default_device()
            choice = self._choices[name] = choose_runtime(self.runtime, name, device)
            log_choice(name, choice)
        return choice

    def _loader(self, model: Optional[str] = None) -> Runtime:
        if self.loader is not None:
            return cast(Runtime, self.loader)
        runtime = self.runtime_for(model).name
        if self.manager is not None:
            if runtime not in self._own_loaders:
                self._own_loaders[runtime] = _new_loader(runtime, self.manager)
            return cast(Runtime, self._own_loaders[runtime])
        return shared_loader(self.memory_budget_gb, runtime)

    def _prepare(self, options: CallOptions) -> tuple[LoadedModel, "_CallRecord"]:
        """Load (or find) the model and let the policy switch it; returns what this call decided and did."""
        call = _CallRecord()
        loader = self._loader(options.model)
        loaded = loader.load_model(
            options.model, task_priority=options.priority, force_quantization=options.force,
            on_switch=call.switches.append, on_decision=call.set_reason,
        )
        if self.prepare_levels:
            loader.prepare_levels_in_background(loaded, self.prepare_levels)
        return loaded, call

    def _call_options(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> CallOptions:
        """Per-call settings, validated before anything is loaded or counted."""
        options = dict(kwargs)
        model = options.pop("model", None) or self.model
        if not isinstance(model, str):
            raise InvalidValueError("model", model, "a model folder or a cached hub id, as a string")
        priority = TaskPriority.parse(options.pop("task_priority", self.task_priority))
        force = options.pop("force_quantization", self.force_quantization)
        force = QuantizationLevel.parse(force) if force is not None else None
        if force is not None:
            self._loader(model).check_level_available(force)  # before the call counts as load
        max_tokens = options.pop("max_tokens", self.max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidValueError("max_tokens", max_tokens, "an integer greater than 0")
        temperature = options.pop("temperature", self.temperature)
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
            raise InvalidValueError("temperature", temperature, "None or a number >= 0")
        stops = list(self.stop or []) + list(stop or []) + list(options.pop("stop", None) or [])
        tools = options.pop("tools", None)
        tool_choice = options.pop("tool_choice", None)
        if tools:
            chat_format.validate_tool_choice(tool_choice, tools)
        response_format = options.pop("response_format", None)
        top_p = options.pop("top_p", self.top_p)
        extra = {**self.model_kwargs, **options}  # sampling options the engine honours; others are an error
        logits_processor = extra.pop("logits_processor", None)
        if logits_processor is not None and not callable(logits_processor):
            raise InvalidValueError("logits_processor", logits_processor,
                                    "None or a callable (input_ids [1, t], scores [1, vocab]) -> scores")
        sampling = Sampling.from_options({"temperature": temperature, "top_p": top_p, **extra})
        return CallOptions(
            model=model,
            priority=priority,
            force=force,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            max_tokens=max_tokens,
            stop=tuple(stops),
            sampling=sampling,
            logits_processor=logits_processor,
        )

    def _prompt(self, loaded: LoadedModel, messages: list[BaseMessage], options: CallOptions) -> tuple[list[int], str]:
        """Token ids of the rendered conversation, and any text pre-filled for the model (forced tool call)."""
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise InvalidValueError("model", loaded.name, "a model folder that includes a tokenizer")
        chat = chat_format.to_chat_dicts(messages)
        tools, choice = options.tools, options.tool_choice
        template_tools = None
        system_notes: list[str] = []
        prefill = ""
        if tools and choice != "none":
            if chat_format.template_renders_tools(getattr(tokenizer, "chat_template", None)):
                template_tools = tools
            else:
                system_notes.append(chat_format.tools_system_prompt(tools))
            instruction = chat_format.tool_choice_instruction(choice, tools)
            if instruction:
                system_notes.append(instruction)
            forced = chat_format.forced_tool_name(choice, tools)
            if forced:
                prefill = '<tool_call>\n{"name": "' + forced + '", "arguments": '
        response_format = options.response_format
        if response_format:
            system_notes.append(_json_instruction(response_format))
            if not self._constrains(options):  # a grammar opens the object itself
                prefill = prefill or "{"
        if system_notes:
            note = "\n\n".join(system_notes)
            if chat and chat[0]["role"] == "system":
                chat[0] = {**chat[0], "content": f"{chat[0]['content']}\n\n{note}".strip()}
            else:
                chat.insert(0, {"role": "system", "content": note})
        text = tokenizer.apply_chat_template(chat, tools=template_tools, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text + prefill, add_special_tokens=False).input_ids)
        context = loaded.context_length
        if context and len(ids) >= context:
            raise InvalidValueError(
                "prompt length", f"{len(ids)} tokens", f"fewer than the model's context of {context} tokens"
            )
        return ids, prefill

    def _constrains(self, options: CallOptions) -> bool:
        """Whether this call decodes under a grammar: tools or a JSON answer, and llguidance installed."""
        wants = bool(options.tools and options.tool_choice != "none") or bool(options.response_format)
        return wants and self.constrained_decoding and _grammars().available()

    def _grammar(self, options: CallOptions, prefill: str, tokenizer: Any) -> Optional["_constrained_types.Grammar"]:
        """The grammar the answer must follow: one tool call when one is forced, an optional one under
        ``auto``, a JSON value for structured output; None when the model writes freely."""
        if not self._constrains(options):
            return None
        constrained = _grammars()
        tools, choice = options.tools, options.tool_choice
        budget = options.max_tokens  # bounds free strings, and the processor closes the answer within it
        if tools and choice != "none":
            tags = constrained.CallTags.for_tokenizer(tokenizer)
            forced = chat_format.forced_tool_name(choice, tools)
            if forced and prefill.startswith("<tool_call>"):
                text = constrained.tool_call_grammar(tools, forced, prefill, tags, max_tokens=budget)
            elif choice in ("any", "required", True):
                text = constrained.tool_call_grammar(tools, tags=tags, max_tokens=budget)
            else:
                text = constrained.optional_tool_calls_grammar(tools, tags, max_tokens=budget)
            return constrained.Grammar(text, "tool call", max_tokens=budget)
        response_format = options.response_format or {}  # set: _constrains said so
        schema = (response_format.get("json_schema") or {}).get("schema")
        return constrained.Grammar(constrained.json_grammar(schema, max_tokens=budget), "json", max_tokens=budget)

    def _stops_and_processor(self, options: CallOptions, loaded: LoadedModel, ids: list[int],
                             prefill: str, max_new: int) -> tuple[tuple[str, ...], Optional[Any]]:
        """This answer's stop strings (the caller's, then the model's own, e.g. a base model's next-turn
        marker) and its logits processor: a fresh grammar processor (it is stateful) when the answer is
        constrained, ahead of the caller's processor, if any."""
        model_stops = tuple(loaded.stop_strings)
        stops = options.stop + tuple(stop for stop in model_stops if stop not in options.stop)
        grammar = self._grammar(options, prefill, loaded.tokenizer)
        if grammar is None:
            return stops, options.logits_processor
        from transformers import LogitsProcessorList

        processor = _grammars().GrammarProcessor(
            grammar, loaded.grammar_tokenizer, sorted(loaded.eos), len(ids), max_new_tokens=max_new
        )
        user = options.logits_processor
        return stops, LogitsProcessorList([processor] + ([user] if user is not None else []))

    def _message_parts(self, loaded: LoadedModel, options: CallOptions, prefill: str,
                       result: GenerationResult) -> tuple[str, list, list, str]:
        text = prefill + result.text
        finish = result.finish_reason
        if options.tools and options.tool_choice != "none":
            if prefill.startswith("<tool_call>") and "</tool_call>" not in text:
                text += "}</tool_call>" if text.count("{") > text.count("}") else "</tool_call>"
            names = {t["function"]["name"] for t in options.tools}
            content, calls, invalid = chat_format.parse_tool_calls(text, names)
            if calls:
                finish = "tool_calls"
            return content, calls, invalid, finish
        return text, [], [], finish

    def _metadata(self, loaded: LoadedModel, result: GenerationResult, finish: str,
                  call: "_CallRecord") -> ResponseMetadata:
        snapshot = self._loader(loaded.name).manager.snapshot()
        levels = list(result.levels_used) or [loaded.level.value]
        level = QuantizationLevel.parse(levels[0])
        return {
            "model_name": loaded.name,
            "model_provider": "adaptquant",
            "quantization_level": level.value,  # the level the answer started at (its decision's)
            "precision": loaded.precision_of(level),
            "source_format": loaded.source_format,
            "runtime": loaded.runtime,
            "backend": loaded.backend,
            "backends": loaded.backend_summary(),
            "memory": snapshot.to_dict(),
            "model_size_mb": round(loaded.stored_bytes / 2**20, 2),
            "decision_reason": call.reason,
            # measured top-1 agreement of this level with 16-bit (or "not measured"): langchain_adaptquant.runtime.quality
            "quality": (loaded.quality.entry(level) if loaded.quality is not None
                        else {"agreement": None, "source": "not measured"}),
            "switches": [record.to_dict() for record in call.switches],
            # the levels this answer's tokens were produced at, in order: a switch lands between two
            # decode steps, so each token has one level; more than one means a switch came mid-answer
            "levels_used": levels,
            "level_runs": [list(run) for run in result.level_runs],  # [level, tokens produced at it]
            "switched_during_generation": len(levels) > 1,
            "generation_seconds": round(result.seconds, 4),
            "finish_reason": finish,
        }

    @staticmethod
    def _usage(result: GenerationResult) -> UsageMetadata:
        return UsageMetadata(
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            total_tokens=result.input_tokens + result.output_tokens,
        )

    # -- generation: one path for invoke, stream, ainvoke and astream ----------------------------
    def _begin(self, messages: list[BaseMessage], options: CallOptions) -> "_Answer":
        """Load (and maybe switch) the model, render the prompt, build the request: no torch work."""
        loaded, call = self._prepare(options)
        ids, prefill = self._prompt(loaded, messages, options)
        context = loaded.context_length
        max_new = options.max_tokens
        if context and len(ids) + max_new > context:  # cap the answer to fit the context window
            max_new = max(1, context - len(ids))
        stops, processor = self._stops_and_processor(options, loaded, ids, prefill, max_new)
        request = GenerationRequest(
            prompt_ids=tuple(ids),
            max_new_tokens=max_new,
            stop=stops,
            sampling=options.sampling,
            deadline=time.monotonic() + self.timeout if self.timeout else None,
            logits_processor=processor,
        )
        return _Answer(self._loader(options.model), loaded, call, request, prefill, self.max_retries)

    def _chunk(self, options: CallOptions, piece: str) -> Optional[ChatGenerationChunk]:
        if options.tools or options.response_format:
            return None  # tool calls and JSON are parsed whole, at the end
        return ChatGenerationChunk(message=AIMessageChunk(content=piece))

    def _chunks(self, messages: list[BaseMessage], options: CallOptions,
                run_manager: Optional[CallbackManagerForLLMRun], stream: bool) -> Iterator[ChatGenerationChunk]:
        """One answer: a chunk per text piece when ``stream`` (also sent to the callbacks), then a final
        chunk with usage and metadata (and the whole text when it was not streamed)."""
        chat_format.to_chat_dicts(messages)  # bad messages fail before anything is counted or loaded
        tracker = self._loader(options.model).manager.tracker
        with tracker.track():
            answer = self._begin(messages, options)
            try:
                answer.submit()
                _dispatch_sync(run_manager, answer.take_new_switches())
                while True:
                    try:
                        if stream:
                            for piece in answer.handle:
                                chunk = self._chunk(options, piece)
                                if chunk is not None:
                                    if run_manager:
                                        run_manager.on_llm_new_token(piece, chunk=chunk)
                                    yield chunk
                        result = answer.handle.result()  # the engine's error, if any, is raised here
                        break
                    except _out_of_memory() as error:
                        if not answer.retry(error):
                            raise
                        _dispatch_sync(run_manager, answer.take_new_switches())
            finally:
                answer.close()  # a consumer that stopped early (or an error) ends the request
        yield self._final_chunk(answer.loaded, options, answer.prefill, result, answer.call, streamed=stream)

    async def _achunks(self, messages: list[BaseMessage], options: CallOptions,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun], stream: bool
                       ) -> AsyncIterator[ChatGenerationChunk]:
        """The async twin of :meth:`_chunks`: waits on the engine without a thread per request."""
        chat_format.to_chat_dicts(messages)
        tracker = self._loader(options.model).manager.tracker
        async with tracker.atrack():
            answer = await asyncio.to_thread(self._begin, messages, options)  # loads/switches: blocking
            try:
                answer.submit()
                await _dispatch_async(run_manager, answer.take_new_switches())
                while True:
                    try:
                        async for piece in answer.handle:  # without ``stream`` only to wait for the end
                            chunk = self._chunk(options, piece) if stream else None
                            if chunk is not None:
                                if run_manager:
                                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                                yield chunk
                        result = answer.handle.result(timeout=0)
                        break
                    except _out_of_memory() as error:
                        if not await asyncio.to_thread(answer.retry, error):
                            raise
                        await _dispatch_async(run_manager, answer.take_new_switches())
            finally:
                answer.close()  # a cancelled task or an early stop ends the request at the next step
        yield self._final_chunk(answer.loaded, options, answer.prefill, result, answer.call, streamed=stream)

    @staticmethod
    def _merged(chunks: list[ChatGenerationChunk]) -> ChatResult:
        merged = chunks[0]
        for chunk in chunks[1:]:
            merged += chunk
        message = cast(AIMessageChunk, merged.message)
        final = AIMessage(
            content=message.content, usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata, tool_calls=message.tool_calls,
            invalid_tool_calls=message.invalid_tool_calls,
        )
        info = {"finish_reason": message.response_metadata.get("finish_reason")}
        return ChatResult(generations=[ChatGeneration(message=final, generation_info=info)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.base_url is not None:
            return self._remote_chat().generate(self, messages, stop, run_manager, kwargs)
        options = self._call_options(stop, kwargs)
        return self._merged(list(self._chunks(messages, options, run_manager, stream=self.streaming)))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.base_url is not None:
            yield from self._remote_chat().stream(self, messages, stop, run_manager, kwargs)
            return
        options = self._call_options(stop, kwargs)
        yield from self._chunks(messages, options, run_manager, stream=True)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.base_url is not None:
            return await self._remote_chat().agenerate(self, messages, stop, run_manager, kwargs)
        options = self._call_options(stop, kwargs)
        chunks = [chunk async for chunk in self._achunks(messages, options, run_manager, stream=self.streaming)]
        return self._merged(chunks)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.base_url is not None:
            async for chunk in self._remote_chat().astream(self, messages, stop, run_manager, kwargs):
                yield chunk
            return
        options = self._call_options(stop, kwargs)
        async for chunk in self._achunks(messages, options, run_manager, stream=True):
            yield chunk

    def _final_chunk(self, loaded: LoadedModel, options: CallOptions, prefill: str,
                     result: GenerationResult, call: "_CallRecord", streamed: bool = True) -> ChatGenerationChunk:
        content, calls, invalid, finish = self._message_parts(loaded, options, prefill, result)
        buffered = bool(options.tools or options.response_format) or not streamed
        chunks = [
            tool_call_chunk(name=c["name"], args=_json_dumps(c["args"]), id=c["id"], index=i) for i, c in enumerate(calls)
        ]
        message = AIMessageChunk(
            content=content if buffered else "",
            tool_call_chunks=chunks,
            usage_metadata=self._usage(result),
            response_metadata=dict(self._metadata(loaded, result, finish, call)),
            chunk_position="last",
        )
        if invalid:
            message.invalid_tool_calls = invalid
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})

    # -- tools and structured output ------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[Union[dict[str, Any], type, Callable, BaseTool]],
        *,
        tool_choice: Optional[Union[dict, str, Literal["auto", "any", "none", "required"], bool]] = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Render ``tools`` into the prompt (chat template ``tools`` variable) and parse calls back."""
        formatted = []
        for tool in tools:
            try:
                formatted.append(convert_to_openai_tool(tool))
            except Exception as error:  # noqa: BLE001 - any conversion failure is the caller's input
                raise InvalidValueError(
                    "tool", tool, f"a pydantic model, a function, a BaseTool or an OpenAI tool dict ({error})"
                ) from None
        if tool_choice is not None:
            chat_format.validate_tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: Optional[Union[dict, type]] = None,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Parse answers into ``schema`` via a forced tool call, a JSON schema in the prompt, or JSON mode.

        With ``constrained_decoding`` (the default, llguidance installed) the answer is decoded under
        the schema's grammar and closed within ``max_tokens``, so it always parses; ``strict`` is
        accepted for compatibility. Without a grammar a small model can still write JSON that fails to
        parse (``include_raw=True`` returns the error instead).
        """
        if kwargs:
            raise InvalidValueError("with_structured_output argument", sorted(kwargs), "schema, method, include_raw, strict")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            if schema is None:
                raise InvalidValueError("schema", schema, "a pydantic model or a JSON schema dict for function_calling")
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": tool})
            parser: Runnable = (
                PydanticToolsParser(tools=[cast(type[BaseModel], schema)], first_tool_only=True)
                if is_pydantic else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema" and schema is None:
                raise InvalidValueError("schema", schema, "a pydantic model or a JSON schema dict for json_schema")
            response_format: dict[str, Any] = {"type": "json_object"}
            if schema is not None and method == "json_schema":
                response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            llm = self.bind(response_format=response_format, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": convert_to_json_schema(schema) if schema is not None else None})
            parser = (PydanticOutputParser(pydantic_object=cast(type[BaseModel], schema)) if is_pydantic
                      else JsonOutputParser())
        else:
            raise InvalidValueError("method", method, "'function_calling', 'json_schema' or 'json_mode'")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


class _CallRecord:
    """What one invocation's preparation decided and did (threads each get their own)."""

    def __init__(self) -> None:
        self.reason = ""
        self.switches: list[SwitchRecord] = []

    def set_reason(self, reason: str) -> None:
        self.reason = reason


class _Answer:
    """One answer over one or more engine requests (a retry after running out of memory resumes).

    Holds the model "in use" (not evictable) from ``submit`` to ``close``.
    """

    def __init__(self, loader: Runtime, loaded: LoadedModel, call: _CallRecord,
                 request: GenerationRequest, prefill: str, max_retries: int) -> None:
        self.loader, self.loaded, self.call = loader, loaded, call
        self.request, self.prefill = request, prefill
        self.max_retries = max_retries
        self.attempts = 0
        self._handle: Optional[RequestHandle] = None
        self._in_use = contextlib.ExitStack()
        self._dispatched = 0

    @property
    def handle(self) -> RequestHandle:
        """The engine request now serving this answer (the latest one after a retry)."""
        if self._handle is None:
            raise RuntimeError("the answer was not submitted yet")
        return self._handle

    def submit(self) -> None:
        self._in_use.enter_context(self.loaded.in_use())
        self._handle = self.loader.engine(self.loaded).submit(self.request)

    def take_new_switches(self) -> list[SwitchRecord]:
        """Switch records not yet sent to the callbacks."""
        new = self.call.switches[self._dispatched :]
        self._dispatched = len(self.call.switches)
        return new

    def retry(self, error: BaseException) -> bool:
        """After running out of memory: one level lower, then resume from the tokens produced so far.

        The level below the one the failing step ran at (not below whatever the model is at now:
        several requests of one batch fail together and must not each step the model down).
        Nothing already streamed is sent again. False when no retry is left or no lower level exists.
        """
        progress = self.handle.progress()
        failed_at = QuantizationLevel.parse(progress.last_level) if progress.last_level else self.loaded.level
        lower = _next_lower(failed_at)
        if self.attempts >= self.max_retries or lower is None:
            return False
        self.attempts += 1
        logger.warning("%s ran out of memory at %s (%s); retrying at %s", self.loaded.name, failed_at.value, error,
                       lower.value)
        if self.loaded.level.rank > lower.rank:
            record = self.loader.requantize(self.loaded, lower, reason="out of memory during generation")
            if record is not None:
                self.call.switches.append(record)
        self.request = dataclasses.replace(self.request, resume=progress.resume())
        self._handle = self.loader.engine(self.loaded).submit(self.request)
        return True

    def close(self) -> None:
        if self._handle is not None and not self._handle.done:
            self._handle.cancel()
        self._in_use.close()


def _grammars() -> Any:
    """The grammar module (llguidance, torch): imported by the first answer that needs a grammar."""
    from langchain_adaptquant import constrained

    return constrained


def _default_device() -> str:
    """The device a manager would pick here (cuda, mps, cpu): what ``runtime="auto"`` weighs.

    torch is asked only when it is loaded already or a GPU may be there (an NVIDIA device node, an
    Apple-silicon Mac): a CPU machine choosing llama.cpp never pays torch's import.
    """
    import platform
    from pathlib import Path

    gpu_possible = Path("/dev/nvidia0").exists() or (platform.system() == "Darwin" and platform.machine() == "arm64")
    if "torch" not in sys.modules and not gpu_possible:
        return "cpu"
    from langchain_adaptquant.control.resources import detect_device

    return detect_device()


def _out_of_memory() -> tuple[type[BaseException], ...]:
    """What running out of memory raises: MemoryError, and torch's own once torch is loaded."""
    torch = sys.modules.get("torch")
    error = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError, error) if isinstance(error, type) else (MemoryError,)


def _json_instruction(response_format: dict[str, Any]) -> str:
    schema = (response_format.get("json_schema") or {}).get("schema")
    if schema:
        return "Answer with one JSON object that matches this JSON schema, and nothing else:\n" + _json_dumps(schema)
    return "Answer with one JSON object, and nothing else."


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _next_lower(level: QuantizationLevel) -> Optional[QuantizationLevel]:
    from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION

    index = LEVELS_BY_PRECISION.index(level)
    return LEVELS_BY_PRECISION[index + 1] if index + 1 < len(LEVELS_BY_PRECISION) else None


def _dispatch_sync(run_manager: Optional[CallbackManagerForLLMRun], records: list[SwitchRecord]) -> None:
    """Send each switch to every handler of this run, as ``dispatch_custom_event`` would."""
    if run_manager is None or not run_manager.handlers:
        return
    for record in records:
        handle_event(
            run_manager.handlers, "on_custom_event", "ignore_custom_event", REQUANTIZE_EVENT, record.to_dict(),
            run_id=run_manager.run_id, tags=run_manager.tags, metadata=run_manager.metadata,
        )


async def _dispatch_async(run_manager: Optional[AsyncCallbackManagerForLLMRun], records: list[SwitchRecord]) -> None:
    if run_manager is None or not run_manager.handlers:
        return
    for record in records:
        await ahandle_event(
            run_manager.handlers, "on_custom_event", "ignore_custom_event", REQUANTIZE_EVENT, record.to_dict(),
            run_id=run_manager.run_id, tags=run_manager.tags, metadata=run_manager.metadata,
        )
