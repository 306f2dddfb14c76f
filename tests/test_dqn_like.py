"""The DQN-like behavior (experiments/dqn_like.py): its policies read the right RAM, its agent improves by
checkpoint as specified, and the recorder writes its data in the DQN-Replay format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
