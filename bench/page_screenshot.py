r"""A screenshot of serve.py's page answering: docs/serve_page.png.

  python -m bench.page_screenshot --workdir=/tmp/mqt_tiny

Starts serve.py on the trained model of --config / --workdir, opens its page in
headless Chromium (Debian's chromium and chromedriver, through selenium) in a
window whose page area is --width x --height, uploads a held-out image of the built-in set, asks its
question at a small m, then compares m = 1, a middle m and M, and saves the window
as a palette PNG (under --max_kb, else an error).
"""
import io
import os
import tempfile

from absl import app
from absl import flags
from PIL import Image

from bench import serve_load
from bench import serve_samples

# --config and --workdir are bench.serve_load's flags (one definition).
_CONFIG, _WORKDIR = serve_load._CONFIG, serve_load._WORKDIR  # pylint: disable=protected-access
_OUT = flags.DEFINE_string("out", os.path.join(serve_load.ROOT, "docs", "serve_page.png"),
                           "Where the PNG goes.")
_WIDTH = flags.DEFINE_integer("width", 900, "Window width, pixels.")
_HEIGHT = flags.DEFINE_integer("height", 700, "Window height, pixels.")
_SAMPLE = flags.DEFINE_integer("sample", 0, "Which held-out sample to ask about.")
_M = flags.DEFINE_integer("m", 2, "m of the first question.")
_MAX_KB = flags.DEFINE_integer("max_kb", 120, "Largest PNG, KiB.")


def main(argv):
  del argv
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  samples, source = serve_samples.builtin_samples(_WORKDIR.value, _SAMPLE.value + 1)
  png, question = samples[_SAMPLE.value]
  server = serve_load.ServeProcess([f"--config={_CONFIG.value}",
                                    f"--workdir={_WORKDIR.value}"])
  driver = None
  try:
    server.wait_ready()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--window-size={_WIDTH.value},{_HEIGHT.value}"):
      options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    driver.set_window_size(2 * _WIDTH.value - inner[0], 2 * _HEIGHT.value - inner[1])
    wait = WebDriverWait(driver, 120, poll_frequency=0.1)
    driver.get(server.url + "/")
    wait.until(lambda d: d.find_element("id", "server-status").text == "ok")
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "sample.png")
      with open(path, "wb") as f:
        f.write(png)
      driver.find_element("id", "image").send_keys(path)
      wait.until(lambda d: (d.find_element("id", "preview").get_attribute("src") or ""
                            ).startswith("data:"))
    box = driver.find_element("id", "question")
    box.clear()
    box.send_keys(question)
    driver.execute_script("const s = document.getElementById('slider'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", str(_M.value))
    driver.find_element("id", "ask").click()
    wait.until(lambda d: len(d.find_elements("css selector", "#history tbody tr")) == 1)
    driver.find_element("id", "compare").click()
    wait.until(lambda d: len(d.find_elements("css selector", "#compare-table tbody tr")) >= 2)
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
  finally:
    if driver is not None:
      driver.quit()
    server.stop()
  out = io.BytesIO()
  shot.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, format="PNG",
                                                                optimize=True)
  size_kb = len(out.getvalue()) / 1024
  if size_kb > _MAX_KB.value:
    raise SystemExit(f"the screenshot is {size_kb:.0f} KiB, more than --max_kb={_MAX_KB.value}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "wb") as f:
    f.write(out.getvalue())
  print(f"wrote {_OUT.value} ({shot.size[0]}x{shot.size[1]}, {size_kb:.0f} KiB; question "
        f"{question!r} about a sample of the {source})")


if __name__ == "__main__":
  app.run(main)
