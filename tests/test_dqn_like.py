"""The DQN-like behavior (experiments/dqn_like.py): its policies read the right RAM, its agent improves by
checkpoint as specified, and the recorder writes its data in the DQN-Replay format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import atari
import record
import replay
from experiments import dqn_like as dl


def ram(**cells: int) -> np.ndarray:
    r = np.zeros(128, np.uint8)
    for k, v in cells.items():
        r[int(k[1:])] = v
    return r


def test_breakout_late_waits_for_a_low_ball_and_the_tracker_does_not():
    high = ram(a99=100, a101=100, a72=20)  # ball high, far right of the paddle
    low = ram(a99=100, a101=160, a72=20)
    assert dl.breakout_late(high) == dl.NOOP and dl.breakout_track(high) == dl.RIGHT
    assert dl.breakout_late(low) == dl.RIGHT
    assert dl.breakout_late(ram(a101=0)) == dl.FIRE  # no ball in play: serve


def test_freeway_cautious_waits_only_for_a_car_near_the_next_lane():
    y = 16 + 16 * 2  # lane 2; the next lane is 3 (RAM 111)
    assert dl.freeway_cautious(ram(a14=y, a111=50)) == dl.NOOP
    assert dl.freeway_cautious(ram(a14=y, a111=120)) == dl.UP


def test_boxing_policies_differ_only_in_the_approach():
    lined_up_far = ram(a32=10, a34=50, a33=100, a35=50)
    assert dl.boxing_still(lined_up_far) == dl.FIRE
    assert dl.boxing_approach(lined_up_far) == dl.RIGHT
    assert dl.boxing_still(ram(a32=10, a34=20, a33=100, a35=50)) == dl.DOWN


class FakeALE:
    """Episodes of 10 steps; RAM is irrelevant to Centipede's policies (M: LEFTFIRE, G: RIGHTFIRE)."""

    def __init__(self):
        self.t = 0

    def getEpisodeFrameNumber(self) -> int:  # noqa: N802 (ALE's name)
        return 4 * (self.t % 10)

    def getRAM(self) -> np.ndarray:  # noqa: N802
        return np.zeros(128, np.uint8)


class FakeEnv:
    def __init__(self):
        self.unwrapped = self
        self.ale = FakeALE()


def test_the_agent_improves_by_checkpoint_as_specified():
    env = FakeEnv()
    act = dl.improving("Centipede", env, np.random.default_rng(0))
    legal = len(atari.legal_actions("Centipede"))
    actions = []
    for _ in range(dl.STEPS_PER_CHECKPOINT * len(dl.P_BETTER)):
        actions.append(act(None))
        env.ale.t += 1
    actions = np.array(actions).reshape(len(dl.P_BETTER), -1)
    for k, (p, eps) in enumerate(zip(dl.P_BETTER, dl.EPSILON, strict=True)):
        expected = p * (1 - eps) + eps / legal  # G's action, plus the noise's share of it
        assert abs(np.mean(actions[k] == dl.RIGHTFIRE) - expected) < 0.04, k
    shares = [np.mean(a == dl.RIGHTFIRE) for a in actions]
    assert shares == sorted(shares)  # the better policy's share rises from checkpoint to checkpoint
    # whole episodes: within one 10-step episode the non-noise actions are all one policy's
    episode = actions[3][:10]
    assert len(set(episode) & {dl.LEFTFIRE, dl.RIGHTFIRE}) == 1


def test_recorded_in_the_dqn_replay_format(tmp_path):
    record.record(tmp_path, ["Freeway"], num_checkpoints=2, capacity=150,
                  policy="experiments.dqn_like:improving", progress=False)  # fmt: skip
    logs = tmp_path / "Freeway" / "1" / "replay_logs"
    assert replay.list_checkpoints(logs) == [0, 1]
    data = replay.read_checkpoint(logs, 1)
    assert data["observation"].shape == (150, 84, 84)
    assert set(np.unique(data["action"])) <= {0, 1, 2}  # Freeway's minimal set: NOOP, UP, DOWN


def test_settings_pilot_and_clips_quick_path(tmp_path):
    """The pilot's whole path on toy data (two candidates, two stages, diagnostics, plot), then a clip of one
    of its networks: a GIF with one frame per decision."""
    from PIL import Image

    from experiments import clips, settings_pilot

    args = settings_pilot.Args(data_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"),
                               out_dir=str(tmp_path / "out"), quick=True)  # fmt: skip
    out = settings_pilot.main(args)
    assert list(out["pilots"]) == ["dopamine", "cpu"]
    for stages in out["pilots"].values():
        assert list(stages) == ["10", "20"]
        for game in dl.GAMES:
            d = stages["20"]["games"][game]
            assert set(d["mean_q"]) == {str(a) for a in atari.legal_actions(game)}
            assert 0 < d["greedy_mode_share"] <= 1
        assert stages["20"]["td_loss"] is not None
    assert (tmp_path / "out" / "pilot_signals.png").is_file()
    run = tmp_path / "runs" / "cpu_seed0"
    clip_args = clips.Args(runs=(str(run),), game="Breakout", labels=("CQL",), out_dir=str(tmp_path / "c"),
                           seconds=1.0, max_steps=30)  # fmt: skip
    [gif] = clips.main(clip_args)
    im = Image.open(gif)
    durations = []
    for k in range(im.n_frames):  # Pillow merges identical consecutive frames, adding up their durations
        im.seek(k)
        durations.append(im.info["duration"])
    # 15 decisions, 1 s at the decision rate (GIF stores durations in 10 ms units: 67 ms becomes 60 or 70)
    assert abs(sum(durations) - 1000) <= 50 and len(durations) <= 15
    assert (tmp_path / "c" / "Breakout_actions.png").is_file()  # the whole episode's actions


def test_the_action_plot_puts_every_step_on_its_action_row(tmp_path):
    from experiments import clips

    assert clips.action_rows("Breakout", [1, 0, 4, 4, 3]).tolist() == [1, 0, 3, 3, 2]  # NOOP FIRE RIGHT LEFT
    assert clips.action_rows("Centipede", [12, 11]).tolist() == [12, 11]  # LEFTFIRE, RIGHTFIRE: all 18 legal
    episodes = {"CQL": ([1, 0, 4, 4, 3], 2.0), "BC": ([0, 0], 0.0)}
    assert clips.plot_actions("Breakout", episodes, tmp_path / "a.png").stat().st_size > 0


def test_replot_draws_the_committed_results_again(tmp_path):
    """evidence.py and transfer.py --replot: the PNGs from a results.json alone (no data, no runs)."""
    import shutil

    from experiments import evidence, transfer

    root = Path(__file__).resolve().parent.parent / "experiments" / "results"
    cases = [(evidence, "evidence", {"bars.png", "curves.png", "q_gaps.png"}),
             (transfer, "transfer", {"transfer_offline.png", "transfer_online.png"})]  # fmt: skip
    for module, folder, names in cases:
        out = tmp_path / folder
        out.mkdir()
        shutil.copy(root / folder / "results.json", out / "results.json")
        plots = module.main(module.Args(out_dir=str(out), replot=True))["plots"]
        assert {Path(p).name for p in plots} == names and all(Path(p).stat().st_size > 10_000 for p in plots)


def test_state_dependent_games_are_those_no_constant_action_reaches_in_the_report():
    import json

    path = Path(__file__).parent.parent / "experiments/results/dqn_like/behavior_improving.json"
    report = json.loads(path.read_text())["games"]
    measured = {g for g, r in report.items() if max(r["constant_actions"].values()) < r["behavior_all"]}
    assert measured == set(dl.STATE_DEPENDENT)


def _claim_inputs(wins: set[str]):
    """Synthetic evidence inputs: 3 seeds each; CQL scores far above BC and the behavior in `wins` only."""
    from experiments import evidence

    games = ("Freeway", "Breakout", "Boxing", "Centipede")
    shares = {g: {str(a): 0.001 for a in atari.legal_actions(g)} for g in games}
    for g in games:
        shares[g]["0"] = 1.0 - 0.001 * (len(shares[g]) - 1)  # NOOP the mode, every other action rare
    behavior = {g: {"episodes": 20, "mean": 10.0, "se": 1.0} for g in games}
    runs = {}
    for method in ("cql", "bc", "td"):
        for seed in (1, 2, 3):
            returns = {g: [30.0 + seed if method == "cql" and g in wins else 10.0 + seed] for g in games}
            # TD only: the rare actions' values above the mode's; CQL and BC: below
            bump = 0.5 if method == "td" else -0.5
            mean_q = {g: {a: (1.0 if a == "0" else 1.0 + bump) for a in shares[g]} for g in games}
            diag = {g: {"greedy_share": {"0": 1.0}, "q_gap_best_second": 0.1} for g in games}
            for g in games:
                diag[g]["mean_q"] = mean_q[g]
            serve = 0.6 if method == "bc" else 0.0  # Breakout's first states: how often the greedy FIREs
            q_serve = {**mean_q["Breakout"], "1": mean_q["Breakout"]["1"] + serve}  # BC's FIRE higher there
            diag["Breakout"]["start"] = {"states": 155, "greedy_share": {"1": serve, "0": 1 - serve},
                                         "data_share": {"1": 0.9, "0": 0.1}, "mean_q": q_serve,
                                         "margin": 0.5 if method == "bc" else -0.01 * seed}  # fmt: skip
            runs[f"{method}_seed{seed}"] = {"10": {"returns": returns, "diagnostics": diag}}
    args = evidence.Args(behavior="experiments.dqn_like:improving", games=games, td_seeds=(1, 2, 3),
                         eval_at=(10,), total_steps=10, claim_se=2.0, claim_min_games=2)  # fmt: skip
    return evidence, args, behavior, runs, shares


def test_the_claim_needs_a_state_dependent_game_and_reads_rare_action_values():
    evidence, args, behavior, runs, shares = _claim_inputs({"Freeway", "Centipede"})
    agg = evidence.aggregate(args, behavior, runs, shares)
    assert agg["claim_games"] == ["Freeway", "Centipede"]
    assert agg["state_dependent_games"] == ["Breakout", "Boxing"]
    assert not agg["claim_holds"]  # two constant-action games are not enough
    evidence, args, behavior, runs, shares = _claim_inputs({"Freeway", "Breakout"})
    agg = evidence.aggregate(args, behavior, runs, shares)
    assert agg["claim_holds"]
    three = evidence.aggregate(dataclasses.replace(args, claim_min_games=3), behavior, runs, shares)
    assert not three["claim_holds"]
    rare = agg["greedy_actions"]["Boxing"]
    assert len(rare["rare_actions"]) == 17 and rare["data_mode"] == 0
    assert rare["runs"]["td_seed1"]["q_rare_minus_mode"] == pytest.approx(0.5)
    assert rare["runs"]["cql_seed1"]["q_rare_minus_mode"] == pytest.approx(-0.5)
    printed = evidence.format_table(args, agg)
    # BC's FIRE 0.6 higher at the serve than everywhere: its advantage +0.45, the other three's -0.15
    serve_row = "| Breakout | 155 | FIRE 90% | 0.60 | 0.00 | 0.00 | +0.500 / -0.020 / -0.020 | "
    serve_row += "0.450 / 0.000 / 0.000 |"
    assert "why CQL" in printed and serve_row in printed
    assert "| Freeway | " not in printed.split("(Breakout's serve)")[1].split("why CQL")[0]  # no start data


def test_q_margin_and_which_diagnostics_are_out_of_date():
    from experiments import evidence

    q = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 4.5]])  # [2 states, 3 actions]
    assert evidence.q_margin(q, 1) == pytest.approx(((3 - 2) + (0 - 5)) / 2)
    assert evidence.q_margin(q, 0) == pytest.approx(((1 - 3) + (5 - 4.5)) / 2)
    everywhere = {"0": 1.0, "1": 2.0, "3": 3.0}
    assert evidence.advantage_shift({"0": 11.0, "1": 12.0, "3": 13.0}, everywhere) == 0.0  # only V moved
    assert evidence.advantage_shift({"0": 3.0, "1": 2.0, "3": 1.0}, everywhere) == pytest.approx(2.0)
    assert evidence.advantage_shift({}, everywhere) is None
    today = {"greedy_share": {}, "mean_q": {}, "start": {"states": 0, "margin": None}}
    assert evidence.diagnosed({"Breakout": today, "Boxing": today})
    before_margin = {**today, "start": {"states": 3, "greedy_share": {}, "data_share": {}}}
    assert not evidence.diagnosed({"Breakout": today, "Boxing": before_margin})  # rediagnose() redoes it
    assert not evidence.diagnosed({"Breakout": {"greedy_share": {}, "mean_q": {}}})  # before episode starts


def test_episode_starts_are_the_first_state_of_every_recorded_episode(tmp_path):
    """Three episodes in one DQN-Replay checkpoint: exactly their three first states come back, each the stack
    [0, 0, 0, first frame], with the action the data took there as a full-set id (Breakout: 1 is FIRE)."""
    from experiments import evidence

    rng = np.random.default_rng(0)
    legal = atari.legal_actions("Breakout")  # [0, 1, 3, 4]: NOOP FIRE RIGHT LEFT
    buf = replay.FrameBuffer(200, n_step=3, action_map=legal)
    firsts, first_actions = [], []
    for length in (10, 7, 12):
        for t in range(length):
            frame = rng.integers(1, 255, (84, 84), dtype=np.uint8)
            action = 1 if t == 0 else int(rng.integers(0, 4))  # minimal-set index 1: FIRE at the serve
            if t == 0:
                firsts.append(frame)
                first_actions.append(legal[action])
            buf.add(frame, action, 0.0, t == length - 1)
    buf.add(rng.integers(1, 255, (84, 84), dtype=np.uint8), 0, 0.0, False)  # a 4th episode's first step
    buf.save(tmp_path / "Breakout" / "1" / "replay_logs", 0)
    obs, actions = evidence.episode_starts(evidence.Args(data_dir=str(tmp_path)), "Breakout")
    # the 4th start is not a valid index (no n-step future after it), so it is not a sampled state either
    assert obs.shape == (3, 4, 84, 84) and not obs[:, :3].any()
    np.testing.assert_array_equal(obs[:, 3], np.stack(firsts))
    assert actions.tolist() == first_actions == [1, 1, 1]
