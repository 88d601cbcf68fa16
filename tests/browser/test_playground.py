"""The playground in a real headless Chromium against the live stack (the keyed application, so
the API key field matters): a streamed answer grows over several frames, Stop aborts the request
in the engine, a /run syntax error shows line, column and caret, the key survives a reload."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.client.stacks import API_KEY, keyed_stack

pytestmark = pytest.mark.serve

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "playground.png"

# Samples the answer's length on every animation frame until it has shown `wanted` distinct
# non-empty lengths (or the answer is finished), and returns what it saw.
SAMPLE_FRAMES = """
const [wanted, done] = [arguments[0], arguments[arguments.length - 1]];
const answer = document.getElementById("answer");
const send = document.getElementById("send");
const seen = [];
const deadline = performance.now() + 90000;
function frame() {
  const n = answer.textContent.length;
  if (n > 0 && seen[seen.length - 1] !== n) seen.push(n);
  const finished = n > 0 && !send.disabled;
  if (seen.length >= wanted || finished || performance.now() > deadline) done(seen);
  else requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
"""


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _open_with_key(driver, base_url: str) -> None:
    driver.get(f"{base_url}/")
    _set(driver, "api-key", API_KEY)
    driver.find_element("id", "prompt").click()  # leaving the field fires `change`
    _wait(lambda: driver.execute_script("return document.getElementById('model').options.length"), 60,
          "the model picker to fill from /v1/models")


def test_chat_streams_stops_and_keeps_the_key(browser, ray_cluster, tiny_model_path):
    keyed = keyed_stack(ray_cluster)
    _open_with_key(browser, keyed.base_url)
    assert browser.execute_script("return sessionStorage.getItem('sglserve.apiKey')") == API_KEY
    assert browser.find_element("id", "model").get_attribute("value") == "sglserve/tiny-llama"

    # A long answer: the text must grow over several paint frames, not arrive at once.
    _set(browser, "max-tokens", "3000")
    browser.find_element("id", "ignore-eos").click()
    _set(browser, "prompt", "Tell me a long story about the sea.")
    browser.find_element("id", "send").click()
    lengths = browser.execute_async_script(SAMPLE_FRAMES, 3)
    assert len(lengths) >= 3 and lengths == sorted(lengths), f"text lengths per frame: {lengths}"
    assert keyed.replica_stats().num_running == 1

    # Stop closes the request; the engine stops decoding it.
    before = keyed.replica_stats()
    browser.find_element("id", "stop").click()
    stopped_at = time.monotonic()
    _wait(lambda: keyed.replica_stats().num_running == 0, 30, "the engine's running count to return to 0")
    freed_after_s = time.monotonic() - stopped_at
    assert freed_after_s < 1.0, f"the engine kept decoding for {freed_after_s:.2f}s after Stop"
    assert keyed.replica_stats().requests_aborted_total == before.requests_aborted_total + 1
    _wait(lambda: "stopped" in browser.find_element("id", "stats").text, 10, "the stopped mark")
    assert "TTFT" in browser.find_element("id", "stats").text

    # A short answer to the end shows TTFT and tokens/s.
    browser.find_element("id", "ignore-eos").click()
    _set(browser, "max-tokens", "48")
    _set(browser, "system", "You are a helpful assistant.")
    _set(browser, "prompt", "Write a short poem about the sea.")
    browser.find_element("id", "send").click()
    stats = _wait(lambda: re.search(r"TTFT \d+ ms .* tokens/s", browser.find_element("id", "stats").text), 60,
                  "TTFT and tokens/s")
    assert stats and browser.find_element("id", "answer").text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # Reload: the key is still there (session storage) and still used.
    browser.refresh()
    assert browser.find_element("id", "api-key").get_attribute("value") == API_KEY
    _wait(lambda: browser.execute_script("return document.getElementById('model').options.length"), 60,
          "the model picker after a reload")
    assert browser.find_element("id", "chat-error").is_displayed() is False


def test_run_tab_shows_variables_and_a_caret_under_a_syntax_error(browser, ray_cluster, tiny_model_path):
    keyed = keyed_stack(ray_cluster)
    _open_with_key(browser, keyed.base_url)
    browser.find_element("css selector", '.tab[data-tab="run"]').click()

    browser.find_element("id", "run-button").click()  # the default script is valid
    _wait(lambda: len(browser.find_elements("css selector", "#variables tbody tr")) == 2, 60,
          "both variables to fill in")
    names = [row.get_attribute("data-name") for row in browser.find_elements("css selector", "#variables tbody tr")]
    assert names == ["colour", "kind"]
    assert browser.find_element("id", "run-output").text.startswith("Q: name a colour.")

    script = browser.find_element("id", "script")
    script.clear()
    script.send_keys('Q: hello\nA: {gen("answer", max_tokens=4}')
    browser.find_element("id", "run-button").click()
    error = _wait(lambda: browser.find_element("id", "run-error").is_displayed()
                  and browser.find_element("id", "run-error").text, 60, "the 422 to show")
    header, source, caret = error.split("\n")[:3]
    match = re.match(r"line (\d+), column (\d+): ", header)
    assert match and match.group(1) == "2", error
    column = int(match.group(2))
    gutter = source.index("| ") + 2
    assert source[gutter:] == 'A: {gen("answer", max_tokens=4}'
    assert caret.index("^") - gutter == column - 1  # the caret sits under the reported column
    browser.save_screenshot(str(SCREENSHOT.with_name("playground_run.png")))


# The brief's example, verbatim in spirit: EventSource appending e.data. The token comes from
# POST /v1/stream_tokens (the key goes in a header, never in the URL). Returns the text, whether
# `done` arrived, and the readyState once the server has refused the reconnect (2 = CLOSED).
EVENT_SOURCE = """
const [key, done] = [arguments[0], arguments[arguments.length - 1]];
const minted = await fetch("v1/stream_tokens", {method: "POST", headers: {authorization: "Bearer " + key}});
const {token} = await minted.json();
let text = "", finished = false, opened = 0;
const es = new EventSource("stream?max_tokens=24&temperature=0&prompt=" + encodeURIComponent("Hello there")
                           + "&token=" + encodeURIComponent(token));
es.onopen = () => { opened += 1; };
es.onmessage = (e) => { text += e.data; };
es.addEventListener("done", () => { finished = true; });  // not closed here: the server must stop it
const started = performance.now();
(function poll() {
  if (es.readyState === 2 || performance.now() - started > 60000) done([text, finished, es.readyState, opened]);
  else setTimeout(poll, 50);
})();
"""


def test_event_source_streams_and_is_not_rerun_after_the_end(browser, ray_cluster, tiny_model_path):
    import httpx

    keyed = keyed_stack(ray_cluster)
    browser.get(f"{keyed.base_url}/")
    text, finished, state, opened = browser.execute_async_script(EVENT_SOURCE, API_KEY)
    assert finished and state == 2 and opened == 1, (text, finished, state, opened)
    same = httpx.post(f"{keyed.base_url}/v1/chat/completions", headers={"authorization": f"Bearer {API_KEY}"},
                      timeout=60, json={"model": "sglserve/tiny-llama", "max_tokens": 24, "temperature": 0,
                                        "messages": [{"role": "user", "content": "Hello there"}]})
    assert text == same.json()["choices"][0]["message"]["content"]
