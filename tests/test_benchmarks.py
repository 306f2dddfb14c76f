"""Smoke test of benchmarks/: every script runs end to end with tiny flags and bench_all.py assembles the
docs/performance.md's table from their JSON. No timing is asserted (the numbers of a --quick run mean
nothing); the benchmarks themselves are run by hand (see docs/performance.md)."""

import json
import os
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
    out = tmp_path / "out"
    r = run("benchmarks/gpu_check.py", "--device", "cpu", "--scratch", str(tmp_path), "--out-dir", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    parts = {p["part"]: p for p in result["parts"]}
    assert parts["install"]["ok"] and parts["install"]["missing_before"] == []
    assert parts["tests"]["ok"] and " passed" in parts["tests"]["summary"]
    bench = [p for p in result["parts"] if p["part"] == "bench"]
    assert [(b["arch"], b["dtype"]) for b in bench] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert all(b["ok"] and b["samples_per_s"] > 0 for b in bench)
    train = parts["train"]
    assert train["ranks_identical"] and train["nproc"] == 2 and train["ddp_check"]
    assert sorted(map(int, train["losses"])) == list(range(1, 7)) and train["steps_per_s"] > 0
    assert result["done"] and "| training | torchrun x2 (DDP check)" in r.stdout
    assert (out / "gpu_check.md").read_text() in r.stdout  # the table on disk is the one printed


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_gpu_check_says_a_one_process_run_is_not_a_ddp_check():
    gpu_check = _gpu_check()
    row = {"part": "train", "nproc": 1, "ddp_check": False, "games": 8, "arch": "resnet50", "ok": True,
           "losses": {50: 4.1, 100: 3.2}, "steps_done": 100, "stopped_at_limit": False, "steps_per_s": 9.5,
           "loss_down": True}  # fmt: skip
    text = gpu_check.table(gpu_check.Args(), {"torch": "2.11.0", "wall_s": 1.0, "parts": [row]})
    assert "| training | 1 process: NOT a DDP check, 8 games, resnet50" in text
    assert "4.100 → 3.200 (down)" in text and "ranks identical" not in text


def _fake_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of distribution `name` with module `name` (what pip needs to install)."""
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**files, f"{info}/RECORD": record}.items():
            z.writestr(k, v)
    return path


def test_gpu_check_installs_missing_packages_from_the_wheel_folder_without_network(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    name = "scaledql_fake_missing"
    monkeypatch.setattr(gpu_check, "NEEDED", {name: name.replace("_", "-")})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network: only the folder
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after the test
    row = gpu_check.install_missing(tmp_path / "no_wheels", tmp_path / "site", timeout=120)
    assert not row["ok"] and "run benchmarks/gpu_wheels.sh" in row["summary"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, name)
    row = gpu_check.install_missing(wheels, tmp_path / "site", timeout=120)
    assert row["ok"], row
    assert row["missing_before"] == [name] and row["installed"] == [f"{name}-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / name / "__init__.py").is_file()
    assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)  # for the parts' subprocesses
