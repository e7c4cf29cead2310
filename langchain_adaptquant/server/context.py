"""Everything one app instance serves with, fixed when the app is created.

The served models are resolved to folders here, once: no request can make the server load another
path. Routes reach the context through ``request.app.state.ctx``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence, Union

from fastapi import Depends, Request

from langchain_adaptquant.callbacks import AsyncQuantizationTelemetryHandler, TelemetryRecorder
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, LoadedModel, serving_manager
from langchain_adaptquant.runtime.weights import resolve_model_folder
from langchain_adaptquant.server.errors import APIError
from langchain_adaptquant.server.security import InFlightLimiter

Allowlist = Union[Mapping[str, Union[str, Path]], Sequence[Union[str, Path]], None]


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    max_tokens_limit: int
    default_max_tokens: int
    max_prompt_chars: int
    max_body_bytes: int


@dataclass(frozen=True)
class ServedModel:
    id: str
    given: str  # as passed to create_app: the loader's name for it
    folder: Path
    llm: ChatAdaptQuant


@dataclass
class ServerContext:
    loader: AdaptiveModelLoader
    manager: DynamicQuantizationManager
    telemetry: TelemetryRecorder
    handler: AsyncQuantizationTelemetryHandler
    limiter: InFlightLimiter
    limits: Limits
    primary: ServedModel
    models: dict[str, ServedModel]  # every accepted name (id, path as given, resolved path) -> model
    token_required: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def served(self) -> list[ServedModel]:
        unique: dict[str, ServedModel] = {}
        for model in self.models.values():
            unique.setdefault(model.id, model)
        return list(unique.values())

    def resolve(self, name: str) -> ServedModel:
        """The served model a request names; anything else is refused, never loaded."""
        found = self.models.get(name)
        if found is None:
            available = sorted(model.id for model in self.served())
            raise APIError(404, f"model {name!r} is not served here; available: {available}", "model_not_found", "model")
        return found

    def loaded(self, model: Optional[ServedModel] = None) -> Optional[LoadedModel]:
        return self.loader.get((model or self.primary).folder)

    def sync_switches(self) -> None:
        """Bring switches made outside a chat call (another client of the loader) into telemetry, once each."""
        keep = self.telemetry.max_history
        for loaded in self.loader.models():
            for record in loaded.switches[-keep:]:
                self.telemetry.switch(record.to_dict())


def context(request: Request) -> ServerContext:
    return request.app.state.ctx


#: A route parameter typed ``Ctx`` receives the app's context.
Ctx = Annotated[ServerContext, Depends(context)]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(name, value, "an integer >= 1")
    return value


def build_context(
    model: Optional[Union[str, Path]],
    loader: Optional[AdaptiveModelLoader],
    manager: Optional[DynamicQuantizationManager],
    token: Optional[str],
    max_queue: int,
    max_tokens_limit: int,
    max_prompt_chars: int,
    max_body_bytes: int,
    model_allowlist: Allowlist,
    telemetry: Optional[TelemetryRecorder],
    default_max_tokens: int,
    served_model_name: Optional[str],
) -> ServerContext:
    for name, value in (("max_queue", max_queue), ("max_tokens_limit", max_tokens_limit),
                        ("max_prompt_chars", max_prompt_chars), ("max_body_bytes", max_body_bytes),
                        ("default_max_tokens", default_max_tokens)):
        _positive_int(name, value)
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise InvalidValueError("token", "<hidden>", "None or a non-empty string")
    if loader is not None and manager is not None and loader.manager is not manager:
        raise InvalidValueError("manager", manager, "the loader's own manager (or leave it out)")
    if loader is None:
        manager = manager or serving_manager()
        loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    manager = loader.manager
    telemetry = telemetry or TelemetryRecorder()

    def serve(given: Union[str, Path], model_id: Optional[str]) -> ServedModel:
        folder = resolve_model_folder(given)
        llm = ChatAdaptQuant(model=str(given), loader=loader, max_tokens=min(default_max_tokens, max_tokens_limit))
        return ServedModel(id=model_id or folder.name, given=str(given), folder=folder, llm=llm)

    if model is None:
        from langchain_adaptquant.pretrained import default_chat_model

        model = default_chat_model()
    primary = serve(model, served_model_name)
    served = [primary]
    if isinstance(model_allowlist, Mapping):
        served += [serve(path, str(name)) for name, path in model_allowlist.items()]
    elif model_allowlist:
        served += [serve(path, None) for path in model_allowlist]
    names: dict[str, ServedModel] = {}
    for entry in served:
        for alias in (entry.id, entry.given, str(entry.folder)):
            names.setdefault(alias, entry)
    return ServerContext(
        loader=loader,
        manager=manager,
        telemetry=telemetry,
        handler=AsyncQuantizationTelemetryHandler(recorder=telemetry),
        limiter=InFlightLimiter(max_queue),
        limits=Limits(max_tokens_limit, min(default_max_tokens, max_tokens_limit), max_prompt_chars, max_body_bytes),
        primary=primary,
        models=names,
        token_required=bool(token),
    )
