"""Tests for experiments/: the scripted behavior policies (their RAM mapping on real ALE, determinism, the
mixture), the recorder's module:function policies, and experiments/evidence.py's --quick path end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import atari
import record
import replay
from experiments import behavior, evidence

REPO = Path(__file__).resolve().parents[1]


def ram_with(**values):
    ram = np.zeros(128, np.uint8)
    for name, v in values.items():
        ram[getattr(behavior, f"BREAKOUT_{name.upper()}")] = v
    return ram


def test_breakout_policies_on_ram_values():
    assert behavior.breakout_track(ram_with(ball_y=0, ball_x=50, paddle_x=120)) == behavior.FIRE
    # aim = ball_x - 8 = 92; no move within 4 of the aim
    assert behavior.breakout_track(ram_with(ball_y=100, ball_x=100, paddle_x=80)) == behavior.RIGHT
    assert behavior.breakout_track(ram_with(ball_y=100, ball_x=100, paddle_x=95)) == behavior.NOOP
    assert behavior.breakout_track(ram_with(ball_y=100, ball_x=100, paddle_x=120)) == behavior.LEFT
    assert behavior.breakout_idle(ram_with(ball_y=0)) == behavior.FIRE
    assert behavior.breakout_idle(ram_with(ball_y=100, ball_x=10, paddle_x=150)) == behavior.NOOP


def test_breakout_ram_addresses_mean_what_the_policy_assumes():
    """On real ALE: no ball before the serve (ball_y 0), a ball after FIRE, RIGHT moves the paddle right."""
    env = atari.make_env("Breakout", seed=0, sticky_actions=0.0)
    env.reset()
    ram = env.unwrapped.ale.getRAM
    assert ram()[behavior.BREAKOUT_BALL_Y] == 0
    x0 = int(ram()[behavior.BREAKOUT_PADDLE_X])
    for _ in range(3):
        env.step(behavior.RIGHT)
    assert int(ram()[behavior.BREAKOUT_PADDLE_X]) > x0
    for _ in range(3):
        env.step(behavior.LEFT)
    assert int(ram()[behavior.BREAKOUT_PADDLE_X]) < int(x0) + 40
    env.step(behavior.FIRE)
    seen = []
    for _ in range(20):
        env.step(behavior.NOOP)
        seen.append(int(ram()[behavior.BREAKOUT_BALL_Y]))
    assert max(seen) > 0
    env.close()


def play(game, seed, steps):
    env = atari.make_env(game, seed=seed)
    act = behavior.scripted(game, env, np.random.default_rng(seed))
    obs, _ = env.reset()
    actions = []
    for _ in range(steps):
        a = act(obs)
        actions.append(a)
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return np.array(actions)


@pytest.mark.parametrize("game", ["Freeway", "DemonAttack", "Breakout", "Centipede"])
def test_scripted_policy_is_deterministic_and_legal(game):
    a, b = play(game, 3, 300), play(game, 3, 300)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) <= set(atari.legal_actions(game))
    assert not np.array_equal(a, play(game, 4, 300))


def test_mixture_frequencies_make_the_bad_action_the_most_frequent():
    freeway = play("Freeway", 0, 3000)
    shares = {a: float(np.mean(freeway == a)) for a in (behavior.UP, behavior.NOOP, behavior.DOWN)}
    assert shares[behavior.UP] == pytest.approx(0.40, abs=0.03)
    assert shares[behavior.NOOP] == pytest.approx(0.45, abs=0.03)
    demon = play("DemonAttack", 0, 3000)
    assert np.mean(demon == behavior.FIRE) == pytest.approx(0.30, abs=0.03)
    assert np.mean(demon == behavior.NOOP) == pytest.approx(0.40, abs=0.03)
    centipede = play("Centipede", 0, 3000)  # the same shooter's mixture on a game with 18 legal actions
    assert np.mean(centipede == behavior.FIRE) == pytest.approx(0.30, abs=0.03)
    assert np.mean(centipede == behavior.NOOP) == pytest.approx(0.40, abs=0.03)
    assert set(centipede.tolist()) == {behavior.NOOP, behavior.FIRE, behavior.LEFT, behavior.RIGHT}
    assert set(behavior.GOOD_ACTION) == set(behavior.MIXTURES)
    with pytest.raises(ValueError, match="no scripted behavior for Pong"):
        behavior.scripted("Pong", None, np.random.default_rng(0))


def test_recorder_takes_a_module_function_policy(tmp_path):
    (logs,) = record.record(
        tmp_path, ["Freeway"], num_checkpoints=2, capacity=1100, policy="experiments.behavior:scripted",
        seed=1, progress=False,
    )  # fmt: skip
    assert replay.list_checkpoints(logs) == [0, 1]
    data = replay.read_checkpoint(logs, 1)
    legal = atari.legal_actions("Freeway")
    up = legal.index(behavior.UP)
    written = data["action"][3:]  # minimal-set indices (padding rows are action 0)
    assert 0.3 < np.mean(written == up) < 0.5
    returns = replay.read_episode_returns(logs)
    assert returns == replay.read_episode_returns(logs, [0, 1]) and len(returns) >= 1  # Freeway: 2,048 steps
    with pytest.raises(replay.ReplayDataError, match="no scripted behavior for Pong"):
        record.record(tmp_path / "x", ["Pong"], capacity=100, policy="experiments.behavior:scripted")
    with pytest.raises(replay.ReplayDataError, match="nope"):
        record.record(tmp_path / "y", ["Pong"], capacity=100, policy="experiments.behavior:nope")


@pytest.fixture(scope="module")
def evidence_quick(tmp_path_factory):
    """`python experiments/evidence.py --quick` once: (its folders, the completed process)."""
    tmp_path = tmp_path_factory.mktemp("evidence")
    dirs = {k: str(tmp_path / k) for k in ("out_dir", "data_dir", "runs_dir")}
    cmd = [sys.executable, "experiments/evidence.py", "--quick", "--no-plots"]
    cmd += [x for k, v in dirs.items() for x in (f"--{k.replace('_', '-')}", v)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, dirs, out


def test_evidence_quick_runs_end_to_end_and_resumes(evidence_quick):
    tmp_path, dirs, out = evidence_quick
    assert "| game | behavior (data) | BC | TD only | CQL |" in out.stdout
    result = json.loads((tmp_path / "out_dir" / "results.json").read_text())
    games = evidence.Args().games
    assert set(games) >= {"Freeway", "DemonAttack", "Breakout", "Centipede"}
    assert set(result["table"]) == set(games) and set(result["claim"]) == set(games)
    for name in ("cql_seed1", "bc_seed1", "td_seed1"):
        stages = result["runs"][name]
        assert sorted(stages, key=int) == ["10", "20"] and stages["20"]["step"] == 20
        diag = stages["20"]["diagnostics"]["Breakout"]
        assert sum(diag["greedy_share"].values()) == pytest.approx(1.0)
        assert set(diag["mean_q"]) == set(diag["greedy_share"])  # one mean Q per legal action
        best = max(diag["mean_q"].values())
        assert diag["q_gap_best_second"] >= 0 and np.isfinite(best)
        start = diag["start"]  # the first states of the recorded episodes: none in 300 steps of Breakout
        assert start == {"states": 0, "greedy_share": {}, "data_share": {}, "mean_q": {}, "margin": None}
        assert evidence.diagnosed(stages["20"]["diagnostics"])  # so rediagnose leaves it alone
        signals = result["training"][name]  # metrics.jsonl up to the last evaluated step, for training.png
        assert signals["step"] and signals["step"][-1] <= 20
        assert len(signals["q_data"]) == len(signals["td_loss"]) == len(signals["step"])
    assert "mean Q of every action on dataset states" in out.stdout
    assert result["args"]["quick"] and result["table"]["Freeway"]["cql"]["seeds"] == 1
    cql_stages = tmp_path / "runs_dir" / f"cql_alpha{evidence.Args().cql_alpha:g}_seed1" / "stages.json"
    before = cql_stages.read_text()
    again = evidence.main(evidence.Args(quick=True, plots=False, **dirs))  # all cached: nothing re-runs
    assert cql_stages.read_text() == before
    assert again["table"] == result["table"]
    stage = evidence.main(evidence.Args(quick=True, plots=False, until=10, **dirs))  # earlier stage: cached
    assert cql_stages.read_text() == before and tuple(stage["args"]["eval_at"]) == (10,)
    assert stage["table"]["Freeway"]["cql"] == result["curves"]["Freeway"]["cql"]["10"]
    with pytest.raises(SystemExit, match="--until 15 must be one of --eval-at"):
        evidence.main(evidence.Args(quick=True, plots=False, until=15, **dirs))
    other = evidence.Args(quick=True, plots=False, games=("Freeway", "Breakout"), **dirs)  # cached data
    with pytest.raises(SystemExit, match="another configuration .*games"):  # its finished stages are not ours
        evidence.main(other)
    assert cql_stages.read_text() == before


def test_transfer_quick_runs_end_to_end_and_caches(evidence_quick, tmp_path):
    from experiments import transfer

    cql_run = f"cql_alpha{evidence.Args().cql_alpha:g}_seed1"
    checkpoint = evidence_quick[0] / "runs_dir" / cql_run / "checkpoint.pt"
    dirs = {k: str(tmp_path / k) for k in ("out_dir", "data_dir", "runs_dir")}
    args = transfer.Args(checkpoint=str(checkpoint), quick=True, plots=False, **dirs)
    result = transfer.main(args)
    assert (tmp_path / "data_dir" / "SpaceInvaders" / "1" / "replay_logs").is_dir()  # held-out data recorded
    offline = result["offline"]
    assert set(offline) == {"fine-tuned (pre-trained trunk)", "from scratch"}
    assert all(list(c) == ["10", "20"] and c["20"]["n"] == 1 for c in offline.values())  # every evaluation
    assert all(list(c) == ["0", "80", "160"] for c in result["online"].values())  # at 0, every 80, the end
    runs = tmp_path / "runs_dir"
    pretrained = json.loads((runs / "online_Freeway_pretrained_seed1" / "summary.json").read_text())
    assert pretrained["difficulty"] == 1 and pretrained["init"] == "pretrained"
    assert json.loads((tmp_path / "out_dir" / "results.json").read_text())["online"] == result["online"]
    stamp = (runs / "offline_SpaceInvaders_seed1" / "transfer.json").stat().st_mtime_ns
    again = transfer.main(args)  # everything cached: nothing re-runs
    assert again["offline"] == offline and again["online"] == result["online"]
    assert (runs / "offline_SpaceInvaders_seed1" / "transfer.json").stat().st_mtime_ns == stamp
    other = tmp_path / "other.pt"  # another start: the cached runs must not be reused for it
    other.write_bytes(checkpoint.read_bytes())
    with pytest.raises(SystemExit, match="holds runs from --checkpoint"):
        transfer.main(transfer.Args(checkpoint=str(other), quick=True, plots=False, **dirs))
    fresh = transfer.Args(checkpoint=str(other), runs_dir=str(tmp_path / "fresh"))
    transfer.check_start(fresh)  # a new --runs-dir takes the start it is given
    transfer.check_start(fresh)
    other.write_bytes(checkpoint.read_bytes() + b"retrained")  # the same path, another network: refused
    with pytest.raises(SystemExit, match="sha256"):
        transfer.check_start(fresh)


def test_alpha_pilot_quick_writes_diagnostics(tmp_path):
    from experiments import alpha_pilot

    args = alpha_pilot.Args(
        alphas=(0.0, 0.01), runs_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"),
        out=str(tmp_path / "pilot.json"), quick=True,
    )  # fmt: skip
    out = alpha_pilot.main(args)
    assert json.loads((tmp_path / "pilot.json").read_text())["pilots"] == out["pilots"]
    assert set(out["pilots"]) == {"0", "0.01"}
    for diag in out["pilots"].values():
        assert set(diag) == {"Freeway", "DemonAttack", "Breakout"}
        assert sum(diag["Freeway"]["greedy_share"].values()) == pytest.approx(1.0)
    # the pilots differ only in alpha: same seed and data, so alpha 0.01's extra term must change the Q-gap
    gaps = [out["pilots"][a]["Breakout"]["q_gap_best_second"] for a in ("0", "0.01")]
    assert gaps[0] != gaps[1]


def _processes_with(marker: str) -> list[int]:
    """The pids whose environment holds `marker` (Linux /proc; the processes of one test's command)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_sigterm_to_evidence_stops_every_worker_and_no_queued_chain_starts(tmp_path):
    """SIGTERM to evidence.py while two of its three chains train (--jobs 2): both save their step, the
    queued third never starts, no process outlives it, and it exits 128 + 15 with the line to go on. Before,
    evidence.py died at once and its pool's workers took the queued chains and trained on, orphaned."""
    import os
    import signal
    import time
    import uuid

    marker = f"SCALEDQL_TEST_{uuid.uuid4().hex}"
    runs = tmp_path / "runs"
    flags = (
        "--games Freeway Breakout --transitions-per-game 300 --checkpoints-per-game 1 --total-steps 20000 "
        "--eval-at 20000 --batch-size 4 --seeds 1 --td-seeds 1 --eval-episodes 1 --eval-max-steps 30 "
        "--diag-states 8 --jobs 2 --threads 1 --no-plots"
    ).split()
    dirs = ["--data-dir", str(tmp_path / "data"), "--runs-dir", str(runs), "--out-dir", str(tmp_path / "out")]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err_file:
        command = [sys.executable, "experiments/evidence.py", *flags, *dirs]
        env = {**os.environ, marker: "1"}
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    cql = f"cql_alpha{evidence.Args().cql_alpha:g}_seed1"
    logs = [runs / cql / "metrics.jsonl", runs / "bc_seed1" / "metrics.jsonl"]
    try:
        deadline = time.monotonic() + 300
        while not all(p.is_file() and p.stat().st_size for p in logs):  # both chains are training
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "evidence.py: run the same command again to continue." in err
    for log in logs:
        assert (log.parent / "checkpoint.pt").is_file()  # each saved the step it reached
    assert not (runs / "td_seed1" / "train.log").exists()  # the queued chain never started
    deadline = time.monotonic() + 30
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_with(marker)
