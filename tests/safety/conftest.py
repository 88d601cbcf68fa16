from tests.security.redis_fixture import redis_url  # noqa: F401 - a fixture
