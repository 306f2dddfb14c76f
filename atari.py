"""Atari for Scaled QL: games, the environment protocol, score tables, IQM and evaluation.

Paper: Kumar, Agarwal, Geng, Tucker, Levine, "Offline Q-Learning on Diverse Multi-Task Data Both Scales and
Generalizes" (ICLR 2023), Section 5 (setup) and Appendix B. What this file implements:

- The game split: 40 training games (the 41 training games of Multi-Game Decision Transformers, Lee et al.
  2022, minus RoadRunner) and the 5 held-out games (Section 5.3, offline fine-tuning).
- The environment protocol of Dopamine, which recorded the DQN-Replay data (Agarwal et al. 2020) and which
  the paper evaluates with: ALE v5 underneath with one raw frame per ALE step and sticky actions 0.25, frame
  skip 4 with a max-pool of the last two raw frames, grayscale 84x84 by cv2 INTER_AREA, a stack of the 4
  latest frames (oldest first; zeros before the episode's first frame), no no-op or fire reset, no life-loss
  terminals, unclipped rewards, at most 27,000 agent steps (108k frames) per episode, the full 18-action
  set. Game variants (Section 5.4, online fine-tuning) come from ALE modes and difficulties.
- Human-normalized scores, the interquartile mean (IQM) and its stratified-bootstrap confidence interval
  (rliable; Agarwal et al. 2021), which the paper uses to aggregate over games: rliable takes them on the
  [runs, games] matrix of per-game MEAN scores, runs being independent training seeds. With one seed,
  `iqm_episode_noise_interval` gives a CI of the evaluation-episode noise instead (a different quantity).
- `evaluate`: epsilon-greedy (0.001) over each game's legal actions, several episodes at once with one
  batched Q-function call per step.

Also: a clip of an evaluation episode (`evaluate(video=...)`, re-played from its seed and actions).

Left out: the 100-episode evaluation schedule of the training script (cql_multigame.py
decides how many episodes), and anything about networks or replay data.
"""

from __future__ import annotations

import difflib
import functools
import math
import multiprocessing as mp
import re
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ale_py
import cv2
import gymnasium as gym
import numpy as np
from ale_py import roms

NUM_ACTIONS = 18  # the full ALE action set; actions everywhere in this repo are ids into it
ACTION_NAMES = ("NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
                "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
                "DOWNLEFTFIRE")  # fmt: skip
FRAME_SKIP = 4
SCREEN_SIZE = 84
STACK_SIZE = 4
MAX_EPISODE_STEPS = 27_000  # agent steps = 108k raw frames (Dopamine's max_steps_per_episode)

# The 41 training games of Multi-Game Decision Transformers (Lee et al. 2022, Sec. 4.1) minus RoadRunner.
TRAIN_GAMES: tuple[str, ...] = (
    "Amidar", "Assault", "Asterix", "Atlantis", "BankHeist", "BattleZone", "BeamRider", "Boxing",
    "Breakout", "Carnival", "Centipede", "ChopperCommand", "CrazyClimber", "DemonAttack", "DoubleDunk",
    "Enduro", "FishingDerby", "Freeway", "Frostbite", "Gopher", "Gravitar", "Hero", "IceHockey",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "NameThisGame", "Phoenix", "Pooyan", "Qbert",
    "Riverraid", "Robotank", "Seaquest", "TimePilot", "UpNDown", "VideoPinball", "WizardOfWor",
    "YarsRevenge", "Zaxxon",
)  # fmt: skip
HELDOUT_GAMES: tuple[str, ...] = ("Alien", "MsPacman", "Pong", "SpaceInvaders", "StarGunner")

# Random- and human-agent scores of Atari-57 (Mnih et al. 2015; Wang et al. 2016; Badia et al. 2020), as
# in google-research/reincarnating_rl atari_scores.py (R. Agarwal, a Scaled QL author) and
# google-deepmind/dqn_zoo atari_data.py. The two differ only in VideoPinball's random score (dqn_zoo:
# 16256.9, from no-op starts); we take 0.0 like reincarnating_rl and Agent57's table.
# Carnival and Pooyan are not in Atari-57. We found no published human score for them in the sources we
# could read (dqn_zoo, rliable/reincarnating_rl, Multi-Game DT's released code, JAT, atarihns), so their
# HUMAN_SCORES entry is NaN and human_normalized_score refuses them with a clear error instead of inventing
# a number. Their random scores are ours (standard error 46 and 21): the mean return of 100 episodes of a
# uniform random policy over legal actions under this file's protocol (sticky 0.25, 27k-step cap):
#   evaluate(lambda o: np.zeros((len(o), 18)), game, num_episodes=100, num_envs=10, epsilon=1.0, seed=0)
RANDOM_SCORES: dict[str, float] = {
    "Alien": 227.8, "Amidar": 5.8, "Assault": 222.4, "Asterix": 210.0, "Atlantis": 12850.0,
    "BankHeist": 14.2, "BattleZone": 2360.0, "BeamRider": 363.9, "Boxing": 0.1, "Breakout": 1.7,
    "Carnival": 820.6, "Centipede": 2090.9, "ChopperCommand": 811.0, "CrazyClimber": 10780.5,
    "DemonAttack": 152.1, "DoubleDunk": -18.6, "Enduro": 0.0, "FishingDerby": -91.7, "Freeway": 0.0,
    "Frostbite": 65.2, "Gopher": 257.6, "Gravitar": 173.0, "Hero": 1027.0, "IceHockey": -11.2,
    "Jamesbond": 29.0, "Kangaroo": 52.0, "Krull": 1598.0, "KungFuMaster": 258.5, "MsPacman": 307.3,
    "NameThisGame": 2292.3, "Phoenix": 761.4, "Pong": -20.7, "Pooyan": 426.6, "Qbert": 163.9,
    "Riverraid": 1338.5, "Robotank": 2.2, "Seaquest": 68.4, "SpaceInvaders": 148.0, "StarGunner": 664.0,
    "TimePilot": 3568.0, "UpNDown": 533.4, "VideoPinball": 0.0, "WizardOfWor": 563.5,
    "YarsRevenge": 3092.9, "Zaxxon": 32.5,
}  # fmt: skip
HUMAN_SCORES: dict[str, float] = {
    "Alien": 7127.7, "Amidar": 1719.5, "Assault": 742.0, "Asterix": 8503.3, "Atlantis": 29028.1,
    "BankHeist": 753.1, "BattleZone": 37187.5, "BeamRider": 16926.5, "Boxing": 12.1, "Breakout": 30.5,
    "Carnival": math.nan, "Centipede": 12017.0, "ChopperCommand": 7387.8, "CrazyClimber": 35829.4,
    "DemonAttack": 1971.0, "DoubleDunk": -16.4, "Enduro": 860.5, "FishingDerby": -38.7, "Freeway": 29.6,
    "Frostbite": 4334.7, "Gopher": 2412.5, "Gravitar": 3351.4, "Hero": 30826.4, "IceHockey": 0.9,
    "Jamesbond": 302.8, "Kangaroo": 3035.0, "Krull": 2665.5, "KungFuMaster": 22736.3, "MsPacman": 6951.6,
    "NameThisGame": 8049.0, "Phoenix": 7242.6, "Pong": 14.6, "Pooyan": math.nan, "Qbert": 13455.0,
    "Riverraid": 17118.0, "Robotank": 11.9, "Seaquest": 42054.7, "SpaceInvaders": 1668.7,
    "StarGunner": 10250.0, "TimePilot": 5229.2, "UpNDown": 11693.2, "VideoPinball": 17667.9,
    "WizardOfWor": 4756.5, "YarsRevenge": 54576.9, "Zaxxon": 9173.3,
}  # fmt: skip


class AtariConfigError(ValueError):
    """A user mistake about games, modes, difficulties or evaluation settings (one-sentence message)."""


# ----------------------------------------------------------------------------------------------------------
# Games and legal actions


def _rom_id(game: str) -> str:
    """CamelCase game name -> ALE ROM id ("MsPacman" -> "ms_pacman", "UpNDown" -> "up_n_down")."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


@functools.cache
def _all_games() -> dict[str, str]:
    """lower-case name -> canonical CamelCase name, for every ROM that ale-py ships."""
    names = ["".join(part.capitalize() for part in rom.split("_")) for rom in roms.get_all_rom_ids()]
    return {name.lower(): name for name in names}


def check_game(game: str) -> str:
    """Return the canonical ALE name of `game` (case-insensitive), or raise naming the closest game."""
    games = _all_games()
    canonical = games.get(str(game).replace("_", "").replace("-", "").lower())
    if canonical is None:
        close = difflib.get_close_matches(str(game), list(games.values()), n=1, cutoff=0.0)
        hint = f"did you mean {close[0]!r}?" if close else "see ale_py.roms.get_all_rom_ids()."
        raise AtariConfigError(f"Unknown Atari game {game!r}: {hint}")
    return canonical


@functools.cache
def _game_info(game: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(minimal action set as full-set ids, available modes, available difficulties), read from ALE."""
    ale = ale_py.ALEInterface()
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(_rom_id(game)))
    actions = tuple(int(a.value) for a in ale.getMinimalActionSet())
    modes = tuple(int(m) for m in ale.getAvailableModes())
    difficulties = tuple(int(d) for d in ale.getAvailableDifficulties())
    return actions, modes, difficulties


def legal_actions(game: str) -> list[int]:
    """The game's minimal action set as full-action-set ids 0..17, in ALE's getMinimalActionSet order.

    That order is the one Dopamine's minimal-action envs used, so a DQN-Replay action `a` (an index into the
    minimal set) is the full-set action legal_actions(game)[a]. (For all 45 games it is ascending.)
    """
    return list(_game_info(check_game(game))[0])


def _check_variant(game: str, mode: int | None, difficulty: int | None) -> None:
    _, modes, difficulties = _game_info(game)
    if mode is not None and mode not in modes:
        raise AtariConfigError(f"{game} has no mode {mode}; valid modes are {list(modes)}.")
    if difficulty is not None and difficulty not in difficulties:
        raise AtariConfigError(
            f"{game} has no difficulty {difficulty}; valid difficulties are {list(difficulties)}."
        )


# ----------------------------------------------------------------------------------------------------------
# The environment (Dopamine's AtariPreprocessing + the agent's frame stack)


class DopamineAtari(gym.Wrapper):
    """Frame skip with max-pool, grayscale 84x84 INTER_AREA resize, 4-frame stack, episode cap.

    Wraps an ALE v5 env made with frameskip=1 and obs_type="grayscale" (one raw frame per inner step).
    Invariants:
    - step(a) repeats `a` for 4 raw frames (fewer only if the game ends first); the reward is their sum,
      unclipped. Sticky actions act per raw frame inside ALE, as in Dopamine.
    - The new frame is max(previous raw frame, last raw frame), resized to 84x84 with cv2.INTER_AREA. After
      reset it is max(first raw frame, zeros) = the first raw frame, like Dopamine.
    - The observation is the stack of the 4 latest frames, uint8 (4, 84, 84), oldest first. Right after a
      reset it is [0, 0, 0, f0], matching the zero padding at episode starts in the DQN-Replay data.
    - terminated: the game is over (no life-loss terminals). truncated: `max_episode_steps` agent steps
      were taken without the game ending.
    If the game ends within the first raw frame of a step, the pooled frame is max(last frame of the previous
    step, final frame); Dopamine would reuse its stale buffer there. Only terminal observations differ, and
    neither the data nor evaluation uses them.
    """

    def __init__(self, env: gym.Env, *, max_episode_steps: int = MAX_EPISODE_STEPS, seed: int | None = None):
        super().__init__(env)
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0, 255, (STACK_SIZE, SCREEN_SIZE, SCREEN_SIZE), np.uint8)
        self._seed = seed  # used by the first reset() that gets no seed of its own
        self._stack = np.zeros((STACK_SIZE, SCREEN_SIZE, SCREEN_SIZE), np.uint8)  # [4, 84, 84]
        self._prev = self._last = None  # the two latest raw frames, [210, 160] uint8
        self._steps = 0

    def _push_frame(self) -> None:
        pooled = np.maximum(self._prev, self._last)  # [210, 160]
        frame = cv2.resize(pooled, (SCREEN_SIZE, SCREEN_SIZE), interpolation=cv2.INTER_AREA)  # [84, 84]
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._seed is not None:
            seed, self._seed = self._seed, None
        if seed is not None:
            self.action_space.seed(seed)
        raw, info = self.env.reset(seed=seed, options=options)
        self._last = raw
        self._prev = np.zeros_like(raw)
        self._stack[:] = 0
        self._push_frame()
        self._steps = 0
        return self._stack.copy(), info

    def step(self, action):
        reward, terminated, info = 0.0, False, {}
        for _ in range(FRAME_SKIP):
            raw, r, terminated, _, info = self.env.step(action)
            reward += float(r)
            self._prev, self._last = self._last, raw
            if terminated:
                break
        self._steps += 1
        truncated = not terminated and self._steps >= self.max_episode_steps
        self._push_frame()
        return self._stack.copy(), reward, terminated, truncated, info


def make_env(
    game: str,
    *,
    mode: int | None = None,
    difficulty: int | None = None,
    sticky_actions: float = 0.25,
    seed: int | None = None,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> gym.Env:
    """One Atari env under Dopamine's protocol (see DopamineAtari).

    Observations: uint8 (4, 84, 84), oldest frame first. Actions: full-set ids 0..17 (ALE treats an action
    outside the game's minimal set like its nearest legal effect, usually NOOP). Rewards: unclipped.
    sticky_actions=0.25 is Dopamine's / DQN-Replay's setting; 0 gives Multi-Game DT's protocol.
    `seed` seeds ALE (and the action space) on the first reset that is called without a seed.
    """
    game = check_game(game)
    _check_variant(game, mode, difficulty)
    if not 0.0 <= sticky_actions <= 1.0:
        raise AtariConfigError(f"sticky_actions must be a probability in [0, 1], got {sticky_actions}.")
    if max_episode_steps < 1:
        raise AtariConfigError(f"max_episode_steps must be at least 1, got {max_episode_steps}.")
    env = gym.make(
        f"ALE/{game}-v5",
        frameskip=1,
        repeat_action_probability=sticky_actions,
        full_action_space=True,
        obs_type="grayscale",
        mode=mode,
        difficulty=difficulty,
        max_num_frames_per_episode=None,  # the cap is counted in agent steps by DopamineAtari
        disable_env_checker=True,
    )
    return DopamineAtari(env, max_episode_steps=max_episode_steps, seed=seed)


def make_vec_env(
    game: str,
    num_envs: int,
    *,
    mode: int | None = None,
    difficulty: int | None = None,
    sticky_actions: float = 0.25,
    seed: int | None = None,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    asynchronous: bool = False,
) -> gym.vector.VectorEnv:
    """`num_envs` copies of make_env (env i seeded with seed + i) as one gymnasium vector env.

    reset(seed=None) -> (obs uint8 [N, 4, 84, 84], info); step(actions int [N], full-set ids) ->
    (obs, reward float [N] unclipped, terminated bool [N], truncated bool [N], info).

    Autoreset: SAME_STEP. When env i ends on a step (terminated[i] or truncated[i]), it is reset within that
    same step: obs[i] is already the first observation of its next episode ([0, 0, 0, f0]), reward[i] and
    the flags belong to the step that ended the episode, and the final observation is in
    info["final_obs"][i] (info["final_info"] holds its info). Every step is a real transition for every env,
    so an acting loop never has to skip a "reset step".

    asynchronous=False steps the envs in this process (gymnasium SyncVectorEnv); True runs one subprocess
    per env (AsyncVectorEnv), worth it only with several free CPU cores.

    Why not ale-py's C++ AtariVectorEnv: it has no mode/difficulty (needed for the game variants of
    online fine-tuning) and starts episodes with a different frame stack, so its frames cannot match
    make_env's; a batch of make_env envs is identical by construction.
    """
    if num_envs < 1:
        raise AtariConfigError(f"num_envs must be at least 1, got {num_envs}.")
    game = check_game(game)
    _check_variant(game, mode, difficulty)
    kwargs = dict(
        mode=mode, difficulty=difficulty, sticky_actions=sticky_actions, max_episode_steps=max_episode_steps
    )
    fns = [
        functools.partial(make_env, game, seed=None if seed is None else seed + i, **kwargs)
        for i in range(num_envs)
    ]
    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ----------------------------------------------------------------------------------------------------------
# Scores and aggregates


def human_normalized_score(game: str, score: float | np.ndarray) -> float | np.ndarray:
    """(score - random) / (human - random); works elementwise on arrays. 0 = random agent, 1 = human."""
    game = check_game(game)
    if game not in HUMAN_SCORES:
        raise AtariConfigError(f"No human score for {game}; the tables cover TRAIN_GAMES and HELDOUT_GAMES.")
    random, human = RANDOM_SCORES[game], HUMAN_SCORES[game]
    if math.isnan(human) or math.isnan(random):
        raise AtariConfigError(
            f"{game} has no published human score (it is not in Atari-57); leave it out of human-normalized "
            "aggregates or add its scores to atari.HUMAN_SCORES and atari.RANDOM_SCORES."
        )
    out = (np.asarray(score, dtype=np.float64) - random) / (human - random)
    return float(out) if out.ndim == 0 else out


def _iqm_rows(x: np.ndarray) -> np.ndarray:
    """IQM of each row of x [R, n]: drop floor(n/4) lowest and highest values, mean of the rest -> [R]."""
    n = x.shape[1]
    cut = int(0.25 * n)  # the same cut as scipy.stats.trim_mean(x, 0.25), which rliable uses
    return np.sort(x, axis=1)[:, cut : n - cut].mean(axis=1)


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean of all values (flattened): the mean of the middle 50% (rliable's aggregate_iqm,
    scipy.stats.trim_mean(values, 0.25, axis=None)). For rliable's aggregate over games, pass the
    [runs, games] matrix of per-game mean scores (runs = training seeds), not one row per episode."""
    x = np.asarray(values, dtype=np.float64).reshape(1, -1)
    if x.size == 0:
        raise AtariConfigError("iqm needs at least one value.")
    return float(_iqm_rows(x)[0])


def _percentile_interval(boot: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])  # arch's "percentile" method
    return float(lo), float(hi)


def iqm_confidence_interval(
    scores: Sequence[float] | np.ndarray,
    *,
    reps: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (1 - alpha) for the IQM, as rliable computes it
    (get_interval_estimates with StratifiedBootstrap, method "percentile").

    scores [runs, tasks]: per-game mean scores of independent runs (training seeds), rliable's convention.
    Stratified bootstrap: each replicate resamples the runs of every task independently (with replacement)
    and takes the IQM of the whole resampled matrix. scores [tasks] (one run): there is nothing to
    stratify, so each replicate resamples the games (rliable's task_bootstrap on one run); for the noise of
    the evaluation episodes of one run use iqm_episode_noise_interval. reps: ours, 10k (rliable: 50k).
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None].T  # [1, tasks]
        stratified = False
    elif x.ndim == 2:
        stratified = True
    else:
        raise AtariConfigError(f"scores must be [runs, tasks] or [tasks], got shape {x.shape}.")
    if x.size == 0 or not np.isfinite(x).all():
        raise AtariConfigError("iqm_confidence_interval needs a non-empty array of finite scores.")
    if not 0.0 < alpha < 1.0:
        raise AtariConfigError(f"alpha must be in (0, 1), got {alpha}.")
    rng = np.random.default_rng(seed)
    runs, tasks = x.shape
    stats = []
    for start in range(0, reps, 1000):  # chunks keep memory at 1000 x runs x tasks
        r = min(1000, reps - start)
        if stratified:
            idx = rng.integers(runs, size=(r, runs, tasks))  # [r, runs, tasks] row picks per task
            sample = np.take_along_axis(np.broadcast_to(x, (r, runs, tasks)), idx, axis=1)
        else:
            sample = x[0][rng.integers(tasks, size=(r, tasks))]  # [r, tasks]
        stats.append(_iqm_rows(sample.reshape(r, -1)))
    return _percentile_interval(np.concatenate(stats), alpha)


def iqm_episode_noise_interval(
    episode_scores: Sequence[Sequence[float]] | np.ndarray,
    *,
    reps: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """CI (1 - alpha) of the IQM over games of ONE run's per-game mean scores, from evaluation-episode noise.

    episode_scores: per game, the scores of its evaluation episodes ([episodes, games] or a list of one
    sequence per game; counts may differ). Each replicate resamples the episodes of every game (with
    replacement), takes each game's mean, then the IQM over games; percentile interval. It says how much
    the evaluation episodes move the number, not how much another training seed would (that is
    iqm_confidence_interval on the [seeds, games] matrix of per-game means). reps: ours, 10k.
    """
    if isinstance(episode_scores, np.ndarray) and episode_scores.ndim == 2:
        episode_scores = list(episode_scores.T)  # [games][episodes]
    columns = [np.asarray(c, dtype=np.float64).reshape(-1) for c in episode_scores]
    if not columns or any(c.size == 0 or not np.isfinite(c).all() for c in columns):
        raise AtariConfigError(
            "iqm_episode_noise_interval needs finite scores of at least one episode per game."
        )
    if not 0.0 < alpha < 1.0:
        raise AtariConfigError(f"alpha must be in (0, 1), got {alpha}.")
    rng = np.random.default_rng(seed)
    means = np.empty((reps, len(columns)))  # [reps, games]
    for g, c in enumerate(columns):
        means[:, g] = c[rng.integers(len(c), size=(reps, len(c)))].mean(axis=1)
    return _percentile_interval(_iqm_rows(means), alpha)


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def _to_numpy(q: Any) -> np.ndarray:
    if hasattr(q, "detach"):  # a torch tensor, possibly on an accelerator
        q = q.detach().float().cpu().numpy()
    return np.asarray(q)


class _LocalSlots:
    """evaluate's env slots, stepped in this process (or in one worker of _WorkerSlots, writing into its
    part of the shared observation array `obs`)."""

    def __init__(self, env_kwargs: dict[str, Any], seeds: Sequence[int], obs: np.ndarray | None = None):
        self.envs = [make_env(**env_kwargs, seed=int(s)) for s in seeds]
        if obs is None:
            obs = np.empty((len(seeds), STACK_SIZE, SCREEN_SIZE, SCREEN_SIZE), np.uint8)
        self.obs = obs  # [n, 4, 84, 84]
        for i, env in enumerate(self.envs):
            self.obs[i] = env.reset()[0]

    def step(
        self, actions: np.ndarray, active: np.ndarray, reset_after: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step env i with actions[i] where active[i], writing its observation into obs[i]; an env whose
        episode ends is reset if reset_after[i]. Returns reward float64 [n] and done bool [n] (0 / False for
        idle slots)."""
        reward, done = np.zeros(len(self.envs)), np.zeros(len(self.envs), bool)
        for i in np.flatnonzero(active):
            self.obs[i], reward[i], terminated, truncated, _ = self.envs[i].step(int(actions[i]))
            done[i] = terminated or truncated
            if done[i] and reset_after[i]:
                self.obs[i] = self.envs[i].reset()[0]
        return reward, done

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _slots_worker(conn, shared, lo: int, hi: int, env_kwargs: dict[str, Any], seeds: Sequence[int]) -> None:
    """Subprocess of _WorkerSlots: slots lo..hi-1 as a _LocalSlots writing into the shared array.

    Ctrl-C reaches the whole process group: the parent decides (the training scripts drop the evaluation
    and close the workers), so a worker ignores SIGINT instead of dying with a KeyboardInterrupt traceback.
    It never outlives the parent: a closed pipe ends its loop (EOFError)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slots = None
    try:
        obs = np.frombuffer(shared, np.uint8).reshape(-1, STACK_SIZE, SCREEN_SIZE, SCREEN_SIZE)[lo:hi]
        slots = _LocalSlots(env_kwargs, seeds, obs)
        conn.send(("ok", None))
        while (msg := conn.recv()) is not None:
            conn.send(("ok", slots.step(*msg)))
    except (EOFError, BrokenPipeError):
        pass  # the parent closed the pipe mid-evaluation (it was interrupted, or died): end quietly
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        if slots is not None:
            slots.close()
        conn.close()


class _WorkerSlots:
    """evaluate's env slots split over `num_workers` subprocesses (contiguous groups), stepped in parallel.

    Observations come back through one shared uint8 array [n, 4, 84, 84] (no pickling of frames); a step
    sends each worker its actions and flags and waits for all of them. Workers are spawned (not forked), so
    they never inherit the threads of torch or OpenCV; starting them costs about a second (imports + ROMs).
    """

    def __init__(self, env_kwargs: dict[str, Any], seeds: Sequence[int], num_workers: int):
        ctx = mp.get_context("spawn")
        n = len(seeds)
        self._shared = ctx.RawArray("B", n * STACK_SIZE * SCREEN_SIZE * SCREEN_SIZE)
        self.obs = np.frombuffer(self._shared, np.uint8).reshape(n, STACK_SIZE, SCREEN_SIZE, SCREEN_SIZE)
        bounds = np.linspace(0, n, min(num_workers, n) + 1).round().astype(int)
        self._groups = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        self._conns, self._procs = [], []
        # A worker starts with SIGINT ignored (the disposition survives exec, and Python keeps it), so a
        # Ctrl-C while it still imports does not print a traceback; the parent's own handler is back at once.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            for lo, hi in self._groups:
                here, there = ctx.Pipe()
                proc = ctx.Process(
                    target=_slots_worker, args=(there, self._shared, lo, hi, env_kwargs, list(seeds[lo:hi])),
                    daemon=True,
                )  # fmt: skip
                proc.start()
                there.close()
                self._conns.append(here)
                self._procs.append(proc)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        for k in range(len(self._groups)):
            self._receive(k)

    def _receive(self, k: int) -> Any:
        try:
            status, payload = self._conns[k].recv()
        except EOFError:
            raise RuntimeError(
                f"evaluate: env worker {k} exited (exit code {self._procs[k].exitcode}); "
                "rerun with num_workers=0 to see the error in this process."
            ) from None
        if status == "error":
            raise RuntimeError(f"evaluate: env worker {k} failed:\n{payload}")
        return payload

    def step(self, actions, active, reset_after):
        for conn, (lo, hi) in zip(self._conns, self._groups, strict=True):
            conn.send((actions[lo:hi], active[lo:hi], reset_after[lo:hi]))
        parts = [self._receive(k) for k in range(len(self._groups))]
        return np.concatenate([r for r, _ in parts]), np.concatenate([d for _, d in parts])

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:  # the worker is already gone
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def epsilon_greedy(q_legal: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Epsilon-greedy indices [N] into the legal actions, from Q-values q_legal [N, L] over them: with
    probability epsilon a uniform legal action, else the one with the highest Q (ties -> the lowest index).
    Both draws are made for every row at every call, so the RNG stream does not depend on the Q-values.
    The one acting rule of evaluation (`evaluate`) and online acting (finetune_online.py)."""
    greedy = np.argmax(q_legal, axis=1)  # [N]
    explore = rng.random(len(q_legal)) < epsilon  # [N]
    return np.where(explore, rng.integers(q_legal.shape[1], size=len(q_legal)), greedy)


def evaluate(
    q_fn: Callable[[np.ndarray], Any],
    game: str,
    *,
    num_episodes: int = 10,
    num_envs: int = 8,
    epsilon: float = 0.001,
    seed: int = 0,
    mode: int | None = None,
    difficulty: int | None = None,
    sticky_actions: float = 0.25,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    num_workers: int = 0,
    video: str | Path | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> np.ndarray:
    """Play `num_episodes` episodes epsilon-greedily over the game's legal actions; return their returns.

    q_fn(obs uint8 [N, 4, 84, 84]) -> Q-values [N, 18] over the full action set (numpy or torch). It is
    called once per env step on a fixed-shape batch of N = min(num_envs, num_episodes) observations.
    Action: with probability epsilon a uniform legal action, else the legal action with the highest Q (ties
    -> lowest id). Exactly num_episodes episodes are started: slot i plays a fixed quota of episodes
    (num_episodes split as evenly as possible), so no slot's short episodes crowd out long ones. A slot that
    has finished its quota sits idle (not stepped; its last observation stays in the batch and its Q-values
    are ignored). Slots are make_env envs (the same envs make_vec_env builds), seeded from `seed`.
    num_workers=0 steps the envs in this process (ALE holds the GIL, so threads would not help); k > 0
    spreads them over k subprocesses, for free cores (up to one per env): same episodes, same returns.
    Returns float64 [num_episodes] unclipped returns, ordered by slot, then by episode within the slot.

    video: a path without extension; the first episode (slot 0's) is also written as an MP4 clip at
    f"{video}_return{R:g}.mp4" (see write_episode_video). progress(episodes_done, num_episodes, agent_steps)
    is called after every PROGRESS_EVERY batched steps and once at the end, so a caller can show that the
    evaluation is still working.
    """
    game = check_game(game)
    _check_variant(game, mode, difficulty)
    if num_episodes < 1 or num_envs < 1:
        raise AtariConfigError(
            f"num_episodes and num_envs must be at least 1, got {num_episodes} and {num_envs}."
        )
    if not 0.0 <= epsilon <= 1.0:
        raise AtariConfigError(f"epsilon must be a probability in [0, 1], got {epsilon}.")
    if num_workers < 0:
        raise AtariConfigError(f"num_workers must be 0 (this process) or more, got {num_workers}.")
    n = min(num_envs, num_episodes)
    quota = np.array([num_episodes // n + (i < num_episodes % n) for i in range(n)])
    seeds = np.random.SeedSequence(seed).generate_state(n + 1)  # n env seeds + 1 for the policy
    rng = np.random.default_rng(int(seeds[-1]))
    legal = np.asarray(legal_actions(game))  # [L] full-set ids
    env_kwargs = dict(game=game, mode=mode, difficulty=difficulty, sticky_actions=sticky_actions,
                      max_episode_steps=max_episode_steps)  # fmt: skip
    seeds = seeds[:n].tolist()
    slots = _WorkerSlots(env_kwargs, seeds, num_workers) if num_workers else _LocalSlots(env_kwargs, seeds)
    returns: list[list[float]] = [[] for _ in range(n)]
    running = np.zeros(n)
    active = np.ones(n, bool)
    first_actions: list[int] = []  # slot 0's actions in its first episode, for the video
    steps = batched = 0  # agent steps over all slots, batched env steps
    try:
        while active.any():
            q = _to_numpy(q_fn(slots.obs))
            if q.shape != (n, NUM_ACTIONS):
                raise AtariConfigError(
                    f"q_fn must return Q-values of shape [{n}, {NUM_ACTIONS}] (batch x full action set), "
                    f"got {q.shape}."
                )
            actions = legal[epsilon_greedy(q[:, legal], epsilon, rng)]  # [n] full-set ids
            reset_after = np.array([len(r) for r in returns]) + 1 < quota  # this slot has episodes left
            if video is not None and not returns[0]:
                first_actions.append(int(actions[0]))
            steps += int(active.sum())  # agent steps taken by this batched step
            reward, done = slots.step(actions, active, reset_after)
            running += reward
            for i in np.flatnonzero(done):
                returns[i].append(float(running[i]))
                running[i] = 0.0
                active[i] = reset_after[i]
            batched += 1
            if progress is not None and batched % PROGRESS_EVERY == 0:
                progress(sum(map(len, returns)), num_episodes, steps)
    finally:
        slots.close()
    if progress is not None:
        progress(sum(map(len, returns)), num_episodes, steps)
    if video is not None:
        write_episode_video(video, env_kwargs, seeds[0], first_actions, returns[0][0])
    return np.asarray([r for slot in returns for r in slot], dtype=np.float64)


PROGRESS_EVERY = 500  # batched env steps between two progress calls of `evaluate`
VIDEO_FPS = 60 / FRAME_SKIP  # the agent's decision rate in real time: 15 decisions per emulated second


def episode_frames(
    env_kwargs: dict[str, Any], seed: int, actions: Sequence[int]
) -> Iterator[tuple[np.ndarray, float]]:
    """Re-play an episode from its env seed and actions, yielding (the RGB screen [210, 160, 3], the return so
    far) after the reset and after every agent step (the decision rate), one at a time: a 27,000-step episode
    never sits in memory.

    ALE is deterministic given the seed of its first reset (sticky actions included), so the same
    (seed, actions) give the same episode as in evaluate; this keeps the video out of the env slots (which
    may live in worker processes) and costs nothing when no video is asked for."""
    env = make_env(**env_kwargs, seed=int(seed))
    ale = env.unwrapped.ale
    try:
        env.reset()
        total = 0.0
        yield ale.getScreenRGB(), total
        for a in actions:
            _, reward, _, _, _ = env.step(int(a))
            total += float(reward)
            yield ale.getScreenRGB(), total
    finally:
        env.close()


def replay_episode_frames(
    env_kwargs: dict[str, Any], seed: int, actions: Sequence[int]
) -> tuple[list[np.ndarray], float]:
    """episode_frames as a list (short episodes: tests, clips) and the episode's return."""
    frames, total = [], 0.0
    for frame, so_far in episode_frames(env_kwargs, seed, actions):
        frames.append(frame)
        total = so_far
    return frames, total


def write_episode_video(
    video: str | Path, env_kwargs: dict[str, Any], seed: int, actions: Sequence[int], episode_return: float
) -> Path:
    """Write one episode as `{video}_return{R:g}.mp4` (OpenCV's mp4v codec, VIDEO_FPS frames per second,
    one frame per agent decision, plus the first frame after the reset), frame by frame. Returns the path."""
    path = Path(f"{video}_return{episode_return:g}.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, total = None, 0.0
    try:
        for frame, so_far in episode_frames(env_kwargs, seed, actions):
            if writer is None:
                size = (frame.shape[1], frame.shape[0])  # (width, height)
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, size)
                if not writer.isOpened():
                    raise OSError(f"OpenCV cannot write the video {path}.")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            total = so_far
    finally:
        if writer is not None:
            writer.release()
    if total != episode_return:  # a broken determinism assumption must not label a clip with a wrong score
        path.unlink(missing_ok=True)
        raise RuntimeError(f"video: the re-played episode scored {total:g}, evaluate {episode_return:g}.")
    return path


def write_gif(
    frames: Sequence[np.ndarray], path: str | Path, fps: float = VIDEO_FPS, scale: float = 1.0
) -> Path:
    """Frames RGB [H, W, 3] -> an animated GIF (needs Pillow, an optional dependency: the docs' clips)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    if scale != 1.0:
        size = (round(images[0].width * scale), round(images[0].height * scale))
        images = [im.resize(size, Image.NEAREST) for im in images]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path
