"""Environment throughput: atari.evaluate and atari.make_vec_env next to ale-py's C++ vector env.

Measures agent steps per second (1 agent step = 4 raw Atari frames) with a random policy:
- `atari.evaluate`: a q_fn returning random Q-values, `num_envs` parallel episodes (this repo's eval path),
- `atari.make_vec_env`: the vector env used for online acting (in-process, and optionally subprocesses),
- ale-py's AtariVectorEnv (gym.make_vec("ALE/<Game>-v5")), C++ threads, its own preprocessing at the same
  frame skip / resolution / stack, random actions: the ceiling of what ALE itself can do here; and the
  same with one thread, the ceiling of one core (evaluate() steps its envs on one core).

Run:  python benchmarks/bench_env.py --game Breakout --num-envs 8
Prints a markdown table and writes JSON to benchmarks/results/bench_env.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import ale_py
import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atari  # noqa: E402


@dataclasses.dataclass
class Args:
    game: str = "Breakout"
    """Atari game (CamelCase ALE name)."""
    num_envs: int = 8
    """Parallel episodes / environments in every measurement."""
    episodes_per_env: int = 6
    """evaluate(): episodes each env slot plays (num_episodes = num_envs * episodes_per_env)."""
    steps: int = 1500
    """Vector-env measurements: steps of the whole batch (agent steps = steps * num_envs)."""
    sticky_actions: float = 0.25
    """Sticky-action probability everywhere (Dopamine's default)."""
    workers: tuple[int, ...] = (2,)
    """evaluate(num_workers=k) rows: envs spread over k subprocesses (empty: none)."""
    asynchronous: bool = False
    """Also time make_vec_env(asynchronous=True) (one subprocess per env)."""
    seed: int = 0
    out: Path = Path(__file__).resolve().parent / "results" / "bench_env.json"
    """Where the JSON results go."""


def bench_evaluate(args: Args, num_workers: int = 0, agent_steps: int | None = None) -> tuple[dict, dict]:
    """(stepping only: from the first q_fn call on, end to end: including making and resetting the envs).

    The vector-env rows are timed after their reset, so the stepping-only row is the one to compare them
    with; end to end adds ~1.5 s of env creation (ROM load) and first resets for 8 envs here. Steps are
    counted in this process; with workers they happen elsewhere, so the caller passes the count of the
    in-process run (the same seeds play the same episodes).
    """
    counter = [0]
    first_call: list[float] = []
    step = atari.DopamineAtari.step

    def counting_step(self, action):
        counter[0] += 1
        return step(self, action)

    rng = np.random.default_rng(args.seed)

    def q_fn(obs):
        if not first_call:
            first_call.append(time.perf_counter())
        return rng.random((len(obs), atari.NUM_ACTIONS))

    atari.DopamineAtari.step = counting_step
    try:
        t = time.perf_counter()
        returns = atari.evaluate(
            q_fn, args.game, num_episodes=args.num_envs * args.episodes_per_env, num_envs=args.num_envs,
            seed=args.seed, sticky_actions=args.sticky_actions, num_workers=num_workers,
        )  # fmt: skip
        end = time.perf_counter()
    finally:
        atari.DopamineAtari.step = step
    steps = counter[0] if agent_steps is None else agent_steps
    info = dict(agent_steps=steps, episodes=len(returns), mean_return=returns.mean())
    info["returns"] = returns.tolist()
    return {**info, "seconds": end - first_call[0]}, {**info, "seconds": end - t}


def bench_vec(env: gym.vector.VectorEnv, args: Args) -> dict:
    env.reset(seed=args.seed)
    env.action_space.seed(args.seed)
    env.step(env.action_space.sample())  # warm-up (threads / subprocesses started)
    t = time.perf_counter()
    for _ in range(args.steps):
        env.step(env.action_space.sample())
    seconds = time.perf_counter() - t
    env.close()
    return dict(agent_steps=args.steps * args.num_envs, seconds=seconds)


def main(args: Args) -> None:
    game = atari.check_game(args.game)
    rows = {}
    stepping, end_to_end = bench_evaluate(args)
    rows["atari.evaluate (random q_fn)"] = stepping
    rows[f"atari.evaluate, end to end (making the {args.num_envs} envs too)"] = end_to_end
    for k in args.workers:
        stepping_k, _ = bench_evaluate(args, num_workers=k, agent_steps=stepping["agent_steps"])
        if stepping_k["returns"] != stepping["returns"]:
            raise RuntimeError(f"evaluate(num_workers={k}) played other episodes than in-process evaluate")
        rows[f"atari.evaluate, num_workers={k} (subprocesses)"] = {**stepping_k, "num_workers": k}
    vec = atari.make_vec_env(game, args.num_envs, seed=args.seed, sticky_actions=args.sticky_actions)
    rows["atari.make_vec_env (sync)"] = bench_vec(vec, args)
    if args.asynchronous:
        vec = atari.make_vec_env(
            game, args.num_envs, seed=args.seed, sticky_actions=args.sticky_actions, asynchronous=True
        )
        rows["atari.make_vec_env (async)"] = bench_vec(vec, args)
    for threads, name in (
        (0, "ale-py AtariVectorEnv (C++, random actions)"),
        (1, "ale-py AtariVectorEnv, 1 thread"),
    ):
        raw = gym.make_vec(
            f"ALE/{game}-v5", num_envs=args.num_envs, repeat_action_probability=args.sticky_actions,
            noop_max=0, use_fire_reset=False, reward_clipping=False, num_threads=threads,
        )  # fmt: skip
        rows[name] = bench_vec(raw, args)  # num_threads 0: ale-py's default, one thread per core

    for r in rows.values():
        r["agent_steps_per_s"] = r["agent_steps"] / r["seconds"]
        r["raw_frames_per_s"] = 4 * r["agent_steps_per_s"]
    print(f"\n{game}, {args.num_envs} envs, sticky {args.sticky_actions}, {os.cpu_count()} CPU cores, "
          f"ale-py {ale_py.__version__}, gymnasium {gym.__version__}\n")  # fmt: skip
    print("| path | agent steps | seconds | agent steps/s | raw frames/s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['agent_steps']} | {r['seconds']:.2f} | {r['agent_steps_per_s']:.0f} | "
              f"{r['raw_frames_per_s']:.0f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(platform=platform.platform(), cpu_count=os.cpu_count(), ale_py=ale_py.__version__,
                gymnasium=gym.__version__)  # fmt: skip
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, machine=info,
                                        results=rows), indent=2, default=float))  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        main(args)
    except ValueError as e:  # user mistakes (unknown game, ...) are one sentence, no traceback
        sys.exit(f"error: {e}")
