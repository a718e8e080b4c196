"""The README's Flask example, run exactly as written there.

It is the Vedfolnir application's own usage (its architecture note) with
only the import path of the session helpers changed. The block is taken
from README.md, executed as a module, and driven with Flask's test client.
"""

import json
import re
import warnings
from pathlib import Path

import pytest

from conftest import REDIS_URL, stream_events

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_app_source():
    text = README.read_text()
    section = text.split("## Python and Flask", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return blocks[0]


@pytest.fixture
def readme_app(monkeypatch, namespace):
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("REDIS_SESSION_PREFIX", f"{namespace}session:")
    monkeypatch.setenv("REDIS_EVENT_STREAM", f"{namespace}events")
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "false")  # the test client speaks HTTP
    module = {"__name__": "readme_app"}
    exec(compile(readme_app_source(), "README.md", "exec"), module)
    return module["app"]


def test_the_readme_example_works_as_written(readme_app, redis_client, namespace):
    from vedfolnir_sessions import session_id_of

    assert "session_middleware_v2" not in readme_app_source()
    client = readme_app.test_client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # datetime.utcnow
        anon = client.get("/").get_json()
    assert anon == {"user_id": None, "platform_id": None, "context": None}
    assert list(redis_client.scan_iter(match=f"{namespace}*")) == [], "anonymous: nothing stored"

    res = client.post("/login/1/123")
    sid = res.get_json()["session_id"]
    assert session_id_of(client.get_cookie("session").value) == sid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        body = client.get("/").get_json()
    assert (body["user_id"], body["platform_id"]) == (1, 123)
    assert body["context"]["session_id"] == sid
    assert body["context"]["csrf_token"]

    data = client.post(f"/sessions/{sid}/key").get_json()
    assert data["user_id"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert client.get("/").get_json()["context"]["key"] == "value"

    assert client.post("/logout").status_code == 204
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert client.get("/").get_json()["context"] is None
    types = [(e["type"], json.loads(e["payload"])) for e in stream_events(redis_client, namespace)]
    assert [t for t, _ in types] == ["created", "updated", "destroyed"]
    assert types[1][1] == {"set": {"key": "value"}, "unset": []}
    assert types[2][1] == {"reason": "logout"}
