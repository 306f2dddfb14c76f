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

Everything is imported: the network and its transfer from resnet.py, the loss, devices, evaluation and
checkpoint I/O from cql_multigame.py, the data from replay.py. This file holds only what differs: which
weights start where, which of them train, and the comparison.

Left out: the paper's other transfer baselines (MAE, CPC, BERT-style pre-training, DT), several fine-tuning
seeds in one call (run the script once per --seed), multi-process training and --resume (a fine-tuning run
is short; cql_multigame.py has both). Values our sources do not state are marked "ours".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import atari
import cql_multigame
import replay
import resnet
from cql_multigame import ConfigError, Interrupted, RunInterrupted, RunLock, StopSignals


@dataclass
class Args:
    """Offline fine-tuning of a cql_multigame.py checkpoint on one (held-out) game, or its baseline."""

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
    """replay memory (ours); the default selection, 2.55M transitions, is ~18 GB and stays resident"""
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

    # --- evaluation (DQN-Replay protocol, see atari.evaluate) ---
    eval_episodes: int = 8
    """episodes at every evaluation (ours)"""
    eval_envs: int = 8
    """episodes played in parallel, one batched forward per step"""
    eval_workers: int = 0
    """subprocesses stepping the evaluation envs (0: in this process; ALE holds the GIL, so threads would not
    help); up to one per free core, same episodes and returns (2 on a 2-core CPU: 1.2x faster stepping)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy (DQN-Replay protocol)"""
    eval_max_steps: int = 27_000
    """agent steps per evaluation episode (DQN-Replay protocol: 27,000 = 108k frames)"""

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
    """Flags that make no sense together; returns the canonical game name."""
    try:
        game = atari.check_game(args.game)
    except ValueError as e:
        raise ConfigError(f"--game: {e}") from None
    if args.from_scratch and args.compare:
        raise ConfigError("--compare already runs the from-scratch baseline; drop --from-scratch.")
    if args.from_scratch and args.fine_tune_existing_head:
        raise ConfigError("--fine-tune-existing-head needs the pre-trained head; drop --from-scratch.")
    if not args.checkpoint and not (args.from_scratch and args.arch):
        raise ConfigError(
            "pass --checkpoint (a cql_multigame.py checkpoint.pt), or --from-scratch with --arch for the "
            "baseline without one."
        )
    if args.arch and args.arch not in resnet.ARCHS:
        raise ConfigError(f"unknown --arch {args.arch!r}; choose one of {', '.join(resnet.ARCHS)}.")
    cql_multigame.check_ranges(args)  # every numeric flag, the same rules as the other scripts
    cql_multigame.parse_checkpoints(args.checkpoints)
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


def variant(args: Args) -> str:
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
# One fine-tuning run
# ----------------------------------------------------------------------------------------------------


def train(
    args: Args,
    net: resnet.QNetwork,
    data: replay.MultiGameReplay,
    game: str,
    support: torch.Tensor,
    device: torch.device,
    run_dir: Path,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """C51 + CQL on one game's data (cql_multigame.compute_loss), periodic and final evaluation.
    With `stop` (main's), SIGINT/SIGTERM finish the current step, save the checkpoint and raise
    RunInterrupted; a signal during an evaluation drops it."""
    stop = stop or StopSignals()  # not entered: no handlers, never set
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    net = net.to(device)
    target_net = resnet.target_network(net)
    optimizer = cql_multigame.make_optimizer(net.parameters(), args.lr, args.adam_eps, device)
    legal_table = cql_multigame.legal_action_table([game]).to(device)  # [1, A]
    bf16 = args.bf16 and device.type in ("cuda", "xla")

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    cql_multigame.write_hyperparameters(writer, args)
    stream = cql_multigame.BatchStream(data, args.batch_size, device, args.prefetch)
    progress = tqdm(
        total=args.total_steps, desc=variant(args), unit="step", dynamic_ncols=True, mininterval=1.0
    )
    replay_state, last_log = data.state_dict(), (time.perf_counter(), 0)

    def save(at_step: int) -> None:
        state = cql_multigame.checkpoint_state(
            net, target_net, optimizer, at_step, dataclasses.asdict(args), [game], replay_state
        )
        cql_multigame.save_checkpoint(run_dir / "checkpoint.pt", state)

    def abandonable_evaluation(at_step: int) -> dict[str, Any] | None:
        try:
            with stop.abandonable():
                return cql_multigame.evaluate_games(
                    net, [game], support, device, args, seed=args.seed + at_step
                )
        except Exception:  # Interrupted, or an env worker killed by the same SIGTERM
            if stop.signum is None:
                raise
            return None

    stop.abandon = False  # a signal lets the current step finish; the loop then saves and stops
    try:
        for step in range(1, args.total_steps + 1):
            batch, replay_state = stream.next()
            loss, metrics = cql_multigame.compute_loss(
                net, target_net, batch, support, legal_table, args.cql_alpha, args.td_weight, bf16
            )
            cql_multigame.gradient_step(loss, optimizer, device)
            if step % args.target_update_every == 0:
                target_net.load_state_dict(net.state_dict())
            cql_multigame.sync_device(device)
            progress.update(1)

            if step % args.log_every == 0 or step == args.total_steps:
                values = cql_multigame.fetch_metrics(
                    metrics, f"at step {step}", "lower --lr or check the data."
                )
                now = time.perf_counter()
                sps = (step - last_log[1]) * args.batch_size / max(now - last_log[0], 1e-9)
                last_log = (now, step)
                cql_multigame.log_training(writer, values, step, sps, run_dir / "metrics.jsonl")
                progress.set_postfix(
                    loss=f"{values['loss']:.3f}", q=f"{values['q_data']:.2f}", sps=f"{sps:.0f}"
                )
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                result = abandonable_evaluation(step)
                if result is not None:
                    cql_multigame.log_evaluation(writer, result, step)
                    progress.write(final_line(game, result["games"][game], step, variant(args)))
            saved = step % args.save_every == 0 or step == args.total_steps
            if saved:
                save(step)
            if stop.signum is not None:
                if not saved:
                    save(step)
                raise RunInterrupted(
                    f"interrupted by {stop.name} at step {step:,} of {args.total_steps:,}: "
                    f"{run_dir / 'checkpoint.pt'} holds the network at step {step:,}; fine-tuning runs have "
                    "no --resume, so rerun with another --run-name to start over.",
                    stop.signum,
                )
    except Interrupted as e:  # a second signal inside a step (or a save): that step is not saved
        raise RunInterrupted(
            f"stopped at once by a second {e}, without saving the step it cut; fine-tuning runs have no "
            "--resume, rerun with another --run-name.",
            e.signum,
        ) from None
    finally:
        stop.abandon = True
        stream.close()
        progress.close()
        writer.flush()

    result = abandonable_evaluation(args.total_steps)
    if result is None:
        raise RunInterrupted(
            f"interrupted by {stop.name} during the final evaluation: {run_dir / 'checkpoint.pt'} holds the "
            f"trained network (step {args.total_steps:,}), not evaluated; fine-tuning runs have no --resume, "
            "rerun with another --run-name.",
            stop.signum,
        )
    cql_multigame.log_evaluation(writer, result, args.total_steps)
    writer.close()
    summary = {"game": game, "variant": variant(args), "init": describe(args), "step": args.total_steps}
    summary.update(run_dir=str(run_dir), **result["games"][game])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
        return finetune(args, stop, cleanup)


def finetune(args: Args, stop: StopSignals, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """main's work, inside its signal handlers and cleanup."""
    game = check_args(args)
    device = cql_multigame.select_device(args.device)
    ckpt = load_source(args, game)
    name = args.run_name or f"finetune_{game}_{'compare' if args.compare else variant(args)}_seed{args.seed}"
    base = Path(args.runs_dir) / name
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
    cleanup.enter_context(RunLock(base))  # one writer; an unwritable --runs-dir is found before the data load

    defaults = cql_multigame.Args()  # the pre-training support when the checkpoint does not record it
    ckpt_args = ckpt["args"] if ckpt is not None else {}
    num_atoms = ckpt["net_config"]["num_atoms"] if ckpt is not None else defaults.num_atoms
    support = torch.linspace(
        ckpt_args.get("v_min", defaults.v_min),
        ckpt_args.get("v_max", defaults.v_max),
        num_atoms,
        device=device,
    )  # [K]
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
    print(data.plan_summary())
    start_state = data.state_dict()  # --compare: both runs see the same batches
    transitions = data.stats()["loaded_transitions"]
    summaries = []
    try:
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
            summaries.append(train(run_args, net, data, game, support, device, run_dir, stop))
            print(final_line(game, summaries[-1], run_args.total_steps, variant(run_args)))
    finally:
        data.close()

    out: dict[str, Any] = {"runs": summaries, "transitions": transitions}
    if args.compare:
        (base / "compare.json").write_text(json.dumps(out, indent=2))
        print(f"\nTensorBoard: tensorboard --logdir {base}; both runs: {base / 'compare.json'}\n")
        print(compare_table(summaries[0], summaries[1], transitions))
    return out


def run(args: Args) -> None:
    """Run `main`, printing user mistakes as one line instead of a traceback."""
    try:
        main(args)
    except (ConfigError, replay.ReplayDataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (RunInterrupted, Interrupted) as e:
        cql_multigame.exit_interrupted(e)
    except OSError as e:
        cql_multigame.exit_on_disk_error(e)


if __name__ == "__main__":
    import tyro

    run(tyro.cli(Args))
