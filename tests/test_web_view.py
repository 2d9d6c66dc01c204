"""The field view in a real browser: headless Chromium → Mosquitto's WebSockets listener.

Real parts only: the API server, Mosquitto started from the shipped config (its
WebSockets listener serves the page and carries MQTT), the bridge, `dispatch-cli`
to create a dispatch, and Debian's Chromium driven by Selenium. The page is
opened as `dispatch-bridge demo` prints it: credentials of the read-only `actor`
user in the URL fragment.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aiomqtt
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import DispatchId
from selenium import webdriver
from selenium.webdriver.common.by import By

from actor_sdk import wire
from testkit.api_server import ApiServerHandle, run_dispatch_cli
from testkit.bridge import BridgeFactory
from testkit.broker import WEB_SITE, Broker
from testkit.processes import wait_until
from tests.fixtures.browser import start_chromium

pytestmark = pytest.mark.slow

MICROGRID = 1
ON_TIME_S = 3.0
"""How late the page may show a start or stop (render throttle 250 ms, 2 loaded cores)."""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def page_url(broker: Broker, user: str = "actor") -> str:
    """The page on the broker's WebSockets listener, credentials in the fragment."""
    assert broker.ws_port is not None
    base = f"http://127.0.0.1:{broker.ws_port}/"
    username = quote(broker.username(user) or "")
    password = quote(broker.password(user) or "")
    fragment = (
        f"broker={quote(f'ws://127.0.0.1:{broker.ws_port}/', safe='')}&microgrid={MICROGRID}"
        f"&username={username}&password={password}"
    )
    return f"{base}#{fragment}"


def attribute(driver: webdriver.Chrome, element_id: str, name: str) -> str | None:
    value: str | None = driver.find_element(By.ID, element_id).get_attribute(name)
    return value


def running_ids(driver: webdriver.Chrome) -> set[int]:
    elements = driver.find_elements(By.CSS_SELECTOR, "#running [data-running-id]")
    return {int(e.get_attribute("data-running-id") or -1) for e in elements}


def when(predicate: object, timeout: float, what: str) -> float:
    """Poll `predicate()` until true; return the time it first was."""
    assert callable(predicate)
    wait_until(lambda: bool(predicate()), timeout, what, interval=0.05)
    return time.time()


def test_the_broker_serves_the_page_and_the_vendored_library(mqtt_broker: Broker) -> None:
    assert mqtt_broker.ws_port is not None
    for name in ("index.html", "app.js", "style.css", "vendor/mqtt.min.js"):
        url = f"http://127.0.0.1:{mqtt_broker.ws_port}/{name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.read() == (WEB_SITE / name).read_bytes()


async def test_the_page_shows_a_dispatch_run_and_the_bridge_going_offline(
    api_server: ApiServerHandle,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    browser: webdriver.Chrome,
) -> None:
    bridge = bridge_factory(api_server, mqtt_broker, (MICROGRID,))
    bridge.wait_synced()
    browser.get(page_url(mqtt_broker))
    await asyncio.to_thread(
        when,
        lambda: attribute(browser, "bridge-state", "data-state") == "online",
        20,
        "the page to show the bridge online",
    )

    code, output = await run_dispatch_cli(
        api_server, "create", str(MICROGRID), "WEB_VIEW", "7,8", "in 20 seconds", "6 seconds"
    )
    assert code == 0, output
    match = re.search(r"ID:\s+DID(\d+)", output)
    assert match is not None, output
    dispatch_id = int(match.group(1))
    async with api_server.client() as client:
        created = await client.get(
            microgrid_id=MicrogridId(MICROGRID), dispatch_id=DispatchId(dispatch_id)
        )
    start = created.start_time.timestamp()
    stop = start + (created.duration or timedelta()).total_seconds()

    # Before it runs: listed among the next starts (from the bridge's upcoming topic).
    await asyncio.to_thread(
        when,
        lambda: browser.find_elements(
            By.CSS_SELECTOR, f'#next-starts [data-upcoming-id="{dispatch_id}"]'
        ),
        15,
        "the page to list the dispatch among the next starts",
    )
    assert dispatch_id not in running_ids(browser)

    # Running at its start, with the time left; gone at its stop.
    started = await asyncio.to_thread(
        when, lambda: dispatch_id in running_ids(browser), 40, "the page to show it running"
    )
    assert start - 0.1 <= started <= start + ON_TIME_S, started - start
    row = browser.find_element(By.CSS_SELECTOR, f'#running [data-running-id="{dispatch_id}"]')
    assert re.search(r"\d+ s left", row.text), row.text
    stopped = await asyncio.to_thread(
        when, lambda: dispatch_id not in running_ids(browser), 30, "the page to show it stopped"
    )
    assert stop - 0.1 <= stopped <= stop + ON_TIME_S, stopped - stop

    # The bridge killed: the broker publishes its will, the page says offline.
    bridge.kill9()
    await asyncio.to_thread(
        when,
        lambda: attribute(browser, "bridge-state", "data-state") == "offline",
        60,
        "the page to show the bridge offline",
    )
    assert "offline" in browser.find_element(By.ID, "bridge-state").text


def test_without_credentials_the_page_asks_for_them(
    mqtt_broker: Broker, browser: webdriver.Chrome
) -> None:
    assert mqtt_broker.ws_port is not None
    browser.get(f"http://127.0.0.1:{mqtt_broker.ws_port}/")
    when(lambda: browser.find_element(By.ID, "login").is_displayed(), 10, "the login form")
    assert not browser.find_element(By.ID, "view").is_displayed()
    # Wrong credentials: refused, asked again; nothing is kept in storage.
    browser.find_element(By.ID, "login-username").send_keys("actor")
    browser.find_element(By.ID, "login-password").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    when(
        lambda: "refused" in browser.find_element(By.ID, "login-error").text,
        15,
        "the page to say the broker refused the credentials",
    )
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
    # Right ones: connected, read-only view of the microgrid.
    browser.find_element(By.ID, "login-username").clear()
    browser.find_element(By.ID, "login-username").send_keys(mqtt_broker.username("actor") or "")
    browser.find_element(By.ID, "login-password").send_keys(mqtt_broker.actor_password or "")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    when(
        lambda: attribute(browser, "connection", "data-state") == "connected",
        15,
        "the page to connect",
    )
    assert browser.find_element(By.ID, "view").is_displayed()


def big_tree(layout: wire.TopicLayout, now: datetime) -> dict[str, bytes]:
    """10,000 dispatches in 10 types, a tenth of them running, each type's upcoming list full."""
    topics: dict[str, bytes] = {}
    for type_index in range(10):
        dispatch_type = f"TYPE_{type_index}"
        dispatches = []
        for number in range(1000):
            dispatch_id = type_index * 1000 + number + 1
            start = now + timedelta(seconds=(number - 100) * 80)
            dispatches.append(
                wire.Dispatch(
                    id=dispatch_id,
                    type=dispatch_type,
                    start_time=start,
                    duration=3600,
                    target=wire.Target(ids=(1, 2)),
                    active=True,
                    dry_run=False,
                    payload={"power_w": number},
                    create_time=now,
                    update_time=now,
                    end_time=start + timedelta(hours=1),
                    running=start <= now,
                    until=start + timedelta(hours=1) if start <= now else None,
                    next_run=start if start > now else None,
                )
            )
        for dispatch in dispatches:
            topics[layout.dispatch(dispatch_type, dispatch.id)] = wire.encode(dispatch)
        running = tuple(d for d in dispatches if d.running)
        topics[layout.running(dispatch_type)] = wire.encode(
            wire.RunningSnapshot(
                microgrid_id=MICROGRID,
                type=dispatch_type,
                running=running,
                next_change=now + timedelta(seconds=80),
                as_of=now,
                session=1,
                seq=type_index,
            )
        )
        runs = tuple(
            wire.UpcomingRun(id=d.id, start=d.start_time, end=d.start_time + timedelta(hours=1))
            for d in dispatches
        )
        topics[layout.upcoming(dispatch_type)] = wire.encode(
            wire.UpcomingRuns(
                microgrid_id=MICROGRID,
                type=dispatch_type,
                runs=runs,
                as_of=now,
                until=now + timedelta(hours=24),
            )
        )
    return topics


async def test_the_page_stays_usable_with_10000_dispatches(
    mqtt_broker: Broker, browser: webdriver.Chrome
) -> None:
    layout = wire.TopicLayout.for_microgrid(MICROGRID)
    tree = big_tree(layout, datetime.now(UTC))
    async with aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as client:
        for topic, payload in tree.items():
            await client.publish(topic, payload, qos=1, retain=True)

    opened = time.monotonic()
    browser.get(page_url(mqtt_broker))
    # The first type's dispatches show within seconds, while the rest still arrive.
    await asyncio.to_thread(
        when,
        lambda: (
            int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-dispatches") or 0)
            >= 1000
        ),
        15,
        "the page to show the first thousand dispatches",
    )
    await asyncio.to_thread(
        when,
        lambda: (
            browser.find_element(By.TAG_NAME, "body").get_attribute("data-dispatches") == "10000"
        ),
        # Mosquitto 2.0.11's WebSockets listener sends large payloads in slow chunks
        # (eclipse-mosquitto/mosquitto#1390): ~2.5 s per type here (a 50 KB running
        # snapshot and a 70 KB upcoming list), whatever the page does.
        90,
        "the page to hold all 10,000 dispatches",
    )
    loaded = time.monotonic() - opened
    # Redraws stay short and the DOM small: capped lists, one canvas for the timeline.
    render_ms = []
    for _ in range(5):
        await asyncio.sleep(1.1)
        render_ms.append(
            float(
                browser.find_element(By.TAG_NAME, "body").get_attribute("data-render-ms") or "inf"
            )
        )
    rows = browser.execute_script("return document.getElementsByTagName('*').length")
    running = browser.find_elements(By.CSS_SELECTOR, "#running [data-running-id]")
    print(f"10k dispatches: loaded in {loaded:.1f} s, redraws {render_ms} ms, {rows} elements")
    assert loaded < 90
    # An uncapped list of 10,000 rows takes seconds per redraw; the capped page takes
    # ~100 ms on an idle machine (docs/broker.md), up to 307 ms seen with the suite
    # running in two processes on two cores: the bound tells the two apart, not the speed.
    assert max(render_ms) < 1000
    assert rows < 2000
    assert len(running) == 10 * 25  # 25 shown per type, "+ N more" for the rest
    more = browser.find_element(By.CSS_SELECTOR, '#running [data-type="TYPE_0"]').text
    assert "+ 76 more" in more
    assert browser.find_element(By.ID, "timeline").get_attribute("data-types") == "10"


async def test_the_page_tells_a_retained_online_from_a_live_one_and_shows_syncing(
    mqtt_broker: Broker, browser: webdriver.Chrome
) -> None:
    layout = wire.TopicLayout.for_microgrid(MICROGRID)

    def status(state: str, error: str | None = None) -> bytes:
        return wire.encode(
            wire.BridgeStatus(
                state=state,  # type: ignore[arg-type]
                upstream="disconnected",
                synced_at=None,
                session=3,
                bridge="test",
                version="0",
                dispatches=0,
                status_interval=5,
                error=error,
                contract=2,
            )
        )

    async with aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as client:
        await client.publish(layout.status, status("online"), qos=1, retain=True)
        browser.get(page_url(mqtt_broker))
        await asyncio.to_thread(
            when,
            lambda: attribute(browser, "connection", "data-state") == "connected",
            15,
            "the page to connect",
        )
        # Only the retained replay so far: not vouched for.
        await asyncio.to_thread(
            when,
            lambda: attribute(browser, "bridge-state", "data-state") == "unconfirmed",
            10,
            "the page to call a retained online unconfirmed",
        )
        await client.publish(layout.status, status("online"), qos=1, retain=True)
        await asyncio.to_thread(
            when,
            lambda: attribute(browser, "bridge-state", "data-state") == "online",
            10,
            "the page to show online after a live status",
        )
        problem = "the Dispatch API refused the key: check DISPATCH_API_AUTH_KEY"
        await client.publish(layout.status, status("syncing", problem), qos=1, retain=True)
        await asyncio.to_thread(
            when,
            lambda: attribute(browser, "bridge-state", "data-state") == "syncing",
            10,
            "the page to show syncing",
        )
        assert problem in browser.find_element(By.ID, "bridge-state").text
        assert problem in browser.find_element(By.ID, "status-details").text
