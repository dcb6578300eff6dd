"""Launch settings of several processes (mqt/distributed.py) and the helpers that
gather host values across them (on one process: the identity)."""
import jax
import numpy as np

from data import records
from mqt import distributed
from mqt import metrics as metrics_lib
from mqt import sharding as shard_lib

ADDRESS = "JAX_COORDINATOR_ADDRESS"


def test_launch_by_hand():
  env = {ADDRESS: "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.from_environment(env) == (
      {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}, [])
  assert distributed.wanted({"distributed": False}, env)


def test_nothing_set_is_one_process_unless_the_config_asks():
  assert distributed.from_environment({}) == ({}, [])
  assert not distributed.wanted({"distributed": False}, {})
  assert distributed.wanted({"distributed": True}, {})  # JAX detects the cluster.
  # The address alone: JAX detects the count and the id.
  assert distributed.from_environment({ADDRESS: "h:1"}) == ({"coordinator_address": "h:1"}, [])


def test_bad_settings_each_named():
  def problems(**env):
    return distributed.from_environment(env)[1]
  assert problems(JAX_NUM_PROCESSES="2") == [
      "JAX_NUM_PROCESSES is set but not JAX_PROCESS_ID: set both (or neither, to let JAX "
      "detect the cluster)"]
  assert problems(JAX_PROCESS_ID="0") == [
      "JAX_PROCESS_ID is set but not JAX_NUM_PROCESSES: set both (or neither, to let JAX "
      "detect the cluster)"]
  assert problems(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="-1") == [
      "JAX_PROCESS_ID='-1' is not a non-negative integer"]
  assert problems(JAX_NUM_PROCESSES="0", JAX_PROCESS_ID="0") == [
      "JAX_NUM_PROCESSES=0: needs at least 1"]
  assert problems(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2") == [
      "JAX_PROCESS_ID=2 is not below JAX_NUM_PROCESSES=2 (ids count from 0)"]
  assert problems(JAX_COORDINATOR_ADDRESS="nohost") == [
      "JAX_COORDINATOR_ADDRESS='nohost' is not host:port"]
  assert distributed.problems({"JAX_NUM_PROCESSES": "x", "JAX_PROCESS_ID": "0"}) == [
      "JAX_NUM_PROCESSES='x' is not a non-negative integer"]


def test_one_process_gathers_itself():
  assert distributed.allgather_json({"a": [1, "b"]}) == [{"a": [1, "b"]}]
  x = np.arange(12).reshape(6, 2)
  np.testing.assert_array_equal(shard_lib.local_rows(x), x)


def test_local_rows_of_a_batch_sharded_array():
  mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  x = np.arange(32).reshape(16, 2)
  np.testing.assert_array_equal(shard_lib.local_rows(
      jax.device_put(x, shard_lib.batch_sharding(mesh))), x)


def test_records_of_several_processes_merge_once():
  """Each process counts its own rows; merged, the ledgers unite (a record met by both
  counts once) and the row counters add up, and merging again adds nothing twice."""
  problem = lambda i, reason: records.Problem(i, f"r{i}", reason, f"record {i}: {reason}")
  a = metrics_lib.StageRecord(records.Ledger(10), skipped=3, truncated=1)
  b = metrics_lib.StageRecord(records.Ledger(10), skipped=3, truncated=1)
  a._shared = b._shared = (3, 1)  # Both restored from the same checkpoint.
  a.add_problems([problem(1, "overlong"), problem(2, "corrupt_image")])
  b.add_problems([problem(2, "corrupt_image"), problem(5, "overlong")])
  a.skipped, b.skipped, b.truncated = 5, 4, 4
  states = [{"skipped": 2, "truncated": 0, "ledger": a.ledger.state()},
            {"skipped": 1, "truncated": 3, "ledger": b.ledger.state()}]
  for record in (a, b):
    record.merge_processes(lambda mine: states)
    assert (record.skipped, record.truncated) == (6, 4)
    assert record.ledger.totals() == {"total": 10, "used": 7, "skipped_total": 3,
                                      "skipped": {"corrupt_image": 1, "overlong": 2}}
  a.skipped += 1  # One more skipped row here, none in the other process.
  a.merge_processes(lambda mine: [mine, {"skipped": 0, "truncated": 0,
                                         "ledger": b.ledger.state()}])
  assert (a.skipped, a.truncated) == (7, 4)
