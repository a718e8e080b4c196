"""Shared fixtures: every test gets its own key namespace on the real Redis
(``REDIS_URL``, default ``redis://127.0.0.1:6379/0``), and its keys are
removed afterwards. Nothing here flushes a database."""

import os
import uuid

import pytest
import redis as redis_py

from vedfolnir_sessions import SessionStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def unlink_namespace(client, namespace):
    """Removes every key of one namespace (SCAN + UNLINK)."""
    batch = []
    for key in client.scan_iter(match=namespace.replace("[", "\\[") + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


@pytest.fixture(scope="session")
def redis_client():
    client = redis_py.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client):
    ns = f"vspy:{uuid.uuid4().hex}:"
    yield ns
    unlink_namespace(redis_client, ns)


@pytest.fixture
def env(namespace):
    """The environment a store of this test reads (an explicit mapping, so
    tests never depend on the process environment)."""
    return {
        "REDIS_URL": REDIS_URL,
        "REDIS_SESSION_PREFIX": f"{namespace}session:",
        "REDIS_EVENT_STREAM": f"{namespace}events",
    }


@pytest.fixture
def store(env):
    return SessionStore.from_env(env=env)


def stream_events(client, namespace):
    """The namespace's stream entries as dicts of str."""
    out = []
    for _id, fields in client.xrange(f"{namespace}events"):
        out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out
