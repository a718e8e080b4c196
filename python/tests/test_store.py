"""The core API against real Redis: every call goes through the library."""

import hashlib
import json
import threading
import time

import pytest

import vedfolnir_sessions as vs
from vedfolnir_sessions import (
    ConfigError,
    ConflictError,
    InvalidInputError,
    SessionEndedError,
    SessionStore,
    StoreUnavailableError,
    TooLargeError,
    VedfolnirSessionError,
)

from conftest import stream_events


def test_exceptions_form_one_hierarchy():
    for exc in (ConflictError, SessionEndedError, TooLargeError, StoreUnavailableError,
                InvalidInputError, ConfigError):
        assert issubclass(exc, VedfolnirSessionError)
    assert issubclass(VedfolnirSessionError, Exception)


def test_create_load_get_and_the_token_is_never_stored(store, redis_client, namespace):
    token, sid, session = store.create({"user_id": 1, "username": "admin", "role": "admin"})
    assert len(token) == 43
    assert sid == hashlib.sha256(token.encode()).hexdigest()
    assert vs.session_id_of(token) == sid
    assert session["user_id"] == 1 and session["_version"] == 1
    assert session["created_at"] == session["last_activity"]
    assert store.load(token) == session
    assert store.get(sid) == session
    # The key layout is the library's: the session key holds the same JSON.
    raw = redis_client.get(f"{namespace}session:{sid}")
    assert json.loads(raw) == session
    # No key, stream entry or value holds the bearer token.
    for key in redis_client.scan_iter(match=f"{namespace}*"):
        assert token.encode() not in key
        if redis_client.type(key) == b"string":
            assert token.encode() not in redis_client.get(key)
    for e in stream_events(redis_client, namespace):
        assert token not in json.dumps(e)


def test_bad_tokens_and_unknown_ids_are_none(store):
    assert store.load("") is None
    assert store.load("not-a-token") is None
    assert store.load("A" * 43) is None  # well-formed, unknown
    assert store.get("a" * 64) is None
    assert vs.session_id_of("x" * 42) is None
    with pytest.raises(InvalidInputError):
        store.get("A" * 64)


def test_update_is_one_updated_event_with_the_diff(store, redis_client, namespace):
    token, sid, _ = store.create({"user_id": "u1", "a": 1, "b": [1, 2]})
    s = store.update(sid, set={"theme": "dark", "n": None}, unset=["a"])
    assert s["theme"] == "dark" and "a" not in s and s["n"] is None and s["_version"] == 2
    events = stream_events(redis_client, namespace)
    assert [e["type"] for e in events] == ["created", "updated"]
    upd = events[1]
    assert upd["session_id"] == sid and upd["seq"] == "2" and upd["user_id"] == "u1"
    assert json.loads(upd["payload"]) == {"set": {"n": None, "theme": "dark"}, "unset": ["a"]}
    assert set(upd) >= {"event_id", "session_id", "seq", "type", "occurred_at", "user_id",
                        "schema", "payload"}


def test_reserved_keys_and_non_json_values_are_refused(store):
    _, sid, _ = store.create({})
    with pytest.raises(InvalidInputError):
        store.update(sid, set={"_version": 3})
    with pytest.raises(InvalidInputError):
        store.update(sid, set={"when": object()})
    with pytest.raises(InvalidInputError):
        store.update(sid, set={"x": float("nan")})
    with pytest.raises(InvalidInputError):
        store.create({"created_at": "yesterday"})
    assert store.get(sid)["_version"] == 1, "nothing was written"


def test_values_round_trip(store):
    value = {"i": -(2**63), "u": 2**64 - 1, "f": 1.5, "s": "é\u0000x", "l": [True, None, (1, 2)],
             "d": {"nested": {"k": []}}}
    _, sid, _ = store.create(value)
    got = store.get(sid)
    expected = dict(value, l=[True, None, [1, 2]])
    for k, v in expected.items():
        assert got[k] == v, k
    with pytest.raises(InvalidInputError):
        store.update(sid, set={"big": 2**64})


def test_too_large_writes_nothing(env):
    store = SessionStore.from_env(env=dict(env, SESSION_MAX_BYTES="1024"))
    _, sid, _ = store.create({})
    with pytest.raises(TooLargeError):
        store.update(sid, set={"blob": "x" * 2000})
    assert "blob" not in store.get(sid)


def test_concurrent_updates_of_different_keys_all_survive(store):
    _, sid, base = store.create({})
    errors = []

    def writer(i):
        try:
            # Every writer folds on the same stale base: the version check
            # makes the store fold again on the current state.
            store.update(sid, set={f"k{i}": i}, base=base)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = store.get(sid)
    assert all(s[f"k{i}"] == i for i in range(20))
    assert s["_version"] == 21


def test_a_stale_read_is_refused(store):
    _, sid, base = store.create({"count": 1})
    store.update(sid, set={"count": 5})
    with pytest.raises(ConflictError):
        store.update(sid, set={"count": 2}, expect={"count": 1}, base=base)
    assert store.get(sid)["count"] == 5
    # A precondition on another key that did not change lets it through.
    s = store.update(sid, set={"other": 1}, expect_absent=["other"], base=base)
    assert s["count"] == 5 and s["other"] == 1


def test_increments_are_never_lost(store):
    _, sid, _ = store.create({})
    threads = [threading.Thread(target=store.increment, args=(sid, "visits")) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(sid)["visits"] == 25


def test_switch_platform_rotate_destroy(store, redis_client, namespace):
    token, sid, _ = store.create({"user_id": 7, "theme": "dark"})
    s = store.switch_platform(sid, 123, "My Platform", "mastodon", "https://m.example.com")
    assert (s["platform_connection_id"], s["platform_type"]) == (123, "mastodon")
    token2, sid2, s2 = store.rotate(sid, set={"role": "admin"})
    assert sid2 != sid and s2["theme"] == "dark" and s2["role"] == "admin"
    assert s2["platform_name"] == "My Platform"
    assert store.load(token) is None and store.tombstone(sid) == "destroyed"
    with pytest.raises(SessionEndedError):
        store.update(sid, set={"x": 1})
    assert store.destroy(sid2, reason="admin") is True
    assert store.destroy(sid2) is False
    assert store.load(token2) is None
    types = [(e["session_id"], e["type"], json.loads(e["payload"])) for e in
             stream_events(redis_client, namespace)]
    assert (sid, "platform_switched", {"platform_connection_id": 123,
            "platform_instance_url": "https://m.example.com", "platform_name": "My Platform",
            "platform_type": "mastodon"}) in types
    assert (sid, "destroyed", {"reason": "rotated"}) in types
    assert (sid2, "destroyed", {"reason": "admin"}) in types
    created = [p for (i, t, p) in types if i == sid2 and t == "created"]
    assert created[0]["rotated_from"] == sid
    with pytest.raises(InvalidInputError):
        store.destroy(sid2, reason="because")


def test_user_sessions_and_destroy_all(store):
    ids = [store.create({"user_id": 42, "n": i})[1] for i in range(3)]
    other = store.create({"user_id": 43})[1]
    listed = store.user_sessions(42)
    assert [i for i, _ in listed] == ids
    assert [s["n"] for _, s in listed] == [0, 1, 2]
    assert store.user_sessions("42") == listed
    ended = store.destroy_all_for_user(42)
    assert sorted(ended) == sorted(ids)
    assert store.user_sessions(42) == []
    assert store.get(other) is not None


def test_stats_and_health(store):
    store.create({"user_id": 5})
    store.create({"user_id": 5})
    store.create({})
    stats = store.stats()
    assert stats["active_sessions"] == 3 and stats["stream_length"] == 3
    assert stats["top_users"] == [{"user_id": "5", "sessions": 2}]
    health = store.health()
    assert health["healthy"] is True and health["redis_reachable"] is True
    assert health["latency_ms"] >= 0


def test_configuration_errors_name_the_variable(env):
    with pytest.raises(ConfigError, match="SESSION_COOKIE_SAMESITE"):
        SessionStore.from_env(env=dict(env, SESSION_COOKIE_SAMESITE="sideways"))
    store = SessionStore.from_env(env=dict(env, SESSION_COOKIE_NAME="sid",
                                           SESSION_COOKIE_SECURE="false"))
    assert store.cookie == {"name": "sid", "http_only": True, "secure": False,
                            "same_site": "Lax", "max_age": 7200}


def test_unreachable_redis_raises_store_unavailable(env):
    down = dict(env, REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT_MS="300")
    with pytest.raises(StoreUnavailableError):
        SessionStore.from_env(env=down)
    lazy = SessionStore.from_env(env=down, lazy=True)
    with pytest.raises(StoreUnavailableError):
        lazy.get("a" * 64)
    assert lazy.health()["healthy"] is False


def test_calls_release_the_gil_while_waiting_on_redis(env):
    # A "Redis" that accepts connections and never answers: the call waits
    # for REDIS_TIMEOUT_MS. Another Python thread must run meanwhile, which
    # it can only do if the call released the GIL.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        store = SessionStore.from_env(
            env=dict(env, REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_TIMEOUT_MS="800"),
            lazy=True,
        )
        in_call = threading.Event()
        done = threading.Event()
        ticks = [0]

        def count():
            in_call.wait()
            while not done.is_set():
                ticks[0] += 1

        t = threading.Thread(target=count)
        t.start()
        started = time.perf_counter()
        in_call.set()
        with pytest.raises(StoreUnavailableError):
            store.get("a" * 64)
        elapsed = time.perf_counter() - started
        done.set()
        t.join()
        assert elapsed >= 0.5, elapsed
        assert ticks[0] > 10_000, f"the other thread ran {ticks[0]} steps in {elapsed:.2f} s"
    finally:
        silent.close()


def test_a_forked_child_opens_its_own_connection(store):
    # A pre-forking server imports the app (and uses the store) before it
    # forks: the child must not use the parent's runtime or connection.
    import os

    _, sid, _ = store.create({"n": 1})
    assert store.get(sid)["n"] == 1
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            store.update(sid, set={"child": True})
            code = 0 if store.get(sid)["child"] is True else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(sid)["child"] is True, "the parent still works and sees the write"
