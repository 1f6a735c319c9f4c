"""The test Redis fixture: a real server of the test's own, that answers, dies and comes back."""

from __future__ import annotations

import redis.asyncio as aioredis
from redisserver import RedisServer


async def test_each_test_gets_a_server_that_answers(redis_server: RedisServer):
    """The fixture's server answers PING and keeps what it is given, with no persistence configured."""
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.ping()
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert await client.config_get("save") == {"save": ""}
        assert await client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        await client.aclose()


async def test_a_killed_server_comes_back_on_the_same_port_with_its_append_only_file(tmp_path):
    """SIGKILL and restart on the same port: with appendonly (fsync always) the data survives."""
    server = RedisServer(tmp_path / "r", appendonly=True).start()
    try:
        client = aioredis.from_url(server.url)
        await client.set("kept", "1")
        await client.aclose()
        server.kill()
        assert server.proc is None
        server.start()
        client = aioredis.from_url(server.url)
        assert await client.get("kept") == b"1"
        await client.aclose()
    finally:
        server.stop()
