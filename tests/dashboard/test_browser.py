"""The dashboard in headless Chromium: log in (password and TOTP), read a value
injected over RMF TCP, acknowledge the alarm it raised, and be refused another
hospital's page; a commission analyst sees only the de-identified view."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from rmiot.core_ext import ACK_OK
from rmiot.ingest.client import RmfClient
from tests.alarms.conftest import frame
from tests.conftest import eventually
from tests.dashboard.conftest import ARTIFACTS, HR, PASSWORD, SPO2, City
from tests.ingest.conftest import now_us

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def injected(city: City) -> float:
    """One frame of device A over TCP, heart rate high enough to raise an alarm."""
    assert city.platform.ingest is not None
    client = RmfClient("127.0.0.1", city.platform.ingest.tcp.port)
    await client.connect()
    try:
        client.send(frame(city.hospital_a, city.device_a, 1, now_us(),
                          [(HR, 1, 188.0), (SPO2, 1, 97.25)]), city.device_a, 1)
        await client.drain()
        assert await client.wait_acked(10)
        assert client.statuses == {ACK_OK: 1}
    finally:
        await client.close()
    await eventually(lambda: _alarm_state(city), 10)  # the rule engine raised it
    return 97.25


def _alarm_state(city: City) -> str:
    with city.conn() as conn:
        row = conn.execute("SELECT state FROM alarms WHERE device_id = %s ORDER BY id DESC",
                           (city.device_a,)).fetchone()
    return str(row[0]) if row else ""


async def _log_in(page: Page, city: City, name: str) -> None:
    await page.goto(city.url)
    await page.fill("input[name=username]", city.user(name))
    await page.fill("input[name=password]", PASSWORD)
    if name in city.totp:
        await page.fill("input[name=totp]", city.code(name))
    await page.click("button[type=submit]")
    await expect(page.locator("#who")).to_contain_text(city.user(name))


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    yield page
    await page.screenshot(path=ARTIFACTS / f"{request.node.name}-end.png", full_page=True)
    await context.close()


async def test_login_refused_then_accepted(page: Page, city: City) -> None:
    await page.goto(city.url)
    await page.fill("input[name=username]", city.user("ops-a"))
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")  # no TOTP code: an administrator needs one
    await expect(page.locator("#login-error")).to_contain_text("TOTP")
    await _log_in(page, city, "ops-a")
    tree = page.locator("#tree")
    await expect(tree).to_contain_text("Hospital A")
    await expect(tree).to_contain_text("A Emergency")
    await expect(tree).not_to_contain_text("Hospital B")
    await page.screenshot(path=ARTIFACTS / "overview.png", full_page=True)


async def test_reads_the_value_injected_over_tcp(page: Page, city: City,
                                                 injected: float) -> None:
    await _log_in(page, city, "ops-a")
    await page.goto(f"{city.url}device/{city.device_a}")
    await expect(page.locator(f'#latest td[data-metric="{SPO2}"]')).to_have_text(
        f"{injected:.2f}")
    await expect(page.locator("svg.chart").first).to_be_visible()
    await page.screenshot(path=ARTIFACTS / "device.png", full_page=True)


async def test_acknowledge_an_alarm(page: Page, city: City, injected: float) -> None:
    await _log_in(page, city, "ops-a")
    row = page.locator("#alarms tr[data-alarm]").filter(has_text="hr-high")
    await expect(row).to_have_attribute("data-state", "active")
    await row.locator("button.ack").click()
    await expect(page.locator("#alarms tr[data-alarm]").filter(has_text="hr-high")
                 ).to_have_attribute("data-state", "acknowledged")
    assert _alarm_state(city) == "acknowledged"
    with city.conn() as conn:
        acked_by = conn.execute("SELECT acked_by FROM alarms WHERE device_id = %s",
                                (city.device_a,)).fetchone()
    assert acked_by == (f"user:{city.user('ops-a')}",)

    def audited() -> bool:  # the audit log appends in the background
        with city.conn() as conn:
            row = conn.execute(
                "SELECT count(*) FROM audit_log WHERE actor = %s AND method = "
                "'HTTP POST /api/alarms/{id}/{action}' AND outcome = 'ok'",
                (f"user:{city.user('ops-a')}",)).fetchone()
        return row is not None and row[0] >= 1

    await eventually(audited, 10)
    await page.screenshot(path=ARTIFACTS / "alarm-acknowledged.png", full_page=True)


async def test_hospital_user_cannot_open_another_hospitals_page(page: Page,
                                                                city: City) -> None:
    await _log_in(page, city, "ops-a")
    await page.goto(f"{city.url}hospital/{city.hospital_a}")
    await expect(page.locator("#page-title")).to_have_text("Hospital A")
    await page.goto(f"{city.url}hospital/{city.hospital_b}")
    await expect(page.locator("#notfound")).to_be_visible()
    await expect(page.locator("#view")).not_to_contain_text("Hospital B")
    await page.screenshot(path=ARTIFACTS / "other-hospital-refused.png", full_page=True)
    for path in (f"api/hospital/{city.hospital_b}", f"api/device/{city.device_b}"):
        reply = await page.request.get(city.url + path)
        assert reply.status == 404, path
    # And the other way round: hospital B's user does not see hospital A.
    other = await page.context.browser.new_context()  # type: ignore[union-attr]
    page_b = await other.new_page()
    await _log_in(page_b, city, "nurse-b")
    await page_b.goto(f"{city.url}device/{city.device_a}")
    await expect(page_b.locator("#notfound")).to_be_visible()
    await other.close()


async def test_commission_sees_deidentified_regional_view(browser: Browser, city: City,
                                                          injected: float) -> None:
    context = await browser.new_context(viewport={"width": 390, "height": 844})  # a phone
    page = await context.new_page()
    try:
        await _log_in(page, city, "analyst")
        await expect(page.locator("#who")).to_contain_text("de-identified")
        await expect(page.locator("#tree")).to_contain_text("Hospital B")
        await expect(page.locator("#tree a")).to_have_count(0)  # no drill-down
        await page.screenshot(path=ARTIFACTS / "commission-phone.png", full_page=True)
        reply = await page.request.get(f"{city.url}api/device/{city.device_a}")
        assert reply.status == 404
        body = await (await page.request.get(f"{city.url}api/overview")).json()
        assert body["alarms"]["open"] == []
        assert all("device" not in c for c in body["alarms"]["counts"])
    finally:
        await context.close()


async def test_api_needs_a_session_and_the_header(city: City) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{city.url}api/overview") as response:
            assert response.status == 401
        async with http.post(f"{city.url}api/login", json={
                "username": city.user("nurse-b"), "password": PASSWORD}) as response:
            assert response.status == 403  # no X-Rmiot header: a cross-site form


async def test_requests_and_rpcs_are_traced_with_their_tenant(city: City,
                                                              injected: float) -> None:
    """The dashboard's requests and the RPCs they make carry the tenant."""
    finished = city.spans.get_finished_spans()
    user = f"user:{city.user('ops-a')}"
    rpcs = [s for s in finished if s.name == "rmiot.v1.AlarmService/Acknowledge"]
    assert rpcs and all(s.attributes for s in rpcs)
    assert rpcs[0].attributes  # the alarm's tenant: the device's department
    assert rpcs[0].attributes["rmiot.tenant"] == city.department_a
    assert rpcs[0].attributes["enduser.id"] == user
    assert rpcs[0].attributes["rpc.grpc.status_code"] == 0
    pages = [s for s in finished if s.name == "HTTP GET /api/device/{id}" and s.attributes
             and s.attributes["enduser.id"] == user]
    assert pages and pages[0].attributes and pages[0].attributes["http.response.status_code"] == 200
    # The injected frame's own trace, from the socket to the commit.
    batches = [s for s in finished if s.name == "ingest.batch" and s.attributes
               and s.attributes["rmiot.device"] == city.device_a]
    assert batches and batches[0].attributes and batches[0].attributes["rmiot.transport"] == "tcp"
