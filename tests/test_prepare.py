"""python -m data.prepare: an existing dataset name is refused unless --overwrite; the
built-in set's settings file is written atomically."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data import prepare
from data.sources import DataError, TfdsSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(q, a):
  return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def _write(tmp_path, n):
  (tmp_path / "img").mkdir(exist_ok=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
  recs = [{"id": f"r{i}", "image": "a.png", "conversations": _conv("q?", f"a{i}.")}
          for i in range(n)]
  (tmp_path / "data.json").write_text(json.dumps(recs))
  return str(tmp_path / "data.json"), str(tmp_path / "img")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "data.prepare", "--kind=llava", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_an_existing_name_is_refused_and_overwrite_prepares_it_again(tmp_path):
  path, folder = _write(tmp_path, 2)
  data_dir = str(tmp_path / "tfds")
  out = prepare.prepare_llava(path, folder, "mine", data_dir)
  assert len(TfdsSource(out, "train")) == 2
  _write(tmp_path, 3)  # The JSON grew: reusing the old folder would hide it.
  with pytest.raises(DataError, match=rf"{out}: a dataset named 'mine' is already prepared "
                                      rf"here; choose another --name, or pass --overwrite"):
    prepare.prepare_llava(path, folder, "mine", data_dir)
  assert len(TfdsSource(out, "train")) == 2  # Untouched.
  run = _cli(f"--data_dir={data_dir}", f"--json={path}", f"--image_folder={folder}",
             "--name=mine")
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"data.prepare: {out}: a dataset named 'mine' is already prepared here; choose another "
      f"--name, or pass --overwrite to prepare it again")
  run = _cli(f"--data_dir={data_dir}", f"--json={path}", f"--image_folder={folder}",
             "--name=mine", "--overwrite")
  assert run.returncode == 0, run.stderr
  assert f"prepared: {out}" in run.stdout
  src = TfdsSource(out, "train")
  assert len(src) == src.total == 3 and src[2]["id"] == "r2"


def test_settings_are_written_atomically(tmp_path, monkeypatch):
  target = tmp_path / "settings.json"
  target.write_text('{"old": true}')
  replaced = []
  real_replace = os.replace

  def spy(src, dst):
    assert json.loads(open(src).read()) == {"seed": 1}  # Complete before it is swapped in.
    replaced.append((src, dst))
    real_replace(src, dst)

  monkeypatch.setattr(prepare.os, "replace", spy)
  prepare.write_json_atomic(str(target), {"seed": 1})
  assert json.loads(target.read_text()) == {"seed": 1}
  assert [d for _, d in replaced] == [str(target)] and os.listdir(tmp_path) == ["settings.json"]


def test_the_builtin_stamp_goes_through_the_atomic_writer(tmp_path, monkeypatch):
  written = []

  class FakeBuilder:

    def __init__(self, **kwargs):
      self.kwargs = kwargs

    def download_and_prepare(self):
      pass

  monkeypatch.setattr(prepare.tfds_builders, "MqtSynthetic", FakeBuilder)
  monkeypatch.setattr(prepare, "ensure_builtin_tokenizer", lambda *a: None)
  monkeypatch.setattr(prepare, "write_json_atomic", lambda p, v: written.append((p, v)))
  prepare.ensure_builtin(str(tmp_path), seed=2, image_size=16, sizes={"eval": 3})
  assert len(written) == 1
  stamp, value = written[0]
  assert stamp == os.path.join(str(tmp_path), prepare.SYNTHETIC + "_settings.json")
  assert value["seed"] == 2 and value["image_size"] == 16 and value["sizes"] == {"eval": 3}


def test_a_file_with_no_usable_record_is_one_error(tmp_path):
  (tmp_path / "img").mkdir()
  path = tmp_path / "data.json"
  path.write_text(json.dumps([{"id": "a", "image": "gone.png", "conversations": _conv("q", "a")}]))
  with pytest.raises(DataError, match=rf"^{path}: none of its 1 records is usable; first: "
                                      rf"{path}: record 0 \(id 'a'\): missing_image: "):
    prepare.prepare_llava(str(path), str(tmp_path / "img"), "none", str(tmp_path / "tfds"),
                          on_error="skip")
