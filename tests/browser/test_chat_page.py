"""The chat page at `/` (frontend/static/) in headless Chromium, against the real server on the
embedded model: streaming, Stop aborting down to the scheduler, Markdown that never runs model
text as HTML, the API key field, and the phone-width layout."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.browser.driver import DESKTOP, PHONE, open_at, wait_until
from tests.conftest import start_server

pytestmark = pytest.mark.slow
KEY = "browser-test-key"

# ---- helpers -------------------------------------------------------------------------------


def open_chat(browser, base_url: str, width: int = DESKTOP[0], **settings: object) -> None:
    """The page with nothing stored (no conversation, settings or key), then `settings`
    (system, temperature, max_tokens) typed into the settings panel."""
    open_at(browser, base_url + "/", width)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_until(browser, lambda d: d.find_element(By.ID, "model-name").text not in ("", "\u2026"))
    if not settings:
        return
    browser.find_element(By.ID, "settings-toggle").click()
    for field, value in settings.items():
        ids = {"system": "system-prompt", "temperature": "temperature", "max_tokens": "max-tokens"}
        replace_text(browser.find_element(By.ID, ids[field]), value)
    browser.find_element(By.ID, "settings-toggle").click()


def replace_text(element, value: object) -> None:
    element.send_keys(Keys.CONTROL, "a", Keys.NULL, str(value))  # NULL lets go of Ctrl


def ask(browser, question: str) -> None:
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()


def state(browser) -> str:
    return browser.execute_script("return document.body.dataset.state")


def last_answer(browser) -> str:
    """The text of the last answer as shown (rendered), '' before it exists."""
    return browser.execute_script(
        "const m = document.querySelectorAll('.message.assistant .content');"
        "return m.length ? m[m.length - 1].textContent : ''")


def stored_messages(browser) -> list[dict]:
    """The current conversation as the page keeps it in localStorage."""
    convs = json.loads(browser.execute_script("return localStorage.getItem('pagoda.conversations')"))
    current = json.loads(browser.execute_script("return localStorage.getItem('pagoda.current')"))
    return next(c for c in convs if c["id"] == current)["messages"]


def metric(base_url: str, name: str, key: str | None = None, **labels: str) -> float:
    """The sum of a /metrics sample over the series whose labels include `labels`."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    total = 0.0
    for line in httpx.get(base_url + "/metrics", headers=headers).text.splitlines():
        m = re.fullmatch(r"([\w:]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


# ---- tests ---------------------------------------------------------------------------------


def test_an_answer_streams_in_and_ends_as_the_apis_greedy_answer(browser, server):
    system, question, max_tokens = "You are a helpful assistant.", "Tell me about Paris.", 20
    open_chat(browser, server.base_url, system=system, temperature=0, max_tokens=max_tokens)
    model = browser.find_element(By.ID, "model-name").text
    ask(browser, question)
    lengths = []
    deadline = time.monotonic() + 120
    while state(browser) == "streaming" or not lengths:
        lengths.append(len(last_answer(browser)))
        assert time.monotonic() < deadline
        time.sleep(0.02)
    growth = [b for a, b in zip(lengths, lengths[1:]) if b > a]
    assert len(growth) >= 2, lengths  # it grew while streaming, not all at once at the end

    sdk = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    expected = sdk.chat.completions.create(
        model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        temperature=0, max_tokens=max_tokens,
    )
    text = expected.choices[0].message.content
    assert expected.usage.completion_tokens == max_tokens  # long enough to stream over many chunks
    messages = stored_messages(browser)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == text
    assert " ".join(last_answer(browser).split()) == " ".join(text.split())  # plain prose: shown as is
    stats = browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text
    assert re.search(rf"\b{max_tokens} tokens\b", stats) and re.search(r"[\d.]+ tok/s", stats), stats
    assert re.search(r"TTFT \d+ ms", stats), stats


def test_stop_aborts_the_request_on_the_server_at_phone_width(browser, server):
    open_chat(browser, server.base_url, PHONE[0], temperature=0, max_tokens=400)
    aborted = metric(server.base_url, "pagoda:request_success_total", finished_reason="abort")
    generated = metric(server.base_url, "pagoda:generation_tokens_total")
    ask(browser, "Write a long story about a dragon who learns to cook.")
    wait_until(browser, lambda d: len(last_answer(d)) > 20, 60)
    wait_until(browser, lambda _: metric(server.base_url, "pagoda:num_requests_running") == 1, 10)
    assert metric(server.base_url, "pagoda:kv_cache_usage_perc") > 0

    browser.find_element(By.ID, "stop").click()
    wait_until(browser, lambda d: state(d) == "idle", 5)
    stopped_at = time.monotonic()
    wait_until(browser, lambda _: metric(server.base_url, "pagoda:num_requests_running") == 0
               and metric(server.base_url, "pagoda:kv_cache_usage_perc") == 0, 5, "the request still runs")
    assert time.monotonic() - stopped_at < 5
    assert metric(server.base_url, "pagoda:request_success_total", finished_reason="abort") == aborted + 1
    assert metric(server.base_url, "pagoda:generation_tokens_total") - generated < 400
    shown = last_answer(browser)
    time.sleep(0.5)
    assert last_answer(browser) == shown and shown  # nothing more arrives; what came stays
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text
    assert stored_messages(browser)[-1]["stopped"] is True

    # At 390 px nothing sticks out or overlaps: no sideways scroll, the header's and the
    # composer's controls side by side within the screen; the list slides in over the chat.
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    for row in ("header", "#composer"):
        boxes = browser.execute_script(
            "return [...document.querySelector(arguments[0]).children]"
            ".filter(e => e.offsetParent !== null).map(e => e.getBoundingClientRect().toJSON())", row)
        assert len(boxes) >= 2
        for a, b in zip(boxes, boxes[1:]):
            assert a["right"] <= b["left"] + 0.5, (row, boxes)
        assert boxes[0]["left"] >= 0 and boxes[-1]["right"] <= PHONE[0], (row, boxes)
    sidebar = browser.find_element(By.ID, "sidebar")
    assert sidebar.rect["x"] + sidebar.rect["width"] <= 0  # off screen
    browser.find_element(By.ID, "open-sidebar").click()
    wait_until(browser, lambda _: sidebar.rect["x"] == 0, 5)
    titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#conversation-list .open")]
    assert titles == ["Write a long story about a dragon who learns to cook."]
    browser.find_element(By.ID, "close-sidebar").click()
    wait_until(browser, lambda _: sidebar.rect["x"] + sidebar.rect["width"] <= 0, 5)


MALICIOUS = (
    "Here <script>window.pwned = 1</script> and <img src=x onerror=\"window.pwned = 2\">.\n\n"
    "[a link](https://example.com/a_b_*c*) [not a link](javascript:window.pwned=3) **bold** *em* `<b>code</b>`\n\n"
    "```html\n<script>window.pwned = 4</script>\n```\n\n# Title\n\n- one\n- two\n\n3. three\n4. four"
)


def test_markdown_renders_and_model_html_stays_text(browser, server):
    # The renderer alone, imported in the page.
    open_chat(browser, server.base_url)
    html = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/static/markdown.js').then(m => done(m.renderMarkdown(arguments[0])));", MALICIOUS)
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in html
    assert '<a href="https://example.com/a_b_*c*" target="_blank" rel="noopener noreferrer">a link</a>' in html
    assert "<strong>bold</strong>" in html and "<em>em</em>" in html and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert '<pre><code class="language-html">&lt;script&gt;' in html
    assert "<h1>Title</h1>" in html and "<ul><li>one</li><li>two</li></ul>" in html and '<ol start="3">' in html
    assert not re.search(r"<(script|img)\b", html) and 'href="javascript' not in html

    # The page itself, showing a stored conversation whose answer holds HTML: as text.
    conv = {"id": "c1", "title": "t", "updated": 0,
            "messages": [{"role": "user", "content": "<b>hi</b>"}, {"role": "assistant", "content": MALICIOUS}]}
    browser.execute_script("localStorage.setItem('pagoda.conversations', arguments[0]);"
                           "localStorage.setItem('pagoda.current', '\"c1\"');", json.dumps([conv]))
    browser.refresh()
    answer = wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant .content"))
    assert "<script>window.pwned = 1</script>" in answer.text
    assert answer.find_elements(By.CSS_SELECTOR, "script, img") == []
    assert [a.get_attribute("href") for a in answer.find_elements(By.TAG_NAME, "a")] == ["https://example.com/a_b_*c*"]
    assert browser.find_element(By.CSS_SELECTOR, ".message.user .content").text == "<b>hi</b>"
    assert browser.execute_script("return window.pwned") is None

    # A real answer with a code block, from the model.
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "settings-toggle").click()
    for field, value in (("temperature", 0), ("max-tokens", 32)):
        replace_text(browser.find_element(By.ID, field), value)
    ask(browser, "Write a Python function that adds two numbers.")
    wait_until(browser, lambda d: state(d) == "idle" and last_answer(d), 120)
    code = browser.find_element(By.CSS_SELECTOR, ".message.assistant .content pre > code")
    assert "def " in code.text and "return" in code.text
    assert code.get_attribute("class") == "language-python"
    assert "```" not in last_answer(browser)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    # A prompt of more than ~100 tokens (400 bytes) is refused with a 503, as an overloaded server's.
    srv = start_server(str(tmp_path_factory.mktemp("keyed")), "--api-key", KEY, "--max-model-len", "512",
                       "--max-num-queued-tokens", "100")
    yield srv
    srv.stop()


def test_a_wrong_api_key_shows_the_401_and_the_right_one_works(browser, keyed_server):
    base = keyed_server.base_url
    # The page and its files are open; the API and everything else still need the key.
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(base + "/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(base + "/static/nothing.js").status_code == 404
    assert httpx.get(base + "/static/%2e%2e/v1/models").status_code == 404  # no way out of static/
    for path in ("/v1/models", "/metrics", "/static", "/docs"):
        assert httpx.get(base + path).status_code == 401, path

    open_at(browser, base + "/", DESKTOP[0])
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    box = wait_until(browser, lambda d: d.find_element(By.ID, "key-box").is_displayed() and
                     d.find_element(By.ID, "key-box"))
    assert "You didn't provide an API key" in box.text
    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys("wrong-key", Keys.ENTER)
    wait_until(browser, lambda d: "Incorrect API key provided." in d.find_element(By.ID, "key-message").text)
    ask(browser, "Hello!")
    error = wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error .content"))
    assert error[0].text == "Error 401: Incorrect API key provided."
    assert state(browser) == "idle" and browser.find_elements(By.CSS_SELECTOR, ".message.assistant") == []

    replace_text(key_field, KEY + Keys.ENTER)
    wait_until(browser, lambda d: not d.find_element(By.ID, "key-box").is_displayed())
    assert browser.find_element(By.ID, "model-name").text == "SmolLM2-135M-Instruct"
    assert json.loads(browser.execute_script("return localStorage.getItem('pagoda.apiKey')")) == KEY
    browser.find_element(By.ID, "settings-toggle").click()
    replace_text(browser.find_element(By.ID, "max-tokens"), 8)
    browser.find_element(By.CSS_SELECTOR, ".message.error .regenerate").click()
    wait_until(browser, lambda d: state(d) == "idle" and last_answer(d), 60)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    assert [m["role"] for m in stored_messages(browser)] == ["user", "assistant"]


def test_a_503_says_when_to_retry(browser, keyed_server):
    open_at(browser, keyed_server.base_url + "/", DESKTOP[0])
    browser.execute_script("localStorage.clear(); localStorage.setItem('pagoda.apiKey', arguments[0])",
                           json.dumps(KEY))
    browser.refresh()
    wait_until(browser, lambda d: d.find_element(By.ID, "model-name").text == "SmolLM2-135M-Instruct")
    ask(browser, "Please summarize this. " + "All work and no play makes Jack a dull boy. " * 12)
    error = wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error .content"))[0].text
    assert error.startswith("Error 503: The server is overloaded") and error.endswith("Retry in 1 s."), error
