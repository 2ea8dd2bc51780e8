"""URI parsing and normalisation (jobs.uris): the normal form, and every refusal."""

from __future__ import annotations

import pytest

from jobs.uris import InvalidUri, parse_uri


@pytest.mark.parametrize(
    ("uri", "normalized"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix/"),
        ("s3://bucket/prefix/", "s3://bucket/prefix/"),
        ("S3://bucket/a/b", "s3://bucket/a/b/"),
        ("s3://bucket", "s3://bucket/"),
        ("s3://bucket/", "s3://bucket/"),
        ("file:///data/adapters/x", "file:///data/adapters/x/"),
        ("file://localhost/data/x/", "file:///data/x/"),
    ],
)
def test_normal_form(uri: str, normalized: str) -> None:
    assert parse_uri(uri).normalized == normalized


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://bucket/x/", "http(s)"),
        ("HTTPS://bucket/x/", "http(s)"),
        ("gs://bucket/x/", "unsupported scheme"),
        ("bucket/x", "not a URI"),
        ("/abs/path", "not a URI"),
        ("s3://bucket/a/../b/", "'..'"),
        ("s3://bucket/../other/", "'..'"),
        ("s3://bucket/./a/", "'..'"),
        ("s3://bucket//a/", "empty"),
        ("s3://bucket/a//", "empty"),
        ("s3://bucket/a%2F..%2Fb/", "percent"),
        ("s3://bucket/a%2e%2e/", "percent"),
        ("s3://bucket/a\\b/", "backslash"),
        ("s3://bucket/a?x=1", "'?'"),
        ("s3://bucket/a#frag", "'#'"),
        ("s3://bucket/a b/", "spaces"),
        ("s3://user:pass@bucket/a/", "credentials"),
        ("s3://bucket:9000/a/", "port"),
        ("s3://Bucket/a/", "bucket name"),
        ("s3://b/a/", "bucket name"),
        ("s3://bucket..x/a/", "bucket name"),
        ("s3://169.254.169.254/latest/", "IP address"),
        ("file://host/data/x/", "local absolute path"),
        ("file:///data/../etc/", "'..'"),
        ("file://", "absolute path"),
    ],
)
def test_refused_uris(uri: str, reason: str) -> None:
    with pytest.raises(InvalidUri) as info:
        parse_uri(uri)
    assert reason in str(info.value)
