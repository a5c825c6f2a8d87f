"""benchmarks/matmul.py: a row with both sides' figures for every product of every projection,
and the step's totals; asserts on what it prints, never on times."""

import os
import subprocess
import sys

import pytest

from benchmarks.timing import is_number  # a table cell that holds a measurement
from tests.helpers.runs import ROOT

pytest.importorskip("torch")


def test_every_product_has_both_sides():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.matmul",
                          "--config=configs/tiny.py:smoke", "--batch=2", "--seq_len=32",
                          "--iters=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and "GFLOP/s" not in line]
    names = ("q / o", "k, v", "gate, up", "down", "head")
    assert [r[0].split(" (")[0] for r in rows] == [n for n in names for _ in range(3)]
    assert {r[1] for r in rows} == {"x @ W", "dy @ Wᵀ", "xᵀ @ dy"}
    assert all(is_number(cell) for r in rows for cell in r[2:]), out
    assert "all products of one step: jax" in out
