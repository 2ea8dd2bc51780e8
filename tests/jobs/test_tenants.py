"""The tenants file, key hashing and the allow-list (jobs.tenants)."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from jobs.tenants import OPEN_TENANT, Tenant, Tenants, TenantsFileError, hash_key, refusal
from jobs.uris import parse_uri
from tests.service.conftest import KEY_A, KEY_B, TENANTS


def test_allow_list_matches_whole_segments() -> None:
    tenant = Tenants.from_dict(TENANTS).authenticate(KEY_A)
    assert tenant is not None and tenant.name == "team-a"
    assert tenant.may_use(parse_uri("s3://adapters-a/x/y"))
    assert tenant.may_use(parse_uri("s3://merged/team-a/run/"))
    assert tenant.may_use(parse_uri("s3://merged/team-a"))  # the prefix itself
    assert not tenant.may_use(parse_uri("s3://merged/team-ab/run/"))
    assert not tenant.may_use(parse_uri("s3://merged/"))
    assert not tenant.may_use(parse_uri("s3://adapters-b/x/"))


def test_refusal_kinds() -> None:
    tenant = Tenant("t", ("s3://okay/",))
    assert refusal(tenant, "s3://okay/a/", allow_file_uris=False) is None
    assert refusal(tenant, "s3://okay/../x/", allow_file_uris=False).kind == "invalid"
    assert refusal(tenant, "s3://other/a/", allow_file_uris=False).kind == "forbidden"
    assert refusal(OPEN_TENANT, "file:///x/", allow_file_uris=False).kind == "forbidden"
    assert refusal(OPEN_TENANT, "file:///x/", allow_file_uris=True) is None
    assert refusal(OPEN_TENANT, "s3://any-bucket/x/", allow_file_uris=False) is None


def test_keys_are_stored_hashed_and_matched() -> None:
    assert hash_key("test") == hashlib.sha256(b"test").hexdigest()
    tenants = Tenants.from_dict(TENANTS)
    assert not tenants.is_open
    assert tenants.authenticate(KEY_B).name == "team-b"
    assert tenants.authenticate(hash_key(KEY_A)) is None  # the hash itself is not a key
    assert tenants.authenticate("") is None
    assert tenants.authenticate(None) is None
    assert tenants.get("team-a").allow == ("s3://adapters-a/", "s3://merged/team-a/")
    assert Tenants.open().authenticate(None) is OPEN_TENANT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected"),
        ({"tenants": {"a": {"keys_sha256": ["abc"], "allow": []}}}, "sha256"),
        ({"tenants": {"a": {"keys_sha256": [hash_key("k")], "allow": ["http://x/"]}}}, "http"),
        ({"tenants": {"a": {"keys_sha256": [hash_key("k")], "alow": []}}}, "only"),
        ({"tenants": {"a b": {"keys_sha256": [hash_key("k")]}}}, "tenant name"),
        ({"tenants": {"a": {"keys_sha256": []}}}, "no keys"),
        (
            {
                "tenants": {
                    "a": {"keys_sha256": [hash_key("k")]},
                    "b": {"keys_sha256": [hash_key("k")]},
                }
            },
            "two tenants",
        ),
    ],
)
def test_bad_tenants_files_are_refused(raw: object, message: str) -> None:
    with pytest.raises(TenantsFileError, match=message):
        Tenants.from_dict(raw)


def test_tenants_file_that_is_not_json(tmp_path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text("{nope")
    with pytest.raises(TenantsFileError, match=r"tenants\.json"):
        Tenants.from_file(path)
    path.write_text(json.dumps(TENANTS))
    assert Tenants.from_file(path).authenticate(KEY_A).name == "team-a"


def test_hash_key_command(monkeypatch, capsys) -> None:
    from worker.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"s3cret").hexdigest()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["hash-key"]) == 2
