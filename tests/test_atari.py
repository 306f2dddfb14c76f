"""Tests for atari.py: games, score math, legal actions, the env protocol against raw ALE, evaluation."""

import collections
import math

import cv2
import gymnasium as gym
import numpy as np
import pytest
from ale_py import roms

import atari

ALL_GAMES = atari.TRAIN_GAMES + atari.HELDOUT_GAMES


# ---------------------------------------------------------------------------------------------- games/scores


def test_game_lists():
    assert len(atari.TRAIN_GAMES) == 40 and len(set(atari.TRAIN_GAMES)) == 40
    assert "RoadRunner" not in atari.TRAIN_GAMES
    assert atari.HELDOUT_GAMES == ("Alien", "MsPacman", "Pong", "SpaceInvaders", "StarGunner")
    assert not set(atari.TRAIN_GAMES) & set(atari.HELDOUT_GAMES)


@pytest.mark.parametrize("game", ALL_GAMES)
def test_all_45_games_exist_in_ale_py(game):
    assert atari.check_game(game) == game
    assert roms.get_rom_path(atari._rom_id(game)).exists()
    assert gym.spec(f"ALE/{game}-v5") is not None


def test_score_tables_complete():
    assert set(atari.RANDOM_SCORES) == set(ALL_GAMES) == set(atari.HUMAN_SCORES)
    no_human = {g for g in ALL_GAMES if math.isnan(atari.HUMAN_SCORES[g])}
    assert no_human == {"Carnival", "Pooyan"}  # not in Atari-57 (see the comment in atari.py)
    for game in ALL_GAMES:
        assert math.isfinite(atari.RANDOM_SCORES[game])
        if game not in no_human:
            assert atari.HUMAN_SCORES[game] > atari.RANDOM_SCORES[game], game


def test_human_normalized_score():
    assert atari.human_normalized_score("Pong", 14.6) == pytest.approx(1.0)
    assert atari.human_normalized_score("Pong", -20.7) == pytest.approx(0.0)
    assert isinstance(atari.human_normalized_score("Breakout", 30.5), float)
    scores = np.array([1.7, 30.5, 59.3])
    np.testing.assert_allclose(atari.human_normalized_score("Breakout", scores), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="Carnival has no published human score"):
        atari.human_normalized_score("Carnival", 1000.0)


def _iqm_reference(values):
    x = sorted(float(v) for v in np.ravel(values))
    cut = len(x) // 4
    middle = x[cut : len(x) - cut]
    return sum(middle) / len(middle)


def test_iqm_matches_reference():
    assert atari.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert atari.iqm([5.0]) == 5.0 and atari.iqm([1.0, 3.0]) == 2.0
    rng = np.random.default_rng(0)
    for n in [1, 3, 4, 5, 7, 40, 101]:
        x = rng.standard_cauchy(n)
        assert atari.iqm(x) == pytest.approx(_iqm_reference(x))
    m = rng.normal(size=(5, 40))
    assert atari.iqm(m) == pytest.approx(_iqm_reference(m))  # a [runs, tasks] matrix is flattened


def _stratified_bootstrap_reference(scores, reps, alpha, seed):
    rng = np.random.default_rng(seed)
    runs, tasks = scores.shape
    stats = []
    for _ in range(reps):
        cols = [scores[rng.integers(runs, size=runs), t] for t in range(tasks)]  # resample within each task
        stats.append(_iqm_reference(np.stack(cols, axis=1)))
    return np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])


def test_iqm_confidence_interval_matches_slow_stratified_bootstrap():
    rng = np.random.default_rng(1)
    scores = rng.gamma(2.0, 0.5, size=(5, 12)) * rng.uniform(0.2, 3.0, size=12)  # [runs, tasks]
    lo, hi = atari.iqm_confidence_interval(scores, reps=4000, seed=0)
    ref_lo, ref_hi = _stratified_bootstrap_reference(scores, reps=4000, alpha=0.05, seed=123)
    width = ref_hi - ref_lo
    assert lo < atari.iqm(scores) < hi
    assert abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width


# rliable's own numbers. aggregate_iqm: its metrics_test asserts 1.5 and 2 for these two matrices. The CIs
# were computed by hand on rliable's code path (rliable/library.py, github.com/google-research/rliable):
# get_interval_estimates({"x": X}, lambda x: np.array([aggregate_iqm(x)]), reps=50000) after
# np.random.seed(0), i.e. 50,000 StratifiedBootstrap replicates (np.random.choice(num_runs, X.shape) rows per
# task, global RNG), scipy.stats.trim_mean(x, 0.25, axis=None) on each, and arch's "percentile" interval
# np.percentile(results, [2.5, 97.5]). rliable is not a dependency: the values are hard-coded.
RLIABLE_A = np.arange(80, dtype=float).reshape(5, 16)  # rliable's library_test matrix [runs, tasks]
RLIABLE_B = np.array(
    [  # [3 runs (seeds), 8 games] of per-game mean human-normalized scores
        [0.12, 1.35, 0.48, 2.70, -0.05, 0.91, 0.33, 4.10],
        [0.20, 1.10, 0.61, 1.95, 0.02, 1.20, 0.25, 3.40],
        [0.08, 1.52, 0.44, 2.35, -0.11, 0.77, 0.41, 5.05],
    ]
)
RLIABLE_REFERENCE = {  # matrix: (aggregate_iqm, CI low, CI high)
    "A": (39.5, 32.55, 46.5),
    "B": (0.7808333333333334, 0.7066666666666666, 0.8574999999999999),
}


def test_iqm_and_interval_match_rliable():
    assert atari.iqm(np.array([[1, 2], [2, 2], [1, 1], [2, 1]])) == 1.5  # rliable metrics_test
    assert atari.iqm(np.array([[1, 1], [2, 2], [3, 3]])) == 2.0
    for name, x, tol in [("A", RLIABLE_A, 0.25), ("B", RLIABLE_B, 0.005)]:
        point, ref_lo, ref_hi = RLIABLE_REFERENCE[name]
        assert atari.iqm(x) == pytest.approx(point, abs=1e-12)
        lo, hi = atari.iqm_confidence_interval(x, reps=50_000, seed=0)
        # another random stream than rliable's global np.random: equal up to Monte Carlo error (width/50)
        assert abs(lo - ref_lo) < tol and abs(hi - ref_hi) < tol, (name, lo, hi)


def _episode_noise_reference(columns, reps, alpha, seed):
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(reps):
        means = [np.mean(c[rng.integers(len(c), size=len(c))]) for c in columns]
        stats.append(_iqm_reference(means))
    return np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])


def test_episode_noise_interval_resamples_episodes_within_games_then_takes_the_iqm_of_means():
    rng = np.random.default_rng(2)
    sizes = [8] * 8 + [5]  # episodes per game may differ
    columns = [rng.normal(mu, 0.3, size=k) for mu, k in zip(np.linspace(-0.5, 3, 9), sizes, strict=True)]
    lo, hi = atari.iqm_episode_noise_interval(columns, reps=4000, seed=0)
    ref_lo, ref_hi = _episode_noise_reference(columns, reps=4000, alpha=0.05, seed=7)
    means = [c.mean() for c in columns]
    assert lo < atari.iqm(means) < hi
    assert abs(lo - ref_lo) < 0.1 * (ref_hi - ref_lo) and abs(hi - ref_hi) < 0.1 * (ref_hi - ref_lo)
    # identical episodes: no episode noise, a point at the IQM of the per-game means
    same = np.tile(np.linspace(0, 2, 6), (4, 1))  # [episodes, games]
    assert atari.iqm_episode_noise_interval(same, reps=200) == pytest.approx((atari.iqm(same[0]),) * 2)
    # the IQM of per-game means differs from the IQM over all episodes (what was reported before)
    skew = np.array([[0.0, 0.0, 10.0], [0.0, 0.0, 10.0], [0.0, 9.0, 10.0], [3.0, 9.0, 10.0]])  # [episodes, 3]
    assert atari.iqm(skew.mean(axis=0)) == pytest.approx((0.75 + 4.5 + 10.0) / 3)
    assert atari.iqm(skew) != pytest.approx(atari.iqm(skew.mean(axis=0)))
    with pytest.raises(ValueError, match="at least one episode per game"):
        atari.iqm_episode_noise_interval([[1.0], []])


def test_iqm_confidence_interval_is_stratified():
    # Runs agree within every task: resampling runs inside tasks changes nothing, so the CI is a point.
    per_task = np.linspace(0.0, 2.0, 10)
    scores = np.tile(per_task, (5, 1))  # [runs=5, tasks=10]
    lo, hi = atari.iqm_confidence_interval(scores, reps=500)
    assert lo == pytest.approx(hi) == pytest.approx(atari.iqm(per_task))
    # One value per game: the bootstrap resamples games, so the interval has width.
    lo1, hi1 = atari.iqm_confidence_interval(per_task, reps=2000)
    assert lo1 < atari.iqm(per_task) < hi1
    assert atari.iqm_confidence_interval(scores, reps=300, seed=3) == atari.iqm_confidence_interval(
        scores, reps=300, seed=3
    )


# --------------------------------------------------------------------------------------------- legal actions


def test_legal_actions_known_games():
    assert atari.legal_actions("Pong") == [0, 1, 3, 4, 11, 12]
    assert atari.legal_actions("Breakout") == [0, 1, 3, 4]
    assert atari.legal_actions("Seaquest") == list(range(18))
    assert atari.legal_actions("pong") == atari.legal_actions("Pong")
    for game in ALL_GAMES:  # ids are valid and ascending, so DQN-Replay index i -> i-th smallest legal id
        acts = atari.legal_actions(game)
        assert acts == sorted(set(acts)) and 0 <= acts[0] and acts[-1] < 18, game


def test_legal_actions_match_gymnasium_minimal_action_set():
    for game in ["MsPacman", "SpaceInvaders", "Enduro"]:
        env = gym.make(f"ALE/{game}-v5")
        assert atari.legal_actions(game) == sorted(int(a.value) for a in env.unwrapped._action_set)
        env.close()


# -------------------------------------------------------------------------------------------- env protocol


def _raw_env(game, seed):
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=True,
                   obs_type="grayscale", max_num_frames_per_episode=None)  # fmt: skip
    first, _ = env.reset(seed=seed)
    return env, first


def _reference_rollout(game, seed, actions):
    """Slow reference from raw ALE screens: 4 raw frames per step, max of the last two, INTER_AREA, stack."""
    env, first = _raw_env(game, seed)
    stack = collections.deque([np.zeros((84, 84), np.uint8)] * 3, maxlen=4)
    stack.append(cv2.resize(first, (84, 84), interpolation=cv2.INTER_AREA))
    out = [(np.stack(stack), 0.0, False)]
    frames = [first]
    for a in actions:
        reward, done = 0.0, False
        for _ in range(4):
            frame, r, done, _, _ = env.step(a)
            frames.append(frame)
            reward += r
            if done:
                break
        pooled = np.maximum(frames[-2], frames[-1])
        stack.append(cv2.resize(pooled, (84, 84), interpolation=cv2.INTER_AREA))
        out.append((np.stack(stack), reward, done))
        if done:
            break
    env.close()
    return out


def test_make_env_frames_match_raw_ale_reference():
    rng = np.random.default_rng(0)
    game, seed = "Breakout", 7
    actions = [int(a) for a in rng.choice(atari.legal_actions(game), size=3000)]
    ref = _reference_rollout(game, seed, actions)
    assert ref[-1][2], "the reference episode should reach game over (to check the terminal step too)"
    env = atari.make_env(game, sticky_actions=0.0, seed=seed)
    obs, _ = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert not obs[:3].any() and obs[3].any()  # [0, 0, 0, f0]
    np.testing.assert_array_equal(obs, ref[0][0])
    total = 0.0
    for t, a in enumerate(actions[: len(ref) - 1], start=1):
        obs, reward, terminated, truncated, _ = env.step(a)
        ref_obs, ref_reward, ref_done = ref[t]
        np.testing.assert_array_equal(obs, ref_obs, err_msg=f"step {t}")
        assert reward == ref_reward and terminated == ref_done and not truncated
        total += reward
    assert terminated and total > 0  # unclipped rewards summed; the game ended at the same step


def test_four_raw_frames_per_agent_step():
    env = atari.make_env("Pong", seed=0)
    env.reset()
    ale = env.unwrapped.ale
    for k in range(1, 6):
        env.step(0)
        assert ale.getEpisodeFrameNumber() == 4 * k


def test_sticky_actions_default_and_override():
    assert atari.make_env("Pong").unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert atari.make_env("Pong", sticky_actions=0.0).unwrapped.ale.getFloat("repeat_action_probability") == 0
    assert atari.make_env("Pong").action_space.n == 18  # the full action set


def test_episode_cap_truncates():
    env = atari.make_env("Pong", seed=0, max_episode_steps=5)
    for _ in range(2):  # the counter restarts after reset
        env.reset()
        for k in range(1, 6):
            _, _, terminated, truncated, _ = env.step(0)
            assert not terminated and truncated == (k == 5)
    assert atari.make_env("Pong").max_episode_steps == 27_000


def test_mode_and_difficulty_reach_ale():
    env = atari.make_env("Breakout", mode=4, difficulty=1, seed=0)
    env.reset()
    assert env.unwrapped._game_mode == 4 and env.unwrapped._game_difficulty == 1


def test_vec_env_frames_match_make_env_including_autoreset():
    n, seed, cap = 2, 11, 6
    vec = atari.make_vec_env("Breakout", n, seed=seed, max_episode_steps=cap)  # sticky 0.25: same RNG seeds
    singles = [atari.make_env("Breakout", seed=seed + i, max_episode_steps=cap) for i in range(n)]
    obs, _ = vec.reset()
    assert obs.shape == (n, 4, 84, 84) and obs.dtype == np.uint8
    single_obs = [env.reset()[0] for env in singles]
    np.testing.assert_array_equal(obs, np.stack(single_obs))
    rng = np.random.default_rng(0)
    for t in range(1, 2 * cap + 1):
        actions = rng.choice(atari.legal_actions("Breakout"), size=n)
        obs, reward, terminated, truncated, info = vec.step(actions)
        for i, env in enumerate(singles):
            o, r, te, tr, _ = env.step(int(actions[i]))
            assert (reward[i], terminated[i], truncated[i]) == (r, te, tr)
            if te or tr:  # SAME_STEP autoreset: final obs in info, obs is the next episode's first
                assert t % cap == 0
                np.testing.assert_array_equal(info["final_obs"][i], o)
                o, _ = env.reset()
                assert not o[:3].any()
            np.testing.assert_array_equal(obs[i], o, err_msg=f"step {t}, env {i}")
    vec.close()


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluate_returns_exactly_num_episodes_and_is_deterministic():
    calls = []

    def q_fn(obs):
        calls.append(obs.shape)
        return np.random.default_rng(len(calls)).normal(size=(len(obs), 18))

    returns = atari.evaluate(q_fn, "Breakout", num_episodes=5, num_envs=3, seed=1, max_episode_steps=30)
    assert returns.shape == (5,) and returns.dtype == np.float64
    assert set(calls) == {(3, 4, 84, 84)}  # one fixed-shape batched call per step
    assert len(calls) <= 2 * 30  # slots play 2, 2 and 1 capped episodes
    calls.clear()
    again = atari.evaluate(q_fn, "Breakout", num_episodes=5, num_envs=3, seed=1, max_episode_steps=30)
    np.testing.assert_array_equal(returns, again)
    one = atari.evaluate(q_fn, "Breakout", num_episodes=2, num_envs=8, max_episode_steps=10)
    assert one.shape == (2,)


def frame_dependent_q(obs):
    """Q-values that depend on every pixel: any wrong observation changes the actions and the returns."""
    q = np.zeros((len(obs), 18))
    q[np.arange(len(obs)), obs.reshape(len(obs), -1).astype(np.int64).sum(1) % 18] = 1.0
    return q


def test_evaluate_in_worker_processes_plays_the_same_episodes():
    kwargs = dict(num_episodes=7, num_envs=5, seed=4, max_episode_steps=150, epsilon=0.1)
    here = atari.evaluate(frame_dependent_q, "Breakout", **kwargs)
    assert here.sum() > 0  # the comparison sees points scored, not only zeros
    for workers in (2, 8):  # uneven groups (3 + 2 slots), and more workers than slots (one per slot)
        np.testing.assert_array_equal(
            atari.evaluate(frame_dependent_q, "Breakout", num_workers=workers, **kwargs), here
        )


def test_evaluate_worker_failure_is_raised_here():
    with pytest.raises(RuntimeError, match="env worker 0 failed"):
        atari._WorkerSlots(dict(game="NoSuchGame"), [1, 2], num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        atari.evaluate(frame_dependent_q, "Pong", num_episodes=1, num_workers=-1)


@pytest.fixture
def taken_actions(monkeypatch):
    taken = []
    step = atari.DopamineAtari.step

    def recording_step(self, action):
        taken.append(action)
        return step(self, action)

    monkeypatch.setattr(atari.DopamineAtari, "step", recording_step)
    return taken


def test_evaluate_uses_only_legal_actions(taken_actions):
    def prefers_illegal(obs):  # UP (2) is not a Pong action; RIGHTFIRE (11) is the best legal one
        q = np.zeros((len(obs), 18))
        q[:, 2], q[:, 11] = 10.0, 5.0
        return q

    atari.evaluate(prefers_illegal, "Pong", num_episodes=2, num_envs=2, epsilon=0.0, max_episode_steps=20)
    assert len(taken_actions) == 40 and set(taken_actions) == {11}
    taken_actions.clear()
    atari.evaluate(prefers_illegal, "Pong", num_episodes=2, num_envs=2, epsilon=1.0, max_episode_steps=50)
    assert set(taken_actions) == set(atari.legal_actions("Pong"))


def test_evaluate_accepts_torch_like_q_values():
    class FakeTensor:  # what a model on an accelerator returns: needs .detach().float().cpu().numpy()
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def float(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    r = atari.evaluate(
        lambda o: FakeTensor(np.zeros((len(o), 18))), "Pong", num_episodes=1, max_episode_steps=3
    )
    assert r.shape == (1,)


# ------------------------------------------------------------------------------------------------ bad input


def test_errors_are_one_clear_sentence():
    with pytest.raises(ValueError, match=r"Unknown Atari game 'Breakot': did you mean 'Breakout'\?"):
        atari.make_env("Breakot")
    with pytest.raises(ValueError, match="did you mean 'MsPacman'"):
        atari.legal_actions("MsPacMann")
    assert atari.check_game("ms_pacman") == "MsPacman"
    with pytest.raises(ValueError, match=r"Pong has no mode 7; valid modes are \[0, 1\]\."):
        atari.make_env("Pong", mode=7)
    with pytest.raises(ValueError, match=r"Breakout has no difficulty 5; valid difficulties are \[0, 1\]\."):
        atari.make_vec_env("Breakout", 2, difficulty=5)
    with pytest.raises(ValueError, match="shape"):
        atari.evaluate(lambda o: np.zeros((len(o), 6)), "Pong", num_episodes=1)
    with pytest.raises(ValueError, match="epsilon"):
        atari.evaluate(lambda o: np.zeros((len(o), 18)), "Pong", num_episodes=1, epsilon=2.0)
    with pytest.raises(ValueError, match="sticky_actions"):
        atari.make_env("Pong", sticky_actions=1.5)
