"""Scale-out across processes and hosts (issue 25): stopping together, what processes > 0 may overwrite,
the logged loss under DDP, and the resume line a launcher prints.

A pod's hosts cannot be had on a CPU machine: torchrun's ranks stand in for them where the code is shared
(a signal that reaches one process, the sampler state of processes > 0 beside the checkpoint). The SPMD
channel between hosts (machinery.devices.spmd_any) needs torch-xla: benchmarks/xla_spmd_check.py runs it on
CPU devices of one host."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cql_multigame
from machinery import checkpoints, devices, runs
from machinery.flags import ConfigError
from machinery.runs import RunLock

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # torchrun of this venv
}  # fmt: skip


def test_sighup_is_a_stop_request_like_sigterm_unless_started_under_nohup():
    # what a closed ssh session (Ctrl-C on `gcloud ... ssh --worker=all`) sends: save and stop, not die
    outer = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (this test may run under nohup)
    try:
        stop = runs.StopSignals()
        with stop:
            stop.abandon = False
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            assert stop.signum == signal.SIGHUP and stop.name == "SIGHUP"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves: the run must survive the hangup
        stop = runs.StopSignals()
        with stop:
            stop.abandon = False
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            assert stop.signum is None
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, outer)


def test_processes_beyond_the_first_do_not_overwrite_an_earlier_runs_state(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rank in (0, 1, 3):
        checkpoints.check_rank_state(run_dir, rank, resume=False)  # a new run: nothing to protect
    (run_dir / "replay_state_rank1.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"already holds process 1's sampler state .*pass --resume"):
        checkpoints.check_rank_state(run_dir, 1, resume=False)
    checkpoints.check_rank_state(run_dir, 3, resume=False)  # another process's file is not its own
    # a host whose --runs-dir is not the shared one finds no checkpoint to resume
    with pytest.raises(ConfigError, match="process 1 sees no checkpoint .* same shared --runs-dir"):
        checkpoints.check_rank_state(run_dir, 1, resume=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    checkpoints.check_rank_state(run_dir, 1, resume=True)


def test_a_second_launch_of_the_same_process_rank_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir, name=runs.rank_lock_name(1)):
        with pytest.raises(ConfigError, match="is in use by another process"):
            RunLock(run_dir, name=runs.rank_lock_name(1)).acquire()
        with RunLock(run_dir, name=runs.rank_lock_name(0)):  # rank 0 of the same launch: its own
            assert (run_dir / RunLock.NAME).exists() and (run_dir / "run.rank1.lock").exists()


def _mean_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    processes = devices.Processes(rank=rank, world_size=2)
    metrics = {"loss": torch.tensor(1.0 + 2 * rank), "q_max": torch.tensor([-4.0, 10.0][rank])}
    mean = runs.mean_over_processes(metrics, processes)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({k: float(v) for k, v in mean.items()}))
    dist.destroy_process_group()


def test_under_ddp_the_logged_metrics_are_the_mean_over_all_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_mean_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"loss": 2.0, "q_max": 3.0}
    one = {"loss": torch.tensor(5.0)}
    assert runs.mean_over_processes(one, devices.Processes()) is one  # no communication


def test_the_resume_line_names_the_launcher_that_started_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["cql_multigame.py", "smoke", "--data-dir", "/data dir"])
    run_dir = tmp_path / "r"
    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    tail = "cql_multigame.py smoke --data-dir '/data dir' --resume --run-name r"
    assert runs.resume_command(run_dir, "cql_multigame.py") == f"python {tail}"
    assert runs.resume_command(run_dir, "cql_multigame.py", 4) == f"python {tail} (on each of the 4 hosts)"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # what torchrun sets in every process it starts
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert runs.resume_command(run_dir, "cql_multigame.py") == (
        f"torchrun --standalone --nproc_per_node 8 {tail}"
    )
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert runs.resume_command(run_dir, "cql_multigame.py") == (
        "torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 "
        f"{tail} (and on the other nodes the same with --node_rank 1 .. 1)"
    )


def _workers(torchrun_pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes torchrun started (its children with RANK in their environment)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != torchrun_pid:
                continue
            env = dict(
                kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(stat.parent.name)
    return out


def test_a_signal_to_one_torchrun_process_stops_all_at_one_step_and_the_printed_line_resumes(
    data_dir, tmp_path
):
    # two processes stand in for two hosts sharing a runs folder: a stop that reaches only one of them
    runs_dir = tmp_path / "runs"
    flags = [
        "--games", "Breakout", "Boxing", "Freeway",  # the data conftest records
        "--data-dir", str(data_dir), "--runs-dir", str(runs_dir), "--run-name", "pod",
        "--record-missing", "0",
        "--total-steps", "60", "--batch-size", "12", "--log-every", "1", "--save-every", "1000",
        "--eval-episodes", "1", "--eval-envs", "1", "--eval-max-steps", "10", "--prefetch", "0",
        "--device", "cpu",
    ]  # fmt: skip
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "cql_multigame.py", "smoke", *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    run_dir = runs_dir / "pod"
    end = time.monotonic() + 300
    while not (
        (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        assert proc.poll() is None and time.monotonic() < end, (
            proc.stderr.read()[-3000:] if proc.poll() else "timeout"
        )
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)  # only the second process (host) gets it
    _, err = proc.communicate(timeout=300)
    line = next(x for x in err.splitlines() if x.startswith("interrupted by SIGTERM at step "))
    step = int(line.split("at step ")[1].split()[0].replace(",", ""))
    assert step < 60 and step % runs.STOP_AGREE_EVERY == 0  # both stopped at the agreed step
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    rank1 = torch.load(run_dir / "replay_state_rank1.pt", weights_only=True)
    assert ckpt["step"] == rank1["step"] == step  # every process saved that same step
    resume = line.split("resume with: ")[1]
    assert resume.startswith("torchrun --standalone --nproc_per_node 2 cql_multigame.py smoke ")
    assert resume.endswith("--device cpu --resume") and " --run-name pod " in resume

    # the same command line without --resume is refused (rank 0's checkpoint, rank 1's state)
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    # the printed line, run as printed, continues the run to its end
    r = subprocess.run(shlex.split(resume), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))


@pytest.mark.parametrize("hosts", [1, 2])
def test_a_signal_during_an_evaluation_drops_it_on_one_host_but_not_across_spmd_hosts(hosts, tmp_path):
    # SPMD hosts all run the evaluation's graphs: one host dropping it alone would leave the others waiting
    def evaluate_games(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        return {"iqm_hns": 0.0}

    processes = devices.Processes(rank=0, world_size=hosts, xla=hosts > 1, spmd=hosts > 1)
    args = cql_multigame.PRESETS["smoke"][1]
    run = runs.Run(args, tmp_path, ["Breakout"], processes, play=evaluate_games)
    learner = cql_multigame.Learner(None, None, None, torch.zeros(3), None, 0.1)
    stop = runs.StopSignals()
    with stop:
        stop.abandon = False  # inside the training loop
        result = run._play(learner, 10, stop)
    assert stop.signum == signal.SIGTERM  # the stop is still requested: the loop's next agreement acts on it
    assert result == (None if hosts == 1 else {"iqm_hns": 0.0})
