"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; never a
downloaded browser): signing in, a pin made through the admin API showing on the page, and a
real adaptive cycle (tiny model, real training) followed live from cloud to local.
Screenshots land in test-artifacts/."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo.fakecloud import FakeCloud, FakeCloudServer
from gateway.settings import load_settings
from tests.conftest import ARTIFACTS, RunningGateway, start_gateway
from tests.gateway.web.admin_fixtures import ADMIN_KEY, ROUTE, AdaptiveGateway, running_adaptive_gateway

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 1000}

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


class PageWatch:
    """A page whose script errors and failed requests fail the test."""

    def __init__(self, browser: Any):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        self.page.on(
            "console",
            lambda message: (
                self.problems.append(f"console: {message.text}")
                if message.type == "error" and "401" not in message.text
                else None
            ),
        )

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watch(browser: Any) -> Iterator[PageWatch]:
    page = PageWatch(browser)
    yield page
    page.close()
    assert not page.problems, page.problems


def _admin_post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + path,
        data=orjson.dumps(body),
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return orjson.loads(response.read())


# --- sign-in and a pin ------------------------------------------------------------------------


@pytest.fixture
def adaptive_gateway(tmp_path: Path, fake_cloud: FakeCloudServer) -> Iterator[AdaptiveGateway]:
    with running_adaptive_gateway(tmp_path, fake_cloud) as gateway:
        gateway.gateway.app.timeline.interval_s = 1.0
        yield gateway


def test_sign_in_then_a_pin_shows_on_the_page(adaptive_gateway: AdaptiveGateway, watch: PageWatch) -> None:
    page, url = watch.page, adaptive_gateway.url
    for i in range(6):
        adaptive_gateway.chat(f"question {i}")
        adaptive_gateway.chat(f"question {i}", model="gpt-4o-mini")

    page.goto(url + "/ui")
    assert page.url == url + "/ui/"
    page.fill("#key", "not-the-key")
    page.click("button[type=submit]")
    assert "not the admin key" in page.inner_text(".login .error")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    card = page.locator(f'[data-route="{ROUTE}"]')
    card.locator('[data-role="mode"][data-mode="local"]').wait_for(timeout=15_000)
    cookie = next(c for c in watch.context.cookies() if c["name"] == "understudy_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN_KEY not in cookie["value"]
    assert page.locator('[data-route="default"] [data-role="mode"]').inner_text().lower() == "cloud"
    assert "3 transitions" in card.inner_text()

    # pinned through the admin API: the page shows it by itself (it polls)
    assert _admin_post(url, f"/admin/routes/{ROUTE}/mode", {"mode": "cloud"})["pinned"] == "cloud"
    card.locator('[data-role="pinned"]').wait_for(timeout=15_000)
    assert card.locator('[data-role="pinned"]').inner_text() == "pinned: cloud"
    assert card.get_attribute("data-serving") == "cloud"
    assert adaptive_gateway.chat("served by?")[0] == "cloud"
    page.wait_for_timeout(2500)  # a couple of traffic samples on the charts
    print("screenshot:", watch.screenshot("dashboard-pinned.png"))

    # and back to auto from the page itself (the session cookie authenticates the change)
    card.locator(".pin-controls button", has_text="Auto").click()
    card.locator('[data-role="pinned"]').wait_for(state="detached", timeout=15_000)
    assert adaptive_gateway.gateway.app.services.controller.describe(ROUTE)["pinned"] is None  # type: ignore[union-attr]


def sign_in(page: Any, url: str) -> None:
    page.goto(url + "/ui/")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")


def test_a_key_in_the_url_is_not_a_sign_in_and_sign_out_ends_the_session(
    adaptive_gateway: AdaptiveGateway, watch: PageWatch
) -> None:
    url = adaptive_gateway.url
    watch.page.goto(f"{url}/ui?key={ADMIN_KEY}")
    assert watch.page.url == url + "/ui/"  # the redirect dropped the key
    watch.page.goto(f"{url}/ui/?key={ADMIN_KEY}")
    assert "not used" in watch.page.inner_text(".login .error")
    assert not [c for c in watch.context.cookies() if c["name"] == "understudy_admin"]
    sign_in(watch.page, url)
    watch.page.locator(f'[data-route="{ROUTE}"] [data-role="mode"]').wait_for(timeout=15_000)
    (cookie,) = [c for c in watch.context.cookies() if c["name"] == "understudy_admin"]
    watch.page.click(".signout button")
    watch.page.locator("#key").wait_for(timeout=5_000)
    # A copy of the cookie taken before the sign-out is refused now.
    request = urllib.request.Request(
        url + "/admin/routes", headers={"cookie": f"understudy_admin={cookie['value']}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


# --- a real adaptive cycle, followed live -----------------------------------------------------


def _grade_or_answer(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"] if body.get("messages") else ""
    if "strict grader" in str(system):
        return orjson.dumps({"similarity": 88, "precision": 84, "reason": "same meaning, shorter"}).decode()
    question = str(body["messages"][-1]["content"])
    return f"Ticket category: {question.split()[-1].upper()}"


@pytest.fixture
def cycle_gateway(tmp_path: Path, tiny_model_dir: Path) -> Iterator[RunningGateway]:
    cloud = FakeCloudServer(FakeCloud(answer=_grade_or_answer)).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    policy = {
        "min_samples": 6,
        "promote_after": 3,
        "min_pass_rate": 0.0,
        "cooldown_s": 0,
        "eval_rate": 1.0,
        "window": 6,
        "threshold": 70,
        "judge": "upstream",
    }
    settings = load_settings(
        config,
        environ={},
        data_dir=tmp_path / "data",
        admin_key=ADMIN_KEY,
        upstream={"base_url": cloud.base_url, "retry": {"attempts": 1}},
        local={"enabled": True, "model": str(tiny_model_dir), "port": port, "startup_timeout_s": 120},
        routes=[
            {
                "name": "support",
                "match": ["support-*"],
                "upstream_model": "gpt-4o-mini",
                "adapt": True,
                "local_model": str(tiny_model_dir),
                "policy": policy,
            }
        ],
    )
    gateway = start_gateway(settings)
    gateway.app.timeline.interval_s = 1.0
    gateway.wait_backend_healthy(120)
    yield gateway
    gateway.stop()
    cloud.stop()


def _until(condition: Callable[[], bool], feed: Callable[[], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        feed()
        time.sleep(0.3)


def test_the_page_follows_a_route_from_cloud_to_local(
    cycle_gateway: RunningGateway, watch: PageWatch
) -> None:
    page = watch.page
    client = openai.OpenAI(base_url=cycle_gateway.url + "/v1", api_key="sk-x", max_retries=0)
    topics = iter(f"my order number {i} never arrived, category please: shipping{i}" for i in range(10_000))

    def ask() -> None:
        client.chat.completions.create(
            model="support-1", messages=[{"role": "user", "content": next(topics)}], max_tokens=8
        )

    sign_in(page, cycle_gateway.url)
    card = page.locator('[data-route="support"]')
    card.locator('[data-role="mode"][data-mode="cloud"]').wait_for(timeout=15_000)
    assert "No transitions yet" in card.inner_text()

    for _ in range(3):  # a route collecting pairs says how far it is from its next job
        ask()
    pending = card.locator('[data-role="pending-pairs"]')
    _until(lambda: "3 collected" in (pending.inner_text() if pending.count() else ""), lambda: None, 30)
    assert "next training at 6 new pairs" in pending.inner_text()
    for _ in range(5):  # enough new pairs: training starts
        ask()
    mode = card.locator('[data-role="mode"]')
    _until(lambda: mode.get_attribute("data-mode") in ("training", "eval", "local"), lambda: None, 60)
    if mode.get_attribute("data-mode") == "training":
        watch.screenshot("dashboard-training.png")
    # shadow evaluations of live traffic promote it
    _until(lambda: mode.get_attribute("data-mode") == "local", ask, 240)
    for _ in range(4):  # served locally now, with spot checks
        ask()
    page.wait_for_timeout(3500)

    text = card.inner_text()
    assert "serving-ready v1" in text
    assert "training" in text and "eval" in text  # the transitions are listed
    evals = card.locator(".eval")
    assert evals.count() >= 1
    first = evals.first
    assert first.locator(".answer.cloud pre").inner_text().startswith("Ticket category:")
    assert first.locator(".answer.local pre").inner_text() != ""
    assert card.locator('[data-role="score"]').inner_text() != "\u2013"  # the dash shown without a score
    path = watch.screenshot("dashboard.png")
    print("screenshot:", path)
