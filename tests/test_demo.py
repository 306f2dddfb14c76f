"""The demo preset: scripted data recorded on the fly, and the claim table printed beside the evaluation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import record
import replay

ROOT = Path(__file__).resolve().parent.parent


def test_data_summary_counts_the_recorded_actions(tmp_path):
    record.record(tmp_path, ["Freeway"], num_checkpoints=1, capacity=3000,
                  policy="experiments.behavior:scripted", progress=False)  # fmt: skip
    logs = tmp_path / "Freeway" / "1" / "replay_logs"
    summary = record.data_summary(logs, "Freeway")
    d = replay.read_checkpoint(logs, 0)
    written = replay.valid_mask(d["terminal"], int(d["add_count"]), 1)
    counts = np.bincount(d["action"][written], minlength=3)  # Freeway's minimal set: NOOP, UP, DOWN
    assert summary["most_frequent_action"] == [0, 2, 5][int(counts.argmax())] == 0  # NOOP, the mistake
    assert abs(summary["action_share"] - counts.max() / counts.sum()) < 1e-9
    assert summary["behavior_returns"] == replay.read_episode_returns(logs)


def test_demo_prints_the_claim_table(tmp_path):
    cmd = [sys.executable, "cql_multigame.py", "demo", "--total-steps", "4", "--record-missing", "300",
           "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--eval-episodes", "1",
           "--eval-envs", "1", "--eval-max-steps", "20", "--save-every", "2", "--log-every", "2"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "transitions of the experiments.behavior:scripted policy" in out.stdout
    table = out.stdout[out.stdout.index("the claim:"):]
    for game in ("Freeway", "Centipede"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {game} |"))
        assert row.count("|") == 6 and row.rstrip(" |").split("| ")[-1] in ("yes", "no")
    assert "evaluating Freeway: 1/1 episodes" in out.stdout  # evaluation shows progress
