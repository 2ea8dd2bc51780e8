"""Nothing untrusted is read whole before it is bounded (issue 22 §2), against moto's S3 server
over HTTP: a config and VeRA weights are sized from their HEAD before they are copied, one
adapter named by every entry of a job is checked and opened once, a report found at an
output is read only within a cap and used only in the shape of a report, and the output's
emptiness check stops at the first foreign object while the sweep pages through the rest."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from jobs.errors import AdapterInvalid, LimitExceeded, OutputExists
from jobs.settings import Settings
from tests.conftest import edit_config
from tests.integration.conftest import AWS_ENV, inproc_settings
from tests.integration.test_worker_job import run_one
from tests.worker.synthetic import lora_adapter, vera_adapter
from worker.adapters import vera as vera_module
from worker.adapters.opening import open_adapters
from worker.adapters.streamed import ReadAhead, StreamedLoraReader
from worker.storage import CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, Storage, make_s3_client
from worker.storage.ownership import Owner
from worker.storage.publish import OutputPublisher, remove_run_leftovers
from worker.storage.reports import MAX_REPORT_BYTES
from worker.storage.s3 import S3Store

OWNER = Owner("job-1", "secret-of-job-1")


@pytest.fixture
def s3_client(moto_endpoint, s3, monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return make_s3_client(Settings(s3_endpoint_url=moto_endpoint, s3_max_attempts=2))


def requests(client) -> list[tuple[str, str]]:
    """Every request the client sends from now on: (method, path and query)."""
    seen: list[tuple[str, str]] = []

    def record(request, **kwargs) -> None:
        seen.append((request.method, request.url.split("/", 3)[3]))

    client.meta.events.register("before-send.s3", record)
    return seen


def upload(s3, local: Path, name: str = "") -> str:
    prefix = f"bounded-{uuid.uuid4().hex[:8]}/{name}"
    for path in local.iterdir():
        s3.upload_file(str(path), "adapters-a", prefix + path.name)
    return f"s3://adapters-a/{prefix}"


def test_a_config_over_1_mib_is_refused_from_its_head(s3_client, s3, tmp_path: Path) -> None:
    folder = lora_adapter(tmp_path / "huge", r=4, m=32, n=16)
    edit_config(folder, notes="x" * (1 << 20))
    uri = upload(s3, folder, "huge/")
    sent = requests(s3_client)
    with pytest.raises(AdapterInvalid, match=f"huge/{CONFIG_NAME}: is larger than 1 MiB"):
        Storage(s3_client).open_inputs([uri], tmp_path / "in")
    gets = [path for method, path in sent if method == "GET" and CONFIG_NAME in path]
    assert gets == []  # sized by its HEAD, never read
    assert not (tmp_path / "in").exists()


def test_vera_weights_over_the_cap_are_refused_before_the_copy(
    s3_client, s3, tmp_path: Path, monkeypatch
) -> None:
    lora = upload(s3, lora_adapter(tmp_path / "lora", r=4, m=32, n=16), "lora/")
    vera = upload(s3, vera_adapter(tmp_path / "vera", r=4, m=32), "vera/")
    monkeypatch.setattr(vera_module, "MAX_VERA_BYTES", 100)  # the file is a few hundred bytes
    inputs = Storage(s3_client).open_inputs([lora, vera], tmp_path / "in")
    sent = requests(s3_client)
    with (
        pytest.raises(LimitExceeded, match=r"'vera': a VeRA adapter's .* over the limit of 100"),
        ReadAhead(1 << 20, 1 << 18, connections=1) as read_ahead,
    ):
        open_adapters(inputs, ["lora", "vera"], read_ahead=read_ahead)
    assert not [p for m, p in sent if m == "GET" and "vera/" + WEIGHTS_NAME in p.split("?")[0]]
    assert not (tmp_path / "in" / "1" / WEIGHTS_NAME).exists()


def test_one_adapter_named_64_times_is_checked_and_opened_once(
    stack, moto_endpoint, monkeypatch, tmp_path: Path, tiny: list[str]
) -> None:
    """A real job (Redis, the job function, moto): the same URI 64 times is one HEAD of each
    file, one look at its header, one reader; the merge still counts 64 entries."""
    settings = inproc_settings(
        stack, moto_endpoint, monkeypatch, tmp_path, f"once{uuid.uuid4().hex[:8]}"
    )
    readers: list[StreamedLoraReader] = []
    real_init = StreamedLoraReader.__init__

    def counted(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(StreamedLoraReader, "__init__", counted)
    heads: list[str] = []
    real_head = S3Store.head
    monkeypatch.setattr(
        S3Store, "head", lambda self, key: heads.append(key) or real_head(self, key)
    )
    output = f"s3://merged/team-a/once-{uuid.uuid4().hex[:8]}/"
    job = run_one(
        settings, {"adapters": [{"uri": tiny[0]}] * 64, "method": "ta", "output": {"uri": output}}
    )
    assert job["status"] == "succeeded", job
    assert len(readers) == 1
    input_heads = [k for k in heads if k.startswith(tiny[0].removeprefix("s3://adapters-a/"))]
    assert sorted(input_heads) == sorted(
        tiny[0].removeprefix("s3://adapters-a/") + n for n in (CONFIG_NAME, WEIGHTS_NAME)
    )
    report = json.loads(
        stack.s3.get_object(Bucket="merged", Key=output.removeprefix("s3://merged/") + REPORT_NAME)[
            "Body"
        ].read()
    )
    assert len(report["inputs"]) == 64 and len({i["sha256"] for i in report["inputs"]}) == 1


# -- what a run finds at its output


def _own_report(store, prefix: str, body: bytes) -> OutputPublisher:
    """A publisher of job-1 whose own report (created with its own metadata) is ``body``."""
    publisher = OutputPublisher(store, prefix, f"s3://merged/{prefix}", owner=OWNER, run="r1")
    store.create(prefix + REPORT_NAME, body, publisher.metadata_for(prefix + REPORT_NAME))
    return publisher


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{" * 100_000, "not JSON"),
        (b'{"output": {"rank": "4", "modules": 1, "bytes": 1}}', "not the shape of a merge report"),
        (b"[1, 2]", "not the shape of a merge report"),
    ],
    ids=["deep", "wrong-type", "not-object"],
)
def test_a_report_found_at_the_output_is_used_only_in_the_shape_of_one(
    s3_client, body: bytes, why: str
) -> None:
    store = S3Store(s3_client, "merged")
    publisher = _own_report(store, f"team-a/report-{uuid.uuid4().hex[:8]}/", body)
    info = publisher.prepare()
    assert info is not None
    with pytest.raises(
        OutputExists, match=f"holds a {REPORT_NAME} that this job cannot use .{why}"
    ):
        publisher.read_report(info)


def test_a_report_over_the_cap_is_not_read(s3_client, monkeypatch) -> None:
    store = S3Store(s3_client, "merged")
    publisher = _own_report(store, f"team-a/big-{uuid.uuid4().hex[:8]}/", b" " * 2048)
    monkeypatch.setattr("worker.storage.reports.MAX_REPORT_BYTES", 1024)
    info = publisher.prepare()
    sent = requests(s3_client)
    with pytest.raises(OutputExists, match="2048 bytes, over the 1024 a report can be"):
        publisher.read_report(info)
    assert sent == []
    assert MAX_REPORT_BYTES >= 64 << 20


def test_the_emptiness_check_stops_at_the_first_foreign_object(s3_client, s3) -> None:
    """25 foreign objects listed 10 a page: the check reads one page; the sweep of a dead
    run pages through all of them and removes that run's objects only."""
    prefix = f"team-a/paged-{uuid.uuid4().hex[:8]}/"
    store = S3Store(s3_client, "merged")
    store.page_size = 10
    publisher = OutputPublisher(store, prefix, f"s3://merged/{prefix}", owner=OWNER, run="r1")
    for i in range(25):
        s3.put_object(Bucket="merged", Key=f"{prefix}a-{i:02d}", Body=b"theirs")
    # the dead run's object sorts after every foreign one
    store.create(prefix + "z-partial", b"ours", publisher.metadata_for(prefix + "z-partial"))
    sent = requests(s3_client)
    with pytest.raises(OutputExists, match="'a-00', which this job did not write"):
        publisher.prepare()
    assert [m for m, p in sent if "list-type=2" in p] == ["GET"]  # one page
    sent.clear()
    remove_run_leftovers(store, prefix, OWNER, "r1")
    assert len([p for m, p in sent if "list-type=2" in p]) == 3  # every page
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="merged", Prefix=prefix)["Contents"]]
    assert len(keys) == 25 and prefix + "z-partial" not in keys
