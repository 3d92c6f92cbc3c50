"""Turn pydantic's errors into messages that name the field path and what is allowed."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .api import DreamBoothJob, FieldRuleError
from .server_api import SERVER_KIND, DreamBoothServer


class JobInvalid(ValueError):
    """A DreamBoothJob that cannot run; `problems` are "path: message" lines."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """The wire-format path of `loc` and the model owning its last part.

    pydantic reports defaults it validated under the Python name; users know the camelCase one.
    """
    path, model = "", root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        name = str(part)
        owner = model if isinstance(model, type) and issubclass(model, BaseModel) else None
        info = None
        if owner is not None:
            info = owner.model_fields.get(name) or next(
                (f for f in owner.model_fields.values() if f.alias == name), None
            )
        if info is not None:
            name = info.alias or name
            model = _unwrap(info.annotation)
        else:
            model = None  # a dict key or a field that does not exist
        path += f".{name}" if path else name
    return path, (model if isinstance(model, type) and issubclass(model, BaseModel) else None)


def _path(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    return _walk(root, loc)[0]


def _unwrap(annotation: Any) -> Any:
    """list[X] / X | None / dict[str, X] -> X, when X is a model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _message(error: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldRuleError):
        return f"{_path(loc + tuple(cause.field.split('.')), root)}: {cause.message}"
    if kind == "extra_forbidden":
        owner = _walk(root, loc[:-1])[1]
        allowed = sorted(f.alias or n for n, f in owner.model_fields.items()) if owner else []
        return f"{_path(loc, root)}: unknown field; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return f"{_path(loc, root)}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    shown = error.get("input")
    if kind not in ("model_type", "dict_type") and not isinstance(shown, dict | list):
        message += f" (got {shown!r})"
    return f"{_path(loc, root)}: {message}"


def problems(error: ValidationError, root: type[BaseModel] = DreamBoothJob) -> list[str]:
    """One line per problem; literal unions report once, not once per branch."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        line = _message(dict(item), root)
        if line not in lines:
            lines.append(line)
    return lines


def parse_job(document: dict[str, Any]) -> DreamBoothJob:
    """Validate a DreamBoothJob (dict as read from YAML or the API server)."""
    if not isinstance(document, dict):
        raise JobInvalid([f"document: expected a mapping, got {type(document).__name__}"])
    try:
        return DreamBoothJob.model_validate(document)
    except ValidationError as error:
        raise JobInvalid(problems(error)) from None


def parse_server(document: dict[str, Any]) -> DreamBoothServer:
    """Validate a DreamBoothServer (dict as read from YAML or the API server)."""
    try:
        return DreamBoothServer.model_validate(document)
    except ValidationError as error:
        raise JobInvalid(problems(error, DreamBoothServer)) from None


def _parse(document: Any) -> DreamBoothJob | DreamBoothServer:
    """A job, or a server when the document says it is one."""
    if isinstance(document, dict) and document.get("kind") == SERVER_KIND:
        return parse_server(document)
    return parse_job(document)


def load_jobs(text: str) -> list[DreamBoothJob | DreamBoothServer]:
    """All DreamBoothJobs and DreamBoothServers of a (multi-document) YAML text; other kinds
    are rejected."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise JobInvalid([f"yaml: {error}"]) from None
    if not documents:
        raise JobInvalid(["document: empty, expected a DreamBoothJob"])
    return [_parse(d) for d in documents]
