"""Shared pytest setup.

``tests/`` is put on sys.path so test modules can ``import graph_capture``."""
from __future__ import annotations

import os
import sys

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(autouse=True, scope="session")
def torch_single_thread():
    """One intra-op thread for the whole suite.

    The models are tiny: on this 2-core machine, when another process keeps a core busy, a tiny
    forward takes ~1 s with 2 OpenMP threads (they wait on each other) and ~15 ms with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def linear_calls(monkeypatch):
    """(weight data_ptr, rows multiplied) of every ``torch.nn.functional.linear`` call made
    during the test; clear it before the call under test."""
    calls: list[tuple[int, int]] = []
    real_linear = torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):
        calls.append((weight.data_ptr(), x.shape[0]))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    return calls
