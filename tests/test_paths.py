"""data.paths: the helpers on local paths, URIs never mangled, and the project's readers and
writers on gs:// paths served by a fake bucket (a local folder behind epath's fsspec
backend), so no network is touched."""
import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.local import LocalFileSystem

from data import paths
from data import sources
from data import tokenizer as tok_lib
from mqt import checkpoint as ckpt_lib
from mqt import checkpoint_io
from mqt import convert
from mqt import metrics


# ---- Local paths.

def test_local_helpers(tmp_path):
  root = str(tmp_path)
  nested = paths.join(root, "a", "b")
  paths.makedirs(nested)
  paths.makedirs(nested)  # Exists already: no error.
  assert paths.isdir(nested) and not paths.isfile(nested)
  f = paths.join(nested, "x.txt")
  assert not paths.exists(f)
  with paths.open(f, "w") as out:
    out.write("héllo")
  assert paths.isfile(f) and paths.exists(f)
  assert paths.read_bytes(f) == "héllo".encode("utf-8")
  assert paths.getsize(f) == len("héllo".encode("utf-8"))
  with paths.open(f) as inp:
    assert inp.read() == "héllo"
  assert sorted(paths.listdir(paths.join(root, "a"))) == ["b"]
  paths.rename(f, paths.join(nested, "y.txt"))
  assert paths.listdir(nested) == ["y.txt"]
  (tmp_path / "a" / "b" / "z.txt").write_text("z")
  with pytest.raises(FileExistsError):
    paths.rename(paths.join(nested, "y.txt"), paths.join(nested, "z.txt"))


def test_atomic_writes_leave_no_temporary(tmp_path):
  path = str(tmp_path / "s.json")
  assert paths.write_text_atomic(path, "first") == path
  assert paths.write_text_atomic(path, "second ü") == path  # Replaces.
  assert (tmp_path / "s.json").read_text(encoding="utf-8") == "second ü"
  paths.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(tmp_path)) == ["b.bin", "s.json"]


def test_local_strings_are_os_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute("run/x") == os.path.abspath("run/x")
  assert paths.join("a", "b/", "c") == os.path.join("a", "b/", "c")
  assert paths.join("a", "/abs", "c") == "/abs/c"
  assert paths.dirname("a/b/c.model") == "a/b" and paths.dirname("c.model") == ""
  assert not paths.is_uri("/x/y") and not paths.is_uri("run/a://b") and not paths.is_uri("")


def test_mqt_paths_is_the_same_helpers():
  """`from mqt import paths` keeps working: the very functions of data.paths."""
  from mqt import paths as mqt_paths  # pylint: disable=import-outside-toplevel
  for name in ("join", "exists", "open", "write_text_atomic", "SCHEMES", "_missing_backend"):
    assert getattr(mqt_paths, name) is getattr(paths, name)


# ---- URIs as strings.

def test_uris_are_never_mangled():
  uri = "gs://bucket/run"
  assert os.path.abspath(uri) != uri  # The bug class: "/cwd/gs:/bucket/run".
  assert paths.is_uri(uri) and paths.is_uri("s3://b/k")
  assert paths.absolute(uri) == uri
  assert paths.join(uri, "stage1", "checkpoints") == "gs://bucket/run/stage1/checkpoints"
  assert paths.join(uri + "/", "summary.json") == "gs://bucket/run/summary.json"
  assert paths.join("/local/data", "gs://bucket/img.png") == "gs://bucket/img.png"
  assert paths.dirname("gs://bucket/tok/tokenizer.model") == "gs://bucket/tok"
  assert paths.dirname("gs://bucket/x") == "gs://bucket" == paths.dirname("gs://bucket")


def test_unsupported_scheme_is_one_line():
  for call in (paths.absolute, paths.exists, paths.read_bytes):
    with pytest.raises(ValueError, match=r"^http://h/x: unsupported URI scheme http://"):
      call("http://h/x")


def test_uri_reaches_the_cloud_backend_intact(monkeypatch):
  """With no bucket behind it, a gs:// path fails in epath's backend, named whole."""
  seen = []

  class NoBucket(Exception):
    pass

  def no_bucket(path):
    seen.append(os.fspath(path))
    raise NoBucket(f"no bucket here for {path}")
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", no_bucket)
  monkeypatch.setattr(paths, "_missing_backend", lambda scheme: None)  # As if gcsfs were.
  with pytest.raises(NoBucket, match="gs://nobucket/tok/tokenizer.model"):
    tok_lib.Tokenizer.load("gs://nobucket/tok/tokenizer.model")
  with pytest.raises(NoBucket, match="gs://nobucket/data.json"):
    sources.load_llava_json("gs://nobucket/data.json")
  with pytest.raises(NoBucket, match="gs://nobucket/weights"):
    checkpoint_io.TensorSource("gs://nobucket/weights")
  assert seen and all(p.startswith("gs://nobucket/") for p in seen)


# ---- The project's readers and writers on a fake gs:// bucket.

@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/bucket through epath's fsspec backend.
  -> the local folder."""
  root = tmp_path / "bucket"
  root.mkdir()

  class FakeGcs(LocalFileSystem):
    cachable = False

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      if path.startswith("gs://"):
        path = str(tmp_path / path[len("gs://"):])
      return super()._strip_protocol(path)

  fake = FakeGcs()
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fake)
  monkeypatch.setattr(paths, "_missing_backend", lambda scheme: None)  # As if gcsfs were.
  return root


def test_helpers_on_a_bucket(bucket):
  paths.makedirs("gs://bucket/run/stage1")
  assert (bucket / "run" / "stage1").is_dir()
  paths.write_text_atomic("gs://bucket/run/summary.json", "{}")
  assert (bucket / "run" / "summary.json").read_text() == "{}"
  assert sorted(paths.listdir("gs://bucket/run")) == ["stage1", "summary.json"]
  assert paths.isdir("gs://bucket/run/stage1") and paths.isfile("gs://bucket/run/summary.json")
  assert not paths.exists("gs://bucket/run/nothing")
  paths.rename("gs://bucket/run/stage1", "gs://bucket/run/stage1.corrupt-1")
  assert (bucket / "run" / "stage1.corrupt-1").is_dir()
  assert paths.getsize("gs://bucket/run/summary.json") == 2


def _tiny_data(folder):
  """A LLaVA JSON with one image record and one text record in `folder`."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (folder / "images").mkdir()
  Image.new("RGB", (4, 3), (200, 10, 10)).save(folder / "images" / "a.png")
  records = [{"id": "a", "image": "a.png", "conversations": [
                 {"from": "human", "value": "<image>\nWhat colour is it?"},
                 {"from": "gpt", "value": "Red, a small red square."}]},
             {"id": "b", "conversations": [{"from": "human", "value": "Say hi twice."},
                                           {"from": "gpt", "value": "hi hi"}]}]
  (folder / "data.json").write_text(json.dumps(records))


def test_data_and_tokenizer_on_a_bucket(bucket):
  _tiny_data(bucket)
  src = sources.LlavaJsonSource("gs://bucket/data.json", "gs://bucket/images")
  assert len(src) == 2 and not src.problems  # The image was read and decoded.
  assert src[0]["image_path"] == "gs://bucket/images/a.png"
  out = tok_lib.train_from_json(["gs://bucket/data.json"], "gs://bucket/tok/tokenizer.model",
                                vocab_size=300, legacy=False)
  assert out["config"] == "gs://bucket/tok/tokenizer_config.json"
  assert sorted(os.listdir(bucket / "tok")) == ["tokenizer.model", "tokenizer_config.json"]
  tok = tok_lib.Tokenizer.load("gs://bucket/tok/tokenizer.model")
  assert tok.legacy_source == "tokenizer_config.json" and tok.legacy is False
  assert tok.decode(tok.encode("hi hi")) == "hi hi"


def test_weights_on_a_bucket(bucket):
  folder = bucket / "hf"
  folder.mkdir()
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([7, 8], np.int64)
  head = checkpoint_io.safetensors_header([("a", a.dtype, a.shape), ("b", b.dtype, b.shape)])
  (folder / "model.safetensors").write_bytes(head + a.tobytes() + b.tobytes())
  (folder / "config.json").write_text(json.dumps({"hidden_size": 3}))
  weights = checkpoint_io.TensorSource("gs://bucket/hf")
  assert weights.name == "gs://bucket/hf/model.safetensors"
  np.testing.assert_array_equal(weights.get("a"), a)
  np.testing.assert_array_equal(weights.get("b"), b)
  assert convert.read_hf_config("gs://bucket/hf") == {"hidden_size": 3}
  assert convert.read_hf_config("gs://bucket/hf/model.safetensors") == {"hidden_size": 3}
  (folder / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(checkpoint_io.CheckpointError, match="read from local disk only"):
    checkpoint_io.TensorSource("gs://bucket/hf/pytorch_model.bin")


def test_checkpoint_folder_on_a_bucket(bucket):
  """The Checkpointer's own file work (no orbax save: that would reach for real GCS)."""
  ckpt = ckpt_lib.Checkpointer.__new__(ckpt_lib.Checkpointer)
  ckpt.directory = "gs://bucket/run/stage1/checkpoints"
  for name in ("10", "20", "20.orbax-checkpoint-tmp-1", "notes"):
    (bucket / "run" / "stage1" / "checkpoints" / name).mkdir(parents=True)
  assert ckpt.finished_steps() == [10, 20]
  assert ckpt.step_path(20) == "gs://bucket/run/stage1/checkpoints/20"
  assert ckpt._move_aside(20) == "gs://bucket/run/stage1/checkpoints/20.corrupt-1"
  assert ckpt.finished_steps() == [10]


def test_summary_and_tensorboard_on_a_bucket(bucket):
  paths.makedirs("gs://bucket/run")  # train.py makes the workdir (the fake bucket needs it).
  assert metrics.write_summary("gs://bucket/run", {"b": 1, "a": [2]}) == \
      "gs://bucket/run/summary.json"
  assert json.loads((bucket / "run" / "summary.json").read_text()) == {"a": [2], "b": 1}
  assert metrics.tensorboard_problem("/tmp/run/tensorboard/stage1") is None
  assert "cannot write to az://" in metrics.tensorboard_problem("az://c/run/tensorboard")
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  gs_problem = metrics.tensorboard_problem("gs://bucket/run/tensorboard/stage1")
  if record_writer.GCS_ENABLED:
    assert gs_problem is None
  else:
    assert "google-cloud-storage" in gs_problem


def test_a_uri_without_its_package_is_one_line(monkeypatch):
  monkeypatch.setattr(paths, "_missing_backend", lambda scheme: {"gs": "gcsfs"}.get(scheme))
  with pytest.raises(ValueError) as e:
    paths.exists("gs://bucket/run")
  assert str(e.value) == ("gs://bucket/run: gs:// paths need the gcsfs package (pip install "
                          "gcsfs; for gs://, pip install -r requirements-cloud.txt)")
  assert paths.absolute("gs://bucket/run") == "gs://bucket/run"  # Strings need no package.
