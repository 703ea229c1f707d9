"""The chat page in headless Chromium (Debian's, driven by Playwright): type a message,
watch the answer grow as it streams, check it is exactly what the API answers, take a
screenshot. Skips (with the reason) where Chromium or Playwright is missing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_TOKENS = 24
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), args=ARGS,
                                                   headless=True, viewport={"width": 1000, "height": 700})
        try:
            yield ctx
        finally:
            ctx.close()


def test_chat_page_streams_an_answer(server, client, browser_context, tmp_path: Path) -> None:
    expected = client.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.endsWith('.gguf')", timeout=30_000)
    page.click("summary")  # open the settings
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(MAX_TOKENS))
    page.click("summary")
    page.fill("#input", QUESTION)
    # Every text the answer shows, recorded by the page itself as the DOM changes (polling
    # from here could miss a short answer's intermediate states).
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const a = document.querySelector('.msg.assistant');
            if (!a) return;
            const text = a.querySelector('.text').textContent, seen = window.__seen;
            if (!seen.length || seen[seen.length - 1] !== text) seen.push(text);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.keyboard.press("Enter")

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if page.evaluate("() => !!document.querySelector('.msg.assistant .meta')"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"no complete answer within 120 s; saw {page.evaluate('() => window.__seen')!r}")
    seen: list[str] = page.evaluate("() => window.__seen")  # the answer's texts, in order

    assert seen[-1] == expected
    partial = [s for s in seen if s and s != expected]
    assert partial and all(expected.startswith(s) for s in partial), f"not streamed: {seen!r}"
    assert page.locator(".msg.user .text").text_content() == QUESTION
    assert "tokens" in page.locator(".msg.assistant .meta").text_content()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    assert not errors

    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    out = os.environ.get("GGUFLM_SCREENSHOT_DIR")
    if out:  # keep it for a human to look at
        shutil.copy(shot, Path(out) / shot.name)
    page.close()


def test_chat_page_with_an_api_key(smollm2_path: Path, start_server, browser_context, tmp_path: Path) -> None:
    """A server started with --api-key: the page says it needs the key; typed under Settings
    (kept in localStorage), the page lists the model and gets an answer."""
    key = "page-test-key"
    with start_server(smollm2_path, tmp_path / "serve.log", "--api-key", key) as srv:
        page = browser_context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('API key')", timeout=30_000)
        page.click("summary")
        page.fill("#api_key", key)
        page.dispatch_event("#api_key", "change")
        page.fill("#max_tokens", "4")
        page.click("summary")
        page.wait_for_function("document.getElementById('model').textContent.endsWith('.gguf')", timeout=30_000)
        assert page.evaluate("localStorage.getItem('gguflm.apiKey')") == key
        page.fill("#input", QUESTION)
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant .meta", timeout=120_000)
        assert not page.locator(".msg.error").count()
        assert "tokens" in page.locator(".msg.assistant .meta").text_content()
        assert not errors
        page.evaluate("localStorage.removeItem('gguflm.apiKey')")
        page.close()
