"""Offline fine-tuning of a Scaled QL network on a game it has never seen (Kumar et al., ICLR 2023, Sec. 5.3).

The paper's offline transfer experiment: the multi-game network pre-trained by cql_multigame.py keeps its
ResNet trunk, spatial embedding and shared MLP, gets a fresh C51 head for a held-out game (Alien, MsPacman,
Pong, SpaceInvaders or StarGunner), and is trained with the same C51 + CQL loss on a small slice of that
game's DQN-Replay data (about 1% of it; the paper describes about 2M transitions). Every result is read
against the same network trained from a random initialization on the same data: `--from-scratch`, or
`--compare`, which runs both with the same seed and the same batches and prints them side by side.

    python finetune_offline.py --checkpoint runs/<run>/checkpoint.pt --game Pong --data-dir data/dqn-replay
    python finetune_offline.py --checkpoint ... --game Pong --compare          # + the from-scratch baseline
    python finetune_offline.py --checkpoint ... --game Pong --freeze-trunk     # the representation alone

Everything is imported: the network and its transfer from resnet.py; the loss, the training step and the
training loop (`update`, `train`: the cadence of target updates, logs, evaluations and checkpoints),
devices, evaluation and checkpoint I/O from cql_multigame.py; the data from replay.py. This file holds only
what differs: which weights start where, which of them train, and the comparison.

Left out: the paper's other transfer baselines (MAE, CPC, BERT-style pre-training, DT), several fine-tuning
seeds in one call (run the script once per --seed), multi-process training and --resume (a fine-tuning run
is short; cql_multigame.py has both). Values our sources do not state are marked "ours".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import atari
import cql_multigame
import replay
import resnet
from cql_multigame import ConfigError, EvalArgs, RunLock, StopSignals


@dataclass
class Args(EvalArgs):
    """Offline fine-tuning of a cql_multigame.py checkpoint on one (held-out) game, or its baseline. The
    evaluation flags (--eval-episodes, ...) come from cql_multigame.EvalArgs."""

    # --- what to start from ---
    checkpoint: str = ""
    """checkpoint.pt of a cql_multigame.py run; its trunk, spatial embedding and shared MLP are copied"""
    game: str = "Pong"
    """game to fine-tune on (the paper's held-out games: Alien, MsPacman, Pong, SpaceInvaders, StarGunner)"""
    freeze_trunk: bool = False
    """train only the new head: trunk, spatial embedding and shared MLP stay as pre-trained"""
    from_scratch: bool = False
    """the baseline: a random init of the checkpoint's network (or of --arch without a checkpoint)"""
    compare: bool = False
    """run the fine-tuning, then the from-scratch baseline with the same seed and batches; print both
    (with --freeze-trunk both are frozen: the baseline is then a random-features head)"""
    fine_tune_existing_head: bool = False
    """if the checkpoint already has a head for --game, fine-tune that head instead of a fresh one"""
    arch: str = ""
    """network of --from-scratch without --checkpoint (tiny, impala, resnet18/34/50/101). With a checkpoint,
    the baseline uses the checkpoint's network, so that it differs from fine-tuning only in the init."""

    # --- data (DQN-Replay, see replay.py) ---
    data_dir: str = "data/dqn-replay"
    """folder holding <Game>/<run>/replay_logs/ (gsutil -m cp -R gs://atari-replay-datasets/dqn/<Game>)"""
    runs: tuple[int, ...] = (1, 2, 3, 4, 5)
    """DQN-Replay runs (folder names 1..5) of the game"""
    checkpoints: str = "nearoptimal"
    """"suboptimal" (suffixes 0..9: the first 20% of a run), "nearoptimal" (all), or suffixes like "0,1" """
    fraction: float = 0.01
    """fraction of each selected checkpoint's transitions (its first ones, in file order).
    Paper: about 1% of the game's data, about 2M transitions. Ours: 1% of all 51 checkpoints of all
    5 runs, 2.55M transitions."""
    memory_budget_gb: float = 32.0
    """replay memory; the default selection, 2.55M transitions, is ~18 GB and stays resident"""
    prefetch: int = 2
    """batches sampled ahead by a background thread (0: sample inside the loop)"""

    # --- algorithm (the pre-training values of cql_multigame.py; the paper gives none for fine-tuning) ---
    total_steps: int = 100_000
    """gradient steps (ours: not stated in our sources)"""
    batch_size: int = 512
    """batch (ours: the pre-training batch)"""
    lr: float = 2e-4
    """Adam learning rate (ours: the pre-training value)"""
    adam_eps: float = 3.125e-4
    """Adam epsilon (ours: Dopamine's C51 value, as in cql_multigame.py)"""
    gamma: float = 0.99
    """discount (ours: the DQN-Replay agents' value)"""
    n_step: int = 3
    """n-step return length (paper: 3)"""
    target_update_every: int = 2000
    """gradient steps between hard target-network updates (paper: 2000)"""
    cql_alpha: float = 0.1
    """weight of the CQL regularizer (ours: the pre-training value)"""
    td_weight: float = 1.0
    """weight of the C51 TD loss (0 with --cql-alpha 1: behavior cloning)"""
    bf16: bool = False
    """bfloat16 autocast for the network on CUDA/XLA; the loss math stays float32"""

    # --- run, logging, checkpoints ---
    log_every: int = 1000
    """gradient steps between TensorBoard scalars (the only host syncs of the loop)"""
    eval_every: int = 10_000
    """gradient steps between evaluations (0: only at the end) (ours)"""
    save_every: int = 10_000
    """gradient steps between checkpoints (also written at the end)"""
    runs_dir: str = "runs"
    """where TensorBoard logs, checkpoints and summaries go"""
    run_name: str = ""
    """run folder under runs_dir (default: finetune_<game>_<variant>_seed<seed>)"""
    seed: int = 1
    """seed of the new head (or the whole net from scratch), the sampler and the evaluation episodes"""
    device: str = "auto"
    """auto (XLA, else CUDA, else MPS, else CPU), or cpu, cuda, cuda:1, mps, xla"""


# ----------------------------------------------------------------------------------------------------
# Input checks and the network (everything here runs before any long work)
# ----------------------------------------------------------------------------------------------------


def check_args(args: Args) -> str:
    """Flags that make no sense together (and the shared cql_multigame.check_flags); returns the canonical
    game name."""
    game = cql_multigame.check_game(args.game)
    if args.from_scratch and args.compare:
        raise ConfigError("--compare already runs the from-scratch baseline; drop --from-scratch.")
    if args.from_scratch and args.fine_tune_existing_head:
        raise ConfigError("--fine-tune-existing-head needs the pre-trained head; drop --from-scratch.")
    if not args.checkpoint and not (args.from_scratch and args.arch):
        raise ConfigError(
            "pass --checkpoint (a cql_multigame.py checkpoint.pt), or --from-scratch with --arch for the "
            "baseline without one."
        )
    cql_multigame.check_flags(args)
    return game


def load_source(args: Args, game: str) -> dict[str, Any] | None:
    """Load --checkpoint and check that resnet.py can rebuild its network and that `game` can get a head."""
    if not args.checkpoint:
        return None
    path = args.checkpoint
    ckpt = cql_multigame.load_checkpoint(path)  # one-sentence errors for missing or corrupt files
    cql_multigame.network_from_checkpoint(ckpt, path=path)  # one sentence if resnet.py can't rebuild it
    arch = ckpt["net_config"]["arch"]
    if args.arch and args.arch != arch:
        raise ConfigError(
            f"--arch {args.arch} differs from the checkpoint's {arch}; the baseline uses the checkpoint's "
            "network so that only the initialization differs: drop --arch."
        )
    games = list(ckpt["games"])
    needs_head = not args.from_scratch or args.compare
    if needs_head and game in games and not args.fine_tune_existing_head:
        unseen = [g for g in atari.HELDOUT_GAMES if g not in games]
        raise ConfigError(
            f"checkpoint {path} was trained on {game} (head {games.index(game)} of {len(games)}), so it is "
            f"not held out; pass --fine-tune-existing-head to fine-tune that head, or pick a game it has not "
            f"seen{', such as ' + ', '.join(unseen) if unseen else ''}."
        )
    if args.fine_tune_existing_head and game not in games:
        raise ConfigError(
            f"--fine-tune-existing-head: checkpoint {path} has no head for {game} (it has "
            f"{', '.join(games)}); drop the flag to fine-tune a fresh head."
        )
    return ckpt


def build_network(args: Args, ckpt: dict[str, Any] | None, game: str) -> resnet.QNetwork:
    """The one-game network to train, on the CPU. Call after torch.manual_seed(args.seed).

    fine-tune: trunk, spatial embedding and shared MLP copied from the checkpoint, a fresh head
    (resnet.transfer); with fine_tune_existing_head, the checkpoint's head for `game` instead of a fresh one;
    from_scratch: the same network (the checkpoint's config, or --arch), every weight random.
    freeze_trunk: trunk, spatial embedding and shared MLP get requires_grad False (GroupNorm keeps no
    running statistics, so frozen parts stay bit-for-bit unchanged).
    """
    if args.from_scratch:
        config = ckpt["net_config"] if ckpt is not None else {"arch": args.arch}
        net = resnet.QNetwork(**{**config, "num_games": 1})
    else:
        pretrained = cql_multigame.network_from_checkpoint(ckpt)
        net = resnet.transfer(pretrained, 1)
        if args.fine_tune_existing_head:
            resnet.copy_head(net, 0, pretrained, list(ckpt["games"]).index(game))
    if args.freeze_trunk:  # with --from-scratch: the random-features baseline
        resnet.freeze_trunk(net)
    return net


def run_kind(args: Args) -> str:
    """Short name of what trains from where: finetune, existinghead or scratch, + _frozen."""
    name = "scratch" if args.from_scratch else "existinghead" if args.fine_tune_existing_head else "finetune"
    return name + ("_frozen" if args.freeze_trunk else "")


def describe(args: Args) -> str:
    frozen = ", trunk frozen" if args.freeze_trunk else ""
    if args.from_scratch:
        return f"from scratch{' (random features)' if args.freeze_trunk else ''}"
    head = "its own head" if args.fine_tune_existing_head else "a new head"
    return f"fine-tuned from {args.checkpoint} ({head}{frozen})"


# ----------------------------------------------------------------------------------------------------
# One fine-tuning run: cql_multigame.py's loop on one game
# ----------------------------------------------------------------------------------------------------


def fine_tune(
    args: Args,
    net: resnet.QNetwork,
    data: replay.MultiGameReplay,
    game: str,
    support: torch.Tensor,
    device: torch.device,
    run_dir: Path,
    stop: StopSignals,
) -> dict[str, Any]:
    """Train `net` with cql_multigame.py's training step and loop (`update`, `train`: the same cadence of
    target updates, logs, evaluations and checkpoints) on one game's data, then evaluate it; returns the
    summary (also <run_dir>/summary.json). SIGINT/SIGTERM save the current step and raise RunInterrupted."""
    net = net.to(device)
    optimizer = cql_multigame.make_optimizer(net.parameters(), args.lr, args.adam_eps, device)
    learner = cql_multigame.Learner(
        net, resnet.target_network(net), optimizer,
        support=support, legal_table=cql_multigame.legal_action_table([game]).to(device),  # [1, A]
        cql_alpha=args.cql_alpha, td_weight=args.td_weight, bf16=args.bf16 and device.type in ("cuda", "xla"),
    )  # fmt: skip

    def report(result: dict[str, Any], step: int) -> str:  # what a periodic evaluation prints
        return final_line(game, result["games"][game], step, run_kind(args))

    run = cql_multigame.Run(args, run_dir, [game], report=report, play=cql_multigame.evaluate_games)
    run.open(desc=run_kind(args))
    stream = cql_multigame.BatchStream(data, args.batch_size, device, args.prefetch)
    step = cql_multigame.train(args, learner, stream, run, stop)
    result = run.final_evaluation(learner, step, stop)
    run.close()
    summary = {"game": game, "variant": run_kind(args), "init": describe(args), "step": step}
    summary.update(run_dir=str(run_dir), **result["games"][game])
    replay.write_file(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def final_line(game: str, r: dict[str, Any], step: int, name: str) -> str:
    hns = f"{r['hns']:.3f}" if r["hns"] is not None else f"n/a ({game} has no human score)"
    return (
        f"{game} after {step:,} steps ({name}): return {r['mean_return']:.1f}, human-normalized {hns} "
        f"(mean of {len(r['returns'])} episodes)"
    )


def compare_table(fine: dict[str, Any], scratch: dict[str, Any], transitions: int) -> str:
    def hns(r: dict[str, Any]) -> str:
        return "n/a" if r["hns"] is None else f"{r['hns']:.3f}"

    return "\n".join([
        f"{fine['game']}: {fine['step']:,} steps on {transitions:,} transitions, {len(fine['returns'])} "
        "evaluation episodes each",
        "",
        "| init | return | human-normalized |",
        "|---|---:|---:|",
        f"| {fine['init']} | {fine['mean_return']:.1f} | {hns(fine)} |",
        f"| {scratch['init']} | {scratch['mean_return']:.1f} | {hns(scratch)} |",
    ])  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    """Fine-tune (or train from scratch, or both with --compare); returns the summary of each run.
    SIGINT/SIGTERM stop it with a saved checkpoint (RunInterrupted); the run folder's lock (RunLock) is
    released however it ends."""
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        game = check_args(args)
        device = cql_multigame.select_device(args.device)
        ckpt = load_source(args, game)
        kind = "compare" if args.compare else run_kind(args)
        base = Path(args.runs_dir) / (args.run_name or f"finetune_{game}_{kind}_seed{args.seed}")
        plans = [(args, base)]
        if args.compare:
            # the baseline differs only in the init: with --freeze-trunk it is frozen too (random features)
            scratch = dataclasses.replace(
                args, from_scratch=True, freeze_trunk=args.freeze_trunk, fine_tune_existing_head=False
            )
            plans = [(args, base / "finetune"), (scratch, base / "scratch")]
        for _, run_dir in plans:
            if (run_dir / "checkpoint.pt").exists():
                raise ConfigError(f"{run_dir} already holds a checkpoint; pass another --run-name.")
        cleanup.enter_context(RunLock(base))  # one writer; an unwritable --runs-dir fails before any load

        support = cql_multigame.support_from_checkpoint(ckpt, device)  # [K]
        data = replay.MultiGameReplay(
            args.data_dir,
            [game],
            runs=tuple(args.runs),
            checkpoints=cql_multigame.parse_checkpoints(args.checkpoints),
            fraction=args.fraction,
            n_step=args.n_step,
            gamma=args.gamma,
            memory_budget_gb=args.memory_budget_gb,
            seed=args.seed,
        )
        cleanup.callback(data.close)
        print(data.plan_summary())
        start_state = data.state_dict()  # --compare: both runs see the same batches
        transitions = data.stats()["loaded_transitions"]
        summaries = []
        for run_args, run_dir in plans:
            data.load_state_dict(start_state)
            torch.manual_seed(run_args.seed)
            np.random.seed(run_args.seed)
            net = build_network(run_args, ckpt, game)
            counts = resnet.count_parameters(net)
            trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
            print(
                f"{describe(run_args)}: {net.arch}, {counts['total'] / 1e6:.2f}M parameters "
                f"({trained / 1e6:.2f}M trained) on {device}; logs and checkpoint in {run_dir}"
            )
            summaries.append(fine_tune(run_args, net, data, game, support, device, run_dir, stop))
            print(final_line(game, summaries[-1], run_args.total_steps, run_kind(run_args)))

        out: dict[str, Any] = {"runs": summaries, "transitions": transitions}
        if args.compare:
            replay.write_file(base / "compare.json", json.dumps(out, indent=2))
            print(f"\nTensorBoard: tensorboard --logdir {base}; both runs: {base / 'compare.json'}\n")
            print(compare_table(summaries[0], summaries[1], transitions))
        return out


if __name__ == "__main__":
    import tyro

    cql_multigame.run_script(main, tyro.cli(Args))
