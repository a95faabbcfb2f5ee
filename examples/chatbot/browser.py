"""The chat page driven in a real, headless Chromium (Debian's `chromium` + `chromium-driver`, via selenium):
what the browser test and measure.py do as a person would: type, press Enter, read the page."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver",)


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when the system has no Chromium and ChromeDriver."""
    browser = next((p for p in CHROMIUM if Path(p).exists()), shutil.which("chromium"))
    driver = next((p for p in CHROMEDRIVER if Path(p).exists()), shutil.which("chromedriver"))
    return (browser, driver) if browser and driver else None


@dataclass
class ShownAnswer:
    answer_id: str
    text: str
    state: str  # done | error
    citations: list[tuple[str, int]] = field(default_factory=list)
    superseded: list[tuple[str, int]] = field(default_factory=list)
    refused: bool = False


class ChatPage:
    def __init__(self, url: str | None, *, width: int = 1280, height: int = 900) -> None:
        """A browser on `url` (None: a blank tab, for `open` later)."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = find_browser()
        if found is None:
            raise RuntimeError("no Chromium/ChromeDriver: apt-get install chromium chromium-driver")
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={width},{height}"):  # fmt: skip
            options.add_argument(arg)
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
        if url is not None:
            self.open(url)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> ChatPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def _until(self, check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"the page did not show {what} within {timeout:.0f} s")

    def type_and_send(self, question: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.ID, "question")
        self._until(lambda: box.is_enabled() and self._js("return !document.getElementById('send').disabled"),
                    30, "the send button ready")  # fmt: skip
        if len(question) > 500:  # typing 100 kB key by key takes minutes: paste it as a person would
            self._js("document.getElementById('question').value = arguments[0]", question)
            box.send_keys(Keys.END)
        else:
            box.send_keys(question)
        box.send_keys(Keys.ENTER)

    def answers(self) -> int:
        return int(self._js("return document.querySelectorAll('#messages li.answer').length"))

    def ask(self, question: str, *, timeout: float = 180.0) -> ShownAnswer:
        """Ask and wait until the answer is complete (its sources shown) or the page shows an error."""
        before = self.answers()
        self.type_and_send(question)
        self._until(lambda: self.answers() > before or self.error(), 30, "an answer starting")
        # One script for both checks: an error removes the answer's bubble and shows the message in the same task.
        self._until(lambda: self._js("""
            if (!document.getElementById('error').hidden) return true;
            const a = document.querySelectorAll('#messages li.answer');
            return a.length > 0 && a[a.length - 1].dataset.state === 'done';"""), timeout, "the whole answer")  # fmt: skip
        error = self.error()
        if error:
            return ShownAnswer("", error, "error")
        last = self._js("""
            const a = [...document.querySelectorAll('#messages li.answer')].pop();
            const ids = (sel) => [...a.querySelectorAll(sel)].map((li) => [li.dataset.docId, Number(li.dataset.version)]);
            return {id: a.dataset.answerId, text: a.querySelector('.text').textContent,
                    citations: ids('.citations li'), superseded: ids('.superseded li'),
                    refused: a.classList.contains('refused')};""")
        return ShownAnswer(last["id"], last["text"], "done", [tuple(c) for c in last["citations"]],
                           [tuple(c) for c in last["superseded"]], bool(last["refused"]))  # fmt: skip

    def error(self) -> str:
        return str(self._js("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent"))

    def knowledge(self) -> dict[str, dict[str, Any]]:
        """The knowledge panel: id -> {version, op, shown_at_ms, searchable_at_ms}."""
        rows = self._js("""return [...document.querySelectorAll('#knowledge li')].map((li) => [li.dataset.docId,
            {version: Number(li.dataset.version), op: li.dataset.op, shown_at_ms: Number(li.dataset.shownAtMs),
             searchable_at_ms: Number(li.dataset.searchableAtMs)}]);""")
        return dict(rows)

    def wait_knowledge(self, doc_id: str, version: int, *, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the knowledge panel shows `version` of `doc_id`; returns its row."""
        return self._until(
            lambda: (row := self.knowledge().get(doc_id)) and row["version"] >= version and row,
            timeout, f"{doc_id} v{version} in the knowledge panel",
        )  # fmt: skip

    def vote(self, answer_id: str, vote: str) -> None:
        from selenium.webdriver.common.by import By

        bubble = self.driver.find_element(By.CSS_SELECTOR, f"li.answer[data-answer-id='{answer_id}']")
        bubble.find_element(By.CSS_SELECTOR, f"button.vote-{vote}").click()
        self._until(lambda: "chosen" in (bubble.find_element(By.CSS_SELECTOR, f"button.vote-{vote}")
                                         .get_attribute("class") or ""), 10, "the vote saved")  # fmt: skip

    def status(self) -> str:
        return str(self._js("return document.getElementById('status').textContent"))

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
