"""The arena and the admin page in headless Chromium: a playground user
compares two checkpoints blind and votes, the vote reveals them; then the
admin page (GET /admin/training) shows the leaderboard those votes made and
the labeler quality table from the newest reward model's manifest.

Needs INSTRUCTD_URL, INSTRUCTD_ADMIN_KEY and INSTRUCTD_ARENA_CANDIDATE (the
second loaded checkpoint's id); Chromium and chromedriver as
playground_browser.py."""

import os
import time

import httpx
from selenium.webdriver.common.by import By

from common import BASE, admin_headers, create_key, ok
from playground_browser import drive

CANDIDATE = os.environ["INSTRUCTD_ARENA_CANDIDATE"]


def arena_flow(page, secret):
    page.d.get(f"{BASE}/playground")
    page.use_key(secret)
    page.by("arena-prompt").send_keys("Hello there")
    page.by("arena-start").click()
    page.wait("two answers", lambda: page.by("arena-battle").is_displayed())
    page.no_error()
    shown = page.by("arena").text
    assert CANDIDATE not in shown, f"the arena names a checkpoint before the vote: {shown!r}"
    page.shot("arena-battle")
    page.by("arena-vote-a").click()
    page.wait("the vote's receipt", lambda: page.by("arena-result").is_displayed())
    page.no_error()
    result = page.by("arena-result").text
    assert "Vote recorded" in result and CANDIDATE in result, result
    assert not page.by("arena-battle").is_displayed(), "a voted battle stays on screen"
    ok(f"arena: battle shown blind, vote revealed the checkpoints ({result})")


def admin_flow(page):
    page.d.get(f"{BASE}/admin/training")
    page.by("key-input").send_keys(admin_headers()["Authorization"].removeprefix("Bearer "))
    page.by("key-save").click()
    page.wait("leaderboard rows", lambda: len(page.all("leaderboard-row")) == 2)
    page.no_error()
    ids = [r.get_attribute("data-id") for r in page.all("leaderboard-row")]
    assert CANDIDATE in ids, ids
    assert "1 votes" in page.by("leaderboard-summary").text, page.by("leaderboard-summary").text
    page.wait("labeler rows", lambda: len(page.all("labeler-row")) >= 2)
    statuses = {r.get_attribute("data-id"): r.get_attribute("data-status") for r in page.all("labeler-row")}
    assert statuses.get("eve") == "flagged" and statuses.get("ann") == "ok", statuses
    flagged_cells = page.d.find_elements(By.CSS_SELECTOR, '[data-testid="labeler-row"][data-id="eve"] .fail')
    assert flagged_cells and flagged_cells[0].text == "flagged"
    page.shot("admin-leaderboard")
    ok(f"admin page: leaderboard {ids}, labelers {statuses}")


def main():
    user = create_key(user="arena-user", scopes=["playground"])

    def flows(page):
        arena_flow(page, user["secret"])
        board = httpx.get(f"{BASE}/admin/leaderboard", headers=admin_headers(), timeout=30).json()
        assert board["votes"] == 1, board
        admin_flow(page)

    drive(flows)


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"arena browser test passed in {time.time() - started:.1f} s")
