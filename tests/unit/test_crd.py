"""The committed CRD is exactly what the generator prints, and it is a structural schema."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from dreambooth_contract import api
from dreambooth_operator.cli import main
from dreambooth_operator.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_generator():
    committed = (ROOT / "manifests/crd.yaml").read_text()
    assert committed == crd_yaml(), (
        "manifests/crd.yaml is stale: dreambooth crd > manifests/crd.yaml"
    )


def test_crd_command_prints_the_generated_crd():
    result = CliRunner().invoke(main, ["crd"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output) == crd()


def _nodes(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def test_schema_is_structural():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _nodes(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert node.get("default", "unset") is not None, f"{path}: default null"


def test_every_field_is_described_for_kubectl_explain():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # .metadata is the exception: a CRD may not describe it, the API server documents ObjectMeta.
    undescribed = [
        path or "."
        for path, node in _nodes(schema)
        if not node.get("description") and path != ".metadata"
    ]
    assert not undescribed, f"schema nodes without a description: {undescribed}"


def test_schema_carries_defaults_bounds_enums_and_required():
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    training = spec["properties"]["training"]["properties"]
    assert training["maxSteps"] == {
        "default": 800,
        "description": training["maxSteps"]["description"],
        "maximum": 1000000,
        "minimum": 1,
        "type": "integer",
    }
    assert training["mixedPrecision"]["enum"] == ["fp16", "bf16", "no"]
    assert training["learningRate"]["exclusiveMinimum"] is True
    assert spec["properties"]["training"]["default"] == {}
    # instance or subjects: one of them, as the spec's own rule says (the operator refuses both
    # or neither, naming the field)
    assert set(spec["required"]) == {"baseModel", "storage"}


def test_printer_columns_and_names():
    version = crd()["spec"]["versions"][0]
    assert {"Phase", "Progress", "Age"} <= {c["name"] for c in version["additionalPrinterColumns"]}
    wide = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert wide["Artifact"] == ".status.artifact.kind"  # pipeline or lora
    assert wide["Base"] == ".status.artifact.baseModel"
    assert version["subresources"] == {"status": {}}
    assert crd()["spec"]["names"]["shortNames"] == api.SHORT_NAMES == ["dbj"]
