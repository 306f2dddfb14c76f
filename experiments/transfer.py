"""The paper's transfer claims at CPU scale: a pre-trained multi-game trunk helps on new games and variants.

Scaled QL's pre-trained representation transfers (Sec. 5.3-5.4): fine-tuned offline on a held-out game with
little data, and online on a variant (ALE mode / difficulty) of a training game, it beats the same network
trained from scratch. This script runs both comparisons from evidence.py's pre-trained CQL network:

1. offline: data of a held-out game (SpaceInvaders, not among evidence.py's games) recorded with the scripted
   behavior of experiments/behavior.py, a small slice of it; `finetune_offline.py --compare` (the trunk of
   the checkpoint + a fresh head vs the same network from a random init, same seed and batches), evaluated
   every --offline-eval-every steps;
2. online: `finetune_online.py` on a variant of a training game (Freeway, difficulty 1), once from the
   checkpoint (its Freeway head included) and once from scratch, evaluated every --online-eval-every env
   steps (and at 0);
3. results.json and two PNG plots (return vs steps, mean and standard error over seeds).

Every run is cached in --runs-dir (a finished one is skipped; an interrupted offline comparison is redone,
an interrupted online run continues with finetune_online's --resume).

    python experiments/transfer.py            # after experiments/evidence.py (its CQL network is the start)
    python experiments/transfer.py --quick    # seconds: the whole path at toy size (needs --checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

import record  # noqa: E402
import replay  # noqa: E402
from experiments import evidence  # noqa: E402


@dataclass
class Args:
    """Offline (held-out game, little data) and online (variant) fine-tuning vs from scratch."""

    checkpoint: str = "runs/evidence/cql_alpha0.001_seed1/checkpoint.pt"
    """the pre-trained network: evidence.py's CQL run (seed 1, at the step evidence.py last reached: the
    transfer results in docs/results.md start from step 20,000, i.e. after `evidence.py --until 20000`;
    --runs-dir remembers the file's sha256, so another network needs another --runs-dir)"""
    out_dir: str = "experiments/results/transfer"
    """where results.json and the PNG plots go"""
    data_dir: str = "data/transfer"
    """DQN-Replay-format data of the held-out game (recorded once, then reused)"""
    runs_dir: str = "runs/transfer"
    """run folders of the fine-tuning runs"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every comparison (the new head's init, the sampler, the envs, the evaluation)"""

    # --- offline: a held-out game with a small slice of data ---
    offline_game: str = "SpaceInvaders"
    """held-out game (the paper's: Alien, MsPacman, Pong, SpaceInvaders, StarGunner)"""
    offline_transitions: int = 10_000
    """recorded transitions of the held-out game (ours: a tenth of a training game's data here, in the
    spirit of the paper's 1% of the game's DQN-Replay data)"""
    offline_steps: int = 4000
    """gradient steps of each offline run (ours)"""
    offline_eval_every: int = 1000
    """gradient steps between evaluations"""

    # --- online: a variant of a training game ---
    online_game: str = "Freeway"
    """training game whose variant is played"""
    online_mode: int | None = None
    """ALE mode of the variant (None: the default mode)"""
    online_difficulty: int | None = 1
    """ALE difficulty of the variant (Freeway difficulty 1: a hit pushes the chicken back further)"""
    online_env_steps: int = 20_000
    """agent steps of each online run (ours)"""
    online_eval_every: int = 10_000
    """agent steps between evaluations"""
    online_learning_starts: int = 2000
    """agent steps before the first update (ours: scaled down with the run)"""

    # --- shared training and evaluation settings (evidence.py's) ---
    batch_size: int = 32
    """batch of every update"""
    lr: float = 1e-4
    """Adam learning rate"""
    target_update_every: int = 500
    """gradient steps between hard target updates"""
    cql_alpha: float = 0.001
    """CQL weight of the offline runs (evidence.py's; online runs use finetune_online's default 0)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    eval_max_steps: int = 3000
    """agent steps per evaluation episode (ours: a cap to bound CPU time; DQN-Replay's protocol is 27,000)"""
    threads: int = 2
    """torch threads"""
    plots: bool = True
    """write PNG plots (needs matplotlib)"""
    replot: bool = False
    """draw the PNG plots again from --out-dir's results.json (no data, no training)"""
    quick: bool = False
    """seconds: a few hundred transitions and steps, one seed, 1 short episode (the path, not skill)"""


def quick_args(args: Args) -> Args:
    """The --quick variant: the same path at toy size (used by the test suite)."""
    return dataclasses.replace(
        args, seeds=(1,), offline_transitions=300, offline_steps=20, offline_eval_every=10,
        online_env_steps=160, online_eval_every=80, online_learning_starts=64, batch_size=8,
        target_update_every=10, eval_episodes=1, eval_max_steps=30,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Offline: held-out game
# ----------------------------------------------------------------------------------------------------


def make_offline_data(args: Args) -> None:
    """Record the held-out game's scripted-behavior data once (one checkpoint)."""
    logs = Path(args.data_dir) / args.offline_game / "1" / "replay_logs"
    if (logs / "episode_returns_ckpt.0.json").is_file():
        return
    print(f"recording {args.offline_transitions:,} transitions of scripted behavior for {args.offline_game}")
    record.record(
        args.data_dir, [args.offline_game], runs=(1,), num_checkpoints=1, capacity=args.offline_transitions,
        policy=evidence.BEHAVIOR_POLICY, seed=0, overwrite=True, progress=not args.quick,
    )  # fmt: skip


def offline_curves(run_dir: Path, game: str) -> dict[str, float]:
    """step -> mean evaluation return, from the run's TensorBoard events (finetune_offline logs every
    evaluation there; its summary.json holds the last one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {str(e.step): float(e.value) for e in acc.Scalars(f"eval/{game}/return")}


def run_offline(args: Args, seed: int) -> dict[str, Any]:
    """`finetune_offline.py --compare` for one seed; cached in compare.json (with the curves)."""
    import finetune_offline

    base = Path(args.runs_dir) / f"offline_{args.offline_game}_seed{seed}"
    done = base / "transfer.json"
    if done.is_file():
        return same_start(args, json.loads(done.read_text()), base)
    if base.exists():  # an interrupted comparison: fine-tuning runs have no --resume, so redo it
        shutil.rmtree(base)
    base.mkdir(parents=True)
    fargs = finetune_offline.Args(
        checkpoint=args.checkpoint, game=args.offline_game, compare=True, data_dir=args.data_dir, runs=(1,),
        checkpoints="nearoptimal", fraction=1.0, memory_budget_gb=4.0, prefetch=0,
        total_steps=args.offline_steps, batch_size=args.batch_size, lr=args.lr,
        target_update_every=args.target_update_every, cql_alpha=args.cql_alpha,
        eval_episodes=args.eval_episodes, eval_envs=args.eval_episodes, eval_max_steps=args.eval_max_steps,
        log_every=min(500, args.offline_steps), eval_every=args.offline_eval_every,
        save_every=args.offline_steps, runs_dir=str(base.parent), run_name=base.name, seed=seed, device="cpu",
    )  # fmt: skip
    with open(base / "train.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        out = finetune_offline.main(fargs)
    result = {
        "checkpoint": args.checkpoint,
        "transitions": out["transitions"],
        "finetune": offline_curves(base / "finetune", args.offline_game),
        "scratch": offline_curves(base / "scratch", args.offline_game),
    }
    done.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------------
# Online: a variant of a training game
# ----------------------------------------------------------------------------------------------------


def run_online(args: Args, seed: int, from_scratch: bool) -> dict[str, Any]:
    """One `finetune_online.py` run; a finished run is read back, an interrupted one resumed."""
    import finetune_online

    name = f"online_{args.online_game}_{'scratch' if from_scratch else 'pretrained'}_seed{seed}"
    run_dir = Path(args.runs_dir) / name
    if (run_dir / "summary.json").is_file():
        return same_start(args, json.loads((run_dir / "summary.json").read_text()), run_dir)
    oargs = finetune_online.Args(
        checkpoint=args.checkpoint, game=args.online_game, mode=args.online_mode,
        difficulty=args.online_difficulty, from_scratch=from_scratch, run_name=name, runs_dir=args.runs_dir,
        seed=seed, device="cpu", resume=(run_dir / "checkpoint.pt").is_file(),
        save_every=args.online_eval_every, total_env_steps=args.online_env_steps, num_envs=4,
        max_episode_steps=args.eval_max_steps, epsilon_decay_steps=args.online_env_steps // 4,
        buffer_size=max(args.online_env_steps, 400), learning_starts=args.online_learning_starts,
        batch_size=args.batch_size, lr=args.lr, target_update_every=args.target_update_every,
        eval_every=args.online_eval_every, eval_episodes=args.eval_episodes, eval_envs=args.eval_episodes,
        eval_max_steps=args.eval_max_steps, log_every=min(1000, args.online_env_steps),
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return finetune_online.main(oargs)


def check_start(args: Args) -> None:
    """--runs-dir holds runs of one start: start.json names its checkpoint file and content (sha256), so a
    checkpoint re-trained at the same path (e.g. evidence.py with other --games) cannot reuse them."""
    digest = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    start = {"checkpoint": args.checkpoint, "sha256": digest}
    evidence.remember_or_refuse(Path(args.runs_dir) / "start.json", start, "--checkpoint")


def same_start(args: Args, cached: dict[str, Any], where: Path) -> dict[str, Any]:
    """A cached run is reused only if it started from the same checkpoint (run folders are named by seed)."""
    if cached.get("checkpoint") != args.checkpoint:
        raise SystemExit(
            f"error: {where} holds a run from --checkpoint {cached.get('checkpoint')}, not "
            f"{args.checkpoint}; pass another --runs-dir."
        )
    return cached


def online_curve(summary: dict[str, Any]) -> dict[str, float]:
    return {str(e["env_steps"]): float(e["mean_return"]) for e in summary["evaluations"]}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def mean_se(curves: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """step -> mean and standard error over seeds (0 with one seed) of the curves that have that step."""
    steps = sorted({int(s) for c in curves for s in c})
    out = {}
    for s in steps:
        x = np.array([c[str(s)] for c in curves if str(s) in c])
        m = evidence.mean_ci(x)
        out[str(s)] = {"mean": m["mean"], "se": m["se"] or 0.0, "n": len(x)}
    return out


def format_cell(point: dict[str, float], seeds: int) -> str:
    """mean ± s.e. of one step; a step that fewer than all `seeds` reached (an evaluation that was dropped)
    says over how many, and one seed has no s.e."""
    n = int(point["n"])
    spread = f" ± {point['se']:.1f}" if n > 1 else ""
    return f"{point['mean']:.1f}{spread}" + (f" ({n} of {seeds} seeds)" if n < seeds else "")


def format_table(title: str, unit: str, curves: dict[str, dict[str, dict[str, float]]], seeds: int) -> str:
    steps = sorted({int(s) for c in curves.values() for s in c})
    lines = [f"{title}", f"| {unit} | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for s in steps:
        cells = [format_cell(c[str(s)], seeds) if str(s) in c else "n/a" for c in curves.values()]
        lines.append(f"| {s:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(args: Args, offline: dict, online: dict, behavior: float | None, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    settings = (("mode", args.online_mode), ("difficulty", args.online_difficulty))
    variant = ", ".join([args.online_game] + [f"{k} {v}" for k, v in settings if v is not None])  # no "None"
    paths = []
    for name, curves, xlabel, title in [
        ("transfer_offline.png", offline, "gradient steps",
         f"Offline transfer to held-out {args.offline_game} ({args.offline_transitions:,} transitions):\n"
         "pre-trained network vs the same network from scratch"),
        ("transfer_online.png", online, "agent steps",
         f"Online transfer to {variant}:\npre-trained network vs the same network from scratch"),
    ]:  # fmt: skip
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, c in curves.items():
            steps = sorted(int(s) for s in c)
            mean = np.array([c[str(s)]["mean"] for s in steps])
            se = np.array([c[str(s)]["se"] for s in steps])
            (line,) = ax.plot(steps, mean, marker="o", label=f"{label} (mean over seeds)")
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2, color=line.get_color(),
                            label=f"{label}: ± 1 s.e. over seeds")  # fmt: skip
        if name == "transfer_offline.png" and behavior is not None:
            ax.axhline(behavior, color="gray", linestyle="--", label="behavior (the data)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))  # 12,500, not 12500
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"return ({args.eval_episodes} episodes, cap {args.eval_max_steps:,} steps)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(str(out / name))
    return paths


def main(args: Args) -> dict[str, Any]:
    if args.replot:  # the PNGs again from the committed numbers, no training
        saved = json.loads((Path(args.out_dir) / "results.json").read_text())
        saved_args = dataclasses.replace(args, **{k: v for k, v in saved["args"].items() if k != "replot"})
        behavior = saved["offline_behavior"]["mean"]
        return {"plots": plot(saved_args, saved["offline"], saved["online"], behavior, Path(args.out_dir))}
    if args.quick:
        args = quick_args(args)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(
            f"error: --checkpoint {args.checkpoint} does not exist; run experiments/evidence.py first (its "
            "CQL network is the pre-trained start), or pass another cql_multigame.py checkpoint."
        )
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_start(args)
    make_offline_data(args)
    behavior = evidence.mean_ci(
        np.array(replay.read_episode_returns(Path(args.data_dir) / args.offline_game / "1" / "replay_logs"))
    )
    offline_runs = {seed: run_offline(args, seed) for seed in args.seeds}
    online_runs = {
        seed: {"pretrained": run_online(args, seed, False), "scratch": run_online(args, seed, True)}
        for seed in args.seeds
    }
    offline = {
        "fine-tuned (pre-trained trunk)": mean_se([r["finetune"] for r in offline_runs.values()]),
        "from scratch": mean_se([r["scratch"] for r in offline_runs.values()]),
    }
    online = {
        label: mean_se([online_curve(r[init]) for r in online_runs.values()])
        for label, init in [("fine-tuned (pre-trained network)", "pretrained"), ("from scratch", "scratch")]
    }
    behavior_text = "n/a: no episode ended" if behavior["mean"] is None else f"{behavior['mean']:.1f}"
    tables = [
        format_table(
            f"offline, held-out {args.offline_game}: return (mean ± s.e. over {len(args.seeds)} seeds; "
            f"behavior of the data {behavior_text})", "steps", offline, len(args.seeds),
        ),
        format_table(
            f"online, {args.online_game} mode {args.online_mode} difficulty {args.online_difficulty}: return "
            f"(mean ± s.e. over {len(args.seeds)} seeds)", "agent steps", online, len(args.seeds),
        ),
    ]  # fmt: skip
    result = {
        "args": dataclasses.asdict(args),
        "offline_behavior": behavior,
        "offline": offline,
        "online": online,
        "offline_runs": {str(s): r for s, r in offline_runs.items()},
        "online_runs": {str(s): {k: online_curve(v) for k, v in r.items()} for s, r in online_runs.items()},
        "wall_seconds_this_invocation": time.perf_counter() - start,
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
    }
    result["plots"] = plot(args, offline, online, behavior["mean"], out) if args.plots else []
    (out / "results.json").write_text(json.dumps(evidence.repo_relative(result), indent=1))
    print("\n\n".join(tables))
    print(f"results: {out / 'results.json'}" + "".join(f"\nplot:    {p}" for p in result["plots"]))
    return result


if __name__ == "__main__":
    import tyro

    evidence.run_experiment(main, tyro.cli(Args), "transfer.py")
