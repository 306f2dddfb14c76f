"""What a user and a hostile machine do to a training run (issue 15): bad flags, a resume with changed
settings, Ctrl-C and SIGTERM, a full or read-only disk, two processes on one run folder, bad data.

Every test checks the same promise: one clear sentence before any long work, no silent change of the
experiment, no lost work. Where the behaviour belongs to the command line, the test runs the script."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cql_multigame import tiny_args as cql_tiny_args

import cql_multigame
import finetune_offline
import finetune_online
import machinery.checkpoints
import machinery.runs
import record
import replay
from cql_multigame import Args, ConfigError, DiskWriteError, RunLock, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def tiny_args(data_dir, runs_dir, **overrides) -> Args:
    """test_cql_multigame's seconds-long smoke run, sampling inside the loop (no prefetch thread)."""
    return cql_tiny_args(data_dir, runs_dir, **{"prefetch": 0, **overrides})


def train_command(data_dir, runs_dir, **flags) -> list[str]:
    """A cql_multigame.py run that trains until it is stopped (no saves, no evaluation), unless `flags`
    (run_name="x", eval_every=2, ...) say otherwise."""
    flags = {
        **dict(data_dir=data_dir, runs_dir=runs_dir, record_missing=0, total_steps=1_000_000,
               batch_size=12, log_every=1, save_every=1_000_000, eval_every=0, eval_episodes=1, eval_envs=1,
               eval_max_steps=20, prefetch=0),
        **flags,
    }  # fmt: skip
    argv = [x for k, v in flags.items() for x in (cql_multigame.flag_name(k), str(v))]
    return [sys.executable, "cql_multigame.py", "smoke", *argv]


def start(cmd) -> subprocess.Popen:
    # a session of its own: a signal to its process group reaches it and its children, not pytest
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(condition, proc, timeout=240.0, what="the run to start training"):
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def session_pids(sid: int) -> list[int]:
    """Processes alive in session `sid` (the script and every child it started), zombies excluded."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def one_line_error(stderr: str) -> str:
    """The last line of stderr, after checking that there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("total_steps", 0, "--total-steps must be at least 1, got --total-steps 0"),
        ("lr", 0.0, "--lr must be above 0"),
        ("lr", -1e-4, "--lr must be above 0"),
        ("lr", float("nan"), "--lr must be above 0"),
        ("adam_eps", 0.0, "--adam-eps must be above 0"),
        ("cql_alpha", -0.1, "--cql-alpha must be 0 or more"),
        ("td_weight", -1.0, "--td-weight must be 0 or more"),
        ("log_every", 0, "--log-every must be at least 1"),
        ("save_every", -5, "--save-every must be at least 1"),
        ("target_update_every", 0, "--target-update-every must be at least 1"),
        ("eval_every", -1, r"--eval-every must be 0 \(evaluate only at the end\) or more"),
        ("gamma", 1.5, r"--gamma must be in \[0, 1\]"),
        ("memory_budget_gb", 0.0, "--memory-budget-gb must be above 0"),
        ("reload_every", -1, r"--reload-every must be 0 \(chosen from --total-steps\) or more"),
        ("record_missing", 3, "--record-missing must be 0"),
    ],
)
def test_every_range_is_checked_before_the_data_load(tmp_path, flag, value, allowed):
    # the data folder does not exist: a range error must come first, or this would be a ReplayDataError
    with pytest.raises(ConfigError, match=allowed):
        main(tiny_args(tmp_path / "no-data", tmp_path / "runs", **{flag: value}))
    assert not (tmp_path / "runs").exists()


def test_a_huge_finite_lr_is_warned_before_the_data_load(tmp_path):
    with pytest.warns(UserWarning, match="--lr 5.0 is over 0.01, 50x the paper's 2e-4"):
        with pytest.raises(replay.ReplayDataError, match="does not exist"):  # the warning comes first
            main(tiny_args(tmp_path / "no-data", tmp_path / "runs", lr=5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the paper's and the demo's rates: no warning
        with pytest.raises(replay.ReplayDataError):
            main(tiny_args(tmp_path / "no-data", tmp_path / "runs", lr=2e-4))


def test_both_loss_weights_zero_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--cql-alpha and --td-weight are both 0"):
        main(tiny_args(tmp_path / "no-data", tmp_path, cql_alpha=0.0, td_weight=0.0))


def test_the_fine_tuning_scripts_share_the_checker(tmp_path):
    off = finetune_offline.Args(
        from_scratch=True, arch="tiny", data_dir=str(tmp_path), runs_dir=str(tmp_path)
    )
    cases = [("lr", -1.0, "--lr must be above 0"), ("log_every", 0, "--log-every must"),
             ("save_every", 0, "--save-every must"), ("adam_eps", 0.0, "--adam-eps")]  # fmt: skip
    for field, value, match in cases:
        with pytest.raises(ConfigError, match=match):
            finetune_offline.main(dataclasses.replace(off, **{field: value}))
    on = finetune_online.Args(checkpoint=str(tmp_path / "none.pt"), runs_dir=str(tmp_path))
    cases = [("lr", 0.0, "--lr must be above 0"), ("adam_eps", -1.0, "--adam-eps"),
             ("cql_alpha", -1.0, "--cql-alpha must be 0 or more"),
             ("epsilon_start", 2.0, r"--epsilon-start must be a probability in \[0, 1\]")]  # fmt: skip
    for field, value, match in cases:
        with pytest.raises(ConfigError, match=match):
            finetune_online.main(dataclasses.replace(on, **{field: value}))


def test_record_missing_checks_every_flag_before_recording(tmp_path):
    data = tmp_path / "to-record"
    with pytest.raises(ConfigError, match="--lr must be above 0"):
        main(tiny_args(data, tmp_path / "runs", record_missing=500, lr=0.0))
    assert not data.exists()  # nothing was recorded
    r = subprocess.run(
        [sys.executable, "cql_multigame.py", "smoke", "--data-dir", str(data), "--runs-dir", str(tmp_path),
         "--record-missing", "500", "--save-every", "0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and not data.exists()
    assert one_line_error(r.stderr) == "error: --save-every must be at least 1, got --save-every 0."


def test_recorder_cli_uses_the_checker_and_the_checkpoint_loader(tmp_path):
    def record(*flags):
        return subprocess.run(
            [sys.executable, "record.py", "--out-dir", str(tmp_path / "out"), "--games", "Pong", *flags],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = record("--epsilon", "1.5")
    assert r.returncode == 2
    assert one_line_error(r.stderr) == "error: --epsilon must be a probability in [0, 1], got --epsilon 1.5."
    r = record("--num-checkpoints", "0")
    assert r.returncode == 2 and "--num-checkpoints must be at least 1" in one_line_error(r.stderr)
    good = tmp_path / "good.pt"
    net = cql_multigame.resnet.QNetwork(num_games=1, arch="tiny")
    torch.save({"model": net.state_dict(), "net_config": net.config(), "games": ["Pong"], "step": 0}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = record("--policy", str(truncated), "--capacity", "50")
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert line.startswith(f"error: --policy: checkpoint {truncated} is corrupt"), line
    assert not (tmp_path / "out" / "Pong").exists()  # refused before recording


# ---------------------------------------------------------------------------------------------- resume


def test_resume_names_every_changed_setting_and_applies_a_new_lr(data_dir, tmp_path):
    main(tiny_args(data_dir, tmp_path, run_name="run", total_steps=4))
    with pytest.raises(ConfigError) as e:
        main(tiny_args(data_dir, tmp_path, run_name="run", resume=True, n_step=5, num_atoms=21))
    message = str(e.value)
    assert "--n-step 5 (the run used 3)" in message and "--num-atoms 21 (the run used 51)" in message
    assert "\n" not in message and "--batch-size" not in message
    with pytest.raises(ConfigError, match="--games"):  # the existing check comes first
        main(tiny_args(data_dir, tmp_path, run_name="run", resume=True, games=("Breakout", "Boxing")))
    with pytest.raises(ConfigError, match="--total-steps 2 is below the step the run .* has reached \\(4\\)"):
        main(tiny_args(data_dir, tmp_path, run_name="run", resume=True, total_steps=2))

    # allowed to change: the length, logging, evaluation; --lr reaches the restored Adam and is recorded
    main(tiny_args(data_dir, tmp_path, run_name="run", resume=True, total_steps=6, lr=3e-5, log_every=2))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["lr"] == 3e-5
    assert {g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {3e-5}


def test_resume_refuses_a_checkpoint_without_optimizer_in_one_sentence(data_dir, tmp_path):
    main(tiny_args(data_dir, tmp_path, run_name="run", total_steps=4))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=r"lacks \['optimizer'\], which --resume needs"):
        main(tiny_args(data_dir, tmp_path, run_name="run", resume=True))


def test_compare_resume_args_treats_a_missing_field_as_its_default():
    saved = dataclasses.asdict(Args())
    del saved["td_weight"]  # a checkpoint from before the flag existed
    assert cql_multigame.compare_resume_args(saved, Args()) == []
    assert cql_multigame.compare_resume_args(saved, Args(td_weight=0.5)) == [
        "--td-weight 0.5 (the run used 1.0)"
    ]
    assert cql_multigame.compare_resume_args(saved, Args(total_steps=5, eval_every=0, lr=1e-3)) == []


# ---------------------------------------------------------------------------------------------- interrupts


def test_sigterm_saves_the_step_prints_how_to_resume_and_a_second_writer_is_refused(data_dir, tmp_path):
    runs = tmp_path / "runs"
    proc = start(train_command(data_dir, runs, run_name="long"))
    run_dir = runs / "long"
    wait_for(lambda: logged_steps(run_dir) >= 2, proc)

    # one run folder, one writer: a second process on the same --run-name stops with one sentence
    second = subprocess.run(
        train_command(data_dir, runs, run_name="long"), cwd=ROOT, env=ENV, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    line = one_line_error(second.stderr)
    assert second.returncode == 1 and f"{run_dir} is in use by another process (pid {proc.pid} on" in line
    assert "pass another --run-name" in line

    proc.send_signal(signal.SIGTERM)  # what a scheduler sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    line = one_line_error(err)
    assert line.startswith("interrupted by SIGTERM at step "), line
    step = int(line.split("at step ")[1].split()[0].replace(",", ""))
    assert f"checkpoint saved to {run_dir / 'checkpoint.pt'}" in line
    assert line.endswith("--run-name long --resume") and "python cql_multigame.py smoke" in line
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == step >= 2
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / RunLock.NAME).exists()

    # the run goes on from there
    resume = tiny_args(
        data_dir, runs, run_name="long", resume=True, total_steps=step + 2, target_update_every=500
    )
    assert main(resume)["step"] == step + 2


def test_ctrl_c_during_an_evaluation_with_workers_leaves_no_process_and_no_traceback(data_dir, tmp_path):
    runs = tmp_path / "runs"
    cmd = train_command(
        data_dir, runs, run_name="ev", eval_every=2, eval_workers=2, eval_episodes=2, eval_envs=2,
        eval_max_steps=27000,
    )  # fmt: skip
    proc = start(cmd)
    # workers exist only while an evaluation runs (step 2): the script, 2 workers, and the spawn tracker
    wait_for(lambda: len(session_pids(proc.pid)) >= 3, proc, what="the evaluation workers")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    line = one_line_error(err)
    assert line.startswith("interrupted by SIGINT at step ") and "checkpoint saved to" in line, line
    step = int(line.split("at step ")[1].split()[0].replace(",", ""))
    assert step % 2 == 0  # during an evaluation (every 2 steps): dropped, the step saved
    assert torch.load(runs / "ev" / "checkpoint.pt", weights_only=True)["step"] == step
    end = time.monotonic() + 15
    while session_pids(proc.pid) and time.monotonic() < end:  # the workers never outlive the parent
        time.sleep(0.2)
    assert session_pids(proc.pid) == []


def test_stop_signals_abandon_then_defer_then_force():
    before = signal.getsignal(signal.SIGINT)
    stop = cql_multigame.StopSignals()
    with stop:
        with pytest.raises(cql_multigame.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)  # abandon is on before the loop: raised at once
            time.sleep(1)
        stop.abandon, stop.signum = False, None
        os.kill(os.getpid(), signal.SIGTERM)  # in the loop: only recorded
        time.sleep(0.1)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(cql_multigame.Interrupted):  # a second one: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ---------------------------------------------------------------------------------------------- disks


def test_full_disk_save_is_one_sentence_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    real_write = cql_multigame._WriteRecorder.write
    saves = {"n": 0, "failing": False}

    def write(self, data):
        if saves["failing"]:
            self.f.write(bytes(data)[: len(data) // 2])  # a partial file, as on a real full disk
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)

    real_save = machinery.checkpoints.save_checkpoint

    def save(path, state):
        saves["failing"] = saves["n"] >= 1  # the first save works, the second meets a full disk
        saves["n"] += 1
        real_save(path, state)

    monkeypatch.setattr(machinery.checkpoints._WriteRecorder, "write", write)
    monkeypatch.setattr(machinery.runs, "save_checkpoint", save)  # Run.save calls it from there
    with pytest.raises(DiskWriteError) as e:
        main(tiny_args(data_dir, tmp_path, run_name="full"))
    run_dir = tmp_path / "full"
    message = str(e.value)
    assert message.startswith(f"could not write {run_dir / 'checkpoint.pt'} (No space left on device):")
    assert "it needs about" in message and "MB free" in message and "is unchanged" in message
    assert "\n" not in message
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4  # the previous one
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / RunLock.NAME).exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_full_disk_for_real_on_a_small_tmpfs(data_dir, tmp_path):
    """As root: the runs folder on a 60 MB tmpfs, where the first tiny checkpoint (34 MB) fits but not a
    second one beside it. Skipped where tmpfs cannot be mounted (the monkeypatched test above covers it)."""
    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "60m"):
        pytest.skip("needs root and mount -t tmpfs")
    try:
        r = subprocess.run(
            train_command(data_dir, fs, run_name="small", total_steps=8, save_every=4, log_every=4),
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        line = one_line_error(r.stderr)
        assert r.returncode == 1, r.stderr[-2000:]
        assert line.startswith(
            f"error: could not write {fs / 'small' / 'checkpoint.pt'} (No space left on device)"
        )
        assert "it needs about" in line and "is unchanged" in line
        assert torch.load(fs / "small" / "checkpoint.pt", weights_only=True)["step"] == 4
        assert not list((fs / "small").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(fs)], check=False)


def test_unwritable_runs_folder_is_found_before_the_data_load(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    with pytest.raises(DiskWriteError, match=f"cannot write in the run folder {blocker}/run .*--runs-dir"):
        main(tiny_args(tmp_path / "no-data", blocker, run_name="run"))  # the data folder does not exist


def test_recorder_full_disk_keeps_earlier_files_and_removes_partial_ones(tmp_path, monkeypatch):
    logs = tmp_path / "Pong" / "1" / "replay_logs"
    c = 40
    arrays = (
        np.zeros((c, 84, 84), np.uint8),
        np.zeros(c, np.int32),
        np.zeros(c, np.float32),
        np.zeros(c, np.uint8),
    )
    replay.write_checkpoint(logs, 0, *arrays)
    before = {p.name: p.read_bytes() for p in logs.iterdir()}
    import gzip

    real = gzip.GzipFile.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] > 3:  # the first files are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", write)
    with pytest.raises(replay.ReplayWriteError, match="No space left on device.*it needs up to .* MB"):
        replay.write_checkpoint(logs, 0, np.ones((c, 84, 84), np.uint8), *arrays[1:])
    assert {p.name: p.read_bytes() for p in logs.iterdir()} == before  # no .tmp, old files intact
    with pytest.raises(replay.ReplayWriteError, match="cannot write in --out-dir"):
        record.record(tmp_path / "Pong" / "1" / "replay_logs" / "$store$_action_ckpt.0.gz", ["Pong"],
                      capacity=20, progress=False)  # fmt: skip


# ---------------------------------------------------------------------------------------------- lock


def test_run_lock_blocks_a_live_owner_and_not_a_stale_file(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        owner = json.loads((run_dir / RunLock.NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(ConfigError, match=rf"is in use by another process \(pid {os.getpid()} on "):
            RunLock(run_dir).acquire()  # a second open file: flock conflicts, also in one process
    assert not run_dir.exists()  # it created the folder and wrote nothing else: gone again
    run_dir.mkdir()
    (run_dir / RunLock.NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone", "started": "x",
                                                     "command": "killed -9"}))  # fmt: skip
    with RunLock(run_dir):  # the owner died: its file does not block
        assert json.loads((run_dir / RunLock.NAME).read_text())["pid"] == os.getpid()
    assert run_dir.is_dir()  # an existing folder stays


def test_temporary_names_are_unique_per_writer(tmp_path):
    p = tmp_path / "checkpoint.pt"
    name = cql_multigame.temp_path(p).name
    assert name.startswith("checkpoint.pt.") and name.endswith(f".{os.getpid()}.tmp")
    assert replay._temp_path(p) == cql_multigame.temp_path(p)


# ---------------------------------------------------------------------------------------------- smaller ones


def test_nan_stop_says_when_no_checkpoint_was_written(data_dir, tmp_path, monkeypatch):
    real = cql_multigame.compute_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), {k: v * float("nan") for k, v in metrics.items()}

    monkeypatch.setattr(cql_multigame, "compute_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 1 .*no checkpoint was written yet"):
        main(tiny_args(data_dir, tmp_path, run_name="nan"))
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def _game_data(root: Path, game: str, reward=None, terminal=None, c: int = 60) -> None:
    rng = np.random.default_rng(0)
    term = np.zeros(c, np.uint8) if terminal is None else terminal
    replay.write_checkpoint(
        root / game / "1" / "replay_logs", 0, rng.integers(0, 255, (c, 84, 84), dtype=np.uint8),
        np.zeros(c, np.int32), np.zeros(c, np.float32) if reward is None else reward, term,
    )  # fmt: skip


def test_nan_rewards_are_refused_with_the_file_named(tmp_path):
    reward = np.zeros(60, np.float32)
    reward[17] = np.inf
    _game_data(tmp_path, "Pong", reward=reward)
    with pytest.raises(replay.ReplayDataError, match=r"reward_ckpt.0.gz holds 1 non-finite rewards"):
        replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")


def test_odd_terminal_values_are_warned_about_once(tmp_path):
    terminal = np.zeros(60, np.uint8)
    terminal[[20, 40]] = 2
    for game in ("Pong", "Boxing"):
        _game_data(tmp_path, game, terminal=terminal)
    with pytest.warns(UserWarning, match="terminal values other than 0 and 1 \\(2\\)") as record:
        r = replay.MultiGameReplay(tmp_path, ["Pong", "Boxing"], runs=(1,), checkpoints="nearoptimal")
    assert len([w for w in record if "terminal values" in str(w.message)]) == 1
    r.close()


def test_exclusions_are_rechecked_on_resume(tmp_path):
    for game in ("Pong",):
        _game_data(tmp_path, game)
    r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")
    state = r.state_dict()
    r.close()
    # as saved after the checkpoint's files went missing while streaming, and another that is still gone
    state["excluded"] = [[0, 1, 0], [0, 7, 3]]
    r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")
    r.load_state_dict(state)
    plan = r.plan_summary()
    assert "taken back on resume (their files read fine again): Pong run 1 checkpoint 0" in plan
    assert "excluded (unreadable while streaming): Pong run 7 checkpoint 3" in plan
    assert r.stats()["excluded_checkpoints"] == 1
    r.close()


def _agree_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    processes = cql_multigame.Processes(rank=rank, world_size=2)
    # only rank 1 got the signal; both must stop, at the same agreement
    agreed = [cql_multigame.agree_to_stop(processes, requested=rank == 1 and k == 1) for k in range(3)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(agreed))
    dist.destroy_process_group()


def test_processes_agree_on_a_stop_that_only_one_of_them_got(tmp_path):
    """torchrun forwards a signal to every process, but each may see it one step apart: they agree (a MAX
    all-reduce over gloo) so that all stop at the same step and none waits for a peer that left."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True, False]
