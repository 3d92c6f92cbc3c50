"""The CustomResourceDefinitions (DreamBoothJob, DreamBoothServer), generated from the contract's
API models.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema: every
node typed, no $ref, no anyOf except int-or-string, `exclusiveMinimum` as a boolean, no `title`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from dreambooth_contract import api, server_api

_KEPT = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        # A $ref with siblings (description, default) keeps the siblings.
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return target
    return node


def _without_null(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in variants if v.get("type") != "null"]


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) to a structural schema node."""
    node = _resolve(node, defs)
    # `default: null` (from `X | None = None`) is dropped: Kubernetes omits unset fields.
    siblings = {
        k: v for k, v in node.items() if k == "description" or (k == "default" and v is not None)
    }
    if "anyOf" in node:
        variants = [_resolve(v, defs) for v in _without_null(node["anyOf"])]
        types = {v.get("type") for v in variants}
        if types == {"integer", "string"}:
            return {**siblings, "x-kubernetes-int-or-string": True}
        if len(variants) != 1:
            raise ValueError(f"cannot express union {types} in a structural schema")
        return {**structural(variants[0], defs), **siblings}  # `X | None`
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT and v is not None}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    if out.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        properties = node.get("properties", {})
        if properties:
            out["properties"] = {k: structural(v, defs) for k, v in properties.items()}
        if node.get("required"):
            out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = structural(extra, defs)
        elif not properties:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array":
        out["items"] = structural(node["items"], defs)
    if "type" not in out and "x-kubernetes-int-or-string" not in out:
        raise ValueError(f"untyped schema node: {node}")
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _schema_of(model: type, defaults: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    return schema if defaults else _without_defaults(schema)


@dataclass(frozen=True)
class Resource:
    """One custom resource: its models and how kubectl names and prints it."""

    model: type[BaseModel]  # the object (apiVersion, kind, metadata, spec, status)
    spec: type[BaseModel]
    status: type[BaseModel]
    kind: str
    plural: str
    singular: str
    short_names: list[str]
    description: str
    printer_columns: list[dict[str, Any]]


def _described(resource: Resource, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the description of the object's field `name` (kubectl explain's text)."""
    description = resource.model.model_fields[name].description
    return {"description": description, **{k: v for k, v in schema.items() if k != "description"}}


def openapi_schema(resource: Resource | None = None) -> dict[str, Any]:
    resource = resource or JOB
    return {
        "type": "object",
        "description": resource.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": _described(resource, "api_version", {"type": "string"}),
            "kind": _described(resource, "kind", {"type": "string"}),
            # The API server allows nothing more here; it documents ObjectMeta itself.
            "metadata": {"type": "object"},
            "spec": _described(resource, "spec", _schema_of(resource.spec)),
            # Status is written by the operator (and a job's trainers), whole; defaulting it on
            # the server would only invent values nobody reported.
            "status": _described(resource, "status", _schema_of(resource.status, defaults=False)),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Activity", "type": "string", "jsonPath": ".status.progress.activity"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.checkpoint.step", "priority": 1},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.inference.endpoint", "priority": 1},
    # -o wide: the trained model's DINO score and its gain over the base model's.
    {
        "name": "Evaluation",
        "type": "string",
        "jsonPath": ".status.evaluation.summary",
        "priority": 1,
    },
    # -o wide: whether the export is a whole pipeline or a LoRA adapter, and for which base.
    {"name": "Artifact", "type": "string", "jsonPath": ".status.artifact.kind", "priority": 1},
    {"name": "Base", "type": "string", "jsonPath": ".status.artifact.baseModel", "priority": 1},
    # -o wide: the OpenAI model name of an adapter published to a shared server.
    {"name": "Model", "type": "string", "jsonPath": ".status.inference.model", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

SERVER_PRINTER_COLUMNS = [
    {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.uri"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Adapters", "type": "integer", "jsonPath": ".status.published"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

JOB = Resource(
    model=api.DreamBoothJob,
    spec=api.DreamBoothJobSpec,
    status=api.DreamBoothJobStatus,
    kind=api.KIND,
    plural=api.PLURAL,
    singular=api.SINGULAR,
    short_names=api.SHORT_NAMES,
    description="DreamBooth fine-tuning of a Stable Diffusion model, and its serving.",
    printer_columns=PRINTER_COLUMNS,
)
SERVER = Resource(
    model=server_api.DreamBoothServer,
    spec=server_api.DreamBoothServerSpec,
    status=server_api.DreamBoothServerStatus,
    kind=server_api.SERVER_KIND,
    plural=server_api.SERVER_PLURAL,
    singular=server_api.SERVER_SINGULAR,
    short_names=server_api.SERVER_SHORT_NAMES,
    description="An inference server for one base model, serving the LoRA adapters that "
    "DreamBoothJobs publish to it.",
    printer_columns=SERVER_PRINTER_COLUMNS,
)
RESOURCES = {"job": JOB, "server": SERVER}


def crd(resource: Resource | None = None) -> dict[str, Any]:
    resource = resource or JOB
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": ["all", "dreambooth"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(resource)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": resource.printer_columns,
                }
            ],
        },
    }


HEADER = "# Generated by `dreambooth crd` from contract/dreambooth_contract/api.py. Do not edit.\n"
SERVER_HEADER = (
    "# Generated by `dreambooth crd server` from contract/dreambooth_contract/server_api.py. "
    "Do not edit.\n"
)


def crd_yaml(resource: Resource | None = None) -> str:
    resource = resource or JOB
    header = SERVER_HEADER if resource is SERVER else HEADER
    return header + yaml.safe_dump(crd(resource), sort_keys=False, width=100)
