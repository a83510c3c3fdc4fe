"""Routes of the admin API, declared once: dispatch, validation, auth, errors and OpenAPI.

A handler is registered with :meth:`Api.route` together with everything the framework needs
to call it and to describe it: the method and path template, who may call it, the pydantic
models of its body, query and answer, and its success status. From that one declaration:

- dispatch: unknown path 404, wrong method 405 with ``Allow``;
- auth: a bearer token of the right kind, else 401 (no or a wrong token) or 403 (a token
  that may not do this), every one logged with the client's address;
- validation: the query and the JSON body become typed objects; an unknown field, a wrong
  type or a missing field is a 400 that names the field;
- errors: :class:`ApiError` and the store's exceptions become ``{"error": {"code",
  "message"}}`` with their status; the database being down is a 503;
- answers: serialised through the route's response model, so an answer is exactly what
  the document promises (a handler may return a model, a dict, a dataclass or a row);
- lists: paginated with ``page`` and ``per_page``; the answer is the JSON array of the page,
  with ``X-Total-Count`` and a ``Link`` header (``rel="next"`` ...), as GitHub's API does;
- the OpenAPI 3.1 document (:func:`openapi`).

A database error that reaches the framework untranslated (a pool used directly instead of
through the store) gets the store's mapping all the same (409, 503 ...) and a warning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema

from edge.admin.http import Request, Response, error_body
from edge.ratelimit import Limiter
from edge.store.errors import (
    TRANSLATED,
    Conflict,
    DatabaseUnavailable,
    Invalid,
    NotFound,
    StoreError,
    translate,
)

if TYPE_CHECKING:
    from edge.admin.app import AdminContext
    from edge.admin.auth import Principal

log = logging.getLogger("edge.admin")

# Who may call a route:
# - "none": anyone (health, metrics, the GitHub receiver, which checks its own signature);
# - "admin": the admin token;
# - "register": the admin token or the node bootstrap token (agent registration);
# - "node": the admin token or the token of the node named by the path's ``{id}``.
Auth = Literal["none", "admin", "register", "node"]

DEFAULT_PER_PAGE = 100
MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Strict(BaseModel):
    """Base of request bodies: unknown fields are errors, JSON types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class QueryModel(BaseModel):
    """Base of query parameters: unknown ones are errors; text converts to the field's type."""

    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    """Base of answers."""

    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(Out):
    code: str
    message: str
    field: str | None = None


class ErrorBody(Out):
    error: ErrorDetail


class ApiError(Exception):
    """An answer other than success: status, a stable code, and a message for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.headers = list(headers)

    def response(self) -> Response:
        detail: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.field is not None:
            detail["field"] = self.field
        return Response(self.status, json.dumps({"error": detail}).encode(), headers=self.headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")


@dataclass(frozen=True, slots=True)
class PageRequest:
    page: int
    per_page: int

    @property
    def limit(self) -> int:
        return self.per_page

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


@dataclass(slots=True)
class Page:
    """One page of a list and the length of the whole list."""

    items: Sequence[Any]
    total: int


@dataclass(slots=True)
class Reply:
    """An answer with a status or headers other than the route's defaults."""

    data: Any
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Call:
    """What a handler gets: the request, its path parameters and validated inputs."""

    request: Request
    params: dict[str, str]
    body: Any
    query: Any
    page: PageRequest
    principal: Principal | None
    ctx: AdminContext


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: Auth
    summary: str
    tag: str
    body: type[BaseModel] | None
    body_required: bool
    query: type[QueryModel] | None
    response: type[BaseModel] | None
    many: bool
    status: int
    errors: tuple[int, ...]
    # Changes recorded in the audit log (the mutating routes of operators).
    audit: bool
    content_type: str
    segments: tuple[str, ...] = ()
    # Other statuses a handler answers with a body of its own (not the error body), by Reply.
    answers: tuple[tuple[int, type[BaseModel]], ...] = ()
    # Request headers the route reads, for the document: (name, required, description).
    headers: tuple[tuple[str, bool, str], ...] = ()
    # For the document only: the body of a route that reads it raw (``body`` is None).
    raw_body: dict[str, Any] | None = None

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params = {}
        for pattern, value in zip(self.segments, segments, strict=True):
            if pattern.startswith("{"):
                if not value:
                    return None
                params[pattern[1:-1]] = value
            elif pattern != value:
                return None
        return params

    @property
    def specificity(self) -> int:
        return sum(1 for s in self.segments if not s.startswith("{"))


class Api:
    """A set of routes; :meth:`dispatch` serves a request with them."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        auth: Auth,
        summary: str,
        tag: str,
        body: type[BaseModel] | None = None,
        body_required: bool = True,
        query: type[QueryModel] | None = None,
        response: type[BaseModel] | None = None,
        many: bool = False,
        status: int = 200,
        errors: tuple[int, ...] = (),
        audit: bool | None = None,
        content_type: str = "application/json",
        answers: tuple[tuple[int, type[BaseModel]], ...] = (),
        headers: tuple[tuple[str, bool, str], ...] = (),
        raw_body: dict[str, Any] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append(
                Route(
                    method=method,
                    path=path,
                    handler=handler,
                    auth=auth,
                    summary=summary,
                    tag=tag,
                    body=body,
                    body_required=body_required,
                    query=query,
                    response=response,
                    many=many,
                    status=status,
                    errors=errors,
                    audit=(method != "GET" and auth == "admin") if audit is None else audit,
                    content_type=content_type,
                    segments=tuple(path.split("/")[1:]),
                    answers=answers,
                    headers=headers,
                    raw_body=raw_body,
                )
            )
            return handler

        return register

    def include(self, other: Api) -> None:
        self.routes.extend(other.routes)

    def resolve(self, request: Request) -> tuple[Route, dict[str, str]]:
        """The route for the request, or 404/405."""
        matches = [(r, p) for r in self.routes if (p := r.match(request.segments)) is not None]
        if not matches:
            raise ApiError(404, "not_found", f"no such path: {request.raw_path}")
        # The most specific template that fits wins (``/deployments/current`` over
        # ``/deployments/{id}``); 405 only when no template of the path has the method.
        best = max(r.specificity for r, _ in matches)
        matches = [(r, p) for r, p in matches if r.specificity == best]
        method = "GET" if request.method == "HEAD" else request.method
        for route, params in matches:
            if route.method == method:
                return route, params
        allowed = sorted(
            {r.method for r, _ in matches}
            | ({"HEAD"} if any(r.method == "GET" for r, _ in matches) else set())
        )
        raise ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.raw_path}; allowed: {', '.join(allowed)}",
            headers=[("allow", ", ".join(allowed))],
        )


# -- validation ---------------------------------------------------------------------------


def _field_name(loc: Sequence[int | str]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def validation_error(exc: ValidationError, where: str) -> ApiError:
    """400 naming the first field at fault (``resources.vcpu``)."""
    first = exc.errors(include_url=False)[0]
    kind = first["type"]
    loc = [p for p in first["loc"] if p not in ("body",)]
    name = _field_name(loc)
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", f"the {where} is not valid JSON: {first['msg']}")
    if kind.endswith("_type") and not name:
        return ApiError(400, "invalid_body", f"the {where} must be a JSON object")
    if kind == "missing":
        return ApiError(400, "missing_field", f"{name} is required", field=name)
    if kind == "extra_forbidden":
        return ApiError(400, "unknown_field", f"{name} is not a known field", field=name)
    message = first["msg"]
    # A model validator's own error has no location: its message names the field.
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    code = "wrong_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return ApiError(400, code, f"{name}: {message}" if name else message, field=name or None)


def _query_values(route: Route, request: Request) -> tuple[dict[str, str], PageRequest]:
    values: dict[str, str] = {}
    for key, value in request.query:
        if key in values:
            raise ApiError(400, "invalid_query", f"query parameter {key} is given twice", field=key)
        values[key] = value
    page, per_page = 1, DEFAULT_PER_PAGE
    if route.many:
        page = _int_param(values.pop("page", "1"), "page", 1, MAX_PAGE)
        per_page = _int_param(
            values.pop("per_page", str(DEFAULT_PER_PAGE)), "per_page", 1, MAX_PER_PAGE
        )
    return values, PageRequest(page, per_page)


def _int_param(text: str, name: str, low: int, high: int) -> int:
    # isdigit() alone admits "²" and digits of other scripts, which int() refuses; the
    # length bound keeps int() off huge strings.
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > len(str(high))
        or not low <= int(text) <= high
    ):
        raise ApiError(
            400,
            "invalid_query",
            f"query parameter {name} must be a whole number from {low} to {high}",
            field=name,
        )
    return int(text)


def _parse_body(route: Route, request: Request) -> Any:
    if route.body is None:
        return None
    if not request.body.strip():
        if route.body_required:
            raise ApiError(400, "missing_body", "a JSON body is required")
        return None
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media.lower() not in ("application/json", "") and not media.lower().endswith("+json"):
        # curl -d sends form encoding unless told otherwise: the usual slip, so say the fix.
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be application/json, not {media}"
            " (with curl: -H 'Content-Type: application/json')",
        )
    # Parsed first on its own: NaN and Infinity are no JSON (RFC 8259) however lenient a
    # parser may be, and a whole number written 8192.0 is, to JSON and to the document's
    # "type: integer", the integer 8192 (strict validation alone would refuse it).
    try:
        data = pydantic_core.from_json(request.body, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    try:
        return route.body.model_validate_json(pydantic_core.to_json(_whole_numbers(data)))
    except ValidationError as exc:
        raise validation_error(exc, "body") from None


# Floats up to here hold whole numbers exactly.
_EXACT = 2**53


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            # 1e400 parses as infinity: no finite value could have been meant.
            raise ApiError(400, "invalid_json", "the body holds a number too large for JSON")
        return int(value) if value.is_integer() and abs(value) <= _EXACT else value
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _dump(route: Route, data: Any) -> Any:
    """JSON-ready data of an answer: through the route's response model when it has one,
    so that the answer is exactly what the OpenAPI document promises (a dict, a dataclass or
    a row from the store are all validated and serialised by it)."""
    if route.many and isinstance(data, list | tuple):
        return [_dump_one(route, item) for item in data]
    return _dump_one(route, data)


def _dump_one(route: Route, data: Any) -> Any:
    if route.response is not None:
        if not isinstance(data, route.response):
            data = route.response.model_validate(data)
        return data.model_dump(mode="json")
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list):
        return [_dump_one(route, item) for item in data]
    return data


_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


def _link_header(request: Request, page: PageRequest, total: int) -> str:
    last = max(1, -(-total // page.per_page))
    others = [(k, v) for k, v in request.query if k not in ("page", "per_page")]

    def url(number: int) -> str:
        query = urlencode([*others, ("page", str(number)), ("per_page", str(page.per_page))])
        # raw_path is percent-encoded as the client sent it (h11 admits visible ASCII
        # only), so "%" stays; what would end or break the <...> of a link is encoded.
        return f"<{quote(request.raw_path, safe=_PATH_SAFE)}?{query}>"

    links = []
    if page.page < last:
        links.append(f'{url(page.page + 1)}; rel="next"')
    if page.page > 1:
        links.append(f'{url(min(page.page - 1, last))}; rel="prev"')
    links.append(f'{url(1)}; rel="first"')
    links.append(f'{url(last)}; rel="last"')
    return ", ".join(links)


def _store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc), field=exc.field)
    if isinstance(exc, Conflict):
        return ApiError(409, "conflict", str(exc), field=exc.field)
    if isinstance(exc, Invalid):
        return ApiError(400, "invalid_value", str(exc), field=exc.field)
    if isinstance(exc, DatabaseUnavailable):
        log.error("admin API: %s", exc)
        return ApiError(
            503,
            "database_unavailable",
            "the database is unavailable; try again shortly",
            headers=[("retry-after", "5")],
        )
    log.error("admin API: store error: %s", exc)
    return ApiError(500, "internal", "internal error in the store")


def _limit(limiter: Limiter, key: str, request: Request) -> None:
    """429 when the token is over the admin API's limit (counted per token, not per address:
    an operator's script and a node's agent each have their own)."""
    now = time.monotonic()
    wait = limiter.check(key, now)
    if wait:
        lines = limiter.deny_headers(key, now, wait).decode("latin-1").split("\r\n")
        headers = [
            (n.strip().lower(), v.strip()) for n, _, v in (x.partition(":") for x in lines if x)
        ]
        log.warning(
            "admin API: rate limit: %s over %s for %s %s from %s",
            key,
            limiter.limit,
            request.method,
            request.raw_path,
            request.client,
        )
        raise ApiError(
            429, "rate_limited", f"too many requests; retry in {wait:.1f} s", headers=headers
        )


async def dispatch(api: Api, ctx: AdminContext, request: Request) -> Response:
    """Serve one request; never raises."""
    started = time.perf_counter()
    route: Route | None = None
    try:
        route, params = api.resolve(request)
        principal = await ctx.auth.authenticate(request, route.auth, params)
        if principal is not None and ctx.limiter is not None:
            _limit(ctx.limiter, principal.name, request)
        values, page = _query_values(route, request)
        if route.query is not None:
            try:
                query = route.query.model_validate(values)
            except ValidationError as exc:
                raise validation_error(exc, "query") from None
        elif values:
            name = next(iter(values))
            raise ApiError(400, "invalid_query", f"unknown query parameter {name}", field=name)
        else:
            query = None
        body = _parse_body(route, request)
        call = Call(request, params, body, query, page, principal, ctx)
        result = await route.handler(call)
        response = _respond(route, request, page, result)
        if route.audit and principal is not None and response.status < 400:
            await ctx.audit(principal, route, request)
    except ApiError as exc:
        response = exc.response()
    except StoreError as exc:
        response = _store_error(exc).response()
    except TRANSLATED as exc:
        # A database call that bypassed the store's translation (a pool used directly): the
        # same answer as through the store, and a line that says where to fix it.
        translated = translate(exc)
        log.warning(
            "admin API: %s %s: untranslated %s from the database (%s)",
            request.method,
            request.raw_path,
            type(exc).__name__,
            translated,
        )
        response = _store_error(translated).response()
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.raw_path)
        response = Response(500, error_body("internal", "internal server error"))
    ctx.observe(
        route.path if route else "unmatched",
        # Any token is a method to HTTP; only the known ones become label values.
        request.method if request.method in _METHODS else "other",
        response.status,
        time.perf_counter() - started,
    )
    return response


def _respond(route: Route, request: Request, page: PageRequest, result: Any) -> Response:
    status = route.status
    headers: list[tuple[str, str]] = []
    if isinstance(result, Reply):
        status = result.status or status
        headers = result.headers
        result = result.data
    if isinstance(result, Response):
        return result
    if isinstance(result, Page):
        headers = [
            *headers,
            ("x-total-count", str(result.total)),
            ("link", _link_header(request, page, result.total)),
        ]
        result = list(result.items)
    if result is None and route.response is None:
        return Response(204 if status == 200 else status, headers=headers)
    if isinstance(result, bytes):
        return Response(status, result, content_type=route.content_type, headers=headers)
    body = json.dumps(_dump(route, result), separators=(",", ":")).encode()
    return Response(status, body, headers=headers)


# -- OpenAPI ------------------------------------------------------------------------------

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Invalid input: a field is unknown, missing or has a wrong value",
    401: "No token, or an invalid one",
    403: "The token may not do this",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the current state",
    413: "Body over 1 MiB",
    429: "Over the admin API's rate limit for this token (see Retry-After)",
    415: "Body is not JSON",
    503: "The database is unavailable",
}


def openapi(api: Api, *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorBody, "serialization")
    ]
    for route in api.routes:
        if route.body is not None:
            models.append((route.body, "validation"))
        if route.query is not None:
            models.append((route.query, "validation"))
        if route.response is not None:
            models.append((route.response, "serialization"))
        models.extend((model, "serialization") for _, model in route.answers)
    # One generation for all models, so that two models of one name get distinct names
    # and every $ref points into components.
    refs, top = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for route in api.routes:
        operation_id = route.handler.__name__
        if operation_id in operation_ids:
            operation_id = f"{route.tag}_{operation_id}"
        operation_ids.add(operation_id)
        operation: dict[str, Any] = {
            "operationId": operation_id,
            "summary": route.summary,
            "tags": [route.tag],
            "parameters": _parameters(route, refs, schemas),
            "responses": _responses(route, refs),
        }
        if route.auth == "none":
            operation["security"] = []
        if route.body is not None:
            operation["requestBody"] = {
                "required": route.body_required,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        elif route.raw_body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": route.raw_body}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    # Query models are flattened into parameters; their own entries would only be noise
    # (unless a body or an answer refers to the same model).
    bodies = {r.body for r in api.routes} | {r.response for r in api.routes}
    for route in api.routes:
        if route.query is not None and route.query not in bodies:
            schemas.pop(_ref_name(refs[(route.query, "validation")]), None)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Zeitwork admin API",
            "version": version,
            "description": "The operator API of the Zeitwork platform, on the admin port.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _ref_name(ref: dict[str, Any]) -> str:
    return str(ref["$ref"]).rpartition("/")[2]


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query field's schema as a parameter's: an optional parameter is one left out, never
    a null (which a query string cannot say)."""
    bare = {k: v for k, v in prop.items() if k != "title"}
    options = bare.pop("anyOf", None)
    if options is not None:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) == 1:
            bare.update(kept[0])
        else:
            bare["anyOf"] = kept
    if bare.get("default", 0) is None:
        del bare["default"]
    return bare


def _parameters(
    route: Route, refs: dict[Any, Any], schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {
            "name": s[1:-1],
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        }
        for s in route.segments
        if s.startswith("{")
    ]
    parameters += [
        {
            "name": name,
            "in": "header",
            "required": required,
            "description": description,
            "schema": {"type": "string", "minLength": 1},
        }
        for name, required, description in route.headers
    ]
    if route.many:
        parameters += [
            {
                "name": "page",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            },
            {
                "name": "per_page",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
            },
        ]
    if route.query is not None:
        schema = schemas[_ref_name(refs[(route.query, "validation")])]
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": _query_schema(prop),
                }
            )
    return parameters


def _responses(route: Route, refs: dict[Any, Any]) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}}
    responses: dict[str, Any] = {}
    if route.response is not None:
        schema = refs[(route.response, "serialization")]
        success: dict[str, Any] = {"description": _STATUS_TEXT.get(route.status, "OK")}
        if route.many:
            schema = {"type": "array", "items": schema}
            success["headers"] = {
                "X-Total-Count": {
                    "description": "Length of the whole list",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                },
                "Link": {
                    "description": 'Pages of the list: rel="next", "prev", "first", "last"',
                    "required": True,
                    "schema": {"type": "string"},
                },
            }
        success["content"] = {route.content_type: {"schema": schema}}
        responses[str(route.status)] = success
    elif route.content_type != "application/json":
        responses[str(route.status)] = {
            "description": "OK",
            "content": {route.content_type: {"schema": {"type": "string"}}},
        }
    else:
        # An answer of nothing is 204, or the route's own status with an empty body.
        status = 204 if route.status == 200 else route.status
        responses[str(status)] = {"description": _STATUS_TEXT.get(status, "OK")}
    codes = {400, *route.errors}
    if route.auth != "none":
        codes |= {401, 403, 429}
    if route.body is not None:
        codes |= {413, 415}
    if route.auth != "none" or route.errors:
        codes.add(503)
    for code in sorted(codes):
        answer: dict[str, Any] = {"description": _STATUS_TEXT.get(code, "Error"), **error}
        if code == 401 and route.auth != "none":
            answer["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
            }
        elif code == 503:
            answer["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again",
                    "schema": {"type": "integer"},
                }
            }
        responses[str(code)] = answer
    for code, model in route.answers:
        responses[str(code)] = {
            "description": f"{code} with a {model.__name__} body",
            "content": {"application/json": {"schema": refs[(model, "serialization")]}},
        }
    return responses
