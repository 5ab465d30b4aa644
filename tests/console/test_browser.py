"""The console in a real browser (headless Chromium from Debian's packages, through
Selenium) against a live cluster: a reviewer watches a run go live, approves its gated
steps and sees it complete; the requester sees the approval but has no button, and her
forged decision is refused by the API; a goal with markup shows as text.

With ``CUGA_CONSOLE_SCREENSHOTS=DIR`` the live test saves the run page and the approval
queue as PNG files there (``docs/`` holds the ones docs/console.md shows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.console import TRANSFER, LiveConsole, step
from tests.support.servers import token_of

pytestmark = pytest.mark.xdist_group("console")

#: Longest a test waits for the page to show something.
WAIT_S = 30


def sign_in(browser: Any, live: LiveConsole, **tokens: str) -> None:
    browser.delete_all_cookies()
    browser.get(live.url + "/signin")
    for area, token in tokens.items():
        browser.find_element(By.ID, f"{area}_token").send_keys(token)
    browser.find_element(By.ID, "signin").click()
    WebDriverWait(browser, WAIT_S).until(lambda b: "/signin" not in b.current_url)


def step_state(browser: Any, step_id: str) -> str:
    node = browser.find_element(By.CSS_SELECTOR, f'g.step[data-step="{step_id}"]')
    return str(node.get_attribute("class")).removeprefix("step state-")


def wait_step(browser: Any, step_id: str, state: str) -> None:
    WebDriverWait(browser, WAIT_S).until(
        lambda b: step_state(b, step_id) == state,
        message=f"step {step_id} never showed {state}",
    )


def approve_in_queue(browser: Any, live: LiveConsole, approval_id: str, reason: str) -> None:
    browser.get(live.url + "/approvals")
    section = browser.find_element(By.ID, approval_id)
    section.find_element(By.NAME, "reason").send_keys(reason)
    section.find_element(By.CSS_SELECTOR, "button.approve").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_elements(By.ID, "decided"), message="no decision shown"
    )
    assert f"{approval_id} APPROVED" in browser.find_element(By.ID, "decided").text


def shoot(browser: Any, name: str) -> None:
    folder = os.environ.get("CUGA_CONSOLE_SCREENSHOTS")
    if folder:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(max(int(height) + 40, 600), 2400))
        browser.save_screenshot(str(Path(folder) / name))
        browser.set_window_size(1280, 900)


def test_a_reviewer_watches_a_run_go_live_approves_and_sees_it_complete(
    live: LiveConsole, chromium: Any
) -> None:
    browser = chromium
    run_id = live.start_run(
        "pay the supplier and the bank fee, then report",
        [
            step("lookup", "web_search", query="supplier FR00TEST0002"),
            step("total", "calculator", expression="1200 + 35"),
            step("pay", "transfer_funds", ("lookup", "total"), **TRANSFER),
            step("fee", "transfer_funds", ("pay",), **{**TRANSFER, "amount": 35}),
            step("report", "echo", ("fee",), text="paid 1200 + 35 EUR"),
        ],
    )
    pay = live.pending_approval(run_id, "pay")
    sign_in(browser, live, runs=token_of("client"), approvals=token_of("reviewer"))

    # The runs list has it, RUNNING; its page draws the plan and follows it live.
    browser.get(live.url + "/runs?state=RUNNING")
    browser.find_element(By.CSS_SELECTOR, f'tr[data-run="{run_id}"] a').click()
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "live-status").text == "live"
    )
    assert step_state(browser, "pay") == "approval"
    assert step_state(browser, "report") == "pending"
    assert browser.find_element(By.ID, "run-state").text == "RUNNING"
    timeline = browser.find_element(By.ID, "timeline").text
    assert "chose" in timeline or "policy" in timeline  # routing reasoning is shown
    countdown = browser.find_element(By.CSS_SELECTOR, f'li[data-approval="{pay}"] .countdown')
    assert countdown.text.endswith("s left")
    run_tab = browser.current_window_handle
    browser.execute_script("document.body.dataset.marker = 'not reloaded'")

    # Approve "pay" in a second tab; the run page changes by itself (no reload).
    browser.switch_to.new_window("tab")
    approve_in_queue(browser, live, pay, "invoice 2026-117 checked")
    browser.switch_to.window(run_tab)
    wait_step(browser, "pay", "done")
    wait_step(browser, "fee", "approval")
    assert browser.execute_script("return document.body.dataset.marker") == "not reloaded"
    assert (
        f"APPROVED by reviewer ({pay}): invoice 2026-117 checked"
        in browser.find_element(By.ID, "timeline").text
    )
    fee = live.pending_approval(run_id, "fee")
    shoot(browser, "console-run.png")

    browser.switch_to.window(browser.window_handles[-1])
    browser.get(live.url + "/approvals")
    shoot(browser, "console-approvals.png")
    approve_in_queue(browser, live, fee, "bank fee as agreed")
    browser.close()
    browser.switch_to.window(run_tab)

    # The run completes: the page reloads at the terminal event and shows the result.
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "run-state").text == "COMPLETED",
        message="the run page never showed COMPLETED",
    )
    for sid in ("lookup", "total", "pay", "fee", "report"):
        assert step_state(browser, sid) == "done"
    assert not browser.find_elements(By.ID, "cancel")
    assert "5 completed, 0 failed" in browser.find_element(By.ID, "summary").text
    assert live.run_state(run_id) == "COMPLETED"


def test_the_requester_sees_the_approval_but_cannot_decide_it(
    live: LiveConsole, chromium: Any
) -> None:
    browser = chromium
    run_id = live.start_run("pay the invoice", [step("pay", "transfer_funds", **TRANSFER)])
    approval_id = live.pending_approval(run_id)
    sign_in(browser, live, runs=token_of("client"))  # she started it: client only

    browser.get(f"{live.url}/runs/{run_id}")
    item = browser.find_element(By.CSS_SELECTOR, f'li[data-approval="{approval_id}"]')
    assert "rule" in item.text and item.find_element(By.CLASS_NAME, "countdown").text
    assert not browser.find_elements(By.CSS_SELECTOR, "button.approve")
    assert not item.find_elements(By.LINK_TEXT, "decide")
    assert "approvals" not in browser.find_element(By.TAG_NAME, "nav").text

    # The queue: the approval service refuses her, so no button either.
    browser.get(live.url + "/approvals")
    assert "UNAUTHENTICATED" in browser.find_element(By.ID, "refusal").text
    assert not browser.find_elements(By.CSS_SELECTOR, "button.approve")

    # A forged POST from her own session, with her valid CSRF token: the API refuses it.
    browser.get(f"{live.url}/runs/{run_id}")
    browser.execute_script(
        """
        const form = document.createElement('form');
        form.method = 'post';
        form.action = '/approvals/' + encodeURIComponent(arguments[0]) + '/decide';
        for (const [k, v] of Object.entries({verdict: 'approve', reason: 'my own',
            csrf: document.querySelector('input[name=csrf]').value})) {
          const input = document.createElement('input');
          input.name = k; input.value = v; form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();
        """,
        approval_id,
    )
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.ID, "refusal"))
    refusal = browser.find_element(By.ID, "refusal").text
    assert "the approval service" in refusal and "UNAUTHENTICATED" in refusal
    assert live.run_state(run_id) == "RUNNING"


def test_a_goal_with_markup_is_shown_as_text(live: LiveConsole, chromium: Any) -> None:
    browser = chromium
    goal = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
    run_id = live.start_run(goal, [step("say", "echo", text="<script>alert(1)</script>")])
    sign_in(browser, live, runs=token_of("client"))
    for page in ("/runs", f"/runs/{run_id}"):
        browser.get(live.url + page)
        assert browser.title != "pwned"
        assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img")
    assert browser.find_element(By.ID, "goal").text == goal
    WebDriverWait(browser, WAIT_S).until(
        lambda b: "<script>alert(1)</script>" in b.find_element(By.ID, "timeline").text
    )
    assert browser.title != "pwned"
