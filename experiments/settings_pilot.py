"""How the DQN-like runs' settings were chosen: short pilots read on training-time signals only.

For each candidate setting (learning rate, target period, n-step, batch, CQL weight), one multi-game network
is trained offline on the DQN-like data (experiments/dqn_like.py) with a pilot seed that no evaluated run
uses, and at every --stages step it is read on dataset states of every game: the mean expected Q of every
legal action, the greedy action's shares (and the share of its most common action: 1.0 is a constant
policy), the Q-gap between the best and second-best action, and the TD loss from the run's metrics.jsonl.
Nothing is evaluated in the environment (each stage's built-in evaluation is one 1-step episode whose return
nobody reads), so a setting is chosen before any return of the new runs is seen. A setting converges within
the budget when its mean Q per action stops rising, its TD loss flattens and its greedy shares settle.

    python experiments/settings_pilot.py --jobs 2          # the record in docs/results.md
    python experiments/settings_pilot.py --quick           # seconds: the path on toy data
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

from experiments import dqn_like, evidence  # noqa: E402

# name -> cql_multigame.Args overrides. The first two are the references a reader knows: Dopamine's C51+CQL
# config (labs/offline_rl/jax/configs/jax_classy_cql.gin: lr 6.25e-5, n-step 1, target every 2,000, CQL
# weight 0.1) and the CPU values of the first evidence run (lr 1e-4, target 500, n-step 3); the others move
# one setting at a time from the CPU values.
CANDIDATES: dict[str, dict[str, Any]] = {
    "dopamine": dict(lr=6.25e-5, target_update_every=2000, n_step=1, cql_alpha=0.1),
    "cpu": dict(lr=1e-4, target_update_every=500, n_step=3, cql_alpha=0.1),
    "cpu-lr3e-4": dict(lr=3e-4, target_update_every=500, n_step=3, cql_alpha=0.1),
    "cpu-alpha0.01": dict(lr=1e-4, target_update_every=500, n_step=3, cql_alpha=0.01),
    "cpu-td": dict(lr=1e-4, target_update_every=500, n_step=3, cql_alpha=0.0),
    # the second pass (session 8): the fastest lr above with CQL weights between 0.01 (data's mode) and 0
    "cpu-lr3e-4-alpha0.003": dict(lr=3e-4, target_update_every=500, n_step=3, cql_alpha=0.003),
    "cpu-lr3e-4-alpha0.001": dict(lr=3e-4, target_update_every=500, n_step=3, cql_alpha=0.001),
    # the demo's candidates (on its scripted data: --behavior experiments.behavior:scripted, see the docs)
    "demo-alpha0.001": dict(lr=1e-4, target_update_every=500, n_step=3, cql_alpha=0.001),
    "demo-alpha0.01": dict(lr=1e-4, target_update_every=500, n_step=3, cql_alpha=0.01),
}


@dataclass
class Args:
    """Training-time diagnostics of short offline runs, per candidate setting, at several steps."""

    candidates: tuple[str, ...] = ("dopamine", "cpu", "cpu-lr3e-4", "cpu-alpha0.01", "cpu-td")
    """which of CANDIDATES to run"""
    stages: tuple[int, ...] = (1000, 2500, 5000, 10_000)
    """gradient steps at which every pilot is read"""
    batch_size: int = 32
    """global batch (8 per game for 4 games)"""
    seed: int = 0
    """pilot seed (the evaluated runs use 1, 2, 3)"""
    data_dir: str = "data/dqn_like"
    games: tuple[str, ...] = dqn_like.GAMES
    behavior: str = "experiments.dqn_like:improving"
    """the data's behavior policy (evidence.py --behavior)"""
    transitions_per_game: int = dqn_like.STEPS_PER_CHECKPOINT * len(dqn_like.P_BETTER)
    checkpoints_per_game: int = len(dqn_like.P_BETTER)
    runs_dir: str = "runs/settings_pilot"
    out_dir: str = "experiments/results/settings_pilot"
    """pilot.json and the training-time plots"""
    jobs: int = 2
    """pilots in parallel (one torch thread each)"""
    quick: bool = False
    """seconds: toy data and a few steps (the path, not the signal)"""


def evidence_args(args: Args) -> evidence.Args:
    return evidence.Args(
        data_dir=args.data_dir, games=tuple(args.games), batch_size=args.batch_size, behavior=args.behavior,
        transitions_per_game=args.transitions_per_game, checkpoints_per_game=args.checkpoints_per_game,
        diag_states=100 * len(args.games),
    )  # fmt: skip


def td_loss_at(run_dir: Path, step: int, window: int = 500) -> float | None:
    """Mean logged TD loss over the `window` steps up to `step` (metrics.jsonl's training rows)."""
    rows = evidence.metrics_rows(run_dir, step)
    values = [float(r["td_loss"]) for r in rows if "td_loss" in r and step - window < r.get("step", -1)]
    return sum(values) / len(values) if values else None


def pilot(args: Args, name: str) -> dict[str, Any]:
    """Train one candidate through every stage (resumable) and read it at each."""
    import torch

    import cql_multigame

    torch.set_num_threads(1)
    ev = evidence_args(args)
    run_dir = Path(args.runs_dir) / f"{name}_seed{args.seed}"
    path = run_dir / "pilot_stages.json"
    stages = json.loads(path.read_text()) if path.is_file() else {}
    for at in args.stages:
        if str(at) in stages:
            continue
        train = evidence.train_args(ev, "cql", args.seed, at, resume=(run_dir / "checkpoint.pt").is_file())
        train = dataclasses.replace(
            train, run_name=run_dir.name, runs_dir=args.runs_dir, eval_episodes=1, eval_envs=1,
            eval_max_steps=1, log_every=min(100, at), **CANDIDATES[name],
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cql_multigame.main(train)
        diag = evidence.greedy_diagnostics(ev, run_dir / "checkpoint.pt", args.seed)
        for d in diag.values():
            d["greedy_mode_share"] = max(d["greedy_share"].values())
        stages[str(at)] = {"td_loss": td_loss_at(run_dir, at), "games": diag}
        evidence.write_stages(path, stages)
        print(f"{name}: step {at:,} read", flush=True)
    return stages


def plot(args: Args, out: dict[str, Any]) -> list[str]:
    """One figure: per game, the mean Q of each action over steps for every candidate, and the TD loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["pilots"])
    fig, axes = plt.subplots(len(names), len(args.games) + 1, figsize=(3.2 * (len(args.games) + 1),
                             2.4 * len(names)), squeeze=False)  # fmt: skip
    for r, name in enumerate(names):
        stages = out["pilots"][name]
        steps = [int(s) for s in stages]
        for c, game in enumerate(args.games):
            ax = axes[r][c]
            final = stages[str(steps[-1])]["games"][game]["mean_q"]
            top = sorted(final, key=final.get, reverse=True)[:3]  # named in the legend; the rest grey
            for a in sorted(final, key=lambda a: a in top):
                named = a in top
                q = [stages[str(s)]["games"][game]["mean_q"][a] for s in steps]
                ax.plot(steps, q, lw=1.2 if named else 0.6, color=None if named else "0.75",
                        label=evidence.ACTION_NAMES[int(a)] if named else None)  # fmt: skip
            ax.set_title(f"{name}: {game}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("mean Q on data states", fontsize=7)
            if r == len(names) - 1:
                ax.set_xlabel("gradient step", fontsize=7)
            title = "highest 3 (others grey)" if len(final) > 3 else None
            ax.legend(fontsize=6, title=title, title_fontsize=6)
        ax = axes[r][-1]
        ax.plot(steps, [stages[str(s)]["td_loss"] for s in steps], "k.-")
        ax.set_title(f"{name}: TD loss (C51 cross-entropy)", fontsize=8)
        ax.ticklabel_format(useOffset=False, axis="y")
        ax.tick_params(labelsize=7)
    fig.suptitle("Settings pilot: training-time signals only (no evaluation)", fontsize=10)
    fig.tight_layout()
    path = Path(args.out_dir) / "pilot_signals.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [str(path)]


def main(args: Args) -> dict[str, Any]:
    if args.quick:
        args = dataclasses.replace(args, stages=(10, 20), jobs=1, candidates=args.candidates[:2],
                                   transitions_per_game=200 * args.checkpoints_per_game)  # fmt: skip
    evidence.make_data(evidence_args(args))
    out: dict[str, Any] = {"args": dataclasses.asdict(args), "candidates": {n: CANDIDATES[n] for n in
                           args.candidates}, "pilots": {}}  # fmt: skip
    if args.jobs <= 1:
        for name in args.candidates:
            out["pilots"][name] = pilot(args, name)
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=ctx, initializer=evidence._die_with_parent, initargs=(signal.SIGKILL,)
        ) as pool:  # no orphan goes on training if the pilot is killed
            futures = {pool.submit(pilot, args, n): n for n in args.candidates}
            for f in concurrent.futures.as_completed(futures):
                out["pilots"][futures[f]] = f.result()
        out["pilots"] = {n: out["pilots"][n] for n in args.candidates}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(ImportError):
        out["plots"] = plot(args, out)
    (Path(args.out_dir) / "pilot.json").write_text(json.dumps(out, indent=1))
    for name, stages in out["pilots"].items():
        last = stages[str(args.stages[-1])]
        cells = [f"{g} mode {d['greedy_mode_share']:.0%} gap {d['q_gap_best_second']:.3f}"
                 for g, d in last["games"].items()]  # fmt: skip
        print(f"{name:14s} td_loss {last['td_loss']}: " + "; ".join(cells))
    return out


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
