"""The web console in a real browser: Debian's headless Chromium driven by
Selenium through /usr/bin/chromedriver, against a live sidecar with a real
worker whose agent suspends a tool call. The test starts the run, sees it
appear in the runs list and its page, approves the call in the approvals
inbox, and sees the run succeed; at a phone's width the inbox still fits and
its buttons are reached with the keyboard; a 20,000-item map-reduce streams
into its page without freezing it (no task of the page's over a second).

`CARSVC_SCREENSHOTS=docs/console` saves the run page and the inbox there (the
PNGs docs/console.md shows); otherwise they go to the test's tmp_path."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Result
from tests.conftest import TEST_SETTINGS, Workers
from tests.procs import ROOT, free_port

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
LAPTOP = (1280, 900)
PHONE = (390, 844)
WAIT_S = 15

_T = TypeVar("_T")


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(TEST_SETTINGS, console_port=free_port())


@pytest.fixture
async def browser() -> AsyncIterator[webdriver.Chrome]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("the console's browser test needs Chromium: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = await asyncio.to_thread(webdriver.Chrome, service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


class Page:
    """The browser, driven from a thread so the sidecar's loop keeps serving it."""

    def __init__(self, driver: webdriver.Chrome, base: str) -> None:
        self.driver = driver
        self.base = base

    async def do(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.to_thread(fn, *args)

    async def open(self, hash_: str) -> None:
        await self.do(self.driver.get, self.base + hash_)

    async def wait(self, condition: Callable[[webdriver.Chrome], Any], what: str, seconds: float = WAIT_S) -> Any:
        waiting = WebDriverWait(self.driver, seconds, poll_frequency=0.05)
        try:
            return await self.do(waiting.until, condition, what)
        except TimeoutException:
            shown = await self.do(self.driver.execute_script, "return document.body.innerText")
            logs = await self.do(self.driver.get_log, "browser")
            message = f"{what} within {seconds}s; the page shows:\n{shown[:3000]}\nits log: {logs}"
            raise AssertionError(message) from None

    async def element(self, css: str) -> WebElement:
        found: WebElement = await self.wait(ec.visibility_of_element_located((By.CSS_SELECTOR, css)), f"no {css}")
        return found

    async def text(self, css: str, text: str, seconds: float = WAIT_S) -> None:
        found = ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text)
        await self.wait(found, f"no {text!r} in {css}", seconds)

    async def click(self, css: str) -> None:
        element = await self.wait(ec.element_to_be_clickable((By.CSS_SELECTOR, css)), f"cannot click {css}")
        await self.do(element.click)

    async def shot(self, directory: Path, name: str) -> None:
        """The whole page at the laptop's width."""
        await asyncio.sleep(0.4)  # a redraw or two after the last change
        height = await self.do(self.driver.execute_script, "return document.documentElement.scrollHeight")
        await self.do(self.driver.set_window_size, LAPTOP[0], max(LAPTOP[1], min(int(height) + 160, 4000)))
        await asyncio.sleep(0.2)
        await self.do(self.driver.save_screenshot, str(directory / f"{name}.png"))
        await self.do(self.driver.set_window_size, *LAPTOP)


def screenshots(tmp_path: Path) -> Path:
    chosen = os.environ.get("CARSVC_SCREENSHOTS")
    directory = Path(ROOT, chosen) if chosen else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def test_a_suspended_tool_call_is_approved_in_the_console_and_the_run_succeeds(
    sidecar: Sidecar, client: Client, workers: Workers, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    async def ops(ctx: AgentContext) -> Result:
        ctx.progress("planning the clean-up", 0.4)
        await ctx.state.set("plan", {"delete": ["build/", "dist/"], "keep": ["src/"]})
        decision = await ctx.suspend_tool_call(
            "call-1", "shell", {"cmd": "rm -rf build dist", "cwd": "/srv/app"}, reason="deletes build output"
        )
        answer = "deleted build/ and dist/" if decision.approved else f"skipped: {decision.reason}"
        return Result(answer=answer, input_tokens=1200, output_tokens=80, cost_usd=0.0021)

    async def summarize(ctx: AgentContext) -> Result:
        return Result(answer=f"summary of {ctx.task.split()[-1]}", input_tokens=300, output_tokens=40, cost_usd=0.0004)

    await workers.start({"ops": ops, "summarizer": summarize, "combiner": lambda ctx: asyncio.sleep(0, "combined")},
                        max_in_flight=4, labels={"zone": "eu-1"})
    # A finished run for the list, then the browser.
    await client.run(map_reduce(agent("summarizer"), agent("combiner"), "Summarize",
                                [f"src/module_{i}.py" for i in range(12)]), agent_id="alice")
    page = Page(browser, f"http://127.0.0.1:{sidecar.console_port}/")
    shots = screenshots(tmp_path)

    # Act as the owner the run will have.
    await page.open("#/runs")
    await page.click("#connection summary")
    agent_id = await page.element("#agent-id")
    await page.do(agent_id.send_keys, "alice")
    await page.click("#connection-form button[type=submit]")
    await page.text("table.runs tbody", "map_reduce")

    # The run appears in the list while the page is open, waiting for a decision.
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "tidy the build directory"),
                                    agent_id="alice", labels={"ticket": "OPS-42"})
    row = f'tr[data-run-id="{handle.run_id}"]'
    await page.text(row, "WAITING")

    # Its page: the suspended call with its arguments, the agent, the state scope.
    await page.click(f"{row} a")
    await page.text(".run-head", "WAITING")
    await page.text(".approval", "rm -rf build dist")
    await page.text("table.agents", "waiting")
    await page.text("table.events", "tool_call_suspended")
    await page.text(".keys", "plan")
    await page.shot(shots, "run")

    # The inbox: the same call; Approve.
    await page.click('a[data-nav="approvals"]')
    card = f'.approval[data-run-id="{handle.run_id}"]'
    await page.text(card, '"cmd": "rm -rf build dist"')
    await page.text(card, "deletes build output")
    await page.shot(shots, "approvals")
    await page.click(f"{card} button.approve")
    await page.text(f"{card} .outcome", "Approved: delivered to the agent.")

    # The run succeeds, live on its page.
    await page.click(f"{card} a")
    await page.text(".run-head", "SUCCEEDED")
    await page.text("table.agents", "deleted build/ and dist/")
    await page.text(".ending", "completed")
    run = await client.get_run(handle.run_id)
    assert run.result.single.output.answer == "deleted build/ and dist/"

    # Workers with their load.
    await page.click('a[data-nav="workers"]')
    await page.text("table.workers", "eu-1")

    errors = [e for e in await page.do(browser.get_log, "browser") if e["level"] == "SEVERE"]
    assert not errors, errors


async def test_the_inbox_fits_a_phone_and_its_buttons_are_reached_with_the_keyboard(
    sidecar: Sidecar, client: Client, workers: Workers, browser: webdriver.Chrome
) -> None:
    async def ops(ctx: AgentContext) -> str:
        decision = await ctx.suspend_tool_call("call-9", "deploy", {"service": "api", "version": "2.4.1"})
        return "deployed" if decision.approved else f"not deployed: {decision.reason}"

    await workers.start({"ops": ops})
    handle = await client.start_run(single(agent("ops", tools=["deploy"]), "ship it"))
    page = Page(browser, f"http://127.0.0.1:{sidecar.console_port}/")
    await page.do(browser.set_window_size, *PHONE)
    await page.open("#/approvals")
    card = f'.approval[data-run-id="{handle.run_id}"]'
    await page.text(card, '"version": "2.4.1"')
    overflow = await page.do(browser.execute_script,
                             "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone"

    # Tab from the top of the page reaches the note, then Approve and Deny.
    def tab() -> str:
        browser.switch_to.active_element.send_keys(Keys.TAB)
        return browser.switch_to.active_element.get_attribute("aria-label") or ""

    reached: list[str] = []
    while len(reached) < 30 and not (reached and reached[-1].startswith("Deny")):
        reached.append(await page.do(tab))
    assert any(label.startswith("Approve deploy") for label in reached), reached
    assert reached[-1].startswith("Deny deploy"), reached

    def enter() -> None:
        browser.switch_to.active_element.send_keys(Keys.ENTER)

    await page.do(enter)  # Deny, from the keyboard
    await page.text(f"{card} .outcome", "Denied: delivered to the agent.")
    async with asyncio.timeout(10):
        run = await client.wait(handle.run_id)
    assert run.result.single.output.answer == "not deployed: "


async def test_a_20000_item_map_reduce_streams_into_its_page_without_freezing_it(
    browser: webdriver.Chrome,
) -> None:
    # Every event retained, so the page that joins a moment late still counts every agent.
    settings = dataclasses.replace(TEST_SETTINGS, console_port=free_port(), event_retention=100_000)
    sidecar = Sidecar(settings)
    await sidecar.start()
    pool = Workers(sidecar.address)
    try:
        await pool.start({"mapper": lambda ctx: asyncio.sleep(0, "ok"), "reducer": lambda ctx: asyncio.sleep(0, "all")},
                         max_in_flight=256)
        page = Page(browser, f"http://127.0.0.1:{sidecar.console_port}/")
        await page.open("#/runs")
        await page.element("table.runs")
        # Long tasks (over 50 ms) of the page's main thread from here on; the longest is a freeze.
        await page.do(browser.execute_script, """
            window.longest = 0;
            new PerformanceObserver((list) => {
              for (const entry of list.getEntries()) window.longest = Math.max(window.longest, entry.duration);
            }).observe({ type: "longtask" });
        """)
        async with Client(sidecar.address) as client:
            await client.start_run(map_reduce(agent("mapper"), agent("reducer"), "map",
                                              [f"item-{i}" for i in range(20_000)]), run_id="big")
            await page.do(browser.execute_script, "location.hash = '#/runs/big'")
            await page.text(".run-head", "SUCCEEDED", 60)  # some 5 s on a quiet machine
            await page.text(".totals", "20,001 started · 0 running · 20,001 succeeded")
        rows = await page.do(browser.execute_script, """return [
            document.querySelectorAll("table.events tbody tr").length,
            document.querySelectorAll("table.agents tbody tr").length]""")
        assert rows == [50, 25]
        longest = await page.do(browser.execute_script, "return window.longest")
        assert longest < 1000, f"the page froze for {longest:.0f} ms"
    finally:
        await pool.stop_all()
        await sidecar.stop(grace=0.5)


async def test_with_tokens_the_console_asks_for_one_and_sends_it_on_every_request(
    browser: webdriver.Chrome,
) -> None:
    settings = dataclasses.replace(
        TEST_SETTINGS, console_port=free_port(), worker_tokens="w-token-0123456789", client_tokens="c-token-0123456789"
    )
    sidecar = Sidecar(settings)
    await sidecar.start()
    pool = Workers(sidecar.address)
    try:
        async def ops(ctx: AgentContext) -> str:
            await ctx.suspend_tool_call("call-2", "shell", {"cmd": "ls"})
            return "done"

        await pool.start({"ops": ops}, token="w-token-0123456789")
        async with Client(sidecar.address, token="c-token-0123456789") as client:
            handle = await client.start_run(single(agent("ops", tools=["shell"]), "look"))
        page = Page(browser, f"http://127.0.0.1:{sidecar.console_port}/")
        await page.open("#/runs")
        await page.text("#notice", "This sidecar needs a client token")
        token = await page.element("#token")  # the form opened by itself, the field focused
        assert await page.do(lambda: browser.switch_to.active_element == token)
        await page.do(token.send_keys, "c-token-0123456789", Keys.ENTER)
        await page.text(f'tr[data-run-id="{handle.run_id}"]', "WAITING")
        await page.open(f"#/runs/{handle.run_id}")  # a new page load: the token is kept in the tab
        await page.text("table.events", "tool_call_suspended")  # the event stream carries it too
        stored = await page.do(browser.execute_script, "return Object.keys(localStorage).length")
        assert stored == 0  # sessionStorage only
    finally:
        await pool.stop_all()
        await sidecar.stop(grace=0.5)
