"""Multi-process data: each process reads only its rows' documents; the shares are disjoint
and together are the single-process batch; states move between process counts; the global
array over the mesh is the single-process batch. Processes are simulated in one process,
and once run for real over gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import data
from jaxllm.config.schema import ConfigError
from jaxllm.data import loader
from jaxllm.parallel import sharding
from jaxllm.train.stages import to_global
from tests.helpers.data import KEYS, ByteTokenizer, make_config, take, two_text_sources
from tests.helpers.runs import ROOT, xla_flags


def test_two_processes_read_disjoint_shares_whose_union_is_the_batch(tmp_path, monkeypatch):
    cfg = make_config(seq_len=32, batch_size=4, sources=two_text_sources(tmp_path),
                      mixture={"a": 0.5, "b": 0.5})
    tok = ByteTokenizer()
    requested: dict[int, list[int]] = {0: [], 1: []}
    submit = loader.ThreadLoader.submit

    def recording(self, indices):
        requested[self.owner].extend(indices)
        return submit(self, indices)

    monkeypatch.setattr(loader.ThreadLoader, "submit", recording)
    whole = data.make_iterator(cfg, "pretrain", tok)
    whole._loader.owner = 0
    expected = take(whole, 6)
    requested[0].clear()
    shares = []
    for p in range(2):
        it = data.make_iterator(cfg, "pretrain", tok, process_index=p, process_count=2)
        it._loader.owner = p
        shares.append(take(it, 6))
        assert it.get_state()["rows"] == [2 * p, 2 * p + 2]
    for step in range(6):
        for key in KEYS:
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][key], shares[1][step][key]]), expected[step][key])
    # Documents are read only by the process whose rows (streams) need them.
    assert requested[0] and requested[1]
    assert {k % 4 for k in requested[0]} <= {0, 1}
    assert {k % 4 for k in requested[1]} <= {2, 3}
    assert not set(requested[0]) & set(requested[1])


def test_states_move_between_process_counts():
    cfg, tok = make_config(seq_len=32, batch_size=4), ByteTokenizer()
    parts = [data.make_iterator(cfg, "pretrain", tok, process_index=p, process_count=2)
             for p in range(2)]
    for it in parts:
        take(it, 3)
    states = [it.get_state() for it in parts]
    whole_state = {"batch_size": 4, "rows": [0, 4],
                   "streams": states[0]["streams"] + states[1]["streams"]}
    expected = [np.concatenate([a["inputs"], b["inputs"]])
                for a, b in zip(take(parts[0], 2), take(parts[1], 2), strict=True)]
    whole = data.make_iterator(cfg, "pretrain", tok)
    whole.set_state(whole_state)  # 2 processes saved, 1 resumes
    for batch, want in zip(take(whole, 2), expected, strict=True):
        np.testing.assert_array_equal(batch["inputs"], want)
    second = data.make_iterator(cfg, "pretrain", tok, process_index=1, process_count=2)
    second.set_state(whole_state)  # a global state gives each process its own rows
    np.testing.assert_array_equal(next(second)["inputs"], expected[0][2:])
    with pytest.raises(ValueError, match="covering rows 0..4"):
        whole.set_state(states[1])
    with pytest.raises(ConfigError, match="batch_size: 4 rows do not split over 3"):
        data.make_iterator(cfg, "pretrain", tok, process_index=0, process_count=3)


class FakeSharding:
    """What addressable_devices_indices_map says on one process of a multi-process mesh."""

    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b),) for i, (a, b) in enumerate(self.spans)}


def test_process_share_from_the_devices_rows():
    assert data.process_share(FakeSharding([(0, 4), (4, 8)]), 16) == (0, 2)
    assert data.process_share(FakeSharding([(12, 14), (14, 16)]), 16) == (3, 4)
    assert data.process_share(FakeSharding([(0, 16)] * 4), 16) == (0, 1)  # replicas
    with pytest.raises(ConfigError, match="not one contiguous"):
        data.process_share(FakeSharding([(0, 4), (8, 12)]), 16)
    mesh = sharding.make_mesh(make_config(batch_size=8), jax.devices())
    assert data.process_share(sharding.batch_sharding(mesh), 8) == (0, 1)


def test_to_global_puts_each_devices_rows_on_it():
    cfg, tok = make_config(seq_len=16, batch_size=8), ByteTokenizer()
    mesh = sharding.make_mesh(cfg, jax.devices())
    batch_sh = sharding.batch_sharding(mesh)
    local = next(data.make_iterator(cfg, "pretrain", tok, sharding=batch_sh))
    glob = to_global(local, batch_sh)
    for key in KEYS:
        assert glob[key].shape == (8, 16)
        for shard in glob[key].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])


CHILD = """
import json, sys
import json

import jax
pid, n, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if n > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", n, pid, initialization_timeout=60)
import numpy as np
from jax.experimental import multihost_utils
from tests.helpers.data import ByteTokenizer, make_config
from jaxllm.parallel import sharding
from jaxllm.data import make_iterator
cfg = make_config(seq_len=16, batch_size=8)
batch_sh = sharding.batch_sharding(sharding.make_mesh(cfg, jax.devices()))
it = make_iterator(cfg, "pretrain", ByteTokenizer(), sharding=batch_sh)
for _ in range(3):
    next(it)
state = it.get_state()  # a collective: every process's rows
local = next(it)["inputs"]
glob = jax.make_array_from_process_local_data(batch_sh, local)
full = np.asarray(multihost_utils.process_allgather(glob, tiled=True))
print(json.dumps({"rows": len(local), "state": state, "batch": full.tolist()}))
"""


def test_two_real_processes_gather_one_global_state(tmp_path):
    """Over gloo, as launch/local.sh runs them: each process reads half the rows, the state
    either saves is the whole batch's, and the global batch is the one-process batch."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags(1)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(p), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    env["XLA_FLAGS"] = xla_flags(2)
    one = subprocess.run([sys.executable, "-c", CHILD, "0", "1", "0"], env=env, text=True,
                         capture_output=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    single = json.loads(one.stdout.strip().splitlines()[-1])
    assert [r["rows"] for r in two] == [4, 4] and single["rows"] == 8
    assert two[0]["state"] == two[1]["state"] == single["state"]
    assert two[0]["state"]["rows"] == [0, 8]
    assert two[0]["batch"] == two[1]["batch"] == single["batch"]
