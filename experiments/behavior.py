"""Scripted behavior policies that make sub-optimal data with real action-value signal (issue 12).

The DQN-Replay data the paper trains on is the replay of learning DQN agents: sub-optimal, and sub-optimal in
a *systematic* way, so that Q-learning can improve on it where imitation (BC) cannot. Random-policy data has
almost no such signal (per-action Monte-Carlo returns differ by 1-4%). These policies make data that has it,
from ALE's RAM, at CPU scale. Each one mixes, at every step, a good action with a systematically bad one
that is the MORE frequent of the two, so the data's most frequent action in a state is often the wrong one
and BC's argmax copies the mistake, while the good action is in the data often enough for a Q-function to
rank it higher.

| game | good action | bad action (the majority) | a constant action is enough? |
|---|---|---|---|
| Freeway | UP (40%) | NOOP (45%) or DOWN (15%) | yes: always UP scores ~21 |
| DemonAttack | FIRE (30%) | NOOP (40%), LEFT / RIGHT (15% each) | yes: FIRE |
| Breakout | paddle under the ball (40%) | paddle left where it is (60%) | no: it must track the ball |
| Centipede | FIRE (30%) | NOOP (40%), LEFT / RIGHT (15% each) | yes: FIRE |
| SpaceInvaders | FIRE (30%) | NOOP (40%), LEFT / RIGHT (15% each) | yes: FIRE |

Centipede was added after the first three games had been evaluated (docs/results.md): there Q-learning
found Freeway's good action but not DemonAttack's, although always-FIRE scores far above DemonAttack's
behavior (580 vs 178 over 4 episodes, measured on the scripted policy alone, no learning). Our guess, not
measured: a DemonAttack shot pays only after a long flight, so its value must travel by bootstrapping
through frames of a laser in flight. Centipede is the same shooter's mixture on a game whose shots meet
something within a few steps: 6-8% of the steps of always-FIRE and of the mixture carry a reward
(DemonAttack 2%, Freeway 1%; one episode each, seed 1). Always-FIRE scored 3,505 / 27,808 / 3,505 / 3,505
in 4 episodes capped at 3,000 steps, NOOP 165 (atari.evaluate, epsilon 0, seed 1): above the mixture's
3,152 only by luck of one episode, which we did not weigh when we chose the game. It was chosen on these
measurements of the scripted policies, before any training on it.

SpaceInvaders is one of the paper's held-out games: its data is for experiments/transfer.py's offline
fine-tuning, never for pre-training.

Both parts of Breakout's mixture FIRE to serve when no ball is in play: waiting to serve costs only
discounting, a Q-gap too small to learn from (an earlier pilot's greedy policies never served), and the
point of this game is the state-dependent part, tracking the ball.

The probabilities are ours, chosen before any training so that the behavior scores between a do-nothing
policy and the good one (measured returns are in docs/results.md). We tried and dropped two others:
Breakout "move away from the ball" as the bad part (mixed per step with the tracker it scores ~1, leaving
almost no reward in the data) and Boxing (no RAM tracker we wrote beat the built-in opponent).
RAM addresses follow AtariARI's annotations (Anand et al. 2019, atariari/benchmark/ram_annotations.py):
Breakout ball_x 99, ball_y 101 (0 while no ball is in play), paddle x 72. The paddle aim offset (-8)
is ours, measured: a pure
tracker with it scores 33-78 per episode here.

Use: `python replay.py --policy experiments.behavior:scripted --games Freeway ...`; the recorder calls
`scripted(game, env, rng)` once per stream and then `act(obs)` every step, which returns a full-set action id.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NOOP, FIRE, UP, RIGHT, LEFT, DOWN = 0, 1, 2, 3, 4, 5  # ALE full-action-set ids

# Breakout RAM (AtariARI)
BREAKOUT_BALL_X, BREAKOUT_BALL_Y, BREAKOUT_PADDLE_X = 99, 101, 72
BREAKOUT_AIM_OFFSET = -8  # ours: paddle x that centres the paddle under ball x (measured, see docstring)
BREAKOUT_TOLERANCE = 4  # ours: no move while the paddle is within this many RAM units of the aim


def breakout_track(ram: np.ndarray) -> int:
    """The good Breakout policy: FIRE to serve, then keep the paddle under the ball."""
    ball_x, ball_y = int(ram[BREAKOUT_BALL_X]), int(ram[BREAKOUT_BALL_Y])
    paddle_x = int(ram[BREAKOUT_PADDLE_X])
    if ball_y == 0:  # no ball in play: serve
        return FIRE
    aim = ball_x + BREAKOUT_AIM_OFFSET
    if paddle_x < aim - BREAKOUT_TOLERANCE:
        return RIGHT
    if paddle_x > aim + BREAKOUT_TOLERANCE:
        return LEFT
    return NOOP


def breakout_idle(ram: np.ndarray) -> int:
    """The systematic mistake: leave the paddle where it is (FIRE to serve, like the tracker)."""
    return FIRE if int(ram[BREAKOUT_BALL_Y]) == 0 else NOOP


# game -> (probability of the good part, good(ram, rng), bad(ram, rng)); the bad part is the majority
MIXTURES: dict[str, tuple[float, Callable, Callable]] = {
    "Freeway": (0.40, lambda ram, rng: UP, lambda ram, rng: NOOP if rng.random() < 0.45 / 0.60 else DOWN),
    "DemonAttack": (
        0.30,
        lambda ram, rng: FIRE,
        lambda ram, rng: int(rng.choice([NOOP, LEFT, RIGHT], p=[0.4 / 0.7, 0.15 / 0.7, 0.15 / 0.7])),
    ),
    "Breakout": (0.40, lambda ram, rng: breakout_track(ram), lambda ram, rng: breakout_idle(ram)),
}
MIXTURES["Centipede"] = MIXTURES["DemonAttack"]  # the same shooter's mixture (added later: see the docstring)
MIXTURES["SpaceInvaders"] = MIXTURES["DemonAttack"]  # the same shooter's mixture (held out: transfer)


def scripted(game: str, env, rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    """The behavior policy of `game` on `env` (an atari.make_env env): obs -> full-set action id.

    Reads the emulator RAM of `env` at every call; deterministic given `rng` and the env's seed.
    """
    if game not in MIXTURES:
        raise ValueError(f"no scripted behavior for {game}; scripted games: {', '.join(MIXTURES)}.")
    p_good, good, bad = MIXTURES[game]
    ale = env.unwrapped.ale

    def act(obs: np.ndarray) -> int:
        ram = ale.getRAM()
        return good(ram, rng) if rng.random() < p_good else bad(ram, rng)

    return act


def policy_action(game: str, part: str, ram: np.ndarray, rng: np.random.Generator) -> int:
    """One part of a mixture alone ("good" or "bad"): for tests and for measuring each part's return."""
    p_good, good, bad = MIXTURES[game]
    return (good if part == "good" else bad)(ram, rng)


# the good part's action where it does not depend on the state (None: it does, e.g. Breakout's tracking)
GOOD_ACTION: dict[str, int | None] = {
    "Freeway": UP, "DemonAttack": FIRE, "Breakout": None, "Centipede": FIRE, "SpaceInvaders": FIRE
}  # fmt: skip
