"""Test setup: an 8-device CPU platform (real meshes) and float32 everywhere.

Subprocesses the tests start (train.py, evaluate.py, predict.py, ...) share one
persistent JAX compilation cache per test session, so a program that several of them
compile (the tiny config's steps) is compiled once. This process keeps compiling in
memory only: jax is imported before the cache variables are set, so the tests that
count compilations see every one.
"""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position,unused-import  (before the cache variables)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"mqt_test_jax_cache_{os.getuid()}")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
