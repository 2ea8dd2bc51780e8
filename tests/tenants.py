"""The two tenants every service test uses: team-a and team-b, each with its own buckets."""

from __future__ import annotations

from jobs.tenants import hash_key


def two_tenants(key_a: str, key_b: str) -> dict:
    """A tenants file (docs/job-spec.md) for team-a (key_a) and team-b (key_b)."""
    return {
        "tenants": {
            "team-a": {
                "keys_sha256": [hash_key(key_a)],
                "allow": ["s3://adapters-a/", "s3://merged/team-a/"],
            },
            "team-b": {
                "keys_sha256": [hash_key(key_b)],
                "allow": ["s3://adapters-b/", "s3://merged/team-b/"],
            },
        }
    }
