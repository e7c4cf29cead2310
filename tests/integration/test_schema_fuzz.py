"""Schemathesis against the live server's own /openapi.json: every operation, every default check.

A real uvicorn server on 127.0.0.1 serves the embedded reference model (tiny, so each chat case
generates a token or few), with a token, so the schema's bearer scheme and 401s are exercised
too. Schemathesis runs its examples, coverage and fuzzing phases per operation, positive and
negative cases, with all its default checks: the server must never answer 5xx, must answer only
documented status codes and content types, with bodies that match the documented schemas, accept
every request the schema allows (2xx, or 404/409 where documented) and refuse every request it
forbids (4xx). The schema is the app's own: limits such as ``max_tokens_limit`` are filled in per
instance (``server/openapi.py``).

Three rules cannot be written in JSON Schema and the schema says them in words; the positive
cases are brought in line with them by ``_keep_cross_field_rules`` (negative cases are sent as
generated):

* a named ``tool_choice`` must name one of ``tools``;
* a tool call's ``arguments`` must be a JSON object (the schema's ``contentSchema``, which
  generators do not honour);
* the conversation's text may hold at most ``max_prompt_chars`` characters in all (each text is
  bounded by ``maxLength``; the sum is not expressible).

Deterministic (``derandomize``), so a failure reproduces on every run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from live_server import LiveServer  # noqa: E402

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, ScriptedProbe  # noqa: E402
from langchain_adaptquant.assets import reference_model_path  # noqa: E402
from langchain_adaptquant.server import create_app  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "reference"
MAX_PROMPT_CHARS = 400
#: Few generated cases per operation: the coverage phase already walks every bound and enum.
MAX_EXAMPLES = 12

#: What came back, per operation and status (checked once every operation has run).
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def live() -> Iterator[SimpleNamespace]:
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10), snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(
        reference_model_path(), loader=loader, token=TOKEN, max_tokens_limit=3, default_max_tokens=3,
        max_prompt_chars=MAX_PROMPT_CHARS, served_model_name=MODEL, preload=True,
    )
    started = time.monotonic()
    with LiveServer(app) as server:
        yield SimpleNamespace(url=server.url, app=app)
    seconds = time.monotonic() - started
    print(f"\nschemathesis {schemathesis.__version__}: {sum(SEEN.values())} cases in {seconds:.1f} s: "
          + ", ".join(f"{label} {status}: {count}" for (label, status), count in sorted(SEEN.items())))


def _json_object(text: Any) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (TypeError, ValueError):
        return False


def _keep_cross_field_rules(body: dict[str, Any]) -> None:
    """Make a schema-valid chat body follow the rules the schema can only state in words."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and function.get("arguments") and not _json_object(function["arguments"]):
                    function["arguments"] = json.dumps({"value": function["arguments"][:40]})
        budget = MAX_PROMPT_CHARS
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                message["content"] = content[:budget]
                budget -= len(message["content"])
            elif isinstance(content, list):
                for part in content:
                    part["text"] = part["text"][:budget]
                    budget -= len(part["text"])
            for call in message.get("tool_calls") or []:
                if len(call["function"]["arguments"]) > budget:
                    call["function"]["arguments"] = "{}"
                budget -= len(call["function"]["arguments"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tools = body.get("tools") or []
        if name not in {tool["function"]["name"] for tool in tools}:
            body["tools"] = [*tools, {"type": "function", "function": {"name": name}}]


@pytest.fixture(scope="module")
def api_schema(live: SimpleNamespace) -> Any:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=30)

    @schema.hook
    def map_case(context: Any, case: Any) -> Any:
        meta = case.meta
        positive = meta is None or meta.generation.mode.is_positive
        if positive and case.path == "/v1/chat/completions" and isinstance(case.body, dict):
            _keep_cross_field_rules(case.body)
        return case

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schema reads and renames ``node._nodeid``, which pytest 9.2 no longer has
    (it is ``_id`` there): give it one to read. Only its subtest labels use it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_passes_the_default_checks(case: Any) -> None:
    response = case.call_and_validate(headers=AUTH, timeout=60)
    SEEN[(case.operation.label, response.status_code)] += 1


def test_the_fuzz_reached_generation_and_every_operation(api_schema: Any) -> None:
    """The run above was not all refusals: chat answered 200 (a model generated) and 422/404."""
    if not SEEN:
        pytest.skip("checks the fuzz run above; run the whole file")
    labels = {label for label, _ in SEEN}
    operations = {result.ok().label for result in api_schema.get_all_operations()}
    assert operations <= labels, f"operations never called: {sorted(operations - labels)}"
    chat = {status: count for (label, status), count in SEEN.items() if label == "POST /v1/chat/completions"}
    assert chat.get(200, 0) >= 5 and chat.get(422, 0) >= 5, chat
