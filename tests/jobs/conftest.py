"""The shared core's tests use the service tests' Redis database and settings fixtures."""

from tests.service.conftest import make_settings, redis, settings, tenants_file

__all__ = ["make_settings", "redis", "settings", "tenants_file"]
