"""Reliability II (issue 26): online fine-tuning's --resume and replay logs, the value range and game names,
a second signal inside a save, partial logs and stale temporary files, interrupted evaluations, and links
in a run folder.

As in test_reliability.py, every test checks one promise with real files and real signals: one clear
sentence before any long work, no silent change of the experiment, no lost work."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_finetune_online
import torch
from test_finetune_online import TINY
from test_reliability import ENV, one_line_error, start, tiny_args, wait_for

import cql_multigame
import finetune_online as fo
import machinery.checkpoints
import machinery.dqn_files
import machinery.runs
import record as recorder
import replay
import resnet
from cql_multigame import ConfigError, RunLock

ROOT = Path(__file__).resolve().parents[1]
checkpoint = test_finetune_online.checkpoint  # fixtures: a tiny cql_multigame.py checkpoint, one torch thread
one_thread = test_finetune_online.one_thread


def online_args(pretrained, runs_dir, **overrides) -> fo.Args:
    """A seconds-long finetune_online run from `pretrained` in the folder runs_dir/on."""
    base = {**TINY, "total_env_steps": 80, "learning_starts": 40, "run_name": "on", "game": "Breakout"}
    return fo.Args(checkpoint=pretrained, runs_dir=str(runs_dir), **{**base, **overrides})


def unfinished_online_run(pretrained, runs_dir, **overrides) -> Path:
    """A finished run whose summary.json is gone: what a kill during the final evaluation leaves."""
    fo.main(online_args(pretrained, runs_dir, **overrides))
    run_dir = Path(runs_dir) / "on"
    (run_dir / "summary.json").unlink()
    return run_dir


# ------------------------------------------------------------------------------------------- 1: online resume


def test_online_resume_names_every_difference_and_applies_a_new_lr(checkpoint, tmp_path, one_thread):
    unfinished_online_run(checkpoint, tmp_path)
    changed = dict(game="Boxing", n_step=5, buffer_size=600, num_envs=3, resume=True)
    with pytest.raises(ConfigError) as e:
        fo.main(online_args(checkpoint, tmp_path, **changed))
    message = str(e.value)
    for diff in ("--game Boxing (the run used Breakout)", "--n-step 5 (the run used 3)",
                 "--buffer-size 600 (the run used 400)", "--num-envs 3 (the run used 2)"):  # fmt: skip
        assert diff in message, message
    assert "\n" not in message and message.startswith("--resume would change the run")

    # another network shape from --checkpoint: named, not a size-mismatch traceback
    ckpt = cql_multigame.load_checkpoint(checkpoint)
    net = resnet.QNetwork(**{**ckpt["net_config"], "num_atoms": 21})
    other = tmp_path / "atoms21.pt"
    other_ckpt = {**ckpt, "model": net.state_dict(), "target": net.state_dict(), "net_config": net.config()}
    if "support" in ckpt:
        other_ckpt["support"] = {**ckpt["support"], "num_atoms": 21}
    torch.save(other_ckpt, other)
    with pytest.raises(ConfigError, match=r"network's num_atoms 21 from --checkpoint \(the run used 51\)"):
        fo.main(online_args(str(other), tmp_path, resume=True))
    with pytest.raises(ConfigError, match=r"--total-env-steps 40 is below the step the run .* \(80\)"):
        fo.main(online_args(checkpoint, tmp_path, resume=True, total_env_steps=40))

    # allowed: a longer run and another --lr, which reaches the restored Adam and is recorded
    summary = fo.main(online_args(checkpoint, tmp_path, resume=True, total_env_steps=120, lr=3e-5))
    assert summary["env_steps"] == 120
    saved = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=True)
    assert saved["args"]["lr"] == 3e-5 and {g["lr"] for g in saved["optimizer"]["param_groups"]} == {3e-5}


# ------------------------------------------------------------------------------- 4: a second signal in a save


def signals_inside_the_next_save(monkeypatch, run_dir: Path, which_save: int) -> dict:
    """Deliver SIGTERM, then SIGINT, to this process from inside the `which_save`-th checkpoint write (real
    signals, handled by the script's StopSignals), while its temporary file exists."""
    seen = {"saves": 0, "writes": 0, "tmp_existed": False}
    real_save, real_write = machinery.checkpoints.save_checkpoint, machinery.checkpoints._WriteRecorder.write

    def save(path, state):
        seen["saves"], seen["writes"] = seen["saves"] + 1, 0
        real_save(path, state)

    def write(self, data):
        if seen["saves"] == which_save:
            seen["writes"] += 1
            if seen["writes"] == 2:
                seen["tmp_existed"] = bool(list(run_dir.glob("checkpoint.pt.*.tmp")))
                os.kill(os.getpid(), signal.SIGTERM)  # the first: recorded, the save goes on
            elif seen["writes"] == 4:
                os.kill(os.getpid(), signal.SIGINT)  # the second: stops at once
        return real_write(self, data)

    monkeypatch.setattr(machinery.runs, "save_checkpoint", save)  # Run.save calls it from there
    monkeypatch.setattr(cql_multigame, "save_checkpoint", save)  # finetune_online calls it from there
    monkeypatch.setattr(machinery.checkpoints._WriteRecorder, "write", write)
    return seen


def exit_line(capsys, run, args) -> tuple[int, str]:
    """Run a script's main through run_script (as the command line does): its exit code and one line."""
    with pytest.raises(SystemExit) as e:
        cql_multigame.run_script(run, args)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected pos" not in err, err[-3000:]
    return e.value.code, err.strip().splitlines()[-1]


def test_a_second_signal_inside_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    data_dir, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "two"
    seen = signals_inside_the_next_save(monkeypatch, run_dir, which_save=2)  # saves at steps 4 and 8
    code, line = exit_line(capsys, cql_multigame.main, tiny_args(data_dir, tmp_path, run_name="two"))
    assert seen["tmp_existed"] and code == 128 + signal.SIGINT
    assert line.startswith("stopped at once by a second SIGINT (at step 8), without saving; "), line
    assert f"the last good checkpoint is {run_dir / 'checkpoint.pt'} (step 4)" in line
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not list(run_dir.glob("*.tmp"))


def test_a_second_signal_inside_an_online_save_keeps_the_previous_save(
    checkpoint,
    tmp_path,
    monkeypatch,
    capsys,
    one_thread,
):
    run_dir = tmp_path / "on"
    seen = signals_inside_the_next_save(monkeypatch, run_dir, which_save=2)  # saves at 40 and 80 env steps
    code, line = exit_line(capsys, fo.main, online_args(checkpoint, tmp_path, save_every=40))
    assert seen["tmp_existed"] and code == 128 + signal.SIGINT
    assert line.startswith("stopped at once by a second SIGINT (at 80 env steps), without saving"), line
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["online"]["env_steps"] == 40 and not list(run_dir.glob("*.tmp"))
    monkeypatch.undo()
    assert fo.main(online_args(checkpoint, tmp_path, save_every=40, resume=True))["env_steps"] == 80


# ---------------------------------------------------------------------------- 6: flags before the data load


@pytest.mark.parametrize(
    "v_min, v_max", [(float("nan"), 10.0), (-10.0, float("inf")), (-1e39, 10.0), (5.0, 5.0), (3.0, -3.0)]
)
def test_the_value_range_is_checked_before_the_data_load(tmp_path, v_min, v_max):
    with pytest.raises(
        ConfigError, match=r"--v-min and --v-max must be finite \(as float32\) with --v-min below"
    ):
        cql_multigame.main(tiny_args(tmp_path / "no-data", tmp_path / "runs", v_min=v_min, v_max=v_max))
    assert not (tmp_path / "runs").exists()


def test_game_names_are_canonicalized_and_duplicates_refused(tmp_path):
    args = tiny_args(tmp_path / "no-data", tmp_path, games=("breakout", "BOXING", "free_way"))
    cql_multigame.check_args(args, 1)
    assert args.games == ("Breakout", "Boxing", "Freeway")  # as the data folders and checkpoints spell them
    with pytest.raises(ConfigError, match=r"--games lists Breakout twice \(as Breakout and breakout\)"):
        cql_multigame.main(
            tiny_args(tmp_path / "no-data", tmp_path, games=("Breakout", "breakout", "Boxing"))
        )
    with pytest.raises(replay.ReplayDataError, match="--games lists Pong twice"):
        recorder.record(tmp_path / "rec", ["Pong", "pong"], capacity=20, progress=False)
    assert not (tmp_path / "rec").exists()  # refused before anything was written
    r = subprocess.run(
        [sys.executable, "record.py", "--out-dir", str(tmp_path / "rec"), "--games", "Pong", "Pong"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and one_line_error(r.stderr).startswith("error: --games lists Pong twice")


def test_absurd_sizes_are_refused_with_the_memory_they_need(tmp_path, checkpoint):
    with pytest.raises(
        ConfigError,
        match=r"--num-atoms 100000000 with --batch-size 12 needs about [\d,]+ GiB "
        r"for the C51 projection .* more than this machine's [\d,]+ GiB of memory; lower --num-atoms",
    ):
        cql_multigame.main(tiny_args(tmp_path / "no-data", tmp_path, num_atoms=100_000_000))
    with pytest.raises(ConfigError, match=r"--batch-size 10000000000 needs about [\d,]+ GiB for the frames"):
        cql_multigame.main(tiny_args(tmp_path / "no-data", tmp_path, batch_size=10**10))
    with pytest.raises(
        ConfigError, match=r"--buffer-size 100000000000 needs about [\d,]+ GiB for the replay"
    ):
        fo.main(online_args(checkpoint, tmp_path, buffer_size=10**11))
    cql_multigame.check_sizes(512, 51, 1_000_000, memory=8 * 2**30)  # the defaults fit in 8 GiB
    with pytest.raises(ConfigError, match="needs about 7 GiB for the replay buffer"):
        cql_multigame.check_sizes(512, 51, 1_000_000, memory=4 * 2**30)
    assert not list(tmp_path.glob("on*"))


def test_checkpoints_keep_the_support_and_loaders_refuse_one_without_it(data_dir, tmp_path):
    import finetune_offline

    cql_multigame.main(tiny_args(data_dir, tmp_path, run_name="pre", total_steps=2, save_every=2,
                                 v_min=-5.0, v_max=5.0, num_atoms=11))  # fmt: skip
    pre = tmp_path / "pre" / "checkpoint.pt"
    assert torch.load(pre, weights_only=True)["support"] == {"v_min": -5.0, "v_max": 5.0, "num_atoms": 11}
    # finetune_offline's checkpoints used to drop v_min/v_max (a later load read [-10, 10]): now kept
    finetune_offline.main(finetune_offline.Args(
        checkpoint=str(pre), game="Breakout", fine_tune_existing_head=True, data_dir=str(data_dir), runs=(1,),
        fraction=1.0, total_steps=2, batch_size=8, log_every=1, eval_every=0, save_every=2, eval_episodes=1,
        eval_envs=1, eval_max_steps=10, prefetch=0, runs_dir=str(tmp_path), run_name="ft", device="cpu",
    ))  # fmt: skip
    tuned = cql_multigame.load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert cql_multigame.support_bounds(tuned) == (-5.0, 5.0, 11)
    assert torch.equal(cql_multigame.support_from_checkpoint(tuned), torch.linspace(-5.0, 5.0, 11))

    # an older checkpoint that records v_min/v_max in its args still loads; one with neither is refused
    old = {k: v for k, v in tuned.items() if k != "support"}
    torch.save({**old, "args": {**old["args"], "v_min": -5.0, "v_max": 5.0}}, tmp_path / "old.pt")
    assert cql_multigame.support_bounds(cql_multigame.load_checkpoint(tmp_path / "old.pt")) == (-5.0, 5.0, 11)
    torch.save(old, tmp_path / "lacks.pt")
    with pytest.raises(ConfigError, match=r"does not record its C51 support \(v_min, v_max, num_atoms\)"):
        cql_multigame.load_checkpoint(tmp_path / "lacks.pt")
    with pytest.raises(
        replay.ReplayDataError, match="--policy: checkpoint .* does not record its C51 support"
    ):
        recorder.record(tmp_path / "rec", ["Breakout"], capacity=20, policy=str(tmp_path / "lacks.pt"),
                      progress=False)  # fmt: skip


# ---------------------------------------------------------------------------------------- 2: replay logs


def test_log_replay_dir_with_logs_is_refused_and_an_unwritable_one_found_first(checkpoint, tmp_path):
    logs = tmp_path / "logged"
    held = logs / "Breakout" / "1" / "replay_logs"
    held.mkdir(parents=True)
    (held / "$store$_action_ckpt.0.gz").write_bytes(b"an earlier agent's data")
    refused = (
        r"already holds Breakout logs \(run folders 1\); pass another --log-replay-dir, --resume .* or --log"
    )
    with pytest.raises(ConfigError, match=refused):
        fo.main(online_args(checkpoint, tmp_path, log_replay_dir=str(logs)))
    assert not (tmp_path / "on" / "checkpoint.pt").exists()
    (held / "notes.txt").write_text("mine")
    fo.prepare_log_replay_dir(logs, "Breakout", 2, resuming=False, overwrite=True)
    assert sorted(p.name for p in held.iterdir()) == ["notes.txt"]  # the replay files only
    assert (logs / "Breakout" / "2" / "replay_logs").is_dir()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    with pytest.raises(ConfigError, match=f"cannot write in --log-replay-dir {blocker} .*pass a writable"):
        fo.main(online_args(checkpoint, tmp_path, log_replay_dir=str(blocker)))
    assert not (tmp_path / "on" / "checkpoint.pt").exists()  # before any acting


def test_a_failing_log_write_saves_the_run_first(checkpoint, tmp_path, monkeypatch, one_thread):
    import errno

    logs = tmp_path / "logged"
    real = replay.write_checkpoint

    def full_disk_in_the_log(directory, suffix, *a, **k):
        if str(directory).startswith(str(logs)):
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise machinery.dqn_files._write_error(Path(directory) / "x", full, 10)
        return real(directory, suffix, *a, **k)

    monkeypatch.setattr(replay, "write_checkpoint", full_disk_in_the_log)
    args = online_args(checkpoint, tmp_path, log_replay_dir=str(logs), total_env_steps=240, buffer_size=200)
    with pytest.raises(ConfigError) as e:
        fo.main(args)  # a 100-transition buffer per env fills before 120 adds: the first snapshot fails
    message = str(e.value)
    assert "(No space left on device)" in message and "\n" not in message
    assert "; the run was saved at " in message and "resume with: python finetune_online.py" in message
    steps = int(message.split("the run was saved at ")[1].split()[0].replace(",", ""))
    saved = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=True)
    assert saved["online"]["env_steps"] == steps < 240
    monkeypatch.undo()
    assert fo.main(dataclasses.replace(args, resume=True))["env_steps"] == 240
    for env in ("1", "2"):  # the resume wrote the failed snapshot of the first fill first: the log has no gap
        first = replay.read_checkpoint(logs / "Breakout" / env / "replay_logs", 0, store=("terminal",))
        assert int(first["add_count"]) == 99 and first["terminal"][98] == 1  # the cut episode ends there


# ----------------------------------------------------------------------- 5: partial logs and temporary files


def test_a_partial_last_metrics_line_is_dropped_with_one_warning(data_dir, tmp_path, capsys):
    cql_multigame.main(tiny_args(data_dir, tmp_path, run_name="cut", total_steps=4))
    history = tmp_path / "cut" / "metrics.jsonl"
    with open(history, "a") as f:
        f.write('{"step": 5, "td_loss": 4.1')  # a write cut by a full disk
    capsys.readouterr()
    cql_multigame.main(tiny_args(data_dir, tmp_path, run_name="cut", total_steps=6, resume=True))
    err = capsys.readouterr().err
    assert err.count("warning: dropped the partial last line of") == 1 and "Traceback" not in err
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]

    # a run that died before its first checkpoint, started again without --resume: no duplicate steps
    died = tmp_path / "died"
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    cql_multigame.main(tiny_args(data_dir, tmp_path, run_name="died", total_steps=3))
    steps = [json.loads(line)["step"] for line in (died / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def stale_temp_files(folder: Path, name: str) -> list[Path]:
    """Temporary files as killed writers leave them: another host's, and a dead pid's on this host."""
    dead = 2**22 + 12345  # above the default pid_max: never alive
    paths = [
        folder / f"{name}.elsewhere.example.org.77.tmp",
        folder / f"{name}.{socket.gethostname()}.{dead}.tmp",
    ]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a checkpoint")
    return paths


def test_stale_temporary_files_are_removed_at_start_and_at_a_successful_save(tmp_path):
    run_dir = tmp_path / "run"
    at_start = stale_temp_files(run_dir, "checkpoint.pt") + stale_temp_files(
        run_dir / "replay_state" / "env0", "x.gz"
    )
    mine = run_dir / "notes.tmp"  # not a writer's temporary name: kept
    mine.write_text("mine")
    with RunLock(run_dir):
        assert not any(p.exists() for p in at_start) and mine.exists()
        at_save = stale_temp_files(run_dir, "checkpoint.pt")
        other = stale_temp_files(run_dir, "replay_state_rank1.pt")  # another writer's file: not this save's
        cql_multigame.save_checkpoint(run_dir / "checkpoint.pt", {"step": 1})
        assert not any(p.exists() for p in at_save) and all(p.exists() for p in other)

    # without the run lock (the recorder, the replay logs), only this host's dead writers' files go
    logs = tmp_path / "logs"
    elsewhere, dead = stale_temp_files(logs, "$store$_action_ckpt.0.gz")
    assert replay.remove_stale_temp_files(logs) == 1 and elsewhere.exists() and not dead.exists()


def test_an_interrupted_recording_says_how_to_continue_and_continues(tmp_path):
    out = tmp_path / "rec"
    flags = ["--out-dir", str(out), "--games", "Pong", "Boxing", "--num-checkpoints", "2",
             "--capacity", "1500", "--num-workers", "1"]  # fmt: skip
    proc = start([sys.executable, "record.py", *flags])
    pong, boxing = (out / g / "1" / "replay_logs" for g in ("Pong", "Boxing"))
    wait_for(lambda: 1 in replay.list_checkpoints(pong), proc, what="Pong's recording")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    line = one_line_error(err)
    command = "python record.py " + " ".join(flags) + " --resume"
    assert (
        line.startswith("interrupted by SIGINT: recording stopped;")
        and f"continue it with: {command} (" in line
    )
    assert not list(out.rglob("*.tmp")) and replay.list_checkpoints(boxing) != [0, 1]
    kept = {p: p.stat().st_mtime_ns for p in pong.iterdir()}
    (dead,) = stale_temp_files(boxing, "$store$_action_ckpt.0.gz")[1:]  # a kill -9's leftover

    again = [sys.executable, *command.split()[1:]]
    r = subprocess.run(again, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in pong.iterdir()} == kept and not dead.exists()
    fresh = recorder.record(tmp_path / "fresh", ["Pong", "Boxing"], num_checkpoints=2, capacity=1500,
                          num_workers=1, progress=False)  # fmt: skip
    for k in (0, 1):  # the continued recording holds exactly what an uninterrupted one holds
        a, b = replay.read_checkpoint(boxing, k), replay.read_checkpoint(fresh[1], k)
        assert all(np.array_equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------------- 3: interrupted evaluations


def signal_in_evaluation(monkeypatch, which: int) -> None:
    """A real SIGINT to this process inside the `which`-th evaluation of finetune_online (1: zero-shot)."""
    real, calls = fo.evaluate_variant, {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == which:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(fo, "evaluate_variant", evaluate)


def test_an_interrupted_zero_shot_evaluation_says_it_was_dropped(checkpoint, tmp_path, monkeypatch, capsys):
    signal_in_evaluation(monkeypatch, which=1)
    code, line = exit_line(capsys, fo.main, online_args(checkpoint, tmp_path, eval_every=40))
    assert code == 128 + signal.SIGINT
    assert line.startswith(
        "interrupted by SIGINT during the zero-shot evaluation, before any training: nothing"
    )
    assert not (tmp_path / "on" / "checkpoint.pt").exists()
    monkeypatch.undo()
    summary = fo.main(online_args(checkpoint, tmp_path, eval_every=40))  # the same command starts it again
    assert [e["env_steps"] for e in summary["evaluations"]] == [0, 40, 80]


def test_an_interrupted_periodic_evaluation_is_redone_on_resume(checkpoint, tmp_path, monkeypatch, capsys):
    signal_in_evaluation(monkeypatch, which=2)  # the one at 40 env steps
    code, line = exit_line(capsys, fo.main, online_args(checkpoint, tmp_path, eval_every=40))
    assert code == 128 + signal.SIGINT and line.startswith("interrupted by SIGINT at 40 of 80 env steps"), (
        line
    )
    saved = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=True)
    assert [e["env_steps"] for e in saved["online"]["evaluations"]] == [0]  # 40 was dropped ...
    monkeypatch.undo()
    summary = fo.main(online_args(checkpoint, tmp_path, eval_every=40, resume=True))
    assert [e["env_steps"] for e in summary["evaluations"]] == [0, 40, 80]  # ... and redone
    assert "redoing the evaluation at 40 env steps" in capsys.readouterr().out


def test_transfer_never_labels_fewer_seeds_as_more():
    from experiments import transfer

    curves = transfer.mean_se([{"0": 1.0, "80": 2.0}, {"80": 4.0}])  # seed 2's step-0 evaluation was dropped
    table = transfer.format_table("return (mean ± s.e. over 2 seeds)", "steps", {"fine-tuned": curves}, 2)
    assert "| 0 | 1.0 (1 of 2 seeds) |" in table and "| 80 | 3.0 ± 1.0 |" in table


# ------------------------------------------------------------------------------------ 7: links in run folders


def test_a_run_folder_with_links_is_refused_before_anything_is_written(tmp_path):
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    run_dir = tmp_path / "runs" / "linked"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").symlink_to(victim)
    (run_dir / "run.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=rf"the run folder {run_dir} holds a symbolic link .* -> {victim} "
                       r"\(and 1 more\); a run never writes through links"):  # fmt: skip
        cql_multigame.main(tiny_args(tmp_path / "no-data", tmp_path / "runs", run_name="linked"))
    (tmp_path / "runs" / "whole").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(ConfigError, match="holds a symbolic link"):
        cql_multigame.main(tiny_args(tmp_path / "no-data", tmp_path / "runs", run_name="whole"))
    assert victim.read_text() == "keep me" and sorted(p.name for p in victim.parent.iterdir()) == [
        "precious.txt"
    ]


def test_run_files_are_written_without_following_links(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for name in ("metrics.jsonl", "checkpoint.pt.tmp"):
        (tmp_path / name).symlink_to(victim)
    with pytest.raises(OSError):  # a link planted while a run goes on: ELOOP, not a write through it
        values = dict.fromkeys(["td_loss", "cql_term", "loss", "q_data", "q_max"], 1.0)
        cql_multigame.log_training(FakeWriter(), values, 1, 1.0, tmp_path / "metrics.jsonl")
    with pytest.raises(OSError):
        replay.open_no_follow(tmp_path / "checkpoint.pt.tmp", "wb")
    (tmp_path / "summary.json").symlink_to(victim)
    replay.write_file(tmp_path / "summary.json", "{}")  # replaces the link itself
    assert not (tmp_path / "summary.json").is_symlink() and (tmp_path / "summary.json").read_text() == "{}"
    assert victim.read_text() == "keep me"


class FakeWriter:
    def add_scalar(self, *a):
        pass
