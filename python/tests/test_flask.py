"""The Flask integration against real Redis, through Flask's test client."""

import json
import threading

import pytest
from flask import Flask, jsonify, request, session

from vedfolnir_sessions import SessionStore, session_id_of
from vedfolnir_sessions.flask import (
    VedfolnirSessions,
    create_user_session,
    destroy_current_session,
    get_current_session_context,
    switch_platform,
)

from conftest import stream_events


def make_app(store, **options):
    app = Flask(__name__)
    app.config["TESTING"] = True
    VedfolnirSessions(app, store=store, **options)

    @app.get("/read/<key>")
    def read(key):
        return jsonify(session.get(key))

    @app.get("/nothing")
    def nothing():
        return "ok"

    @app.post("/set/<key>")
    def set_key(key):
        session[key] = request.get_json()
        return "", 204

    @app.post("/del/<key>")
    def del_key(key):
        session.pop(key, None)
        return "", 204

    @app.post("/login/<int:user_id>")
    def login(user_id):
        body = request.get_json(silent=True) or {}
        sid = create_user_session(user_id, body.pop("platform_id", None), **body)
        return jsonify(session_id=sid, csrf_token=session.get("csrf_token"))

    @app.post("/logout")
    def logout():
        return jsonify(ended=destroy_current_session())

    @app.get("/context")
    def context():
        return jsonify(get_current_session_context())

    @app.post("/platform")
    def platform():
        return jsonify(switched=switch_platform(**request.get_json()))

    @app.post("/clear")
    def clear():
        session.clear()
        return "", 204

    @app.post("/boom")
    def boom():
        session["lost"] = True
        return "no", 500

    @app.post("/incr/<key>")
    def incr(key):
        return jsonify(session.increment(key))

    return app


@pytest.fixture
def flask_env(env):
    return dict(env, SESSION_COOKIE_SECURE="false")


@pytest.fixture
def fstore(flask_env):
    return SessionStore.from_env(env=flask_env)


@pytest.fixture
def app(fstore):
    return make_app(fstore)


@pytest.fixture
def client(app):
    return app.test_client()


def set_cookies(res):
    return res.headers.getlist("Set-Cookie")


def token_of(res):
    for line in set_cookies(res):
        name, _, rest = line.partition("=")
        if name == "session":
            return rest.split(";", 1)[0]
    return None


def session_keys(redis_client, namespace):
    return list(redis_client.scan_iter(match=f"{namespace}session:*"))


def test_anonymous_requests_store_nothing(client, redis_client, namespace):
    for path in ("/nothing", "/read/theme", "/context"):
        res = client.get(path)
        assert res.status_code == 200
        assert set_cookies(res) == []
    assert client.get("/context").get_json() is None
    assert list(redis_client.scan_iter(match=f"{namespace}*")) == []


def test_an_anonymous_write_creates_one_session_with_the_exact_cookie(env, redis_client, namespace):
    app = make_app(SessionStore.from_env(env=env))  # Secure on: the defaults
    client = app.test_client()
    res = client.post("/set/theme", json="dark")
    assert res.status_code == 204
    [line] = set_cookies(res)
    token = token_of(res)
    assert line == f"session={token}; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=7200"
    assert res.headers["Cache-Control"] == "no-store"
    sid = session_id_of(token)
    events = stream_events(redis_client, namespace)
    assert [(e["type"], e["session_id"]) for e in events] == [("created", sid)]
    fields = json.loads(events[0]["payload"])["fields"]
    assert fields["theme"] == "dark" and len(fields["csrf_token"]) == 43


def test_a_read_only_request_writes_nothing_and_sets_no_cookie(client, redis_client, namespace):
    client.post("/set/theme", json="dark")
    before = len(stream_events(redis_client, namespace))
    res = client.get("/read/theme")
    assert res.get_json() == "dark"
    assert set_cookies(res) == []
    # Writing the value it already has is no change either.
    assert client.post("/set/theme", json="dark").status_code == 204
    assert len(stream_events(redis_client, namespace)) == before


def test_changes_are_one_updated_event_with_the_diff(client, redis_client, namespace):
    client.post("/set/a", json=1)
    client.post("/set/b", json=[1, 2])
    client.post("/del/a")
    events = stream_events(redis_client, namespace)
    assert [e["type"] for e in events] == ["created", "updated", "updated"]
    assert json.loads(events[1]["payload"]) == {"set": {"b": [1, 2]}, "unset": []}
    assert json.loads(events[2]["payload"]) == {"set": {}, "unset": ["a"]}
    assert [e["seq"] for e in events] == ["1", "2", "3"]


def test_in_place_changes_of_nested_values_are_stored(client, fstore):
    app = client.application

    @app.post("/append")
    def append():
        session.setdefault("items", []).append(len(session["items"]))
        return "", 204

    for _ in range(3):
        assert client.post("/append").status_code == 204
    ctx = client.get("/context").get_json()
    assert fstore.get(ctx["session_id"])["items"] == [0, 1, 2]


def test_concurrent_requests_changing_different_keys_both_survive(app, fstore):
    entered, release = threading.Event(), threading.Event()

    @app.post("/slow/<key>")
    def slow(key):
        session.get("seed")  # reads a key nobody changes
        entered.set()
        release.wait(10)
        session[key] = "slow"
        return "", 204

    client = app.test_client()
    client.post("/set/seed", json=0)
    token = client.get_cookie("session").value

    results = {}

    def run_slow():
        c = app.test_client()
        c.set_cookie("session", token)
        results["slow"] = c.post("/slow/x").status_code

    t = threading.Thread(target=run_slow)
    t.start()
    assert entered.wait(10)
    assert client.post("/set/y", json="fast").status_code == 204
    release.set()
    t.join()
    assert results["slow"] == 204
    stored = fstore.load(token)
    assert stored["x"] == "slow" and stored["y"] == "fast" and stored["seed"] == 0


def test_a_change_computed_from_a_stale_value_is_refused(app, fstore):
    entered, release = threading.Event(), threading.Event()

    @app.post("/bump")
    def bump():
        n = session["count"]
        entered.set()
        release.wait(10)
        session["count"] = n + 1
        return "", 204

    client = app.test_client()
    client.post("/set/count", json=1)
    token = client.get_cookie("session").value

    results = {}

    def run():
        c = app.test_client()
        c.set_cookie("session", token)
        res = c.post("/bump")
        results["status"], results["body"] = res.status_code, res.get_json()

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(10)
    assert client.post("/set/count", json=10).status_code == 204
    release.set()
    t.join()
    assert results["status"] == 409
    assert results["body"]["error"] == "session_conflict"
    assert fstore.load(token)["count"] == 10, "the concurrent write is not overwritten"


def test_increments_from_concurrent_requests_are_never_lost(app, fstore):
    client = app.test_client()
    client.post("/set/seed", json=0)
    token = client.get_cookie("session").value

    def run():
        c = app.test_client()
        c.set_cookie("session", token)
        assert c.post("/incr/visits").status_code == 200

    threads = [threading.Thread(target=run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fstore.load(token)["visits"] == 10


def test_create_user_session_rotates_and_sets_the_new_cookie(client, fstore, redis_client,
                                                             namespace):
    client.post("/set/cart", json=["book"])
    old = client.get_cookie("session").value
    old_ctx = fstore.load(old)
    res = client.post("/login/7", json={"platform_id": 123, "username": "admin",
                                        "role": "admin"})
    body = res.get_json()
    new = token_of(res)
    assert new and new != old
    assert body["session_id"] == session_id_of(new)
    assert fstore.load(old) is None
    s = fstore.load(new)
    assert (s["user_id"], s["platform_connection_id"], s["username"]) == (7, 123, "admin")
    assert s["cart"] == ["book"], "the same visitor keeps their data"
    assert s["csrf_token"] != old_ctx["csrf_token"] and body["csrf_token"] == s["csrf_token"]
    events = stream_events(redis_client, namespace)
    old_sid = session_id_of(old)
    ended = [json.loads(e["payload"]) for e in events
             if e["session_id"] == old_sid and e["type"] == "destroyed"]
    assert ended == [{"reason": "rotated"}]
    created = [json.loads(e["payload"]) for e in events
               if e["session_id"] == body["session_id"] and e["type"] == "created"]
    assert created[0]["rotated_from"] == old_sid
    # Another user logging in on this browser starts clean.
    res = client.post("/login/8")
    s8 = fstore.load(token_of(res))
    assert s8["user_id"] == 8 and "cart" not in s8 and "username" not in s8


def test_login_without_a_session_creates_one(client, fstore):
    res = client.post("/login/3", json={"email": "u@example.com"})
    s = fstore.load(token_of(res))
    assert s["user_id"] == 3 and s["email"] == "u@example.com"
    assert "platform_connection_id" not in s


def test_logout_ends_the_session_and_clears_the_cookie(client, fstore, redis_client, namespace):
    client.post("/login/1")
    token = client.get_cookie("session").value
    res = client.post("/logout")
    assert res.get_json() == {"ended": True}
    assert set_cookies(res)[0].startswith("session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0")
    assert fstore.load(token) is None
    assert fstore.tombstone(session_id_of(token)) == "destroyed"
    last = stream_events(redis_client, namespace)[-1]
    assert last["type"] == "destroyed" and json.loads(last["payload"]) == {"reason": "logout"}
    # The old cookie presented again is an anonymous request.
    c = client.application.test_client()
    c.set_cookie("session", token)
    assert c.get("/context").get_json() is None


def test_session_clear_logs_out(client, fstore):
    client.post("/login/1")
    token = client.get_cookie("session").value
    res = client.post("/clear")
    assert res.status_code == 204
    assert fstore.load(token) is None
    assert any(line.startswith("session=;") for line in set_cookies(res))


def test_dead_or_forged_cookies_are_anonymous(client, redis_client, namespace):
    for value in ("garbage", "A" * 43, "A" * 42, "%00%ff", "x" * 4000):
        c = client.application.test_client()
        c.set_cookie("session", value)
        res = c.get("/context")
        assert res.status_code == 200 and res.get_json() is None
        assert set_cookies(res) == []
    assert list(redis_client.scan_iter(match=f"{namespace}*")) == []
    # A forged cookie and a write: a fresh session, not the presented one.
    c = client.application.test_client()
    c.set_cookie("session", "A" * 43)
    res = c.post("/set/k", json=1)
    assert token_of(res) not in (None, "A" * 43)


def test_switch_platform_is_one_event(client, fstore, redis_client, namespace):
    assert client.post("/platform", json=dict(
        platform_connection_id=1, platform_name="n", platform_type="t",
        platform_instance_url="u")).get_json() == {"switched": False}
    client.post("/login/1")
    res = client.post("/platform", json=dict(
        platform_connection_id=9, platform_name="Pixel", platform_type="pixelfed",
        platform_instance_url="https://p.example.com"))
    assert res.get_json() == {"switched": True}
    ctx = client.get("/context").get_json()
    assert ctx["platform_connection_id"] == 9 and ctx["platform_name"] == "Pixel"
    assert stream_events(redis_client, namespace)[-1]["type"] == "platform_switched"


def test_user_id_is_set_only_by_login(app):
    @app.post("/forge")
    def forge():
        session["user_id"] = 1
        return "no"

    app.config["TESTING"] = False  # the error becomes a 500, as in production
    res = app.test_client().post("/forge")
    assert res.status_code == 500


def test_a_5xx_response_stores_nothing(client, redis_client, namespace):
    assert client.post("/boom").status_code == 500
    assert list(redis_client.scan_iter(match=f"{namespace}*")) == []


def test_the_store_maintained_keys_can_be_assigned_and_are_kept_by_the_store(client, fstore,
                                                                              redis_client,
                                                                              namespace):
    client.post("/login/1")
    before = len(stream_events(redis_client, namespace))
    res = client.post("/set/last_activity", json="2000-01-01T00:00:00")
    assert res.status_code == 204
    assert len(stream_events(redis_client, namespace)) == before
    assert client.get("/read/last_activity").get_json() != "2000-01-01T00:00:00"


def test_session_manager(app, fstore, redis_client, namespace):
    client = app.test_client()
    sid = client.post("/login/5").get_json()["session_id"]
    client2 = app.test_client()
    client2.post("/login/5")
    with app.app_context():
        from flask import current_app

        m = current_app.session_manager
        data = m.get_session_data(sid)
        assert data["user_id"] == 5 and "_version" not in data
        assert m.update_session(sid, {"key": "value", "last_activity": "x"}) is True
        assert m.get_session_data(sid)["key"] == "value"
        assert m.get_session_data("nope") is None
        assert m.update_session("f" * 64, {"k": 1}) is False
        assert len(m.get_user_sessions(5)) == 2
        assert m.destroy_session(sid) is True
        assert m.destroy_session(sid) is False
        assert m.cleanup_user_sessions(5) == 1
        assert m.get_user_sessions(5) == []
        assert m.health_check()["healthy"] is True
    last = stream_events(redis_client, namespace)[-1]
    assert json.loads(last["payload"]) == {"reason": "logout_all"}


def test_redis_unreachable_is_a_503(flask_env):
    store = SessionStore.from_env(
        env=dict(flask_env, REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT_MS="300"),
        lazy=True)
    app = make_app(store)
    c = app.test_client()
    c.set_cookie("session", "A" * 43)
    res = c.get("/context")
    assert res.status_code == 503
    assert res.headers["Retry-After"] == "1"
    assert res.get_json()["error"] == "session_store_unavailable"
    # Without a cookie nothing needs Redis until the view writes.
    c2 = app.test_client()
    assert c2.get("/nothing").status_code == 200
    res = c2.post("/set/k", json=1)
    assert res.status_code == 503 and res.get_json()["error"] == "session_store_unavailable"


def test_the_audit_database_serves_sessions_while_redis_is_unreachable(flask_env, tmp_path):
    db = tmp_path / "audit.sqlite"
    env = dict(flask_env, DATABASE_URL=f"sqlite://{db}?mode=rwc")
    up = make_app(SessionStore.from_env(env=env, audit=True))
    client = up.test_client()
    client.post("/login/4", json={"username": "dana"})
    token = client.get_cookie("session").value
    down_store = SessionStore.from_env(
        env=dict(env, REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT_MS="300"),
        audit=True, lazy=True)
    down = make_app(down_store).test_client()
    down.set_cookie("session", token)
    res = down.get("/context")
    assert res.status_code == 200, res.get_data()
    assert res.get_json()["username"] == "dana"


def test_csrf_option(fstore):
    app = make_app(fstore, csrf=True, csrf_exempt=["/login/1"])
    c = app.test_client()
    token = c.post("/login/1").get_json()["csrf_token"]
    res = c.post("/set/k", json=1)
    assert res.status_code == 403 and res.get_json()["error"] == "csrf"
    assert c.post("/set/k", json=1, headers={"X-CSRF-Token": "x" * 43}).status_code == 403
    assert c.post("/set/k", json=1, headers={"X-CSRF-Token": token}).status_code == 204
