"""The playground page (GET /playground) driven in headless Chromium through
Selenium: key entry, the notice and consent, a K=4 generation, a ranking made
with the keyboard and with HTML5 drag and drop, a rating with a flag, a
double-clicked submit; then the events are read back from the Redis stream
`instructd:feedback` (with redis-cli) and checked against what the page showed.
Then the labeler mode takes the same prompt from the queue, and a withdrawal
shows that a generation without consent cannot be judged.

Needs INSTRUCTD_URL, INSTRUCTD_ADMIN_KEY, INSTRUCTD_REDIS_URL; Chromium and
chromedriver at /usr/bin (or INSTRUCTD_CHROMIUM / INSTRUCTD_CHROMEDRIVER).
Prints the paths of the screenshots it takes."""

import json
import os
import shutil
import subprocess
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from common import BASE, create_key, ok

CHROMIUM = os.environ.get("INSTRUCTD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("INSTRUCTD_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = tempfile.mkdtemp(prefix="instructd-playground-")
PROFILE = tempfile.mkdtemp(prefix="instructd-chromium-")
FLAGS = [
    "fails_to_follow_instruction", "inappropriate_for_customer_assistant", "hallucination", "satisfies_constraint",
    "sexual_content", "violent_content", "denigrates_protected_class", "harmful_advice", "expresses_opinion",
    "expresses_moral_judgment",
]


def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1100",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--password-store=basic", "--force-color-profile=srgb",
                f"--user-data-dir={PROFILE}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager downloads nothing.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class Page:
    def __init__(self, driver):
        self.d = driver

    def by(self, testid):
        return self.d.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, testid):
        return self.d.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def wait(self, what, cond, timeout=60):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda _: cond())
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}; error banner: {self.error()!r}; "
                                 f"status: {self.by('status').text!r}") from None

    def error(self):
        banner = self.by("error-banner")
        return banner.text if banner.is_displayed() else None

    def no_error(self):
        assert self.error() is None, f"unexpected error banner: {self.error()}"

    def attr(self, testid, name):
        return self.by(testid).get_attribute(name)

    def shot(self, name):
        path = os.path.join(SHOTS, f"{name}.png")
        self.d.save_screenshot(path)
        # A full-page one as well: the cards run below the fold.
        height = self.d.execute_script("return document.documentElement.scrollHeight")
        width = self.d.execute_script("return document.documentElement.clientWidth")
        size = self.d.get_window_size()
        self.d.set_window_size(size["width"], max(size["height"], height + 150))
        full = os.path.join(SHOTS, f"{name}-full.png")
        self.d.save_screenshot(full)
        self.d.set_window_size(size["width"], size["height"])
        print(f"screenshot {path} ({width}px wide), full page {full}", flush=True)
        return path

    def order(self):
        return self.attr("ranking-order", "data-order").split(",")

    def cards(self):
        return {c.get_attribute("data-letter"): c for c in self.all("card")}

    def use_key(self, secret):
        self.by("key-input").send_keys(secret)
        self.by("key-save").click()
        self.wait("the key to be accepted", lambda: self.by("key-status").is_displayed() and self.by("model-name").text)
        self.no_error()

    def press(self, element, *keys, modifier=None):
        """Focuses `element` and presses keys on it (optionally with a held modifier)."""
        self.d.execute_script("arguments[0].focus()", element)
        assert self.d.switch_to.active_element == element, "the card takes focus"
        chain = ActionChains(self.d)
        if modifier:
            chain.key_down(modifier)
        for k in keys:
            chain.send_keys(k)
        if modifier:
            chain.key_up(modifier)
        chain.perform()

    def drag(self, letter, onto, after):
        """HTML5 drag and drop of card `letter` by its handle onto card `onto`
        (its lower half when `after`). Dispatched as DragEvents: chromedriver's
        pointer actions do not start native HTML5 drags."""
        self.d.execute_script(
            """
            const [handle, target, after] = arguments;
            const dt = new DataTransfer();
            const r = target.getBoundingClientRect();
            const at = {bubbles: true, cancelable: true, dataTransfer: dt, clientX: r.left + 40,
                        clientY: after ? r.bottom - 4 : r.top + 4};
            handle.dispatchEvent(new DragEvent('dragstart', {bubbles: true, cancelable: true, dataTransfer: dt}));
            target.dispatchEvent(new DragEvent('dragenter', at));
            target.dispatchEvent(new DragEvent('dragover', at));
            target.dispatchEvent(new DragEvent('drop', at));
            handle.dispatchEvent(new DragEvent('dragend', {bubbles: true, dataTransfer: dt}));
            """,
            self.by(f"handle-{letter}"), self.cards()[onto], after)

    def click(self, element):
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def click_rating(self, letter, score):
        # The radio itself is visually hidden; its label is the button.
        self.click(self.d.find_element(By.CSS_SELECTOR, f'label[for="rate-{letter}-{score}"]'))

    def flag(self, letter, name):
        details = self.by(f"flags-{letter}")
        if details.get_attribute("open") is None:
            self.click(details.find_element(By.TAG_NAME, "summary"))
        box = self.by(f"flag-{letter}-{name}")
        self.click(box)
        assert box.is_selected()

    def generate(self, prompt, k=4, via_keyboard=True):
        Select(self.by("k")).select_by_value(str(k))
        for testid, value in (("max-tokens", "8"), ("temperature", "1")):
            field = self.by(testid)
            field.clear()
            field.send_keys(value)
        box = self.by("prompt")
        box.clear()
        box.send_keys(prompt)
        before = self.d.execute_script("return document.getElementById('workspace').dataset.promptId || ''")
        if via_keyboard:
            box.send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.by("generate").click()
        self.wait("the samples", lambda: (self.attr("workspace", "data-prompt-id") or "") not in ("", before)
                  and len(self.all("card")) == k)
        self.no_error()
        return self.attr("workspace", "data-prompt-id")


def redis_cli(*args):
    url = os.environ["INSTRUCTD_REDIS_URL"]
    out = subprocess.run(["redis-cli", "-u", url, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def feedback_events():
    """Every entry of `instructd:feedback`, as (fields, parsed event)."""
    script = "return cjson.encode(redis.call('XRANGE', KEYS[1], '-', '+'))"
    text = redis_cli("--no-raw", "EVAL", script, "1", "instructd:feedback").strip()
    # --no-raw prints the reply as a quoted string; redis-cli --raw would not quote it.
    raw = json.loads(text)
    entries = json.loads(raw) if isinstance(raw, str) else raw
    if entries == {}:  # cjson encodes an empty array as an object
        entries = []
    events = []
    for _id, flat in entries:
        fields = dict(zip(flat[::2], flat[1::2]))
        events.append((fields, json.loads(fields["event"])))
    return events


def console_errors(driver):
    bad = []
    for entry in driver.get_log("browser"):
        message = entry.get("message", "")
        if entry.get("level") == "SEVERE" or "Content Security Policy" in message or "Refused to" in message:
            bad.append(message)
    return bad


def playground_flow(page, user_secret):
    d = page.d
    d.get(f"{BASE}/playground")
    assert "instructd" in d.title, d.title
    assert page.by("consent-status").get_attribute("data-status") == "unknown"
    page.use_key(user_secret)
    ok("the key is taken, kept masked, and the model is shown")
    assert user_secret not in page.by("key-status").text, "the key is shown masked"
    assert d.execute_script("return sessionStorage.getItem('instructd.key')") == user_secret

    # The notice, rendered from Markdown (escaped, with headings, bold and lists).
    page.wait("the notice", lambda: "Training-use notice" in page.attr("notice-body", "textContent"))
    notice = page.by("notice-body")
    assert notice.is_displayed(), "the notice is open to read before consent"
    assert notice.find_elements(By.TAG_NAME, "h3"), notice.get_attribute("innerHTML")[:300]
    assert notice.find_elements(By.TAG_NAME, "strong") and notice.find_elements(By.TAG_NAME, "li")
    assert "**" not in notice.text and "# " not in notice.text, notice.text[:200]
    version = page.by("notice-version").text
    assert version.startswith("version ") and len(version) > len("version "), version
    assert version.removeprefix("version ") in page.by("consent-accept").text, "Accept names the version it sends"
    assert page.by("consent-status").get_attribute("data-status") == "none"
    page.by("consent-accept").click()
    page.wait("consent to be accepted", lambda: page.by("consent-status").get_attribute("data-status") == "accepted")
    assert page.by("consent-accept").get_attribute("disabled") is not None, "accepting twice is not offered"
    page.no_error()
    ok("the notice is read and accepted")

    prompt_id = page.generate("Write a short poem about the sea at night.", k=4, via_keyboard=True)
    assert page.attr("workspace", "data-logged") == "true"
    assert not page.by("not-logged-reason").is_displayed()
    cards = page.cards()
    assert sorted(cards) == ["A", "B", "C", "D"], sorted(cards)
    gen = {letter: card.get_attribute("data-generation-id") for letter, card in cards.items()}
    assert all(g.startswith(prompt_id) for g in gen.values()), gen
    assert page.order() == ["A", "B", "C", "D"]
    assert page.attr("ranking-order", "data-set") == "false", "nothing is ranked until the user ranks"
    assert page.by("submit").get_attribute("disabled") is not None, "nothing to submit yet"
    page.shot("after-generation")
    ok(f"K=4 samples generated with Ctrl+Enter ({prompt_id}), shown as cards A-D")

    # Keyboard: D to position 1; then A one down with Alt+ArrowDown.
    page.press(page.cards()["D"], "1")
    page.wait("D at the top", lambda: page.order() == ["D", "A", "B", "C"])
    page.press(page.cards()["A"], Keys.ARROW_DOWN, modifier=Keys.ALT)
    page.wait("A moved down", lambda: page.order() == ["D", "B", "A", "C"])
    assert d.switch_to.active_element.get_attribute("data-letter") == "A", "the moved card keeps focus"
    page.press(page.cards()["A"], Keys.ARROW_DOWN, modifier=Keys.SHIFT)
    page.wait("A moved down again", lambda: page.order() == ["D", "B", "C", "A"])
    ok("keyboard reorder: 1..9 to a position, Alt/Shift+Arrow to move")

    # Drag and drop: C onto the upper half of B (before it).
    page.drag("C", onto="B", after=False)
    page.wait("C dropped before B", lambda: page.order() == ["D", "C", "B", "A"])
    # Tie B with the card above (C), with the checkbox.
    page.click(page.by("tie-B"))
    page.wait("the tie", lambda: page.attr("ranking-order", "data-text") == "D > C = B > A")
    assert page.by("ranking-order").text.replace("\n", " ").split() == ["D", ">", "C", "=", "B", ">", "A"]
    ranking = json.loads(page.attr("ranking-order", "data-ranking"))
    assert ranking == [[gen["D"]], [gen["C"], gen["B"]], [gen["A"]]], ranking
    ok("drag and drop reorders, 'tie with the card above' groups; the order reads D > C = B > A")

    # Ratings: C by clicking 6 and flagging it; A by keyboard (Shift+3).
    page.click_rating("C", 6)
    page.flag("C", "hallucination")
    page.by("comment-C").send_keys("Invents a lighthouse.")
    page.press(page.cards()["A"], "3", modifier=Keys.SHIFT)
    page.wait("A rated by keyboard", lambda: page.by("rate-A-3").is_selected())
    assert page.by("rate-C-6").is_selected()
    assert page.by("flag-count-C").text.strip() == "(1)", page.by("flag-count-C").text
    page.by("demonstration").send_keys("The sea at night: a slow black breath under the stars.")
    page.shot("ranked-and-rated")
    summary = page.by("submit").find_element(By.XPATH, "..").text
    assert "Ranking D > C = B > A" in summary and "Rating C: 6/7" in summary and "Rating A: 3/7" in summary, summary

    # A double click submits once: the page holds the button while requests run,
    # and every item carries its own Idempotency-Key.
    ActionChains(d).double_click(page.by("submit")).perform()
    page.wait("the submission", lambda: page.by("receipt").is_displayed())
    page.no_error()
    receipt = page.by("receipt")
    assert receipt.get_attribute("data-prompt-id") == prompt_id
    text = receipt.text
    assert "Submitted 4 items" in text and text.count("recorded") == 4, text
    assert page.by("prompt").get_attribute("value") == "", "the prompt is cleared for the next one"
    assert not page.all("card"), "the cards are cleared"
    assert page.by("k").get_attribute("value") == "4" and page.by("key-status").is_displayed(), "key and settings stay"
    ok("submit shows per-item success, then clears for the next prompt")

    # What landed in the stream.
    events = [(f, e) for f, e in feedback_events() if e.get("prompt_id") == prompt_id]
    kinds = sorted(e["payload"]["type"] for _, e in events)
    assert kinds == ["demonstration", "ranking", "rating", "rating"], kinds
    (ranking_event,) = [e for _, e in events if e["payload"]["type"] == "ranking"]
    assert ranking_event["payload"]["ranking"] == [[gen["D"]], [gen["C"], gen["B"]], [gen["A"]]], ranking_event
    ratings = {e["payload"]["generation_id"]: e["payload"] for _, e in events if e["payload"]["type"] == "rating"}
    assert set(ratings) == {gen["C"], gen["A"]}, ratings
    c = ratings[gen["C"]]
    assert c["score"] == 6 and c["flags"]["hallucination"] is True, c
    assert [f for f in FLAGS if c["flags"].get(f)] == ["hallucination"], c["flags"]
    assert c.get("comment") == "Invents a lighthouse.", c
    assert ratings[gen["A"]]["score"] == 3 and not any(ratings[gen["A"]]["flags"].values())
    (demo,) = [e for _, e in events if e["payload"]["type"] == "demonstration"]
    assert demo["payload"]["response"].startswith("The sea at night"), demo
    for fields, event in events:
        assert fields["kind"] == event["payload"]["type"] and fields["prompt_id"] == prompt_id, fields
    ok("instructd:feedback holds exactly one ranking (all 4 ids, in the page's order), two ratings and the demonstration")
    return prompt_id, gen


def labeler_flow(page, labeler_secret, prompt_id, gen):
    page.by("key-forget").click()
    page.wait("the key to be forgotten", lambda: page.by("key-input").is_displayed())
    assert page.d.execute_script("return sessionStorage.getItem('instructd.key')") is None
    page.d.find_element(By.CSS_SELECTOR, 'label[for="mode-labeler"]').click()
    assert page.by("mode-labeler").is_selected()
    assert not page.by("consent-panel").is_displayed() and page.by("next-task").is_displayed()
    page.use_key(labeler_secret)
    page.by("next-task").click()
    page.wait("a labeling task", lambda: page.attr("workspace", "data-prompt-id") == prompt_id and len(page.all("card")) == 4)
    assert "poem about the sea" in page.by("prompt-view").text
    assert {l: c.get_attribute("data-generation-id") for l, c in page.cards().items()} == gen
    page.shot("labeler-task")
    # Keep the shown order as the ranking, rate B 5.
    page.by("keep-order").click()
    page.click_rating("B", 5)
    page.by("submit").click()
    # After the submission the next task is loaded by itself: the queue is now empty.
    page.wait("the empty queue", lambda: page.by("queue-empty").is_displayed())
    page.no_error()
    assert "Submitted 2 items" in page.by("receipt").text, page.by("receipt").text
    events = [e for _, e in feedback_events() if e.get("prompt_id") == prompt_id and e["labeler_id"] == "browser-labeler"]
    (ranking,) = [e for e in events if e["payload"]["type"] == "ranking"]
    assert ranking["payload"]["ranking"] == [[gen["A"]], [gen["B"]], [gen["C"]], [gen["D"]]], ranking
    assert [e["payload"]["score"] for e in events if e["payload"]["type"] == "rating"] == [5]
    ok("labeler mode: next task, rank and rate, submit; then 'queue is empty'")


def withdrawal_flow(page, user_secret):
    page.by("key-forget").click()
    page.d.find_element(By.CSS_SELECTOR, 'label[for="mode-playground"]').click()
    page.use_key(user_secret)
    page.wait("the consent", lambda: page.by("consent-status").get_attribute("data-status") == "accepted")
    withdraw = page.by("consent-withdraw")
    withdraw.click()
    assert "Confirm" in withdraw.text, withdraw.text
    withdraw.click()
    page.wait("the withdrawal", lambda: page.by("withdraw-result").is_displayed())
    result = page.by("withdraw-result").text
    assert "entries removed" in result or "entry removed" in result, result
    assert page.by("consent-status").get_attribute("data-status") == "withdrawn"
    page.no_error()
    ok(f"withdraw: {result!r}")

    page.generate("Another line about the sea.", k=4, via_keyboard=False)
    assert page.attr("workspace", "data-logged") == "false"
    reason = page.by("not-logged-reason")
    assert reason.is_displayed() and "not accepted" in reason.text, reason.text
    assert page.by("submit").get_attribute("disabled") is not None
    assert not page.by("rating-A").is_displayed() and not page.by("order-bar").is_displayed()
    page.shot("not-logged")
    ok("without consent the samples are shown, marked 'not logged', and cannot be judged")


def drive(flows):
    """Runs `flows(page)` in a fresh headless browser, then checks the console stayed clean; on a failure takes a
    screenshot and prints the console before re-raising."""
    driver = browser()
    try:
        flows(Page(driver))
        errors = console_errors(driver)
        assert not errors, f"browser console errors (CSP violations?): {errors}"
        ok("no console errors and no CSP violations")
    except Exception:
        try:
            Page(driver).shot("failure")
            print("console:", driver.get_log("browser"))
        except Exception:  # noqa: BLE001 - the original failure matters more
            pass
        raise
    finally:
        driver.quit()
        shutil.rmtree(PROFILE, ignore_errors=True)


def main():
    user = create_key(user="browser-user", scopes=["playground"])
    labeler = create_key(user="browser-labeler", scopes=["labeler"])

    def flows(page):
        prompt_id, gen = playground_flow(page, user["secret"])
        labeler_flow(page, labeler["secret"], prompt_id, gen)
        withdrawal_flow(page, user["secret"])

    drive(flows)


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"playground browser test passed in {time.time() - started:.1f} s")
