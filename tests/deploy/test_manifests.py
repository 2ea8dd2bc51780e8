"""The deployment files (deploy/, docker-compose.yml) agree with each other and with the code.

Each test pins an invariant that would otherwise break silently: nothing fails at
``kubectl apply`` when the worker's grace period falls below the job timeout, when KEDA
watches a Redis key RQ no longer writes, or when a ConfigMap variable is misspelt (pydantic-
settings ignores unknown ``COREMERGE_*`` variables). The base and the example overlay are
rendered with kustomize (kubectl's built-in one) exactly as ``kubectl apply -k`` would.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from copy import deepcopy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient
from redis import Redis

from jobs.queue import make_queue
from jobs.settings import Settings
from service.app import create_app

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["deploy/base", "deploy/overlays/production"]
#: Whoever has these keys and the workers' node pool can run merges; a Redis that evicts or
#: forgets loses accepted jobs (docs/deploy.md).
REDIS_PERSISTENCE = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
}


def _load_checker() -> Any:
    spec = importlib.util.spec_from_file_location(
        "check_manifests", ROOT / "deploy/check_manifests.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_manifests = _load_checker()

pytestmark = pytest.mark.skipif(
    not (shutil.which("kubectl") or shutil.which("kustomize")),
    reason="rendering the manifests needs kubectl or kustomize on PATH",
)


@pytest.fixture(scope="module", params=TARGETS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return check_manifests.render(ROOT / request.param)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("coremerge-config")
    ]
    return config["data"]


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return _one(docs, kind, name)["spec"]["template"]["spec"]


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal environment variables."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The container's variables taken from Secrets, as {name: (secret, key)}."""
    return {
        item["name"]: (ref["name"], ref["key"])
        for item in container.get("env", [])
        if (ref := item.get("valueFrom", {}).get("secretKeyRef"))
    }


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity with a binary suffix ("64Gi") in bytes."""
    number, suffix = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity).groups()
    return int(number) * 1024 ** (["", "Ki", "Mi", "Gi", "Ti"].index(suffix or ""))


def _redis_args(args: list[str]) -> dict[str, str]:
    """``redis-server --name value ...`` as {name: value}."""
    assert args[0] == "redis-server"
    pairs = args[1:]
    assert len(pairs) % 2 == 0 and all(p.startswith("--") for p in pairs[::2]), args
    return {name[2:]: str(value) for name, value in zip(pairs[::2], pairs[1::2], strict=True)}


# -- every object is valid ------------------------------------------------------------------


def test_every_object_validates_strictly(docs: list[dict[str, Any]]) -> None:
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "ScaledObject", "ConfigMap"}
    assert {d["metadata"]["name"]: check_manifests.problems(d) for d in docs} == {
        d["metadata"]["name"]: [] for d in docs
    }


def test_the_checker_rejects_misspelt_fields(docs: list[dict[str, Any]]) -> None:
    scaled = deepcopy(_one(docs, "ScaledObject", "coremerge-worker"))
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    assert any("minReplicas" in p for p in check_manifests.problems(scaled))
    worker = deepcopy(_one(docs, "Deployment", "coremerge-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 3900
    assert any("terminationGracePeriod" in p for p in check_manifests.problems(worker))
    worker["apiVersion"] = "app/v1"
    assert check_manifests.problems(worker)


# -- configuration -------------------------------------------------------------------------


def test_configmap_holds_only_settings_that_exist(docs: list[dict[str, Any]]) -> None:
    config = _config(docs)
    unknown = [
        key
        for key in config
        if not key.startswith("COREMERGE_")
        or key.removeprefix("COREMERGE_").lower() not in Settings.model_fields
    ]
    assert unknown == [], "not fields of jobs.settings.Settings (credentials go in Secrets)"
    # ...and their values pass Settings' own validation.
    Settings(**{key.removeprefix("COREMERGE_").lower(): value for key, value in config.items()})


def test_tenants_file_is_the_mounted_secret(docs: list[dict[str, Any]]) -> None:
    path = Path(_config(docs)["COREMERGE_TENANTS_FILE"])
    for name in ("coremerge-api", "coremerge-worker"):
        pod = _pod(docs, "Deployment", name)
        mounts = {m["name"]: m for m in _container(pod)["volumeMounts"]}
        sources = [
            (Path(mounts[v["name"]]["mountPath"]), v["secret"])
            for v in pod["volumes"]
            if "secret" in v and v["name"] in mounts
        ]
        assert any(
            path == mount / item["path"] and not secret.get("optional", False)
            for mount, secret in sources
            for item in secret["items"]
        ), f"{name}: {path} is not a file of a mounted (required) Secret"


def test_secrets_are_created_as_docs_deploy_says(docs: list[dict[str, Any]]) -> None:
    """The Secrets are not in the manifests (apply would overwrite real ones): the commands
    in docs/deploy.md must create every one the pods name."""
    named = set()
    for name in ("coremerge-api", "coremerge-worker"):
        pod = _pod(docs, "Deployment", name)
        named |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        named |= {
            s["secretRef"]["name"] for s in _container(pod).get("envFrom", []) if "secretRef" in s
        }
        named |= {secret for secret, _ in _secret_env(_container(pod)).values()}
    redis = _pod(docs, "StatefulSet", "coremerge-redis")
    named |= {secret for secret, _ in _secret_env(_container(redis)).values()}
    keda = _one(docs, "TriggerAuthentication", "coremerge-redis")
    named |= {ref["name"] for ref in keda["spec"]["secretTargetRef"]}
    created = set(
        re.findall(r"kubectl .*create secret generic (\S+)", (ROOT / "docs/deploy.md").read_text())
    )
    assert named == {"coremerge-tenants", "coremerge-s3", "coremerge-redis"}
    assert named <= created


# -- the API --------------------------------------------------------------------------------


def test_api_probes_are_the_api_s_health_routes(docs: list[dict[str, Any]]) -> None:
    container = _container(_pod(docs, "Deployment", "coremerge-api"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert command[:2] == ["coremerge", "serve"]
    assert int(command[command.index("--port") + 1]) == ports["http"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["port"] == live["port"] == "http"
    service = _one(docs, "Service", "coremerge-api")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    # Against the real app with Redis unreachable: liveness must not depend on Redis (or a
    # Redis outage restarts every API pod), readiness must.
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert {ready["path"], live["path"]} <= set(app.openapi()["paths"])
    with TestClient(app) as client:
        assert client.get(live["path"]).status_code == 200
        assert client.get(ready["path"]).status_code == 503


# -- the workers ----------------------------------------------------------------------------


def test_worker_grace_period_outlasts_the_job_timeout(docs: list[dict[str, Any]]) -> None:
    """SIGTERM is RQ's warm shutdown: the running merge finishes within the job timeout (RQ
    stops it there), then publishes. A shorter grace period SIGKILLs merges mid-way."""
    job_timeout = int(_config(docs)["COREMERGE_JOB_TIMEOUT"])
    grace = _pod(docs, "Deployment", "coremerge-worker")["terminationGracePeriodSeconds"]
    assert grace >= job_timeout + 60


def test_worker_runs_on_one_gpu_without_touching_cuda_in_the_parent(
    docs: list[dict[str, Any]],
) -> None:
    worker = _one(docs, "Deployment", "coremerge-worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    pod = worker["spec"]["template"]["spec"]
    container = _container(pod)
    assert container["command"][:2] == ["coremerge", "worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(container)["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_work_dir_is_an_empty_dir_with_room_for_a_job(docs: list[dict[str, Any]]) -> None:
    config = _config(docs)
    pod = _pod(docs, "Deployment", "coremerge-worker")
    mounts = {m["mountPath"]: m["name"] for m in _container(pod)["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[config["COREMERGE_WORK_DIR"]]]
    # inputs (≤ max job bytes) + the staged output (≤ 2 × inputs when the dtype widens)
    assert _bytes(volume["emptyDir"]["sizeLimit"]) >= 3 * int(config["COREMERGE_MAX_JOB_BYTES"])


# -- KEDA -----------------------------------------------------------------------------------


def test_keda_counts_exactly_rq_s_keys_for_the_configured_queue(docs: list[dict[str, Any]]) -> None:
    scaled = _one(docs, "ScaledObject", "coremerge-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "coremerge-worker"
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    # The queue the API enqueues to, built as the API builds it; Redis() never connects here.
    queue = make_queue(Redis(), Settings(queue=_config(docs)["COREMERGE_QUEUE"]))
    expected = {
        "queued": queue.key,  # rq:queue:<name>, the waiting list
        "dequeued": queue.intermediate_queue_key,
        "started": queue.started_job_registry.key,
    }
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {name: t["metadata"]["listName"] for name, t in triggers.items()} == expected
    assert all(t["type"] == "redis" for t in triggers.values())
    # One metric, their sum (HPA would take the maximum of separate metrics).
    modifiers = spec["advanced"]["scalingModifiers"]
    assert set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) == set(expected)
    assert "+" in modifiers["formula"] and float(modifiers["target"]) == 1
    # The CRD's CEL rule, which its JSON Schema cannot say.
    assert 0 == spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_keda_reaches_the_redis_the_service_uses(docs: list[dict[str, Any]]) -> None:
    url = urlsplit(_config(docs)["COREMERGE_REDIS_URL"])
    database = url.path.lstrip("/") or "0"
    scaled = _one(docs, "ScaledObject", "coremerge-worker")
    namespace = scaled["metadata"]["namespace"]
    service = _one(docs, "Service", url.hostname)
    assert service["metadata"]["namespace"] == namespace
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    # KEDA's operator runs in its own namespace: it needs the Service's full name.
    address = f"{url.hostname}.{namespace}.svc.cluster.local:{url.port}"
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == address
        assert trigger["metadata"]["databaseIndex"] == database


# -- Redis ----------------------------------------------------------------------------------


def test_every_redis_client_logs_in_with_the_password_redis_requires(
    docs: list[dict[str, Any]],
) -> None:
    """One Secret key: Redis's requirepass, the API's and workers' COREMERGE_REDIS_PASSWORD
    (a field of Settings, kept out of the URL) and KEDA's TriggerAuthentication on every
    trigger. A client left out would fail with NOAUTH only once deployed."""
    container = _container(_pod(docs, "StatefulSet", "coremerge-redis"))
    variable = _redis_args(container["args"])["requirepass"]
    name = re.fullmatch(r"\$\((\w+)\)", variable).group(1)  # expanded by the kubelet
    password = _secret_env(container)[name]
    assert "REDISCLI_AUTH" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert "redis_password" in Settings.model_fields
    assert "@" not in _config(docs)["COREMERGE_REDIS_URL"]  # no password in the ConfigMap
    for deployment in ("coremerge-api", "coremerge-worker"):
        env = _secret_env(_container(_pod(docs, "Deployment", deployment)))
        assert env["COREMERGE_REDIS_PASSWORD"] == password, deployment
    scaled = _one(docs, "ScaledObject", "coremerge-worker")
    for trigger in scaled["spec"]["triggers"]:
        auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {"password": password}, trigger["name"]


def test_redis_persists_and_never_evicts(docs: list[dict[str, Any]]) -> None:
    statefulset = _one(docs, "StatefulSet", "coremerge-redis")
    container = _container(statefulset["spec"]["template"]["spec"])
    args = _redis_args(container["args"])
    assert {k: args.get(k) for k in REDIS_PERSISTENCE} == REDIS_PERSISTENCE
    # The AOF lives on the claimed volume, not in the container.
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[args["dir"]] in claims
    # noeviction means writes fail when full; below the limit they fail before an OOM kill.
    maxmemory = _bytes(args["maxmemory"].replace("gb", "Gi").replace("mb", "Mi"))
    assert maxmemory < _bytes(container["resources"]["limits"]["memory"])


def test_compose_redis_persists_and_never_evicts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    args = _redis_args(redis["command"])
    assert {k: args.get(k) for k in REDIS_PERSISTENCE} == REDIS_PERSISTENCE
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]  # a named volume survives `down`


def test_compose_clients_log_in_with_the_password_redis_requires() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    password = _redis_args(services["redis"]["command"])["requirepass"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password  # the health check
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["environment"]["COREMERGE_REDIS_PASSWORD"] == password, name


# -- every pod ------------------------------------------------------------------------------


def test_every_container_runs_unprivileged_on_a_read_only_root(docs: list[dict[str, Any]]) -> None:
    pods = [
        d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
    ]
    assert len(pods) == 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        context = _container(pod)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert _container(pod)["resources"]["limits"]["memory"]
