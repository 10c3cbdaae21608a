"""The OpenAPI 3.1 document: hand-built for the fixed routes, msgspec's JSON Schema for the tasks.

Each public task gets a request schema of its own (`Submit.<task>`): `task` is its name, `args`
and `kwargs` follow its signature, each argument's schema being `msgspec.json.schema` of its type
hint (Structs, dataclasses, enums and so on become components named `task.<Type>`). `POST /v1/jobs`
takes one of them, discriminated by `task`.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any

import msgspec

from offload.api.validation import (
    MAX_DEPTH,
    MAX_WEBHOOK_URL,
    WEBHOOK_PATTERN,
    ArgumentValidator,
    DlqSelection,
    SubmitRequest,
)
from offload.job import JobInfo, JobState
from offload.task import QUEUE_NAME

if TYPE_CHECKING:
    from offload.app import App

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
REF = "#/components/schemas/{name}"
_COMPONENT_NAME = re.compile(r"[^A-Za-z0-9._-]")

NUMBER_OR_NULL = {"type": ["number", "null"]}


class JobView(msgspec.Struct):
    """A job as the API shows it (`Job` in the contract): no arguments, no worker internals."""

    id: str
    task: str
    queue: str
    state: str
    attempts: int
    deliveries: int
    max_deliveries: int
    priority: int
    created_at: float
    run_at: float
    started_at: float | None
    finished_at: float | None
    result: Any
    error: str | None
    progress: None = None

    @classmethod
    def of(cls, info: JobInfo) -> JobView:
        return cls(
            info.id,
            info.task,
            info.queue,
            info.state.value,
            info.attempts,
            info.deliveries,
            info.max_deliveries,
            info.priority,
            info.created_at,
            info.run_at,
            info.started_at,
            info.finished_at,
            info.result,
            info.error,
        )


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _problem_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": _ref_header("RetryAfter")}
    return response


def _ref_header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _problem_response("Malformed JSON, a field of the wrong type, or a bad parameter"),
    "401": _problem_response("Missing, unknown or revoked API key"),
    "403": _problem_response("The API key lacks the scope this operation needs"),
    "404": _problem_response("No such job, or no such public task"),
    "413": _problem_response("The body (or the job it makes) is over the size limit"),
    "415": _problem_response("The body is not application/json"),
    "422": _problem_response("The arguments do not match the task's type hints (see `errors`)"),
    "429": _problem_response("This API key's rate limit; retry after Retry-After seconds", retry_after=True),
    "503": _problem_response(
        "The queue is full (Retry-After computed from its depth and drain rate) or the broker is unreachable",
        retry_after=True,
    ),
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: ERRORS[code] for code in codes}


def _components() -> dict[str, Any]:
    states = [s.value for s in JobState]
    (submit_schema, dlq_schema), submit_components = msgspec.json.schema_components(
        [SubmitRequest, DlqSelection], ref_template=REF
    )
    schemas: dict[str, Any] = {
        **submit_components,
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": _ref("FieldError")},
                "queue": {"type": "string"},
                "depth": {"type": "integer"},
                "max_depth": {"type": "integer"},
                "drain_rate": {"type": "number"},
                "retry_after": {"type": "integer"},
                "max_body_bytes": {"type": "integer"},
            },
        },
        "FieldError": {
            "type": "object",
            "required": ["field", "message"],
            "properties": {
                "field": {"type": "string", "examples": ["args[1]", "kwargs.width"]},
                "message": {"type": "string"},
            },
        },
        "JobAccepted": {
            "type": "object",
            "required": ["id", "state", "created", "location"],
            "properties": {
                "id": {"type": "string"},
                "state": {"type": "string", "enum": states},
                "created": {"type": "boolean", "description": "false: an Idempotency-Key matched"},
                "location": {"type": "string"},
            },
        },
        "Job": {
            "type": "object",
            "required": list(JobView.__struct_fields__),
            "properties": {
                "id": {"type": "string"},
                "task": {"type": "string"},
                "queue": {"type": "string"},
                "state": {"type": "string", "enum": states},
                "attempts": {"type": "integer", "description": "executions that ended in an error"},
                "deliveries": {"type": "integer", "description": "times handed to a worker"},
                "max_deliveries": {"type": "integer"},
                "priority": {"type": "integer"},
                "created_at": {"type": "number", "description": "epoch seconds"},
                "run_at": {"type": "number"},
                "started_at": NUMBER_OR_NULL,
                "finished_at": NUMBER_OR_NULL,
                "result": {"description": "the task's return value (JSON) once succeeded"},
                "error": {"type": ["string", "null"]},
                "progress": {"description": "reserved; null in v1"},
            },
        },
        "CancelResult": {
            "type": "object",
            "required": ["id", "cancelled", "state"],
            "properties": {
                "id": {"type": "string"},
                "cancelled": {"type": "boolean"},
                "state": {"type": "string", "enum": states},
            },
        },
        "QueueStats": {
            "type": "object",
            "required": ["queue", "ready", "delayed", "running", "dead", "max_depth", "drain_rate", "depth"],
            "properties": {
                "queue": {"type": "string"},
                "ready": {"type": "integer"},
                "delayed": {"type": "integer"},
                "running": {"type": "integer"},
                "dead": {"type": "integer"},
                "max_depth": {"type": ["integer", "null"]},
                "drain_rate": {"type": "number", "description": "jobs finished per second, last minute"},
                "depth": {"type": "integer", "description": "ready + delayed: what max_depth bounds"},
            },
        },
        "Count": {"type": "object", "required": ["count"], "properties": {"count": {"type": "integer"}}},
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    }
    schemas["SubmitRequest"] = submit_schema if "$ref" not in submit_schema else schemas["SubmitRequest"]
    schemas["DlqSelection"] = _dlq_selection_schema(schemas.pop("DlqSelection", dlq_schema))
    return schemas


def _dlq_selection_schema(generated: dict[str, Any]) -> dict[str, Any]:
    """Exactly one of ids, queue or all=true (msgspec's schema cannot say "exactly one")."""
    props = generated["properties"]
    null = {"type": "null"}

    def one(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        others = {other: null for other in ("ids", "queue", "all") if other != name}
        return {
            "type": "object",
            "required": [name],
            "properties": {name: schema, **others},
            "additionalProperties": False,
        }

    ids = next(s for s in props["ids"]["anyOf"] if s.get("type") == "array")
    queue = next(s for s in props["queue"]["anyOf"] if s.get("type") == "string")
    return {
        "title": "DlqSelection",
        "description": 'exactly one of {"ids": [...]}, {"queue": "name"} or {"all": true}',
        "oneOf": [one("ids", ids), one("queue", queue), one("all", {"const": True})],
    }


def task_request_schemas(
    validators: dict[str, ArgumentValidator], https_only: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({task name: request schema}, {component name: schema}) for the public tasks.

    A task's schema is exact: one branch per way to split its parameters between `args` (the
    first n positionally) and `kwargs` (the rest by name), each with its own required names, so
    a body matches the schema exactly when the API accepts its arguments' shape and types.
    """
    hints: list[Any] = []
    for validator in validators.values():
        hints.extend(p.hint for p in validator.params)
    schemas, components = _hint_schemas(hints)
    by_hint = iter(schemas)
    base = msgspec.json.schema_components([SubmitRequest], ref_template=REF)[1]["SubmitRequest"]["properties"]
    options = {
        "queue": base["queue"],
        "priority": base["priority"],
        "delay": base["delay"],
        "webhook": webhook_schema(https_only),
    }
    out: dict[str, Any] = {}
    for name, validator in validators.items():
        schema_of = {param.name: next(by_hint) for param in validator.params}
        branches = [
            {
                "type": "object",
                "required": ["task", *required],
                "additionalProperties": False,
                "properties": {"task": {"type": "string", "const": name}, **parts, **options},
            }
            for parts, required in _call_shapes(validator, schema_of)
        ]
        doc = inspect.getdoc(validator.task.fn) or ""
        out[name] = {
            "title": f"Submit {name}",
            "description": (doc.splitlines()[0] + " " if doc else "")
            + f"Arguments: ({', '.join(_signature_text(validator))}).",
            **({"oneOf": branches} if len(branches) > 1 else branches[0]),
        }
    return out, components


def _call_shapes(
    validator: ArgumentValidator, schema_of: dict[str, Any]
) -> list[tuple[dict[str, Any], list[str]]]:
    """({"args": ..., "kwargs": ...}, required top-level names) per number of positional arguments."""
    kind = inspect.Parameter
    positional = validator.positional
    keyword_only = [p for p in validator.params if p.kind is kind.KEYWORD_ONLY]
    var_positional, var_keyword = validator.var_positional, validator.var_keyword
    shapes = []
    for n in range(len(positional) + 1):
        rest = positional[n:]
        if any(p.required and p.kind is kind.POSITIONAL_ONLY for p in rest):
            continue  # a positional-only parameter cannot be given by name
        args: dict[str, Any] = {"type": "array", "minItems": n}
        if n:
            args["prefixItems"] = [{**schema_of[p.name], "title": p.name} for p in positional[:n]]
        if n == len(positional) and var_positional is not None:
            args["items"] = schema_of[var_positional.name]
        else:
            args["items"] = False
            args["maxItems"] = n
        by_name = [p for p in rest if p.kind is not kind.POSITIONAL_ONLY] + keyword_only
        kwargs: dict[str, Any] = {
            "type": "object",
            "properties": {p.name: schema_of[p.name] for p in by_name},
            "additionalProperties": schema_of[var_keyword.name] if var_keyword is not None else False,
        }
        taken = [p.name for p in positional[:n] if p.kind is not kind.POSITIONAL_ONLY]
        if var_keyword is not None and taken:
            kwargs["propertyNames"] = {"not": {"enum": taken}}  # given positionally already
        needed = [p.name for p in by_name if p.required]
        if needed:
            kwargs["required"] = needed
        required = (["args"] if n else []) + (["kwargs"] if needed else [])
        shapes.append(({"args": args, "kwargs": kwargs}, required))
    return shapes


def webhook_schema(https_only: bool) -> dict[str, Any]:
    pattern = WEBHOOK_PATTERN.replace("https?", "https") if https_only else WEBHOOK_PATTERN
    url = {"type": "string", "maxLength": MAX_WEBHOOK_URL, "pattern": pattern}
    return {"anyOf": [url, {"type": "null"}], "description": "POSTed a signed notification when the job ends"}


def _signature_text(validator: ArgumentValidator) -> list[str]:
    text = str(validator.task.signature).strip("()")
    return [part.strip() for part in text.split(",")] if text else []


def _hint_schemas(hints: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One schema per hint (unsupported hints: any value), components prefixed `task.`."""
    template = REF.format(name="task.{name}")
    try:
        schemas, components = msgspec.json.schema_components(hints, ref_template=template)
    except (TypeError, ValueError):
        supported = []
        for hint in hints:
            try:
                msgspec.json.schema(hint)
                supported.append(hint)
            except (TypeError, ValueError):
                supported.append(Any)
        schemas, components = msgspec.json.schema_components(supported, ref_template=template)
    return list(schemas), {f"task.{name}": schema for name, schema in components.items()}


def openapi_document(
    app: App, validators: dict[str, ArgumentValidator], *, auth: bool, https_only: bool
) -> dict[str, Any]:
    components = _components()
    components["SubmitRequest"]["properties"]["webhook"] = webhook_schema(https_only)
    per_task, task_components = task_request_schemas(validators, https_only)
    components.update(task_components)
    refs = {}
    for name, schema in per_task.items():
        component = "Submit." + _COMPONENT_NAME.sub("_", name)
        components[component] = schema
        refs[name] = REF.format(name=component)
    if refs:
        submit_body: dict[str, Any] = {
            "oneOf": [{"$ref": ref} for ref in refs.values()],
            "discriminator": {"propertyName": "task", "mapping": refs},
        }
    else:
        submit_body = _ref("SubmitRequest")

    def op(summary: str, scope: str | None, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, **more, "responses": responses}
        if scope is not None and auth:
            operation["security"] = [{"bearer": []}]
            operation["description"] = (more.get("description", "") + f"\n\nScope: `{scope}`.").strip()
            responses.update(_errors("401", "403", "429"))
        return operation

    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    json_body = {"required": True, "content": {"application/json": {"schema": _ref("DlqSelection")}}}
    dlq_errors = ("400", "413", "415", "503")
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": op(
                "Submit a job",
                "submit",
                {
                    "202": {
                        **_json(_ref("JobAccepted"), "Accepted: the job is durably queued"),
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "the job"}},
                    },
                    **_errors("400", "404", "413", "415", "422", "503"),
                },
                operationId="submitJob",
                description=(
                    "Arguments are checked against the task's type hints before anything is "
                    f"enqueued; values may nest at most {MAX_DEPTH} levels. Only tasks declared "
                    "with public=True can be submitted."
                ),
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "same key (within its window) -> the same job, created: false",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                requestBody={"required": True, "content": {"application/json": {"schema": submit_body}}},
            )
        },
        "/v1/jobs/{id}": {
            "get": op(
                "A job's state and outcome",
                "read",
                {"200": _json(_ref("Job"), "The job"), **_errors("400", "404", "503")},
                operationId="getJob",
                parameters=[
                    job_id,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "long-poll: wait up to this many seconds for the job to finish",
                        "schema": {"type": "number", "minimum": 0, "maximum": 60},
                    },
                ],
            )
        },
        "/v1/jobs/{id}/events": {
            "get": op(
                "Server-sent events: the job's state changes",
                "read",
                {
                    "200": {
                        "description": "`event: state` with `data: <Job>` per change (the first at "
                        "once); ends after a finished state; `: keep-alive` every 15 s",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors("404", "503"),
                },
                operationId="jobEvents",
                parameters=[job_id],
            )
        },
        "/v1/jobs/{id}/cancel": {
            "post": op(
                "Cancel a queued job",
                "submit",
                {"200": _json(_ref("CancelResult"), "Whether it was cancelled"), **_errors("404", "503")},
                operationId="cancelJob",
                parameters=[job_id],
            )
        },
        "/v1/queues": {
            "get": op(
                "Queue depths, bounds and drain rates",
                "read",
                {
                    "200": _json({"type": "array", "items": _ref("QueueStats")}, "Every known queue"),
                    **_errors("503"),
                },
                operationId="listQueues",
            )
        },
        "/v1/dlq": {
            "get": op(
                "Dead jobs, newest first",
                "admin",
                {"200": _json({"type": "array", "items": _ref("Job")}, "Dead jobs"), **_errors("400", "503")},
                operationId="listDeadJobs",
                parameters=[
                    {
                        "name": "queue",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": QUEUE_NAME.pattern},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    },
                ],
            )
        },
        "/v1/dlq/replay": {
            "post": op(
                "Put dead jobs back on their queue with fresh counters",
                "admin",
                {"200": _json(_ref("Count"), "How many"), **_errors(*dlq_errors)},
                operationId="replayDeadJobs",
                requestBody=json_body,
            )
        },
        "/v1/dlq/purge": {
            "post": op(
                "Delete dead jobs",
                "admin",
                {"200": _json(_ref("Count"), "How many"), **_errors(*dlq_errors)},
                operationId="purgeDeadJobs",
                requestBody=json_body,
            )
        },
        "/healthz": {
            "get": op("The process is up", None, {"200": _json(_ref("Status"), "Up")}, operationId="health")
        },
        "/readyz": {
            "get": op(
                "The broker answers",
                None,
                {"200": _json(_ref("Status"), "Ready"), "503": ERRORS["503"]},
                operationId="ready",
            )
        },
        "/openapi.json": {
            "get": op(
                "This document",
                None,
                {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                operationId="openapi",
            )
        },
    }
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"offload API ({app.name})",
            "version": API_VERSION,
            "description": "Submit background jobs and follow them. Errors are application/problem+json "
            "(RFC 9457). See docs/http-api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": {
                "RetryAfter": {
                    "description": "whole seconds to wait before retrying (>= 1)",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
        },
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key from `offload keys create`",
            }
        }
    return document
