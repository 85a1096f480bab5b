"""Fixtures the evaluator's test modules share (imported by them, so they apply to those modules only)."""

from __future__ import annotations

import pytest
import torch

from para_policy.evaluation import runner


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster than two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_baseline_cache():
    """Each test computes its own sequential baseline (the runner caches it per process)."""
    runner._BASELINE_CACHE.clear()
    yield
    runner._BASELINE_CACHE.clear()
