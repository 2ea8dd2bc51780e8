"""Completion notifications on the real stack (issue 25 §4): a receiver on loopback gets the
signed POST when a real job ends; retries are recorded; a failed delivery leaves the job's
status alone; hosts off the allow-list and private addresses are refused at submission; a
queued job canceled through the API is notified too, and checked again before sending.

A deployment of its own (queue, key prefix, tenants file with ``notify`` prefixes, http
allowed) on the session's Redis and S3 server: an API and one worker, plus an API on a queue
no worker serves, so that a job stays queued until it is canceled."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs.notify import SIGNATURE_HEADER
from service.client import ApiError, CoremergeClient
from tests.integration.conftest import KEY_A, ROOT, TENANTS, Stack
from tests.processes import Workers, start_api, stop, wait_until

SECRET = "notify-secret-of-team-a-0123456789"


@dataclass
class Receiver:
    """An HTTP server on loopback: each path answers the statuses of ``script`` in turn
    (then 200) and every POST is kept."""

    server: ThreadingHTTPServer
    script: dict[str, list[int]] = field(default_factory=dict)
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.posts if p == path]


def _receiver() -> Receiver:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.posts.append((self.path, dict(self.headers), body))
            statuses = receiver.script.get(self.path, [])
            self.send_response(statuses.pop(0) if statuses else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = Receiver(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
    return receiver


@dataclass
class Deployment:
    api_url: str
    idle_api_url: str
    receiver: Receiver
    tenants: Path

    def client(self, url: str | None = None) -> CoremergeClient:
        return CoremergeClient(url or self.api_url, KEY_A, timeout=10)


def _tenants(receiver: Receiver, port: int) -> dict:
    """team-a may be notified on the receiver (by address) and on ``localhost`` (a name that
    resolves to loopback: refused however it is listed)."""
    tenants = json.loads(json.dumps(TENANTS))
    tenants["tenants"]["team-a"].update(
        notify=[f"{receiver.url}/", f"http://localhost:{port}/"], notify_secret=SECRET
    )
    return tenants


@pytest.fixture(scope="module")
def deployment(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("notify")
    receiver = _receiver()
    tenants = work / "tenants.json"
    port = receiver.server.server_address[1]
    tenants.write_text(json.dumps(_tenants(receiver, port)))
    name = f"notify{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "COREMERGE_TENANTS_FILE": str(tenants), "COREMERGE_QUEUE": name,
           "COREMERGE_KEY_PREFIX": name, "COREMERGE_NOTIFY_ALLOW_HTTP": "true"}  # fmt: skip
    api, url = start_api(env, work / "api.log")
    idle_env = {**env, "COREMERGE_QUEUE": f"{name}-idle", "COREMERGE_KEY_PREFIX": f"{name}-idle"}
    idle_api, idle_url = start_api(idle_env, work / "idle-api.log")
    workers = Workers(env, work, 1, name="notify")
    try:
        workers.start(0)
        yield Deployment(url, idle_url, receiver, tenants)
    finally:
        workers.stop_all()
        for proc in (api, idle_api):
            stop(proc)
        receiver.server.shutdown()


def _spec(tiny: list[str], notify: str) -> dict:
    output = f"s3://merged/team-a/notify-{uuid.uuid4().hex[:8]}/"
    return {"adapters": [{"uri": u} for u in tiny], "output": {"uri": output},
            "notify": {"url": notify}}  # fmt: skip


def _notified(client: CoremergeClient, job_id: str) -> dict:
    """The job once its notification's outcome is recorded."""
    return wait_until(lambda: (j := client.get(job_id))["notification"] and j, "notified", 60)


def _docs_verify():
    """The receiver's check as docs/job-spec.md shows it (its Python block), so the
    documentation is what verifies the real signature here."""
    text = (ROOT / "docs" / "job-spec.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify" in b]
    scope: dict = {}
    exec(block, scope)
    return scope["verify"]


def _verify(headers: dict[str, str], body: bytes) -> None:
    verify = _docs_verify()
    assert verify(SECRET, headers[SIGNATURE_HEADER], body)
    assert not verify(SECRET, headers[SIGNATURE_HEADER], body + b" ")
    assert not verify("another-secret-0123456789", headers[SIGNATURE_HEADER], body)


def test_a_succeeded_job_posts_a_signed_notification(deployment: Deployment, tiny) -> None:
    with deployment.client() as client:
        job = client.submit(_spec(tiny, f"{deployment.receiver.url}/ok/"))
        assert client.wait(job["id"], timeout=120)["status"] == "succeeded"
        job = _notified(client, job["id"])
    (headers, body), *more = deployment.receiver.received("/ok/")
    assert not more
    _verify(headers, body)
    sent = json.loads(body)
    assert sent["job_id"] == job["id"] and sent["status"] == "succeeded"
    assert sent["result"]["uri"] == job["result"]["uri"] and sent["error"] is None
    assert sent["finished_at"] == job["finished_at"]
    note = job["notification"]
    assert note["outcome"] == "delivered" and note["attempts"] == 1
    assert note["last_status"] == 200 and note["delivered_at"] is not None


def test_retries_are_recorded_and_a_failed_delivery_keeps_the_status(
    deployment: Deployment, tiny
) -> None:
    deployment.receiver.script["/flaky/"] = [500, 500]
    deployment.receiver.script["/down/"] = [503] * 10
    with deployment.client() as client:
        flaky = client.submit(_spec(tiny, f"{deployment.receiver.url}/flaky/"))
        down = client.submit(_spec(tiny, f"{deployment.receiver.url}/down/"))
        flaky, down = _notified(client, flaky["id"]), _notified(client, down["id"])
    assert len(deployment.receiver.received("/flaky/")) == 3
    assert flaky["notification"] | {"delivered_at": None} == {
        "url": f"{deployment.receiver.url}/flaky/", "outcome": "delivered", "attempts": 3,
        "last_status": 200, "last_error": None, "delivered_at": None,
    }  # fmt: skip
    assert down["status"] == "succeeded"
    assert down["notification"]["outcome"] == "failed" and down["notification"]["attempts"] == 3
    assert down["notification"]["last_error"] == "HTTP 503"


def test_hosts_off_the_allow_list_and_private_names_are_refused(
    deployment: Deployment, tiny
) -> None:
    port = deployment.receiver.server.server_address[1]
    refused = {
        "https://hooks.example.com/ci/": "is not under a notify prefix",
        f"http://127.0.0.1:{port + 1}/": "is not under a notify prefix",
        f"http://localhost:{port}/ok/": "resolves to 127.0.0.1, a private, loopback",
        f"http://u:p@127.0.0.1:{port}/": "no user:password",
    }
    with deployment.client() as client:
        for url, says in refused.items():
            with pytest.raises(ApiError) as info:
                client.submit(_spec(tiny, url))
            assert info.value.status == 422, url
            (error,) = info.value.problem["errors"]
            assert error["field"].replace("body.", "") == "notify.url", error
            assert says in error["message"], (url, error)


def test_a_canceled_queued_job_is_notified_and_checked_again(deployment: Deployment, tiny) -> None:
    receiver = deployment.receiver
    with deployment.client(deployment.idle_api_url) as client:
        first = client.submit(_spec(tiny, f"{receiver.url}/canceled/"))
        second = client.submit(_spec(tiny, f"{receiver.url}/revoked/"))
        client.cancel(first["id"])
        first = _notified(client, first["id"])
        tenants = json.loads(deployment.tenants.read_text())
        del tenants["tenants"]["team-a"]["notify"]
        deployment.tenants.write_text(json.dumps(tenants))
        try:
            client.cancel(second["id"])
            second = _notified(client, second["id"])
        finally:
            port = receiver.server.server_address[1]
            deployment.tenants.write_text(json.dumps(_tenants(receiver, port)))
    ((_, body),) = receiver.received("/canceled/")
    assert json.loads(body)["status"] == "canceled" and first["notification"]["attempts"] == 1
    assert json.loads(body)["error"]["code"] == "canceled"
    assert not receiver.received("/revoked/")
    assert second["status"] == "canceled" and second["notification"]["outcome"] == "refused"
    assert "may not be notified anywhere" in second["notification"]["last_error"]
