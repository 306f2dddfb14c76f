"""Fixtures shared by the training-script tests (test_cql_multigame.py, test_reliability.py)."""

import pytest

import record

GAMES = ("Breakout", "Boxing", "Freeway")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """1,500 random-policy transitions of each of GAMES, recorded once per test module."""
    path = tmp_path_factory.mktemp("data")
    record.record(path, GAMES, runs=(1,), num_checkpoints=1, capacity=1500, seed=0, progress=False)
    return path
