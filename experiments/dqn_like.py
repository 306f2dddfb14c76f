"""Data like DQN-Replay's sub-optimal data: the replay of an improving, epsilon-greedy, state-dependent agent.

DQN-Replay (Agarwal et al. 2020) is the replay buffer of a DQN agent while it learned: checkpoint k holds the
transitions of its k-th million agent steps, so early checkpoints hold a weak policy and later ones a better
one, always under epsilon-greedy noise. Behavior cloning (BC) of such data copies a competent-but-mediocre
policy (the paper's BC scores well above zero); offline Q-learning can do better because the data also holds
the better policy's actions and their outcomes.

The first scripted data (experiments/behavior.py) made BC zero by construction: at every step it mixed a good
action with a more frequent bad one, so BC's argmax copied the bad one. This module makes the second data set,
beside the first: per game, two deterministic state-dependent policies read from ALE's RAM,

| game | mediocre policy M (the majority: BC copies it) | better policy G | a constant action? |
|---|---|---|---|
| Freeway | UP, but NOOP while the next lane's car is within 40 of the chicken | always UP | yes: UP |
| Breakout | serve; go to the ball only once it is low (y >= 150), aim +-10 | track the ball always | no |
| Boxing | line up vertically with the opponent and punch, never approach | also keep ~28 away | no |
| Centipede | LEFTFIRE (sit at the left edge and shoot) | RIGHTFIRE (the right edge) | yes |

The agent improves across checkpoints as a learning agent's replay does: each episode is played by G with
probability P_BETTER[k] and by M otherwise, k being the checkpoint the episode starts in, and every action is
replaced by a uniform legal one with probability EPSILON[k] (epsilon-greedy, decaying). Averaged over the
data, M plays about 70% of the episodes, so where M and G disagree the data's most frequent action is M's and
BC copies M (a policy that scores well above zero); G's actions and outcomes are in the data for Q-learning.

All values here are ours, chosen before any training on this data from the returns of M and G alone
(measured by `python experiments/dqn_like.py`, saved in experiments/results/dqn_like/): P_BETTER rises
0.1 -> 0.5 (DQN-Replay's own agent improves from ~0 to its final score over the run); EPSILON decays 0.2 ->
0.05 (DQN's training epsilon decays 1.0 -> 0.01 over the first 1M steps, i.e. within checkpoint 0; ours stays
higher so the data covers every action, and the narrow variant below keeps it at 0.01).

Centipede's first M was FIRE (the centre): its report (3 episodes, no noise) scored it above G (11,606 vs
7,791), so M became LEFTFIRE before any training on the data (LEFTFIRE 321 / 1,952 and RIGHTFIRE 5,145 / 9,231
in two probe episodes with epsilon 0.05).

RAM addresses: Breakout and Boxing follow AtariARI's annotations (Anand et al. 2019,
atariari/benchmark/ram_annotations.py): Breakout ball_x 99, ball_y 101, paddle 72; Boxing player_x 32,
player_y 34, enemy_x 33, enemy_y 35; Freeway player_y 14, car x 108-117 (lane 0 = the bottom lane). The
Freeway lane of a chicken height y, round((y - 16) / 16), and the chicken's column (x 48 in car units) are
ours, measured from the positions at which an always-UP chicken was hit.

Use:
    python record.py --policy experiments.dqn_like:improving --games Freeway Breakout Boxing Centipede \\
        --capacity 25000 --num-checkpoints 4 --out-dir data/dqn_like
    python experiments/dqn_like.py            # records (cached) and writes the behavior report
The policy needs the checkpoint size: STEPS_PER_CHECKPOINT must equal the recording's --capacity.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

NOOP, FIRE, UP, RIGHT, LEFT, DOWN = 0, 1, 2, 3, 4, 5  # ALE full-action-set ids
UPFIRE, RIGHTFIRE, LEFTFIRE, DOWNFIRE = 10, 11, 12, 13

GAMES = ("Freeway", "Breakout", "Boxing", "Centipede")
STEPS_PER_CHECKPOINT = 25_000  # ours: agent steps per recorded checkpoint (DQN-Replay: 1M)
P_BETTER = (0.1, 0.2, 0.35, 0.5)  # ours: probability that an episode of checkpoint k is played by G
EPSILON = (0.2, 0.1, 0.05, 0.05)  # ours: epsilon-greedy noise of checkpoint k
NARROW_EPSILON = 0.01  # ours: the narrow-coverage variant (DQN's final training epsilon)


# --- the policies: ram -> full-set action id ---------------------------------------------------------------


def freeway_cautious(ram: np.ndarray) -> int:
    """M: go UP, but wait while the car of the next lane is within 40 units of the chicken's column."""
    lane = int(round((int(ram[14]) - 16) / 16)) + 1
    if 0 <= lane <= 9 and abs(int(ram[108 + lane]) - 48) < 40:
        return NOOP
    return UP


def breakout_late(ram: np.ndarray) -> int:
    """M: serve, then move to the ball only once it is low (y >= 150), with a coarse aim."""
    ball_x, ball_y, paddle_x = int(ram[99]), int(ram[101]), int(ram[72])
    if ball_y == 0:
        return FIRE
    if ball_y < 150:
        return NOOP
    aim = ball_x - 8
    return RIGHT if paddle_x < aim - 10 else LEFT if paddle_x > aim + 10 else NOOP


def breakout_track(ram: np.ndarray) -> int:
    """G: serve, then keep the paddle under the ball (experiments/behavior.py's tracker)."""
    from experiments.behavior import breakout_track as track

    return track(ram)


def _boxer(keep_distance: int | None) -> Callable[[np.ndarray], int]:
    def act(ram: np.ndarray) -> int:
        px, py, ex, ey = int(ram[32]), int(ram[34]), int(ram[33]), int(ram[35])
        dx, dy = ex - px, ey - py
        if abs(dy) > 4:
            return DOWN if dy > 0 else UP
        if keep_distance is not None and abs(abs(dx) - keep_distance) > 4:
            toward, away = (RIGHT, LEFT) if dx > 0 else (LEFT, RIGHT)
            return toward if abs(dx) > keep_distance else away
        return FIRE

    return act


boxing_still = _boxer(None)  # M: line up vertically and punch, never approach
boxing_approach = _boxer(28)  # G: line up, keep ~28 units away, punch

# game -> (M, G)
POLICIES: dict[str, tuple[Callable[[np.ndarray], int], Callable[[np.ndarray], int]]] = {
    "Freeway": (freeway_cautious, lambda ram: UP),
    "Breakout": (breakout_late, breakout_track),
    "Boxing": (boxing_still, boxing_approach),
    "Centipede": (lambda ram: LEFTFIRE, lambda ram: RIGHTFIRE),
}
# G's action where it does not depend on the state (None: it does); evidence.py's diagnostics read it
GOOD_ACTION: dict[str, int | None] = {"Freeway": UP, "Breakout": None, "Boxing": None, "Centipede": RIGHTFIRE}
# the games where no constant action reaches the behavior's return (the report, results/dqn_like/
# behavior_improving.json: every constant Breakout action scores 0, the best Boxing one -25, against 18.6 and
# -1.7); evidence.py's claim needs one of them (tests/test_dqn_like.py checks this against the report)
STATE_DEPENDENT: tuple[str, ...] = ("Breakout", "Boxing")


# --- the behavior: the recorder's module:function policies --------------------------------------------------


def _behavior(game: str, env, rng: np.random.Generator, epsilon: tuple[float, ...]) -> Callable:
    if game not in POLICIES:
        raise ValueError(f"no DQN-like behavior for {game}; games: {', '.join(POLICIES)}.")
    import atari

    mediocre, better = POLICIES[game]
    legal = atari.legal_actions(game)
    ale = env.unwrapped.ale
    state = {"step": 0, "frame": -1, "policy": mediocre}

    def act(obs: np.ndarray) -> int:
        k = min(state["step"] // STEPS_PER_CHECKPOINT, len(P_BETTER) - 1)  # the checkpoint being recorded
        frame = ale.getEpisodeFrameNumber()
        if frame < state["frame"] or state["frame"] < 0:  # a new episode: draw who plays it
            state["policy"] = better if rng.random() < P_BETTER[k] else mediocre
        state["frame"] = frame
        state["step"] += 1
        if rng.random() < epsilon[k]:
            return int(legal[rng.integers(len(legal))])
        return int(state["policy"](ale.getRAM()))

    return act


def improving(game: str, env, rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    """The DQN-like behavior of `game`: G's share of the episodes rises and epsilon decays by checkpoint."""
    return _behavior(game, env, rng, EPSILON)


def narrow(game: str, env, rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    """The narrow-coverage variant: the same agent with epsilon 0.01 throughout (rare actions are rare)."""
    return _behavior(game, env, rng, (NARROW_EPSILON,) * len(P_BETTER))


# --- the report: what the data holds, before any training ------------------------------------------------


@dataclass
class Args:
    """Record the DQN-like data (cached) and report what it holds: returns per checkpoint, action shares,
    the return of M, G and of every constant action."""

    data_dir: str = "data/dqn_like"
    """where the data is recorded (DQN-Replay layout: <data_dir>/<Game>/1/replay_logs/)"""
    out_dir: str = "experiments/results/dqn_like"
    """where behavior.json goes"""
    games: tuple[str, ...] = GAMES
    variant: str = "improving"
    """improving (the main data) or narrow (epsilon 0.01: the narrow-coverage variant)"""
    data_seed: int = 0
    episodes: int = 3
    """episodes per policy and constant action in the report"""
    max_steps: int = 3000
    """agent steps per report episode (a cap, as in every evaluation here; DQN-Replay's is 27,000)"""
    quick: bool = False
    """a few hundred transitions and one short episode: the path, not the numbers"""


def logs_dir(data_dir: str | Path, game: str) -> Path:
    return Path(data_dir) / game / "1" / "replay_logs"


def make_data(args: Args, capacity: int = STEPS_PER_CHECKPOINT, num_checkpoints: int = len(P_BETTER)) -> None:
    """Record every game's data unless its last checkpoint's episode returns are there (all games together:
    each game's stream seed is its position in the list)."""
    import record

    last = logs_dir(args.data_dir, args.games[-1]) / f"episode_returns_ckpt.{num_checkpoints - 1}.json"
    if all((logs_dir(args.data_dir, g) / last.name).is_file() for g in args.games):
        return
    record.record(
        args.data_dir, list(args.games), runs=(1,), num_checkpoints=num_checkpoints, capacity=capacity,
        policy=f"experiments.dqn_like:{args.variant}", seed=args.data_seed, overwrite=True,
        progress=not args.quick,
    )  # fmt: skip


def play(
    game: str, policy: Callable[[np.ndarray], int], episodes: int, max_steps: int, seed: int
) -> list[float]:
    """Returns of `episodes` episodes of a RAM policy (no noise), under the evaluation's env protocol."""
    import atari

    env = atari.make_env(game, seed=seed, max_episode_steps=max_steps)
    ale, out = env.unwrapped.ale, []
    for _ in range(episodes):
        env.reset()
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(policy(ale.getRAM()))
            total, done = total + float(reward), terminated or truncated
        out.append(total)
    env.close()
    return out


def report(args: Args) -> dict:
    import atari
    import record
    import replay

    out: dict = {"settings": {"variant": args.variant, "steps_per_checkpoint": STEPS_PER_CHECKPOINT,
                              "p_better": P_BETTER, "epsilon": EPSILON if args.variant == "improving"
                              else (NARROW_EPSILON,) * len(P_BETTER), "episodes": args.episodes,
                              "max_steps": args.max_steps}, "games": {}}  # fmt: skip
    for game in args.games:
        d = logs_dir(args.data_dir, game)
        legal = atari.legal_actions(game)
        per_ckpt, shares = [], []
        for k in replay.list_checkpoints(d):
            returns = replay.read_episode_returns(d, [k])
            per_ckpt.append({"checkpoint": k, "episodes": len(returns),
                             "mean": float(np.mean(returns)) if returns else None})  # fmt: skip
            counts = record.action_counts(d, game, [k])
            shares.append({str(a): float(counts[a] / counts.sum()) for a in legal})
        mediocre, better = POLICIES[game]
        constant = {str(a): float(np.mean(play(game, lambda ram, a=a: a, args.episodes, args.max_steps, 1)))
                    for a in legal}  # fmt: skip
        out["games"][game] = {
            "behavior_per_checkpoint": per_ckpt,
            "behavior_all": float(np.mean(replay.read_episode_returns(d))),
            "action_shares_per_checkpoint": shares,
            "mediocre": float(np.mean(play(game, mediocre, args.episodes, args.max_steps, 1))),
            "better": float(np.mean(play(game, better, args.episodes, args.max_steps, 1))),
            "constant_actions": constant,
        }
        g = out["games"][game]
        best = max(constant, key=constant.get)
        means = [round(c["mean"], 1) for c in per_ckpt if c["mean"] is not None]
        print(f"{game}: behavior per checkpoint {means}"
              f" (all {g['behavior_all']:.1f}); M {g['mediocre']:.1f}, G {g['better']:.1f}; best constant "
              f"action {best} {constant[best]:.1f}", flush=True)  # fmt: skip
    return out


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, episodes=1, max_steps=50)
        make_data(args, capacity=200, num_checkpoints=len(P_BETTER))
    else:
        make_data(args)
    result = report(args)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"behavior_{args.variant}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
