"""The shared REST layer of the CRM connectors: one table of answers and what each becomes,
against a loopback server, for a minimal connector that declares only what the layer asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from leadloop.config import settings_from_dict
from leadloop.crm.rest import MAX_REPEATS, Auth, OAuthAuth, RestApi, TokenAuth, follow_pages
from leadloop.errors import FatalSourceError, QuotaExhaustedError, RetriableSourceError
from leadloop.http import make_session
from leadloop.sandbox.server import LocalServer, Reply
from tests.conftest import BASE_CONFIG

ENV = "LEADLOOP_TEST_REST_TOKEN"
TOKEN = "rest-secret-token-4711"


class ExampleApi(RestApi):
    """A CRM whose daily quota is a 429 with `{"policy": "daily"}`, and which asks for short
    pauses with a 429 carrying `X-Pause`."""

    vendor = "ExampleCRM"
    auth_hint = "check the token"

    def throttle_wait(self, response: requests.Response) -> float | None:
        pause = response.headers.get("X-Pause")
        return float(pause) if response.status_code == 429 and pause else None

    def quota_error(self, response: requests.Response) -> QuotaExhaustedError | None:
        if response.status_code == 429 and response.json().get("policy") == "daily":
            return QuotaExhaustedError("ExampleCRM daily quota used up")
        return None


class StubProvider:
    """An OAuth provider whose first token the API refuses."""

    def __init__(self) -> None:
        self.issued = ["expired-early", "fresh"]
        self.invalidated: list[str] = []

    def token(self) -> str:
        return self.issued[0]

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        self.issued.pop(0)


@pytest.fixture
def server() -> Iterator[tuple[LocalServer, list[Reply]]]:
    replies: list[Reply] = []
    srv = LocalServer()
    srv.route("GET", "/things", lambda request: replies.pop(0))
    srv.start()
    yield srv, replies
    srv.stop()


def _api(srv: LocalServer, monkeypatch: pytest.MonkeyPatch, auth: str = "token") -> ExampleApi:
    monkeypatch.setenv(ENV, TOKEN)
    settings = settings_from_dict({**BASE_CONFIG, "crm": {"kind": "hubspot", "token_env": ENV}})
    slept: list[float] = []

    def credentials() -> Auth:
        if auth == "oauth":
            return OAuthAuth(StubProvider(), "the OAuth app in CID/REFRESH")  # type: ignore[arg-type]
        return TokenAuth(settings, "crm.token_env", ENV)

    api = ExampleApi(make_session(retries=0), srv.base_url, credentials, sleep=slept.append)
    api.slept = slept  # type: ignore[attr-defined]
    return api


CASES = [
    # (answers in order, the error raised or None, words the message must hold)
    ([Reply(200, {"ok": 1})], None, []),
    ([Reply(401, {"message": "bad"})], FatalSourceError, [f"environment variable {ENV}", "401"]),
    ([Reply(429, {"policy": "daily"})], QuotaExhaustedError, ["daily quota"]),
    ([Reply(429, {"policy": "secondly"})], RetriableSourceError, ["ExampleCRM kept failing", "429"]),
    ([Reply(503, {})], RetriableSourceError, ["503"]),
    ([Reply(404, {"message": f"no thing for {TOKEN}"})], FatalSourceError,
     ["ExampleCRM refused a request", "404"]),
    ([Reply(drop_connection=True)], RetriableSourceError, ["failed after retries"]),
    ([Reply(429, {}, {"X-Pause": "0.5"}), Reply(429, {}, {"X-Pause": "0.5"}), Reply(200, {"ok": 1})],
     None, []),
]


@pytest.mark.parametrize(("answers", "error", "words"), CASES)
def test_each_answer_is_classified_once_for_every_connector(server, monkeypatch, answers, error,
                                                            words) -> None:
    srv, replies = server
    replies.extend(answers)
    api = _api(srv, monkeypatch)
    if error is None:
        assert api.request("GET", "/things") == {"ok": 1}
        assert api.requests == len(answers) and api.throttled == len(answers) - 1
        assert api.slept == [0.5] * (len(answers) - 1)  # type: ignore[attr-defined]
        return
    with pytest.raises(error) as raised:
        api.request("GET", "/things")
    message = str(raised.value)
    assert all(w in message for w in words), message
    assert TOKEN not in message  # the token is never part of a message, even echoed back


def test_the_token_is_sent_and_an_oauth_token_refused_early_is_renewed_once(server,
                                                                            monkeypatch) -> None:
    srv, replies = server
    replies.extend([Reply(200, {"ok": 1})])
    assert _api(srv, monkeypatch).request("GET", "/things") == {"ok": 1}
    assert srv.received[-1].headers["authorization"] == f"Bearer {TOKEN}"

    replies.extend([Reply(401, {}), Reply(200, {"ok": 1})])
    api = _api(srv, monkeypatch, auth="oauth")
    assert api.request("GET", "/things") == {"ok": 1}
    assert srv.received[-1].headers["authorization"] == "Bearer fresh"

    replies.extend([Reply(401, {}), Reply(401, {})])
    api = _api(srv, monkeypatch, auth="oauth")
    with pytest.raises(FatalSourceError, match=r"the OAuth app in CID/REFRESH.*even after a "
                                               r"token refresh"):
        api.request("GET", "/things")


def _server_pages(answers: list[tuple[list[int], str | None]]):
    """fetch(token) answering from `answers` in order; records which tokens were asked."""
    asked: list[str | None] = []

    def fetch(token: str | None) -> dict:
        asked.append(token)
        ids, nxt = answers.pop(0)
        return {"ids": ids, "next": nxt}

    return fetch, asked


@pytest.mark.parametrize(("answers", "yielded", "asked"), [
    # plain paging
    ([([1, 2], "a"), ([3], None)], [[1, 2], [3]], [None, "a"]),
    # the server sends its own token back: the page is read again, not yielded twice
    ([([1, 2], "a"), ([1, 2], "a"), ([3], None)], [[1, 2], [3]], [None, "a", "a"]),
    # the same records under a new token: read again with the token that was sent
    ([([1, 2], "a"), ([1, 2], "b"), ([3], None)], [[1, 2], [3]], [None, "a", "a"]),
])
def test_follow_pages_reads_a_repeated_page_again(answers, yielded, asked) -> None:
    fetch, tokens = _server_pages(answers)
    pages = follow_pages(fetch, lambda d: d["next"], vendor="ExampleCRM", what="list",
                         same_records=lambda d: d["ids"])
    assert [d["ids"] for d, _ in pages] == yielded
    assert tokens == asked


def test_follow_pages_gives_up_on_a_server_that_loops() -> None:
    fetch, tokens = _server_pages([([1], "a")] + [([2], "a")] * (MAX_REPEATS + 1))
    with pytest.raises(RetriableSourceError, match="kept repeating the list page after a"):
        list(follow_pages(fetch, lambda d: d["next"], vendor="ExampleCRM", what="list"))
    assert tokens == [None] + ["a"] * (MAX_REPEATS + 1)
