"""The page serve.py serves at /, driven in a real headless browser (Debian's chromium and
chromedriver through selenium): upload a PNG, ask at two values of m, ask at a FLOPs
budget, compare three values of m; every answer shown equals the API's answer.
"""
import os
import signal

import pytest

from tests import test_server as ts

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
  if missing:
    pytest.fail(f"the page test needs a headless browser: {', '.join(missing)} missing. "
                "Install Debian's chromium and its driver: sudo apt-get install chromium "
                "chromium-driver (.ci/run does)")
  try:
    from selenium import webdriver  # pylint: disable=import-outside-toplevel
    from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.fail("the page test needs selenium: pip install -r requirements-test.txt")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=900,700"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  workdir = ts.shared_checkpoint(tmp_path_factory)
  server = ts.Served(workdir, "--buckets=1,4", "--max_wait_ms=30")
  server.wait_ready()
  yield server
  server.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def browser():
  driver = _browser()
  yield driver
  driver.quit()


def _wait(driver, condition, what: str, timeout: float = 120):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  try:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
  except Exception as e:  # pylint: disable=broad-except
    error = driver.find_element("id", "error").text
    raise AssertionError(f"timed out waiting for {what}; the page's error line: {error!r}"
                         ) from e


def _rows(driver, table: str):
  """(m, answer) of each row of a result table."""
  rows = driver.find_elements("css selector", f"#{table} tbody tr")
  return [(r.find_element("css selector", ".m").text,
           r.find_element("css selector", ".answer").text) for r in rows]


def _set_slider(driver, value):
  driver.execute_script("const s = document.getElementById('slider'); s.value = arguments[0];"
                        "s.dispatchEvent(new Event('input'));", str(value))


def _api_answer(url, png, **fields) -> str:
  status, out = ts.chat(url, png, **fields)
  assert status == 200, out
  return out["choices"][0]["message"]["content"] or "(empty answer)"


def test_page_asks_at_two_m_a_budget_and_compares(served, browser, tmp_path):
  png = ts.shape_png((40, 60, 200))
  path = tmp_path / "circle.png"
  path.write_bytes(png)
  d = browser
  d.get(served.url + "/")
  assert "MQT-LLaVA" in d.title
  _wait(d, lambda d: d.find_element("id", "server-status").text == "ok", "the health line")
  d.find_element("id", "image").send_keys(str(path))
  _wait(d, lambda d: (d.find_element("id", "preview").get_attribute("src") or "").startswith(
      "data:image/png;base64,"), "the image preview")
  d.find_element("id", "question").clear()
  d.find_element("id", "question").send_keys(ts.QUESTION)
  for i, m in enumerate((2, 7)):
    _set_slider(d, m)
    assert d.find_element("id", "slider-value").text == f"m = {m}"
    d.find_element("id", "ask").click()
    _wait(d, lambda d, n=i + 1: len(_rows(d, "history")) == n, f"the answer at m={m}")
    assert d.find_element("id", "visual-tokens").text == str(m)
    assert d.find_element("id", "bucket").text == ("4" if m <= 4 else "9")
    assert float(d.find_element("id", "flops").text) > 0
    assert d.find_element("id", "latency").text.endswith(" ms")
  rows = _rows(d, "history")
  assert [m for m, _ in rows] == ["2", "7"], rows
  for (m, shown), wanted in zip(rows, (2, 7)):
    assert shown, rows
    assert shown == _api_answer(served.url, png, m=wanted), (m, shown)
  assert d.find_element("id", "answer").text == rows[-1][1]

  d.find_element("id", "mode-budget").click()  # The largest budget: M for this question.
  _set_slider(d, 100)
  assert "budget" in d.find_element("id", "slider-value").text
  assert "about m = 9" in d.find_element("id", "slider-value").text
  d.find_element("id", "ask").click()
  _wait(d, lambda d: len(_rows(d, "history")) == 3, "the answer at a FLOPs budget")
  assert d.find_element("id", "visual-tokens").text == "9"
  assert "fit the budget" in d.find_element("id", "why").text

  d.find_element("id", "compare").click()
  _wait(d, lambda d: len(_rows(d, "compare-table")) == 3, "the comparison")
  rows = _rows(d, "compare-table")
  assert [m for m, _ in rows] == ["1", "5", "9"], rows
  for m, shown in rows:
    assert shown == _api_answer(served.url, png, m=int(m)), (m, shown)
  assert d.find_element("id", "error").text == ""
  severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
  assert not severe, severe
