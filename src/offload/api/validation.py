"""Request bodies, checked before anything is enqueued.

The submit body is decoded once by msgspec into `SubmitRequest`, its arguments kept as raw JSON
(`msgspec.Raw`, a slice of the body): each argument is then decoded against the task's type hint
with exact JSON semantics ("5" is not an int; an object key is a string) by a decoder built once
per task, and, once all pass, into plain JSON values for the envelope. Problems are reported by
field: `args[1]`, `kwargs.width`, `args[0].items[2]`.

Strict is deliberate: the worker converts only rich types (datetime, Structs, ...) and passes
plain JSON values through, so a task annotated `int` would otherwise receive the string "5".
Whatever passes here, the worker accepts.

Limits beyond the body size, each refused (422) with the argument's field: an argument nested
deeper than MAX_DEPTH containers, or one whose JSON alone is over the App's `max_message_bytes`
(the whole job over that limit is a 413).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import msgspec

from offload.api.problems import Problem, bad_request
from offload.task import MAX_PRIORITY, MAX_WEBHOOK_URL, QUEUE_NAME, Task

__all__ = ["MAX_WEBHOOK_URL", "ArgumentValidator", "DlqSelection", "SubmitRequest"]

MAX_DEPTH = 32
MAX_ERRORS = 20
MAX_TASK_NAME = 200
MAX_JOB_ID = 200
MAX_DLQ_IDS = 1000
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
# An absolute http(s) URL with a host name or IPv4 address (no user info, no IPv6 literal).
WEBHOOK_PATTERN = rf"^https?://[A-Za-z0-9._~-]+(:{_PORT})?([/?#][!-~]*)?$"

QueueName = Annotated[
    str, msgspec.Meta(pattern=QUEUE_NAME.pattern, description="1-100 of A-Z a-z 0-9 _ . : -")
]


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/jobs`: which task, its arguments, and per-job options."""

    task: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TASK_NAME)]
    args: list[msgspec.Raw] = []
    kwargs: dict[str, msgspec.Raw] = {}
    queue: QueueName | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)] | None = None
    delay: Annotated[float, msgspec.Meta(ge=0)] | None = None
    webhook: Annotated[str, msgspec.Meta(pattern=WEBHOOK_PATTERN, max_length=MAX_WEBHOOK_URL)] | None = None


class DlqSelection(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/dlq/replay` and `/purge`: exactly one of ids, queue or all=true."""

    ids: (
        Annotated[
            list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID)]],
            msgspec.Meta(min_length=1, max_length=MAX_DLQ_IDS),
        ]
        | None
    ) = None
    queue: QueueName | None = None
    all: bool | None = None


_submit_decoder = msgspec.json.Decoder(SubmitRequest)
_value_decoder = msgspec.json.Decoder()
_dlq_decoder = msgspec.json.Decoder(DlqSelection)


def decode_body(decoder: msgspec.json.Decoder[Any], body: bytes, what: str) -> Any:
    """Decode or raise 400 naming the field (malformed JSON, wrong types, unknown fields)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_path(str(exc))
        raise bad_request(
            f"{what}: {message}{f' at {field!r}' if field else ''}",
            errors=[{"field": field or "$", "message": message}],
        ) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Problem(400, "malformed-json", f"the body is not valid JSON: {detail}") from None


def decode_submit(body: bytes) -> SubmitRequest:
    request: SubmitRequest = decode_body(_submit_decoder, body, "invalid submit request")
    return request


def decode_dlq_selection(body: bytes) -> tuple[list[str] | None, str | None]:
    """(job ids, queue) for the broker's DLQ verbs; `all` is (None, None)."""
    selection: DlqSelection = decode_body(_dlq_decoder, body, "invalid selection")
    given = [name for name in ("ids", "queue", "all") if getattr(selection, name) is not None]
    if len(given) != 1 or selection.all is False:
        raise bad_request('give exactly one of {"ids": [...]}, {"queue": "name"} or {"all": true}')
    return selection.ids, selection.queue


def plain_values(
    args: Sequence[msgspec.Raw], kwargs: dict[str, msgspec.Raw]
) -> tuple[list[Any], dict[str, Any]]:
    """Checked raw arguments as the plain JSON values a job envelope holds."""
    decode = _value_decoder.decode
    return [decode(raw) for raw in args], {name: decode(raw) for name, raw in kwargs.items()}


def split_path(message: str) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.x[0]`" -> ("Expected `int`, got `str`", "x[0]")."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message, ""
    path = where.rstrip("`")
    return text, path[2:] if path.startswith("$.") else path[1:]


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    kind: inspect._ParameterKind
    required: bool
    decoder: msgspec.json.Decoder[Any] | None  # None: any JSON value
    hint: Any


class ArgumentValidator:
    """Checks one task's JSON arguments against its signature and type hints."""

    def __init__(self, task: Task[Any, Any]) -> None:
        self.task = task
        try:
            hints = typing.get_type_hints(task.fn, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable hints: arguments are checked by count only
            hints = {}
        self.params: list[_Param] = []
        for p in task.signature.parameters.values():
            hint = hints.get(p.name, Any)
            decoder = None if hint is Any else msgspec.json.Decoder(hint, strict=True)
            required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            self.params.append(_Param(p.name, p.kind, required, decoder, hint))
        self.positional = [
            p for p in self.params if p.kind in (p.kind.POSITIONAL_ONLY, p.kind.POSITIONAL_OR_KEYWORD)
        ]
        self.by_name = {
            p.name: p for p in self.params if p.kind not in (p.kind.VAR_POSITIONAL, p.kind.VAR_KEYWORD)
        }
        self.var_positional = next((p for p in self.params if p.kind is p.kind.VAR_POSITIONAL), None)
        self.var_keyword = next((p for p in self.params if p.kind is p.kind.VAR_KEYWORD), None)

    def check(
        self,
        args: Sequence[msgspec.Raw],
        kwargs: dict[str, msgspec.Raw],
        body: bytes,
        max_value_bytes: int,
    ) -> None:
        """Raise 422 listing every argument at fault (up to MAX_ERRORS)."""
        errors: list[dict[str, str]] = []
        # Fast, in C: no value can be too deep unless the body has that many brackets at all.
        deep_scan = body.count(b"[") + body.count(b"{") > MAX_DEPTH
        check_value = partial(_check_value, deep_scan=deep_scan, max_bytes=max_value_bytes, errors=errors)
        given: set[str] = set()
        for index, raw in enumerate(args):
            field = f"args[{index}]"
            if index < len(self.positional):
                param: _Param | None = self.positional[index]
                assert param is not None
                given.add(param.name)
            else:
                param = self.var_positional
                if param is None:
                    errors.append(
                        {
                            "field": field,
                            "message": f"unexpected: the task takes at most {len(self.positional)} "
                            "positional argument(s)",
                        }
                    )
                    continue
            check_value(raw, param, field)
        for name, raw in kwargs.items():
            field = f"kwargs.{name}"
            param = self.by_name.get(name)
            if param is None or param.kind is param.kind.POSITIONAL_ONLY:
                if self.var_keyword is not None:  # as in Python: the name goes to **kwargs
                    check_value(raw, self.var_keyword, field)
                    continue
                why = "is positional-only: pass it in args" if param is not None else "is not a parameter"
                errors.append({"field": field, "message": f"{name!r} {why} of this task{self._takes()}"})
                continue
            if name in given:
                errors.append({"field": field, "message": f"{name!r} is also given positionally in args"})
                continue
            given.add(name)
            check_value(raw, param, field)
        for position, param in enumerate(self.params):
            if param.required and param.name not in given:
                if param.kind is param.kind.KEYWORD_ONLY:
                    field = f"kwargs.{param.name}"
                else:
                    field = f"args[{position}]"
                errors.append({"field": field, "message": f"missing required argument {param.name!r}"})
        if errors:
            fields = ", ".join(e["field"] for e in errors[:5])
            raise Problem(
                422,
                "invalid-arguments",
                f"the arguments do not match task {self.task.name!r}: {fields}{self._takes()}",
                title="Invalid arguments",
                errors=errors[:MAX_ERRORS],
            )

    def _takes(self) -> str:
        return f"; it takes ({', '.join(_describe(p) for p in self.params)})"


def _describe(p: _Param) -> str:
    star = "*" if p.kind is p.kind.VAR_POSITIONAL else "**" if p.kind is p.kind.VAR_KEYWORD else ""
    hint = "" if p.hint is Any else f": {getattr(p.hint, '__name__', None) or p.hint}"
    return f"{star}{p.name}{hint}"


def _check_value(
    raw: msgspec.Raw,
    param: _Param,
    field: str,
    *,
    deep_scan: bool,
    max_bytes: int,
    errors: list[dict[str, str]],
) -> None:
    if len(raw) > max_bytes:
        errors.append(
            {"field": field, "message": f"{len(raw):,} bytes of JSON, over the {max_bytes:,}-byte limit"}
        )
        return
    if deep_scan:
        where = _too_deep(bytes(memoryview(raw)))
        if where is not None:
            errors.append({"field": field + where, "message": f"nested deeper than {MAX_DEPTH} levels"})
            return
    if param.decoder is None:
        return
    try:
        param.decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message, path = split_path(str(exc))
        suffix = "" if not path else (path if path.startswith("[") else f".{path}")
        errors.append({"field": field + suffix, "message": message})
    except RecursionError:
        errors.append({"field": field, "message": f"nested deeper than {MAX_DEPTH} levels"})


def _too_deep(data: bytes) -> str | None:
    """The path (suffix) of the first container nested deeper than MAX_DEPTH, else None."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return None
    try:
        value = msgspec.json.decode(data)
    except RecursionError:
        return ""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, list | dict):
            if depth >= MAX_DEPTH:
                return path
            if isinstance(item, list):
                stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(item))
            else:
                stack.extend((v, depth + 1, f"{path}.{k}") for k, v in item.items())
    return None
