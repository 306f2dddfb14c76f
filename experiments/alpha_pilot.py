"""How evidence.py's CQL weight was chosen: short pilots that read training-time signals only.

For each alpha, one multi-game network is trained offline on evidence.py's data (its settings, a pilot seed
that no evaluated run uses) for a few thousand steps; then, on dataset states of every game, the greedy
action's shares and the mean Q-gap between the best and the second-best action. Nothing is evaluated in the
environment: a CQL weight is chosen before any return is seen (issue 12's rule). alpha 0 is the TD-only
reference: the action the C51 TD signal alone prefers, and how large its Q-gap is.

    python experiments/alpha_pilot.py            # about 2 min per alpha on one core of the 2-core CPU
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

from experiments import evidence  # noqa: E402


@dataclass
class Args:
    """Greedy-action diagnostics on dataset states after a short offline run, per CQL weight."""

    alphas: tuple[float, ...] = (0.0, 0.01, 0.003, 0.001, 0.0003)
    """CQL weights to try (0: TD only, the reference)"""
    steps: int = 2000
    """gradient steps per pilot (evidence.py's first evaluation point)"""
    seed: int = 0
    """pilot seed (evidence.py's evaluated runs use 1, 2, 3)"""
    games: tuple[str, ...] = ("Freeway", "DemonAttack", "Breakout")
    """games of the pilot networks: evidence.py's games when alpha was chosen (Centipede came later)"""
    runs_dir: str = "runs/alpha_pilot"
    """run folders of the pilots"""
    data_dir: str = "data/evidence"
    """evidence.py's data (run evidence.py first, or it is recorded here)"""
    out: str = "experiments/results/alpha_pilot.json"
    """where the diagnostics go"""
    threads: int = 1
    """torch threads"""
    quick: bool = False
    """seconds: evidence.py --quick's toy data and a few steps (the path, not the signal)"""


def pilot(args: Args, alpha: float, ev: evidence.Args) -> dict:
    """Train (or reuse) one pilot run and return its diagnostics on dataset states."""
    import torch

    import cql_multigame

    torch.set_num_threads(args.threads)
    name = f"alpha{alpha:g}_seed{args.seed}"
    run_dir = Path(args.runs_dir) / name
    resume = (run_dir / "checkpoint.pt").is_file()  # a finished pilot is reused
    train = evidence.train_args(ev, "cql", args.seed, args.steps, resume=resume)
    # evaluation in effect off: one 1-step episode per game whose return nobody reads
    train = dataclasses.replace(
        train, run_name=name, runs_dir=args.runs_dir, cql_alpha=alpha, eval_episodes=1, eval_envs=1,
        eval_max_steps=1,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cql_multigame.main(train)
    return evidence.greedy_diagnostics(ev, run_dir / "checkpoint.pt", args.seed)


def main(args: Args) -> dict:
    ev = evidence.Args(data_dir=args.data_dir, games=tuple(args.games))
    if args.quick:
        ev = evidence.quick_args(ev)
        args = dataclasses.replace(args, steps=ev.total_steps)
    evidence.make_data(ev)
    out = {"args": dataclasses.asdict(args), "pilots": {}}
    for alpha in args.alphas:
        diag = pilot(args, alpha, ev)
        out["pilots"][f"{alpha:g}"] = diag
        cells = []
        for game, d in diag.items():
            top = max(d["greedy_share"], key=d["greedy_share"].get)
            name = evidence.ACTION_NAMES[int(top)]
            cells.append(f"{game} {name} {d['greedy_share'][top]:.0%} gap {d['q_gap_best_second']:.4f}")
        print(f"alpha {alpha:<7g} greedy on dataset states: " + "; ".join(cells), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(evidence.repo_relative(out), indent=1))
    print(f"diagnostics: {args.out}")
    return out


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
