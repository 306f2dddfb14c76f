"""Smoke test of benchmarks/: every script runs end to end with tiny flags and bench_all.py assembles the
README's Performance table from their JSON. No timing is asserted (the numbers of a --quick run mean
nothing); the benchmarks themselves are run by hand (see the README's Performance section)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_benchmark_runs_and_the_table_is_assembled(tmp_path):
    out = tmp_path / "results"
    r = run(
        "benchmarks/bench_all.py",
        "--quick",
        "--device",
        "cpu",
        "--scratch",
        str(tmp_path),
        "--out-dir",
        str(out),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in ("learner", "learner_channels_last", "learner_unfused", "pipeline", "replay", "env"):
        assert (out / f"bench_{name}.json").is_file(), name
    assert (out / "bench_network_cpu_b32.json").is_file()
    summary = json.loads((out / "performance.json").read_text())
    parts = {row["part"].split()[0] for row in summary["rows"]}
    assert parts == {"learner", "pipeline", "replay", "environment"}
    learner = json.loads((out / "bench_learner.json").read_text())["rows"][0]
    assert learner["arch"] == "tiny" and learner["ratio_best"] > 0 and learner["flops_per_update"] > 0
    table = (out / "performance.md").read_text()
    assert (
        table.startswith("## Performance") and "| learner tiny |" in table and "python benchmarks/" in table
    )
    assert "atari.evaluate(num_workers=2), 2 envs in 2 subprocesses" in table  # bench_env's worker row


def test_a_wrong_flag_is_one_sentence_without_traceback(tmp_path):
    r = run("benchmarks/bench_learner.py", "--archs", "resnet7", "--out", str(tmp_path / "x.json"))
    assert r.returncode != 0
    assert "unknown --archs 'resnet7'" in r.stderr and "Traceback" not in r.stderr


def test_gpu_check_smoke_on_the_cpu(tmp_path):
    # the one-command accelerator check, shrunk to its CPU smoke test: tests, learner bench, torchrun run
    out = tmp_path / "gpu_check.json"
    r = run("benchmarks/gpu_check.py", "--device", "cpu", "--scratch", str(tmp_path), "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tests"]["ok"] and " passed" in result["tests"]["summary"]
    assert [(b["arch"], b["dtype"]) for b in result["bench"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert all(b["ok"] and b["samples_per_s"] > 0 for b in result["bench"])
    assert result["train"]["ranks_identical"] and result["train"]["nproc"] == 2
    assert "| training | torchrun x2" in r.stdout
