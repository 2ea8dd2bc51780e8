"""Render each kustomization and validate every object in it, offline.

    python deploy/check_manifests.py deploy/base deploy/overlays/production

Built-in kinds go through kubernetes-validate in strict mode (unknown fields are errors)
against the oldest and the newest Kubernetes versions named below; KEDA's ScaledObject and
TriggerAuthentication against the JSON Schemas vendored from their CRDs (deploy/schemas/); any other kind is an error,
so a misspelt ``apiVersion`` cannot slip through as "unknown, skipped". Rendering needs
``kubectl`` (its built-in kustomize) or ``kustomize`` on PATH; nothing is fetched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

__all__ = ["KUBERNETES_VERSIONS", "problems", "render"]

#: The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: Custom resources, by (apiVersion, kind): their vendored schemas.
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh-triggerauthentication-v1alpha1.json",
}


def _kustomize_command(path: Path) -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(path)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(path)]
    raise SystemExit("check_manifests: neither kubectl nor kustomize is on PATH")


def render(path: Path | str) -> list[dict[str, Any]]:
    """The objects the kustomization at ``path`` renders to."""
    out = subprocess.run(
        _kustomize_command(Path(path)), check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@cache
def _custom_validator(filename: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / filename).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def problems(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is invalid (empty when it is valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        validator = _custom_validator(CUSTOM_SCHEMAS[key])
        return [
            f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(doc)
        ]
    found = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [f"{key[0]} {key[1]} is neither a built-in kind of {version} nor vendored"]
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.absolute_path)) or "<root>"
            found.append(f"Kubernetes {version}: {path}: {exc.message}")
    return found


def main(argv: list[str]) -> int:
    failed = 0
    for target in argv or ["deploy/base", "deploy/overlays/production"]:
        docs = render(target)
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            for problem in problems(doc):
                print(f"{target}: {name}: {problem}", file=sys.stderr)
                failed += 1
        kinds = sorted({doc["kind"] for doc in docs})
        print(f"{target}: {len(docs)} objects ({', '.join(kinds)}) checked")
    if failed:
        print(f"check_manifests: {failed} problem(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
