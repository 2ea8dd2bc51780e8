"""S3 inputs read as the merge goes (``worker.adapters.streamed``), against moto's S3 server
over HTTP: the same tensors and refusals as a local read, the object's sha256, a bounded
look-ahead, and an object replaced mid-read refused."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from jobs.errors import AdapterInvalid, StorageError
from jobs.settings import Settings
from jobs.spec import MergeSpec
from tests.conftest import ADAPTER_SPECS
from tests.hostile.corpus import CASES
from tests.integration.conftest import AWS_ENV
from tests.worker.synthetic import lora_adapter
from worker.adapters import open_adapters
from worker.adapters.format import module_order
from worker.adapters.header import held_for_header
from worker.adapters.lora import LoraReader
from worker.adapters.streamed import ReadAhead, StreamedLoraReader
from worker.demo import make_tiny_adapters
from worker.merge.plan import make_plan
from worker.merge.runner import run_merge
from worker.storage import CONFIG_NAME, WEIGHTS_NAME, Storage, make_s3_client
from worker.storage.inputs import HEAD_BYTES

KiB = 1 << 10
#: Each input's look-ahead and span in these tests: a few of the synthetic adapters' modules
#: (32 KiB float32, 16 KiB bfloat16), so every adapter is many spans and many windows.
WINDOW, SPAN = 256 * KiB, 64 * KiB


@pytest.fixture
def s3_client(moto_endpoint, s3, monkeypatch):
    """A client built the way the worker builds it (settings + boto3's credential chain)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return make_s3_client(Settings(s3_endpoint_url=moto_endpoint, s3_max_attempts=2))


def upload(s3, local: Path) -> str:
    prefix = f"streamed-{uuid.uuid4().hex[:8]}/"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        s3.upload_file(str(local / name), "adapters-a", prefix + name)
    return f"s3://adapters-a/{prefix}"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two adapters of 24 modules ``layers.<i>.q`` (key order puts layers.10 before
    layers.2), one float32 of rank 16, one bfloat16 of rank 8, about 1.5 MiB and 0.4 MiB."""
    root = tmp_path_factory.mktemp("synthetic")
    return [
        lora_adapter(root / "a0", r=16, m=256, n=256, modules=24, seed=1),
        lora_adapter(root / "a1", r=8, m=256, n=256, modules=24, seed=2, dtype=torch.bfloat16),
    ]


def open_streamed(
    s3_client, uris: list[str], dest: Path, read_ahead: ReadAhead
) -> list[StreamedLoraReader]:
    inputs = Storage(s3_client).open_inputs(uris, dest)
    readers = open_adapters(inputs, [f"a{i}" for i in range(len(uris))], read_ahead=read_ahead)
    assert all(isinstance(r, StreamedLoraReader) for r in readers)
    return readers  # type: ignore[return-value]


def parsed_header_bytes(reader: StreamedLoraReader) -> int:
    """What a reader counts for its parsed header, held for the whole merge."""
    return held_for_header(reader._data_start - 8)


def weights_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != CONFIG_NAME]


def assert_reads_equal(
    reader: StreamedLoraReader, local: LoraReader, modules: list[str], threads: int = 4
) -> None:
    """Reads from ``threads`` threads at once by default, as the runner reads several modules."""
    with ThreadPoolExecutor(threads) as pool:
        for module, (A, B) in zip(modules, pool.map(reader.read, modules), strict=True):
            A_local, B_local = local.read(module)
            assert torch.equal(A, A_local) and torch.equal(B, B_local), module


def test_streamed_reads_equal_local_reads_and_hash_the_whole_object(
    s3_client, s3, synthetic: list[Path], tmp_path: Path
) -> None:
    uris = [upload(s3, d) for d in synthetic]
    with ReadAhead(WINDOW * len(uris), SPAN, connections=3) as read_ahead:
        readers = open_streamed(s3_client, uris, tmp_path / "in", read_ahead)
        for reader, folder in zip(readers, synthetic, strict=True):
            local = LoraReader(folder, reader.name)
            assert reader.modules == {
                m: info.__class__(**{**vars(info), "read_bytes": reader.modules[m].read_bytes})
                for m, info in local.modules.items()
            }
            order = sorted(reader.modules, key=module_order)  # the plan's order
            # One reader thread: with several, a read can start before the read of the module
            # ahead of it has, find its span beyond the window and fetch it alone (correct,
            # but then bytes are read twice and the count below depends on timing).
            assert_reads_equal(reader, local, order, threads=1)
            data = (folder / WEIGHTS_NAME).read_bytes()
            assert reader.sha256() == hashlib.sha256(data).hexdigest()
            stats = reader.stats
            # Every byte after the header fetched once, in spans, none twice.
            assert stats.direct_bytes == 0
            assert stats.span_bytes == len(data) - reader._data_start
            assert stats.gets >= (len(data) - HEAD_BYTES) // SPAN  # beyond what the check read
            # The look-ahead stayed within the window, which the bytes held count, with the
            # parsed header.
            assert 0 < stats.peak_held_bytes <= WINDOW
            assert reader.held_bytes == WINDOW + parsed_header_bytes(reader)
            reader.close()
            assert stats.held_bytes == 0
        # The work-memory estimate counts every input's window.
        spec = MergeSpec.model_validate(
            {"adapters": [{"uri": u} for u in uris], "output": {"uri": "/tmp/x"}}
        )
        assert make_plan(readers, spec).work.held_bytes == sum(r.held_bytes for r in readers)
    assert weights_files(tmp_path / "in") == []  # only the configs reached the disk


def test_reads_out_of_file_order_are_fetched_alone_within_the_window(
    s3_client, s3, synthetic: list[Path], tmp_path: Path
) -> None:
    """Another layout than the plan's (here: reversed, and layers.2 before layers.10):
    each module outside the window comes by a GET of its own, memory stays bounded and the
    digest is still the object's."""
    uri = upload(s3, synthetic[0])
    with ReadAhead(WINDOW, SPAN, connections=2) as read_ahead:
        (reader,) = open_streamed(s3_client, [uri], tmp_path / "in", read_ahead)
        local = LoraReader(synthetic[0], reader.name)
        modules = sorted(reader.modules, key=module_order, reverse=True)
        assert_reads_equal(reader, local, modules)
        assert_reads_equal(reader, local, modules[:3])  # read twice: fetched again
        data = (synthetic[0] / WEIGHTS_NAME).read_bytes()
        assert reader.sha256() == hashlib.sha256(data).hexdigest()
        assert reader.stats.direct_bytes > 0
        assert reader.stats.peak_held_bytes <= reader.held_bytes
        reader.close()


def test_an_object_replaced_mid_read_is_refused(
    s3_client, s3, synthetic: list[Path], tmp_path: Path
) -> None:
    uri = upload(s3, synthetic[0])
    key = uri.removeprefix("s3://adapters-a/") + WEIGHTS_NAME
    with ReadAhead(WINDOW, SPAN, connections=2) as read_ahead:
        (reader,) = open_streamed(s3_client, [uri], tmp_path / "in", read_ahead)
        modules = sorted(reader.modules, key=module_order)
        reader.read(modules[0])
        s3.put_object(Bucket="adapters-a", Key=key, Body=(synthetic[1] / WEIGHTS_NAME).read_bytes())
        with pytest.raises(StorageError, match="changed while this job was reading it"):
            for module in modules[1:]:
                reader.read(module)
        with pytest.raises(StorageError, match="changed while this job was reading it"):
            reader.sha256()
        reader.close()


def test_a_merge_whose_input_is_replaced_midway_fails_and_leaves_nothing(
    s3_client, s3, synthetic: list[Path], tmp_path: Path
) -> None:
    uris = [upload(s3, d) for d in synthetic]
    key = uris[0].removeprefix("s3://adapters-a/") + WEIGHTS_NAME
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": u} for u in uris], "method": "ta", "output": {"uri": "/tmp/x"}}
    )
    replaced = []

    def replace_once(progress) -> None:
        if progress.stage == "merge" and not replaced:
            replaced.append(progress.modules_done)
            s3.put_object(Bucket="adapters-a", Key=key, Body=b"\0" * 1024)

    with ReadAhead(WINDOW * 2, SPAN, connections=2) as read_ahead:
        inputs = Storage(s3_client).open_inputs(uris, tmp_path / "in")
        with pytest.raises(StorageError, match="changed while this job was reading it"):
            run_merge(
                spec, inputs, tmp_path / "out", device="cpu", on_progress=replace_once,
                read_ahead=read_ahead,
            )  # fmt: skip
    assert replaced
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # the staging folder went too


def test_a_streamed_merge_equals_the_local_merge_bit_for_bit(
    s3_client, s3, synthetic: list[Path], peft_adapters: list[Path], tmp_path: Path
) -> None:
    """Same bytes out (tensors, file, report digests) whether inputs are read from S3 as the
    merge goes or from local folders; the heterogeneous PEFT adapters (modules present in
    only some inputs) read without a second fetch."""
    for dirs in (synthetic, peft_adapters):
        uris = [upload(s3, d) for d in dirs]
        spec = {"adapters": [{"uri": u} for u in uris], "method": "ties", "output": {"uri": "/x"}}
        job = MergeSpec.model_validate(spec)
        tag = uuid.uuid4().hex[:6]
        with ReadAhead(WINDOW * len(uris), SPAN, connections=3) as read_ahead:
            inputs = Storage(s3_client).open_inputs(uris, tmp_path / f"in-{tag}")
            served = run_merge(
                job, inputs, tmp_path / f"served-{tag}", device="cpu", read_ahead=read_ahead
            )
        local = run_merge(job, dirs, tmp_path / f"local-{tag}", device="cpu")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            assert (served.out_dir / name).read_bytes() == (local.out_dir / name).read_bytes()
        assert served.report["inputs"] == local.report["inputs"]
        assert [i["sha256"] for i in served.report["inputs"]] == [
            hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest() for d in dirs
        ]


#: Corpus cases about the weights file that pass the input check (prefix, sizes) and are
#: refused when the input is opened or read.
OPEN_CASES = [
    c
    for c in CASES
    if c.name
    in {
        "truncated-tail",
        "header-offsets-lie",
        "header-not-json",
        "int-factor",
        "rank-mismatch",
        "dora-magnitude-tensor",
        "stray-key",
        "not-lora-a-or-b",
        "backtracking-rank-pattern",
        "nan-factor",
    }
]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_adapters(tmp_path_factory.mktemp("good"), ADAPTER_SPECS[:1])[0]


@pytest.mark.parametrize("case", OPEN_CASES, ids=[c.name for c in OPEN_CASES])
def test_a_bad_adapter_is_refused_as_the_local_reader_refuses_it(
    case, s3_client, s3, good_adapter: Path, tmp_path: Path
) -> None:
    folder = case.make(good_adapter, tmp_path)
    uri = upload(s3, folder)

    def refusal(inputs: list, read_ahead: ReadAhead | None = None) -> AdapterInvalid:
        with pytest.raises(AdapterInvalid) as caught:
            for reader in open_adapters(inputs, [case.name], read_ahead=read_ahead):
                for module in sorted(reader.modules, key=module_order):
                    reader.read(module)
        return caught.value

    local = refusal([folder])
    with ReadAhead(WINDOW, SPAN, connections=2) as read_ahead:
        streamed = refusal(Storage(s3_client).open_inputs([uri], tmp_path / "in"), read_ahead)
    assert case.says in local.message and case.says in streamed.message
    if "safetensors file" not in local.message:  # coremerge's own checks: the same words
        assert streamed.message == local.message
    shutil.rmtree(folder)
