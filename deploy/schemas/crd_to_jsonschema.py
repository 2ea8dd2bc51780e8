"""Turn a CustomResourceDefinition's ``openAPIV3Schema`` into a strict JSON Schema file.

The deployment files are validated offline (scripts/validate-deploy.sh): built-in kinds by
kubernetes-validate, and custom resources (KEDA's ScaledObject) against their CRD's schema,
which CI cannot download. This makes that schema a file to vendor::

    python deploy/schemas/crd_to_jsonschema.py keda.sh_scaledobjects.yaml v1alpha1 \
        --source "kedacore/keda v2.20.2 config/crd/bases/keda.sh_scaledobjects.yaml" \
        > deploy/schemas/keda.sh-scaledobject-v1alpha1.json

What changes on the way: ``nullable`` becomes a ``null`` type; ``x-kubernetes-int-or-string``
becomes int-or-string; every object that lists its properties and does not preserve unknown
fields gets ``additionalProperties: false`` (an API server would silently prune a misspelt
field; this rejects it, as ``kubernetes-validate --strict`` does for built-in kinds);
``apiVersion`` and ``kind`` are pinned. Descriptions are dropped. CEL rules
(``x-kubernetes-validations``) cannot be expressed and are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["crd_version_schema", "strict_json_schema"]

#: Left out of the output (besides every ``x-kubernetes-*`` extension, handled below).
_DROPPED = {"description"}


def strict_json_schema(node: Any) -> Any:
    """The JSON Schema equivalent of one OpenAPI v3 schema node (recursively)."""
    if isinstance(node, list):
        return [strict_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: strict_json_schema(value)
        for key, value in node.items()
        if key not in _DROPPED and not key.startswith("x-kubernetes-")
    }
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_version_schema(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The strict JSON Schema of ``version`` of ``crd``, with pinned apiVersion and kind."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    matches = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not matches:
        raise SystemExit(f"{kind}: no version {version!r} in the CRD")
    schema = strict_json_schema(matches[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"{kind} {group}/{version}: the openAPIV3Schema of {source}, made strict by "
            "deploy/schemas/crd_to_jsonschema.py (descriptions and CEL rules dropped)."
        ),
        **schema,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition (YAML)")
    parser.add_argument("version", help="the served version to convert, e.g. v1alpha1")
    parser.add_argument("--source", required=True, help="where the CRD came from (recorded)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    json.dump(crd_version_schema(crd, args.version, args.source), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
