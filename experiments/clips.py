"""Short clips of trained policies for the docs: one GIF per (run, game), a few seconds, small files.

Each clip plays one episode of a run's network under the evaluation protocol (atari.make_env: sticky actions
0.25; atari.epsilon_greedy with epsilon 0.001) and writes its first --seconds as an animated GIF at the
agent's decision rate (15 frames per second), half size, with the run's label and the score so far drawn on
the frame. (--capture-video on the training scripts writes whole evaluation episodes as MP4 instead.) Beside
the GIFs, {game}_actions.png: the action each run took at every step of its whole episode, one panel per run,
so a reader sees whether a policy is one constant action or changes with the state.

    python experiments/clips.py --runs runs/dqn_like/cql_alpha0.1_seed1 runs/dqn_like/bc_seed1 \\
        --labels CQL BC --game Breakout --out-dir docs/clips
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

import atari  # noqa: E402


@dataclass
class Args:
    """GIF clips of trained policies (the first seconds of one evaluation episode each)."""

    runs: tuple[str, ...]
    """run folders (each holds checkpoint.pt)"""
    game: str = "Breakout"
    """the game to play (one of the runs' games)"""
    labels: tuple[str, ...] = ()
    """a label per run, drawn on its clip (default: the run folder's name)"""
    out_dir: str = "docs/clips"
    seconds: float = 8.0
    """clip length at the decision rate (15 decisions per emulated second)"""
    max_steps: int = 3000
    """agent steps of the episode (a cap, as in every evaluation here)"""
    seed: int = 0
    scale: float = 0.5


def q_function(checkpoint: Path, game: str):
    import torch

    import resnet

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = resnet.network_from_checkpoint(ckpt, path=checkpoint).eval()
    support = resnet.support_from_checkpoint(ckpt)
    head = list(ckpt["games"]).index(game)

    @torch.no_grad()
    def q_fn(obs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(obs))
        return resnet.expected_q(net(x, torch.full((len(x),), head)), support).numpy()

    return q_fn


def caption(frame: np.ndarray, text: str) -> np.ndarray:
    import cv2

    out = frame.copy()
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def clip(args: Args, run: str, label: str) -> tuple[Path, list[int], float]:
    """Play one episode of `run` on args.game (the evaluation's protocol and acting rule) and write its first
    args.seconds as a GIF, one frame per agent decision. Returns the GIF, every action taken (full-set ids)
    and the episode's return."""
    q_fn = q_function(Path(run) / "checkpoint.pt", args.game)
    legal = np.asarray(atari.legal_actions(args.game))
    rng = np.random.default_rng(args.seed)
    env = atari.make_env(args.game, seed=args.seed, max_episode_steps=args.max_steps)
    ale = env.unwrapped.ale
    obs, _ = env.reset()
    frames, actions, total, done = [ale.getScreenRGB()], [], 0.0, False
    while not done:
        action = legal[atari.epsilon_greedy(q_fn(obs[None])[:, legal], 0.001, rng)[0]]
        actions.append(int(action))
        obs, reward, terminated, truncated, _ = env.step(int(action))
        total, done = total + float(reward), terminated or truncated
        frames.append(caption(ale.getScreenRGB(), f"{label} on {args.game}: {total:g}"))
    env.close()
    n = min(len(frames), int(args.seconds * atari.VIDEO_FPS))
    path = Path(args.out_dir) / f"{args.game}_{label}.gif"
    atari.write_gif(frames[:n], path, scale=args.scale)
    print(f"{path}: {n} frames, {path.stat().st_size / 1024:.0f} KiB (episode return {total:g})")
    return path, actions, total


def action_rows(game: str, actions: list[int]) -> np.ndarray:
    """Full-set action ids -> their rows in the game's legal actions (the action plot's y)."""
    legal = atari.legal_actions(game)
    return np.asarray([legal.index(a) for a in actions], dtype=int)


def plot_actions(game: str, episodes: dict[str, tuple[list[int], float]], path: Path) -> Path:
    """One panel per run: a mark at every step for the action taken (rows: the game's legal actions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legal = atari.legal_actions(game)
    height = 0.6 + 0.17 * len(legal) * len(episodes)
    fig, axes = plt.subplots(len(episodes), 1, figsize=(9, height), squeeze=False)
    for ax, (label, (actions, total)) in zip(axes[:, 0], episodes.items(), strict=True):
        ax.scatter(np.arange(len(actions)), action_rows(game, actions), s=2, marker="|", linewidths=0.6)
        ax.set_yticks(range(len(legal)), [atari.ACTION_NAMES[a] for a in legal], fontsize=6)
        ax.set_ylim(-0.5, len(legal) - 0.5)
        ax.set_title(f"{label}: {len(actions)} steps, return {total:g}", fontsize=8)
    axes[-1, 0].set_xlabel("agent step of the episode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: Args) -> list[Path]:
    labels = args.labels or tuple(Path(r).name for r in args.runs)
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(args.runs)} --runs but {len(labels)} --labels.")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    gifs, episodes = [], {}
    for run, label in zip(args.runs, labels, strict=True):
        gif, actions, total = clip(args, run, label)
        gifs.append(gif)
        episodes[label] = (actions, total)
    plot = plot_actions(args.game, episodes, Path(args.out_dir) / f"{args.game}_actions.png")
    print(f"{plot}: the action at every step of each episode")
    return gifs


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
