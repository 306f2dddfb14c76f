"""cql_multigame.py end to end on small recorded data: the script, --resume, torchrun DDP, bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAMES

import cql_multigame
import record
import replay
from cql_multigame import PRESETS, Args, ConfigError, cli, main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data_dir, runs_dir, **overrides) -> Args:
    """The smoke preset, shrunk to seconds."""
    base = dataclasses.replace(
        PRESETS["smoke"][1],
        data_dir=str(data_dir),
        runs_dir=str(runs_dir),
        record_missing=0,
        total_steps=8,
        batch_size=12,
        log_every=1,
        save_every=4,
        target_update_every=3,
        eval_episodes=1,
        eval_envs=1,
        eval_max_steps=20,
    )
    return dataclasses.replace(base, **overrides)


def run_script(*argv, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_presets_parse():
    args = cli(["smoke", "--total-steps", "5"])
    assert args.arch == "tiny" and args.total_steps == 5
    paper = cli(["paper-suboptimal"])
    assert (paper.arch, paper.batch_size, paper.lr, paper.target_update_every, paper.n_step) == (
        "resnet101",
        512,
        2e-4,
        2000,
        3,
    )
    assert paper.total_steps == 10_000_000 and len(paper.games) == 40 and paper.checkpoints == "suboptimal"
    assert paper.runs == (1,)  # the paper's 10M per game: the first 20% of ONE run (400M over 40 games)
    near = cli(["paper-nearoptimal"])
    assert near.checkpoints == "nearoptimal" and near.runs == (1,)
    assert not paper.double_q and paper.reload_every == 0 and paper.windows_per_slot == 5
    bc = cli(["bc"])
    assert bc.td_weight == 0.0 and bc.cql_alpha == 1.0


def test_script_runs_and_writes_logs_checkpoint_and_summary(data_dir, tmp_path):
    r = run_script(
        "cql_multigame.py",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--record-missing",
        "0",
        "--total-steps",
        "6",
        "--batch-size",
        "12",
        "--log-every",
        "3",
        "--save-every",
        "3",
        "--eval-episodes",
        "2",
        "--eval-envs",
        "2",
        "--eval-workers",
        "2",  # the spawned env workers re-import this script: they must not start a run
        "--eval-max-steps",
        "20",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IQM" in r.stdout and "Breakout" in r.stdout
    run_dir = tmp_path / "scaledql_tiny_3games_seed1"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["games"] == list(GAMES) and ckpt["net_config"]["arch"] == "tiny"
    assert {"model", "target", "optimizer", "rng", "replay", "args"} <= set(ckpt)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["games"]) == set(GAMES) and summary["iqm_hns"] is not None
    lo, hi = summary["iqm_ci"]
    assert lo - 1e-9 <= summary["iqm_hns"] <= hi + 1e-9  # point estimate and CI from the same score matrix
    assert list(run_dir.glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    # a second start with the same --run-name must not overwrite it
    r2 = run_script(
        "cql_multigame.py",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        run_dir.name,
        "--total-steps",
        "6",
    )
    assert r2.returncode != 0 and "--resume" in r2.stderr and "Traceback" not in r2.stderr


def test_default_run_names_never_reuse_a_finished_run(tmp_path):
    args = tiny_args("unused", tmp_path)
    first = cql_multigame.choose_run_dir(args)
    assert first.name == "scaledql_tiny_3games_seed1"
    assert cql_multigame.choose_run_dir(dataclasses.replace(args, resume=True)) == first  # nothing to resume
    first.mkdir()
    (first / "checkpoint.pt").touch()
    assert cql_multigame.choose_run_dir(args).name == "scaledql_tiny_3games_seed1_2"  # the same command again
    assert (
        cql_multigame.choose_run_dir(dataclasses.replace(args, resume=True)) == first
    )  # continue the newest
    assert cql_multigame.choose_run_dir(dataclasses.replace(args, run_name="mine")).name == "mine"


def losses(run_dir):
    return {x["step"]: x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_the_same_batches_and_losses(data_dir, tmp_path, prefetch):
    full = main(tiny_args(data_dir, tmp_path, run_name="full", prefetch=prefetch))
    assert full["step"] == 8
    main(
        tiny_args(data_dir, tmp_path, run_name="cut", prefetch=prefetch, total_steps=4)
    )  # "killed" at step 4
    main(tiny_args(data_dir, tmp_path, run_name="cut", prefetch=prefetch, resume=True))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9))
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # one line per step
    for step in range(5, 9):  # after the resume: identical losses, so identical batches and parameters
        for key in ("loss", "td_loss", "cql_term", "q_data"):
            assert a[step][key] == b[step][key], (step, key)
    ca = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


def test_torchrun_two_processes_keep_identical_parameters(data_dir, tmp_path):
    r = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "cql_multigame.py",
        "smoke",
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--record-missing",
        "0",
        "--total-steps",
        "4",
        "--batch-size",
        "12",
        "--log-every",
        "2",
        "--save-every",
        "4",
        "--eval-episodes",
        "1",
        "--eval-envs",
        "1",
        "--eval-max-steps",
        "10",
        "--save-all-ranks",
        "--device",
        "cpu",
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "scaledql_tiny_3games_seed1"
    p0 = torch.load(run_dir / "params_rank0.pt", weights_only=True)
    p1 = torch.load(run_dir / "params_rank1.pt", weights_only=True)
    init = cql_multigame.resnet.QNetwork(num_games=3, arch="tiny")
    changed = 0
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
        changed += not torch.equal(p0[k], init.state_dict()[k])
    assert changed > 0
    # each rank sampled its own share: rank 1 saved its sampler state beside the checkpoint
    assert (run_dir / "replay_state_rank1.pt").is_file()


def test_torchrun_four_processes_split_the_games_of_the_global_batch(data_dir, tmp_path):
    # more games than samples per process (6 games, batch 8: 2 rows per rank), as 40 games at batch 512
    # on 64 replicas: each rank draws a rotating subset of the games from its own share of their data
    games = GAMES + ("Asterix", "Seaquest", "Qbert")
    data6 = tmp_path / "data6"
    data6.mkdir()
    for game in GAMES:
        (data6 / game).symlink_to(data_dir / game)
    record.record(data6, games[3:], runs=(1,), num_checkpoints=1, capacity=1500, seed=0, progress=False)
    steps = 6
    r = run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        "cql_multigame.py", "smoke", "--games", *games, "--data-dir", str(data6),
        "--runs-dir", str(tmp_path / "runs"), "--run-name", "four", "--record-missing", "0",
        "--total-steps", str(steps), "--batch-size", "8", "--log-every", "3", "--save-every", "3",
        "--target-update-every", "2", "--eval-episodes", "1", "--eval-envs", "1", "--eval-max-steps", "5",
        "--prefetch", "0", "--save-all-ranks", "--device", "cpu",
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "four"
    params = [torch.load(run_dir / f"params_rank{k}.pt", weights_only=True) for k in range(4)]
    init = cql_multigame.resnet.QNetwork(num_games=6, arch="tiny").state_dict()
    for k in params[0]:
        for p in params[1:]:
            assert torch.equal(params[0][k], p[k]), k
    assert any(not torch.equal(params[0][k], init[k]) for k in init)
    rows = [torch.load(run_dir / f"batch_games_rank{k}.pt", weights_only=True)["games"] for k in range(4)]
    assert all(x.shape == (steps, 2) for x in rows)
    for step in range(steps):
        global_batch = torch.cat([x[step] for x in rows])
        counts = torch.bincount(global_batch, minlength=6).tolist()
        # the 1-process share of batch 8 over 6 games: 1 each, 2 extra rows rotating over the games
        assert counts == np.bincount(replay.rank_batch_games(8, 6, step), minlength=6).tolist()
        assert sorted(counts) == [1, 1, 1, 1, 2, 2]
        for k in range(4):
            assert rows[k][step].tolist() == replay.rank_batch_games(8, 6, step, k, 4).tolist()
    for k in (1, 2, 3):  # every rank created the folder it writes into and saved its sampler state
        assert (run_dir / f"replay_state_rank{k}.pt").is_file()


def test_bad_input_stops_with_one_sentence(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown --arch 'resnet7'.*resnet101"):
        main(tiny_args(data_dir, tmp_path, arch="resnet7"))
    with pytest.raises(ConfigError, match="Breakout"):
        main(tiny_args(data_dir, tmp_path, games=("Breakot", "Boxing")))
    with pytest.raises(ConfigError, match="smaller than the 3 games"):
        main(tiny_args(data_dir, tmp_path, batch_size=2))
    with pytest.raises(ConfigError, match="--eval-workers must be 0"):  # before training, not at evaluation
        main(tiny_args(data_dir, tmp_path, eval_workers=-1))
    with pytest.raises(ConfigError, match="--eval-envs must be at least 1"):
        main(tiny_args(data_dir, tmp_path, eval_envs=0))
    with pytest.raises(ConfigError, match="--resume found no checkpoint"):
        main(tiny_args(data_dir, tmp_path, run_name="nothing", resume=True))
    with pytest.raises(replay.ReplayDataError):
        main(tiny_args(tmp_path / "empty", tmp_path))
    main(tiny_args(data_dir, tmp_path, run_name="tinyrun", total_steps=2))
    with pytest.raises(ConfigError, match="holds a tiny network but --arch is impala"):
        main(tiny_args(data_dir, tmp_path, run_name="tinyrun", arch="impala", resume=True))
    # and from the command line: one line, no traceback
    r = run_script("cql_multigame.py", "smoke", "--arch", "resnet7", "--data-dir", str(data_dir))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = cql_multigame.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 6:  # from step 6 on the loss is NaN
            loss = loss * float("nan")
            metrics = {k: v * float("nan") for k, v in metrics.items()}
        return loss, metrics

    monkeypatch.setattr(cql_multigame, "compute_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 6"):
        main(tiny_args(data_dir, tmp_path, run_name="nan", prefetch=0))
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_after_a_kill_drops_lines_past_the_checkpoint(data_dir, tmp_path):
    """A kill after step 6 leaves metrics.jsonl lines and TensorBoard events for steps 5-6 that the
    checkpoint (step 4) does not cover; the resumed run writes them again, once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(tiny_args(data_dir, tmp_path, run_name="killed", total_steps=6, save_every=4, prefetch=0))
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    ckpt["step"] = 4  # as if the process died between the save at step 4 and the one at step 6
    torch.save(ckpt, tmp_path / "killed" / "checkpoint.pt")
    torch.save(ckpt, tmp_path / "killed" / "step4.pt")
    main(tiny_args(data_dir, tmp_path, run_name="killed", prefetch=0, resume=True))
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    events = EventAccumulator(str(tmp_path / "killed")).Reload()
    assert [e.step for e in events.Scalars("losses/total_loss")] == list(range(1, 9))


def test_a_save_that_skips_non_finite_weights_warns(capsys):
    net = torch.nn.Linear(3, 2)
    assert cql_multigame.all_finite(net, 7) and capsys.readouterr().err == ""
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    assert not cql_multigame.all_finite(net, 7)
    assert "non-finite weights at step 7: checkpoint not saved" in capsys.readouterr().err


def test_plan_only_needs_no_data_and_prints_the_streaming_plan(tmp_path):
    flags = ["--plan-only", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path / "runs")]
    r = run_script("cql_multigame.py", "paper-suboptimal", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "10 checkpoints, 9,999,999 transitions per game (399,999,960 in all)" in out
    for key in ("slots: 41", "windows per slot: 5", "reload period:", "data seen over the run: 100.0%",
                "distinct checkpoints per batch:"):  # fmt: skip
        assert key in out, key
    assert not (tmp_path / "none").exists() and not (tmp_path / "runs").exists()
