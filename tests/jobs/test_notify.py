"""``jobs.notify``'s checks without a network: URL forms, allow-lists, the SSRF guard, the
signature, and the tenants file's notify fields (the real deliveries: tests/integration)."""

from __future__ import annotations

import hashlib
import hmac
import socket

import pytest
from pydantic import ValidationError

from jobs.notify import refusal, signature
from jobs.notify_urls import parse_prefix, parse_target
from jobs.settings import Settings
from jobs.spec import MergeSpec
from jobs.tenants import OPEN_TENANT, Tenant, Tenants, TenantsFileError, hash_key

SECRET = "s" * 32
TEAM = Tenant("team-a", ("s3://a/",), notify=(parse_prefix("https://hooks.example.com/ci"),),
              notify_secret=SECRET)  # fmt: skip


def _resolver(address: str):
    def resolve(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    return resolve


def _settings(**values: object) -> Settings:
    return Settings(tenants_file=None, **values)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://hooks.example.com/x", "only https://"),
        ("https://user:pw@hooks.example.com/x", "no user:password"),
        ("https://hooks.example.com/x#frag", "no #fragment"),
        ("https://hooks.example.com:99999/x", "port"),
        ("https://hooks.example.com/" + "x" * 2048, "characters"),
        ("https://hooks.exämple.com/x", "ASCII"),
    ],
)
def test_malformed_urls_are_refused_by_the_spec(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_target(url)
    body = {
        "adapters": [{"uri": "s3://a/x/"}],
        "output": {"uri": "s3://a/o/"},
        "notify": {"url": url},
    }
    with pytest.raises(ValidationError) as info:
        MergeSpec.model_validate(body)
    assert info.value.errors()[0]["loc"][:2] == ("notify", "url")


def test_prefixes_end_at_a_path_boundary() -> None:
    assert parse_prefix("HTTPS://Hooks.Example.com/ci") == "https://hooks.example.com:443/ci/"
    ok = _resolver("93.184.216.34")
    assert refusal("https://hooks.example.com/ci/run-1", TEAM, _settings(), resolve=ok) is None
    for url in ("https://hooks.example.com/ci-other", "https://hooks.example.com.evil.org/ci/",
                "https://hooks.example.com:8443/ci/", "http://hooks.example.com/ci/"):  # fmt: skip
        assert refusal(url, TEAM, _settings(notify_allow_http=True), resolve=ok), url


def test_http_needs_the_operator_setting() -> None:
    team = Tenant("t", (), notify=(parse_prefix("http://127.0.0.1:9000/"),), notify_secret=SECRET)
    url = "http://127.0.0.1:9000/hook"
    assert "COREMERGE_NOTIFY_ALLOW_HTTP" in refusal(url, team, _settings())
    assert refusal(url, team, _settings(notify_allow_http=True)) is None


@pytest.mark.parametrize("address", ["10.0.0.7", "127.0.0.1", "169.254.169.254", "::1", "fd00::1"])
def test_a_name_that_resolves_to_a_private_address_is_refused(address: str) -> None:
    said = refusal("https://hooks.example.com/ci/x", TEAM, _settings(), resolve=_resolver(address))
    assert said is not None and "private, loopback or link-local" in said


def test_an_entry_naming_the_address_itself_permits_it() -> None:
    team = Tenant("t", (), notify=(parse_prefix("https://10.0.0.7/"),), notify_secret=SECRET)
    assert refusal("https://10.0.0.7/hook", team, _settings()) is None


def test_open_mode_refuses_notify_unless_the_operator_names_prefixes() -> None:
    url, ok = "https://hooks.example.com/ci/x", _resolver("93.184.216.34")
    assert "COREMERGE_NOTIFY_ALLOW" in refusal(url, OPEN_TENANT, _settings(), resolve=ok)
    allowed = _settings(notify_allow="https://other.example/, https://hooks.example.com/ci/")
    assert "notify_secret" in refusal(url, OPEN_TENANT, allowed, resolve=ok)
    signed = _settings(notify_allow="https://hooks.example.com/ci/", notify_secret=SECRET)
    assert refusal(url, OPEN_TENANT, signed, resolve=ok) is None


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"job_id":"x"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1700000000, body) == f"t=1700000000,v1={expected}"


def test_the_tenants_file_checks_its_notify_fields() -> None:
    def tenants(**fields: object) -> Tenants:
        body = {"keys_sha256": [hash_key("k")], "allow": ["s3://bucket-a/"], **fields}
        return Tenants.from_dict({"tenants": {"team-a": body}})

    team = tenants(notify=["https://hooks.example.com/ci"], notify_secret=SECRET).get("team-a")
    assert team.notify == ("https://hooks.example.com:443/ci/",) and SECRET not in repr(team)
    with pytest.raises(TenantsFileError, match="notify_secret must be"):
        tenants(notify_secret="short")
    with pytest.raises(TenantsFileError, match="no user:password"):
        tenants(notify=["https://u:p@hooks.example.com/"])
    with pytest.raises(TenantsFileError, match="list of URL prefixes"):
        tenants(notify="https://hooks.example.com/")
