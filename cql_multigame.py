"""Multi-game offline C51 + CQL ("Scaled QL"): the main script and the home of the algorithm.

Implements Kumar et al., "Offline Q-Learning on Diverse Multi-Task Data Both Scales and Generalizes"
(ICLR 2023, arXiv 2211.15144), Section 4 and Appendix B:

* one Q-network (resnet.py: ResNet trunk, learned spatial embedding, normalized shared features, one
  C51 head per game) trained offline on the DQN-Replay data of many games at once (replay.py);
* the loss (Sec. 4, "Scaled QL"): the C51 distributional TD loss (a cross-entropy between the projected
  n-step target distribution of a target network and the predicted distribution of the data action)
  plus the CQL regularizer  alpha * (logsumexp_a Q(s, a) - Q(s, a_data))  on expected Q-values, where
  the logsumexp and the target network's argmax run over the game's legal (minimal-set) actions only;
* Adam, hard target updates every 2000 gradient steps, batch 512, n-step 3 (Appendix B.3);
* periodic evaluation (atari.py: sticky actions, epsilon 0.001, human-normalized score, IQM).

Left out: the paper's exact TPU input pipeline (we stream checkpoints with replay.py instead), and
anything our sources do not state, which is marked "ours" where it is set (see the README's deviations).

Read top to bottom, in the paper's order: `Args` and the presets; the math (`categorical_projection`,
`c51_cql_loss`, `expected_q`, `target_action`, `compute_loss`); one training step (`update`); the loop
(`train`, which finetune_offline.py runs too); `main`. Below `main`, the machinery it calls, each in a
named section: main's set-up (resume, replay), the run folder (`Run`: logs, evaluations, checkpoints),
devices and processes (torchrun DDP, torch-xla), batches (`BatchStream`), checkpoint files, evaluation,
input checks, reliability (flag ranges, resume checks, run locks, signals, disks) and the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import queue
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import atari
import replay
import resnet

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    """The evaluation flags of all three training scripts (DQN-Replay protocol, see atari.evaluate). Each
    script's Args inherits them, so the flags keep their names (--eval-episodes, ...)."""

    eval_episodes: int = 8
    """episodes per game at every evaluation (ours)"""
    eval_envs: int = 8
    """episodes played in parallel, one batched forward per step"""
    eval_workers: int = 0
    """subprocesses stepping the evaluation envs (0: in this process; ALE holds the GIL, so threads would not
    help); up to one per free core, same episodes and returns"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy (DQN-Replay protocol)"""
    eval_max_steps: int = 27_000
    """agent steps per evaluation episode (DQN-Replay protocol: 27,000 = 108k frames)"""


@dataclass
class Args(EvalArgs):
    """Scaled QL: multi-game offline C51 + CQL. Defaults are the paper's; "ours" marks unstated values.
    The evaluation flags (--eval-episodes, ...) come from EvalArgs."""

    # --- run ---
    run_name: str = ""
    """name of the run folder under `runs_dir` (default: derived from arch, number of games and seed)"""
    runs_dir: str = "runs"
    """where TensorBoard logs, checkpoints and the summary of every run go"""
    seed: int = 1
    """seed of the network init, the sampler and the evaluation episodes"""
    resume: bool = False
    """continue the run `run_name` from its last checkpoint (same next batches and losses)"""
    device: str = "auto"
    """auto (XLA if torch_xla imports, else CUDA, else MPS, else CPU), or cpu, cuda, cuda:1, mps, xla"""
    xla_multiprocess: bool = False
    """on TPU: start one process per TPU device with torch_xla's launcher (data parallel over cores);
    prefer --xla-spmd"""
    xla_spmd: bool = False
    """on TPU: SPMD data parallelism, one process per host drives all its devices; every batch is split
    along its batch dim over a ('data',) mesh of all devices of all hosts (torch-xla's recommended way)"""
    xla_cache_dir: str = ""
    """on XLA: torch-xla's persistent compilation cache in this (host-local) folder, so a restarted run
    loads its compiled graphs instead of compiling them again ("": off)"""

    # --- data (DQN-Replay, see replay.py) ---
    data_dir: str = "data/dqn-replay"
    """folder holding <Game>/<run>/replay_logs/ of DQN-Replay (gsutil -m cp -R gs://atari-replay-datasets/dqn/<Game>)"""
    games: tuple[str, ...] = atari.TRAIN_GAMES
    """games to train on; one head per game, in this order (default: the paper's 40 training games)"""
    runs: tuple[int, ...] = (1,)
    """DQN-Replay runs (folder names 1..5) to use for every game. Default: run 1 only, so that "suboptimal"
    is the paper's amount: 400M transitions over 40 games = 10M per game = the first 20% of ONE run (the
    abstract's numbers). Which run the paper used is not stated: run 1 is ours (runs are independent DQN
    agents of equal standing); --runs 1 2 3 4 5 reads 5x the paper's data"""
    checkpoints: str = "suboptimal"
    """"suboptimal" (suffixes 0..9: the first 20% of DQN-Replay's 0..50 numbering), "nearoptimal" (all),
    or suffixes like "0,1,2" """
    fraction: float = 1.0
    """fraction of the transitions of each selected checkpoint to use"""
    memory_budget_gb: float = 32.0
    """replay memory per process (ours); checkpoints rotate through memory when all don't fit"""
    reload_every: int = 0
    """gradient steps between two swaps of a game's loaded data (ours; 0: auto, the longest period up to
    50,000 at which every game loads all its selected data within --total-steps)"""
    windows_per_slot: int = 5
    """when the data does not fit: windows of this many different checkpoints share each game's slot, so a
    batch mixes them (ours: batch_rl's FixedReplayBuffer mixes 5 checkpoints; 1: one window per slot)"""
    plan_only: bool = False
    """print the replay plan for DQN-Replay's sizes (slots, windows per slot, reload period, data seen over
    the run, distinct checkpoints per batch) and exit; needs no data"""
    prefetch: int = 2
    """batches sampled ahead by a background thread (0: sample inside the loop)"""
    record_missing: int = 0
    """if > 0, record this many random-policy transitions per missing game with replay.py first (demo)"""

    # --- network (resnet.py) ---
    arch: str = "resnet101"
    """tiny, impala, resnet18, resnet34, resnet50 or resnet101 (paper: resnet101)"""
    num_atoms: int = 51
    """C51 atoms (ours: the C51 default; not stated in the paper)"""
    v_min: float = -10.0
    """lowest return atom (ours: the C51 default for clipped rewards)"""
    v_max: float = 10.0
    """highest return atom (ours: the C51 default for clipped rewards)"""

    # --- algorithm ---
    total_steps: int = 10_000_000
    """gradient steps (paper: 10M)"""
    batch_size: int = 512
    """global batch, split over processes and then over games (paper: 512)"""
    lr: float = 2e-4
    """Adam learning rate (paper: 2e-4, scaled from single-game 5e-5 for a 16x larger batch)"""
    adam_eps: float = 3.125e-4
    """Adam epsilon (ours: Dopamine's C51/Rainbow value, 0.01/32)"""
    gamma: float = 0.99
    """discount (ours: the DQN-Replay agents' value)"""
    n_step: int = 3
    """n-step return length (paper: 3)"""
    target_update_every: int = 2000
    """gradient steps between hard target-network updates (paper: 2000)"""
    cql_alpha: float = 0.1
    """weight of the CQL regularizer (ours: not stated for the multi-game runs)"""
    td_weight: float = 1.0
    """weight of the C51 TD loss; 0 with cql_alpha 1 is behavior cloning (see the `bc` preset)"""
    double_q: bool = False
    """pick the target's next action by the ONLINE network's Q (double DQN) instead of the target
    network's (plain C51, ours: the paper does not say; Dopamine's offline configs, e.g.
    labs/offline_rl jax_classy_cql.gin, set double_dqn = True)"""

    # --- speed ---
    channels_last: bool = False
    """store conv activations channels-last (faster on CUDA tensor cores, and for impala and tiny on CPU:
    see the README's Performance section)"""
    bf16: bool = False
    """bfloat16 autocast for the network on CUDA/XLA; the loss math stays float32"""
    compile: bool = False
    """torch.compile the loss computation (meant for CUDA; on CPU it gains nothing, see the README's
    Performance section)"""

    # --- logging, evaluation (and EvalArgs), checkpoints ---
    log_every: int = 1000
    """gradient steps between TensorBoard scalars (the only host syncs of the loop)"""
    eval_every: int = 500_000
    """gradient steps between evaluations (0: only at the end)"""
    save_every: int = 100_000
    """gradient steps between checkpoints (also written at the end)"""
    save_all_ranks: bool = False
    """debug: every process writes its final parameters to params_rank<r>.pt and the games of its batches
    to batch_games_rank<r>.pt (the data-parallel tests use them)"""
    xla_metrics: bool = False
    """debug on XLA: print the graph compile/execute counts at every log interval (should stop growing)"""


PRESETS: dict[str, tuple[str, Args]] = {
    "paper-suboptimal": (
        "the paper's main setting: 40 games, checkpoints 0..9 (the first 20%) of DQN-Replay run 1: 10M "
        "transitions per game, 400M in all (which run: ours)",
        Args(runs=(1,), checkpoints="suboptimal"),
    ),
    "paper-nearoptimal": (
        "the paper's near-optimal setting: 40 games, all 51 checkpoints of DQN-Replay run 1 (ours: the run "
        "of the sub-optimal preset, so that one data set contains the other)",
        Args(runs=(1,), checkpoints="nearoptimal"),
    ),
    "demo": (
        "CPU demo, no download: records a small random-policy dataset for 3 games, trains the tiny net",
        Args(
            data_dir="data/demo",
            games=("Breakout", "Boxing", "Freeway"),
            runs=(1,),
            checkpoints="nearoptimal",
            record_missing=20_000,
            memory_budget_gb=2.0,
            reload_every=1_000_000,
            arch="tiny",
            total_steps=3000,
            batch_size=32,
            lr=1e-4,
            target_update_every=500,
            log_every=100,
            eval_every=0,
            eval_episodes=4,
            eval_envs=4,
            eval_max_steps=2000,
            save_every=1000,
            device="cpu",
        ),
    ),
    "bc": (
        "behavior cloning on the same network: the CQL term alone (TD off) is the cross-entropy of the "
        "data action under softmax(Q)",
        Args(td_weight=0.0, cql_alpha=1.0),
    ),
}


# TensorBoard tags of the training scalars (metric of c51_cql_loss, tag); the fine-tuning scripts share them.
TRAIN_SCALARS = (
    ("td_loss", "losses/td_loss"),
    ("cql_term", "losses/cql_term"),
    ("loss", "losses/total_loss"),
    ("q_data", "q/data_action"),
    ("q_max", "q/max"),
)


class ConfigError(ValueError):
    """A mistake in the flags or files a user gave; printed as one sentence, without a traceback."""


# ----------------------------------------------------------------------------------------------------
# The math: C51 projection, the C51 + CQL loss, expected Q, the target's action
# ----------------------------------------------------------------------------------------------------


def categorical_projection(
    next_probs: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Project the distribution of  reward + discount * Z'  back onto the fixed support (C51, Alg. 1).

    Dense and fixed-shape, as in Dopamine's `project_distribution`: every shifted target atom spreads its
    mass over the support atoms with a triangle kernel of width one atom spacing, so an atom landing
    exactly on a support point gives all its mass to that point, and targets outside [v_min, v_max] are
    clamped to the end atoms first. No loop over the batch; compiles to one graph on XLA.

    next_probs [B, K] (sums to 1), reward [B], discount [B] (gamma**n, 0 at terminals), support [K].
    Returns [B, K], each row summing to 1.
    """
    v_min, v_max = support[0], support[-1]
    delta = (v_max - v_min) / (support.shape[0] - 1)
    target_atoms = reward[:, None] + discount[:, None] * support[None, :]  # [B, K]
    target_atoms = target_atoms.clamp(v_min, v_max)
    # weight[b, i, j]: share of target atom j that lands on support atom i
    distance = (target_atoms[:, None, :] - support[None, :, None]).abs()  # [B, K_i, K_j]
    weight = (1.0 - distance / delta).clamp(min=0.0)  # [B, K, K]
    return torch.einsum("bij,bj->bi", weight, next_probs)  # [B, K]


def c51_cql_loss(
    logits: torch.Tensor,
    action: torch.Tensor,
    target_probs: torch.Tensor,
    support: torch.Tensor,
    legal: torch.Tensor,
    cql_alpha: float,
    td_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Scaled QL loss: C51 cross-entropy TD loss + cql_alpha * CQL regularizer (Sec. 4).

    logits [B, A, K] of the online network; action [B] full-set ids of the data; target_probs [B, K]
    (already projected, no gradient); support [K]; legal [B, A] bool, the game's minimal action set.

    TD:  -sum_k target_probs[k] * log_softmax(logits[action])[k]
    CQL: logsumexp over legal a of Q(s, a)  -  Q(s, a_data), with Q = sum_k softmax(logits[a])_k z_k.
    Illegal actions enter neither term. With td_weight=0 the loss is cql_alpha times the cross-entropy of
    the data action under softmax(Q) over legal actions: behavior cloning on the same network.
    Returns the mean loss and detached metrics (device tensors; read them only at log intervals).
    """
    logits = logits.float()  # the loss math stays in float32 under bf16 autocast
    batch = torch.arange(logits.shape[0], device=logits.device)
    log_probs = F.log_softmax(logits, dim=-1)  # [B, A, K]
    td = -(target_probs * log_probs[batch, action]).sum(-1)  # [B]

    q = (log_probs.exp() * support).sum(-1)  # [B, A] expected_q, from the log-probabilities TD uses
    q_legal = q.masked_fill(~legal, float("-inf"))  # [B, A]
    q_data = q[batch, action]  # [B]
    cql = torch.logsumexp(q_legal, dim=-1) - q_data  # [B]

    loss = (td_weight * td + cql_alpha * cql).mean()
    metrics = {
        "td_loss": td.mean().detach(),
        "cql_term": cql.mean().detach(),
        "q_data": q_data.mean().detach(),
        "q_max": q_legal.max(-1).values.mean().detach(),
        "loss": loss.detach(),
    }
    return loss, metrics


def expected_q(logits: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """[B, A, K] logits -> [B, A] expected Q-values, sum_k softmax(logits)_k z_k (every script's Q)."""
    return (logits.float().softmax(-1) * support).sum(-1)


def target_action(q: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """The next action of the n-step target: argmax of q [B, A] over the legal actions (legal [B, A]
    bool) only, so an action the game does not have can never be the bootstrap action. Returns [B]."""
    return q.masked_fill(~legal, float("-inf")).argmax(-1)


def legal_action_table(games: list[str] | tuple[str, ...], num_actions: int = 18) -> torch.Tensor:
    """[G, A] bool: which full-set actions are in each game's minimal action set (from ALE)."""
    table = torch.zeros(len(games), num_actions, dtype=torch.bool)
    for g, game in enumerate(games):
        table[g, atari.legal_actions(game)] = True
    return table


def compute_loss(
    net: torch.nn.Module,
    target_net: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    support: torch.Tensor,
    legal_table: torch.Tensor,
    cql_alpha: float,
    td_weight: float = 1.0,
    bf16: bool = False,
    double_q: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch -> (loss, metrics): n-step C51 target from the target network, then `c51_cql_loss`.

    batch: obs, next_obs uint8 [B, 4, 84, 84]; action, game int64 [B]; reward, discount float32 [B].
    The next action is the argmax over legal actions of the target network's Q (plain C51, ours), or of the
    online network's Q with double_q (double DQN, as Dopamine's offline configs); its distribution always
    comes from the target network.
    """
    legal = legal_table[batch["game"]]  # [B, A]
    autocast = torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=bf16)
    if td_weight != 0.0:
        with torch.no_grad(), autocast:
            next_logits = target_net(batch["next_obs"], batch["game"]).float()  # [B, A, K]
        next_probs = next_logits.softmax(-1)  # [B, A, K]
        chooser_logits = next_logits  # [B, A, K] whose Q picks the next action
        if double_q:  # double DQN: the online network chooses, the target network evaluates
            with torch.no_grad(), autocast:
                chooser_logits = net(batch["next_obs"], batch["game"]).float()  # [B, A, K]
        next_action = target_action(expected_q(chooser_logits, support), legal)  # [B]
        batch_idx = torch.arange(next_probs.shape[0], device=next_probs.device)
        target_probs = categorical_projection(
            next_probs[batch_idx, next_action], batch["reward"], batch["discount"], support
        )  # [B, K]
    else:  # behavior cloning: no TD target needed
        target_probs = torch.zeros(batch["obs"].shape[0], support.shape[0], device=support.device)
    with autocast:
        logits = net(batch["obs"], batch["game"])  # [B, A, K]
    return c51_cql_loss(logits, batch["action"], target_probs, support, legal, cql_alpha, td_weight)


# ----------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------


@dataclass
class Learner:
    """What a training step reads and changes. All three training scripts build one and call `update`."""

    net: resnet.QNetwork  # the online network; its weights are the ones saved
    target_net: resnet.QNetwork  # frozen copy (resnet.target_network); the loop refreshes it
    optimizer: torch.optim.Optimizer
    support: torch.Tensor  # [K] the C51 atoms, on the training device
    legal_table: torch.Tensor  # [G, A] bool, legal_action_table of the heads' games
    cql_alpha: float
    td_weight: float = 1.0
    bf16: bool = False  # autocast the network to bfloat16 (CUDA/XLA only); the loss stays float32
    double_q: bool = False
    model: torch.nn.Module | None = None  # what runs the forward when it is not `net` (its DDP wrapper)
    loss_fn: Callable[..., Any] | None = None  # compute_loss or its torch.compile (None: compute_loss)


def update(learner: Learner, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One gradient step on one batch: the C51 + CQL loss (`compute_loss`), backward, Adam.
    Returns the loss's metrics as device tensors: read them only at log intervals (no host sync here)."""
    loss_fn = learner.loss_fn or compute_loss
    loss, metrics = loss_fn(
        learner.model or learner.net, learner.target_net, batch, learner.support, learner.legal_table,
        learner.cql_alpha, learner.td_weight, learner.bf16, learner.double_q,
    )  # fmt: skip
    gradient_step(loss, learner.optimizer, learner.support.device)
    return metrics


def gradient_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Backward and one optimizer step. On XLA (one process per device), xm.optimizer_step also
    all-reduces the gradients over replicas (the torch-xla idiom); under DDP, backward has already averaged
    them; under XLA SPMD the loss is the mean over the global sharded batch, so the compiler has."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if device.type == "xla" and not _xla_spmd():
        import torch_xla.core.xla_model as xm

        xm.optimizer_step(optimizer)
    else:
        optimizer.step()


# ----------------------------------------------------------------------------------------------------
# The training loop (finetune_offline.py runs it too)
# ----------------------------------------------------------------------------------------------------


def train(
    args: Any, learner: Learner, stream: BatchStream, run: Run, stop: StopSignals, step: int = 0
) -> int:
    """Train from `step` to args.total_steps: one `update` per batch, a hard target update every
    target_update_every steps, and a log line (log_every), an evaluation (eval_every, not at the last
    step: the caller's final evaluation follows) and a checkpoint (save_every and the last step).

    SIGINT/SIGTERM: the current step finishes, the loop saves it and raises RunInterrupted with the line to
    print; a signal during an evaluation drops only the evaluation. Returns the last step.
    """
    stop.abandon = False  # from here a signal lets the current step finish, then the loop saves and stops
    try:
        while step < args.total_steps:
            batch, replay_state = stream.next()  # the sampler's state right after this batch
            metrics = update(learner, batch)
            step += 1
            if step % args.target_update_every == 0:
                learner.target_net.load_state_dict(learner.net.state_dict())
            sync_device(learner.support.device)  # XLA: one step is one graph
            run.stepped()

            if step % args.log_every == 0 or step == args.total_steps:
                run.log(step, metrics, stream, learner.optimizer)
            evaluated = bool(args.eval_every and step % args.eval_every == 0 and step < args.total_steps)
            if evaluated:
                run.evaluate(learner, step, stop)
            if step % args.save_every == 0 or step == args.total_steps:
                run.save(learner, step, replay_state)
            if stop_requested(stop, run.processes, step, evaluated):
                run.stop_with_checkpoint(learner, step, replay_state, stop)
    except Interrupted as e:  # a second signal inside a step (or a save): what it cut is not saved
        what_next = f"{run.last_good_text()}; {run.how_to_go_on('resume with')}"
        raise stopped_at_once(e, f"at step {step:,}", what_next) from None
    finally:
        stop.abandon = True
        stream.close()
        run.flush()
    return step


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    """Train one run and evaluate it; returns the summary (also <run_dir>/summary.json). SIGINT/SIGTERM
    end it with a checkpoint (RunInterrupted); the run folder's lock is released however it ends.
    --plan-only prints the data plan and returns."""
    if args.plan_only:  # needs no data, no device
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_args(args, world_size)
        print(replay_plan(args, world_size))
        return {}
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        # where it runs, and every check of the flags and files before any long work
        init_xla_runtime(args)
        device = select_device(args.device)
        processes = setup_distributed(device)
        check_args(args, processes.world_size)
        check_spmd_args(args, processes)
        run_dir = choose_run_dir(args)
        resume_ckpt = checkpoint_to_resume(args, run_dir)  # None for a new run
        if processes.is_first:  # one writer per run folder; also finds an unwritable --runs-dir now
            cleanup.enter_context(RunLock(run_dir))
        if args.record_missing > 0 and processes.is_first:
            record_missing_games(args)
        processes.barrier()

        # the data, the network, its target copy and Adam (Sec. 4, Appendix B.3)
        torch.manual_seed(args.seed)  # same init on every process
        np.random.seed(args.seed)
        data = make_replay(args, processes)
        cleanup.callback(data.close)
        net = resnet.QNetwork(num_games=len(args.games), arch=args.arch, num_atoms=args.num_atoms).to(device)
        net = net.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        target_net = resnet.target_network(net)  # its weights are set below (a resumed run's target)
        optimizer = make_optimizer(net.parameters(), args.lr, args.adam_eps, device)
        step = 0
        if resume_ckpt is not None:  # weights, Adam, sampler and torch RNG: the same next batches
            step = restore(resume_ckpt, net, optimizer, data, args, processes, run_dir)
        if processes.is_first:  # after a resume: with the checkpoints excluded so far
            print(data.plan_summary())
        broadcast_initial_weights(net, processes)
        target_net.load_state_dict(resume_ckpt["target"] if resume_ckpt is not None else net.state_dict())
        learner = Learner(
            net, target_net, optimizer,
            support=torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device),  # [K]
            legal_table=legal_action_table(args.games).to(device),  # [G, A]
            cql_alpha=args.cql_alpha, td_weight=args.td_weight, double_q=args.double_q,
            bf16=args.bf16 and device.type in ("cuda", "xla"),
            model=data_parallel(net, processes, device),
            loss_fn=torch.compile(compute_loss) if args.compile else compute_loss,
        )  # fmt: skip

        # the loop, then the final evaluation
        if processes.is_first:
            print_start(args, device, processes, net, run_dir)
        run = Run(args, run_dir, list(args.games), processes, resume_command(run_dir, "cql_multigame.py"))
        run.open(step, resumed=resume_ckpt is not None, xla_metrics=args.xla_metrics and device.type == "xla")
        cleanup.callback(run.close)
        stream = BatchStream(data, args.batch_size // processes.world_size, device, args.prefetch,
                             mesh=processes.mesh)  # fmt: skip
        stream.games_seen = [] if args.save_all_ranks else None
        step = train(args, learner, stream, run, stop, step)
        data.close()  # the loader stops before the final evaluation
        if args.save_all_ranks:
            save_rank_debug(run_dir, net, stream, processes.rank)
        result = run.final_evaluation(learner, step, stop)
        summary: dict[str, Any] = {"step": step, "run_dir": str(run_dir)}
        if processes.is_first:
            summary.update(result)
            run.finish(summary, result, step)
        processes.barrier()
        processes.close()
        return summary


# ----------------------------------------------------------------------------------------------------
# main's set-up: resume, the replay, the start line
# ----------------------------------------------------------------------------------------------------


def checkpoint_to_resume(args: Args, run_dir: Path) -> dict[str, Any] | None:
    """With --resume: the run's checkpoint, checked against the flags (one sentence for each mismatch).
    Without: None, after checking that the run folder holds no checkpoint that a new run would overwrite."""
    ckpt_path = run_dir / "checkpoint.pt"
    if not args.resume:
        if ckpt_path.exists():
            raise ConfigError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it or another "
                "--run-name to start a new run."
            )
        return None
    if not ckpt_path.is_file():
        raise ConfigError(
            f"--resume found no checkpoint at {ckpt_path}; start the run without --resume "
            "or pass the --run-name of an earlier run."
        )
    ckpt = load_checkpoint(ckpt_path, require=RESUME_KEYS, purpose="--resume")
    if ckpt["net_config"]["arch"] != args.arch:
        raise ConfigError(
            f"{ckpt_path} holds a {ckpt['net_config']['arch']} network but --arch is "
            f"{args.arch}; resume with --arch {ckpt['net_config']['arch']}."
        )
    if list(ckpt["games"]) != list(args.games):
        raise ConfigError(f"{ckpt_path} was trained on other --games; resume with the same games.")
    check_resume(ckpt, args, run_dir)
    return ckpt


def make_replay(args: Args, processes: Processes) -> replay.MultiGameReplay:
    """The training data of this process: its share of the checkpoints of every game (replay.py)."""
    return replay.MultiGameReplay(
        args.data_dir,
        list(args.games),
        runs=tuple(args.runs),
        checkpoints=parse_checkpoints(args.checkpoints),
        fraction=args.fraction,
        n_step=args.n_step,
        gamma=args.gamma,
        memory_budget_gb=args.memory_budget_gb,
        reload_every=args.reload_every,
        windows_per_slot=args.windows_per_slot,
        total_samples=args.total_steps,
        seed=args.seed + 1000 * processes.rank,
        rank=processes.rank,
        world_size=processes.world_size,
    )


def restore(
    ckpt: dict[str, Any],
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: replay.MultiGameReplay,
    args: Args,
    processes: Processes,
    run_dir: Path,
) -> int:
    """--resume: the checkpoint's weights, Adam state (with this run's --lr/--adam-eps), this process's
    sampler state and the torch RNG; returns the checkpoint's step."""
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step = int(ckpt["step"])
    changed = apply_optimizer_settings(optimizer, args.lr, args.adam_eps)  # train with what is recorded
    if changed and processes.is_first:
        print(f"resuming at step {step:,} with {', '.join(changed)}: applied to the restored Adam")
    data.load_state_dict(
        ckpt["replay"] if processes.rank == 0 else load_rank_replay_state(run_dir, processes.rank, step)
    )
    torch.set_rng_state(ckpt["rng"]["torch"])
    return step


def print_start(
    args: Args, device: torch.device, processes: Processes, net: resnet.QNetwork, run_dir: Path
) -> None:
    """The first line of a run: where it trains, how big the network is, where its files go."""
    counts = resnet.count_parameters(net)
    print(
        f"device {device}, {processes.world_size} process(es), {args.arch}: "
        f"{counts['total'] / 1e6:.2f}M parameters; logs and checkpoint in {run_dir}"
    )


def save_rank_debug(run_dir: Path, net: torch.nn.Module, stream: BatchStream, rank: int) -> None:
    """--save-all-ranks: this process's final parameters and the games of every batch it trained on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(to_cpu(net.state_dict()), run_dir / f"params_rank{rank}.pt")
    games_seen = torch.from_numpy(np.stack(stream.games_seen))  # [steps, per-rank batch]
    torch.save({"games": games_seen}, run_dir / f"batch_games_rank{rank}.pt")


# ----------------------------------------------------------------------------------------------------
# The run folder: what the loop logs, evaluates and saves (cql_multigame.py and finetune_offline.py)
# ----------------------------------------------------------------------------------------------------

NO_RESUME = "this script has no --resume; rerun with another --run-name to start over"


@dataclass
class Run:
    """One run folder as `train` writes it: TensorBoard scalars and metrics.jsonl (`log`), evaluations
    (`evaluate`, `final_evaluation`), checkpoint.pt (`save`) and the line an interruption prints. Only the
    first process logs and writes the checkpoint; the others save their sampler state beside it."""

    args: Any  # the script's Args: cadence, evaluation flags, seed (the checkpoint records all of it)
    run_dir: Path
    games: list[str]  # the heads, in order: what evaluations play and checkpoints record
    processes: Processes = dataclasses.field(default_factory=lambda: Processes())
    resume_cmd: str | None = None  # the command that continues this run (None: the script has no --resume)
    report: Callable[[dict[str, Any], int], str] | None = None  # an evaluation's text (None: format_summary)
    # set by open():
    writer: Any = dataclasses.field(default=None, init=False)  # TensorBoard SummaryWriter, first process
    progress: Any = dataclasses.field(default=None, init=False)  # tqdm bar, first process
    last_good: int | None = dataclasses.field(default=None, init=False)  # step of the newest good checkpoint
    xla_metrics: bool = dataclasses.field(default=False, init=False)  # print XLA compile counts at each log
    # time, step and the stream's total data wait at the last log
    _last_log: tuple[float, int, float] = dataclasses.field(default=(0.0, 0, 0.0), init=False)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def open(
        self, step: int = 0, resumed: bool = False, xla_metrics: bool = False, desc: str | None = None
    ) -> Run:
        """TensorBoard (after a resume: events and metrics.jsonl past `step` dropped), the hyperparameter
        table and the progress bar, on the first process."""
        self.xla_metrics, self._last_log = xla_metrics, (time.perf_counter(), step, 0.0)
        self.last_good = step if resumed else None
        if not self.processes.is_first:
            return self
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir), purge_step=step + 1 if resumed else None)
        if resumed:
            drop_history_after(self.run_dir / "metrics.jsonl", step)
        write_hyperparameters(self.writer, self.args)
        self.progress = tqdm(
            total=self.args.total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
            mininterval=1.0,
        )  # fmt: skip
        return self

    def stepped(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def log(self, step: int, metrics: dict[str, torch.Tensor], stream: BatchStream, optimizer: Any) -> None:
        """A log interval: the metrics to floats on every process (a non-finite loss stops the run), then
        TensorBoard, metrics.jsonl and the progress bar on the first."""
        lr_hint = " (--resume applies it to the restored Adam)" if self.resume_cmd else ""
        values = fetch_metrics(
            metrics, f"at step {step}", f"{self.last_good_text()}; lower --lr{lr_hint} or check the data."
        )
        if self.processes.is_first:
            now = time.perf_counter()
            last_time, last_step, last_wait = self._last_log
            sps = (step - last_step) * self.args.batch_size / max(now - last_time, 1e-9)
            wait = (stream.wait_time - last_wait) / max(now - last_time, 1e-9)
            self._last_log = (now, step, stream.wait_time)
            log_training(self.writer, values, step, sps, self.run_dir / "metrics.jsonl")
            self.writer.add_scalar("charts/data_wait_fraction", wait, step)
            self.writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
            for k, v in stream.data.stats().items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"replay/{k}", v, step)
            self.progress.set_postfix(
                loss=f"{values['loss']:.3f}", q=f"{values['q_data']:.2f}", sps=f"{sps:.0f}"
            )
        if self.xla_metrics:
            (self.progress.write if self.progress is not None else print)(
                xla_metrics_line(step, self.processes.rank)
            )

    def _play(self, learner: Learner, step: int, stop: StopSignals) -> dict[str, Any] | None:
        """evaluate_games with seed + step; None when a signal dropped it."""
        try:
            with stop.abandonable():  # a signal drops this evaluation, not the training
                return evaluate_games(
                    learner.net, self.games, learner.support, learner.support.device, self.args,
                    seed=self.args.seed + step,
                )  # fmt: skip
        except Exception:  # Interrupted, or an env worker killed by the same SIGTERM
            if stop.signum is None:
                raise
            return None

    def evaluate(self, learner: Learner, step: int, stop: StopSignals) -> None:
        """A periodic evaluation: logged and printed on the first process; every process waits for it."""
        if self.processes.is_first or self.processes.spmd:  # SPMD: every host runs the same graphs
            result = self._play(learner, step, stop)
            if result is not None and self.processes.is_first:
                log_evaluation(self.writer, result, step)
                self.progress.write((self.report or format_summary)(result, step))
        self.processes.barrier()

    def final_evaluation(self, learner: Learner, step: int, stop: StopSignals) -> dict[str, Any] | None:
        """The evaluation after the last step, logged on the first process (None on the others). A signal
        during it stops the run with RunInterrupted (the checkpoint of the last step is kept)."""
        if not (self.processes.is_first or self.processes.spmd):
            return None
        result = self._play(learner, step, stop)
        if result is None:
            raise RunInterrupted(
                f"interrupted by {stop.name} during the final evaluation; {self.last_good_text()}; "
                f"{self.how_to_go_on('evaluate it with')}",
                stop.signum,
            )
        if self.processes.is_first:
            log_evaluation(self.writer, result, step)
        return result

    def save(self, learner: Learner, step: int, replay_state: dict[str, Any]) -> bool:
        """checkpoint.pt on the first process, each other process's sampler state beside it. A network with
        a non-finite weight is not saved (False): the last good checkpoint stays."""
        if not all_finite(learner.net, step):  # one small graph and one host sync
            return False
        if not self.processes.is_first:
            rank_state = {"step": step, "replay": replay_state}
            save_checkpoint(self.run_dir / f"replay_state_rank{self.processes.rank}.pt", rank_state)
        else:
            state = checkpoint_state(
                learner.net, learner.target_net, learner.optimizer, step, dataclasses.asdict(self.args),
                self.games, replay_state,
            )  # fmt: skip
            save_checkpoint(self.checkpoint, state)
        self.last_good = step
        return True

    def stop_with_checkpoint(
        self, learner: Learner, step: int, replay_state: dict[str, Any], stop: StopSignals
    ) -> None:
        """After a stop request: save this step (unless saved already) and raise RunInterrupted."""
        saved = self.last_good == step or self.save(learner, step, replay_state)
        what = (
            f"checkpoint saved to {self.checkpoint}" if saved
            else f"the network is not finite, not saved; {self.last_good_text()}"
        )  # fmt: skip
        raise RunInterrupted(
            f"interrupted by {stop.name} at step {step:,} of {self.args.total_steps:,}: {what}; "
            f"{self.how_to_go_on('resume with')}",
            stop.signum,
        )

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.checkpoint} (step {self.last_good:,})"

    def how_to_go_on(self, verb: str) -> str:
        return f"{verb}: {self.resume_cmd}" if self.resume_cmd else NO_RESUME

    def flush(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any], result: dict[str, Any], step: int) -> None:
        """The end of a cql_multigame.py run: summary.json, the evaluation table, where everything is."""
        self.close()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(result, step))
        if self.xla_metrics:
            print(xla_metrics_line(step) + " (after the final evaluation)", flush=True)
        print(
            f"\nTensorBoard: tensorboard --logdir {self.args.runs_dir}\ncheckpoint:  {self.checkpoint}\n"
            f"summary:     {self.run_dir / 'summary.json'}"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------
# Logs, run names, the optimizer and the replay plan
# ----------------------------------------------------------------------------------------------------


def fetch_metrics(metrics: dict[str, torch.Tensor], where: str, advice: str) -> dict[str, float]:
    """The training loop's only host sync (at log intervals): metric tensors -> floats. A non-finite loss
    stops the run with `where` (e.g. "at step 6"), the last metrics and `advice`."""
    values = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the loss became {values['loss']} {where} (last metrics {values}); {advice}"
        )
    return values


def log_training(
    writer, values: dict[str, float], step: int, samples_per_second: float, history: Path
) -> None:
    """One log interval: the TRAIN_SCALARS and samples/s to TensorBoard, and a line of metrics.jsonl."""
    for k, tag in TRAIN_SCALARS:
        writer.add_scalar(tag, values[k], step)
    writer.add_scalar("charts/samples_per_second", samples_per_second, step)
    with open(history, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def write_hyperparameters(writer, args: Any) -> None:
    """The run's flags as a TensorBoard text table (CleanRL's convention)."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + rows)


def checkpoint_state(
    net: resnet.QNetwork,
    target_net: resnet.QNetwork,
    optimizer: torch.optim.Optimizer,
    step: int,
    args: dict[str, Any],
    games: list[str],
    replay_state: dict[str, Any],
) -> dict[str, Any]:
    """What every checkpoint of this repo holds (load_checkpoint and network_from_checkpoint read it)."""
    return {
        "model": net.state_dict(),
        "target": target_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": args,
        "net_config": net.config(),
        "games": list(games),
        "rng": {"torch": torch.get_rng_state()},
        "replay": replay_state,
    }


def make_optimizer(params, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel: one pass per tensor instead of ~8 (the same result to
    rounding; its speed-up is in the README's Performance section). torch_xla's optimizer_step needs the
    default implementation."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


def choose_run_dir(args: Args) -> Path:
    """runs/<run_name>. Without --run-name: scaledql_<arch>_<G>games_seed<s>, then _2, _3, ... so that
    running the same command again starts a new run instead of touching an old one; with --resume, the
    newest of those that holds a checkpoint. Every process computes the same name (nothing is created yet).
    """
    root = Path(args.runs_dir)
    if args.run_name:
        return root / args.run_name
    base = f"scaledql_{args.arch}_{len(args.games)}games_seed{args.seed}"
    names = [base]
    while (root / names[-1] / "checkpoint.pt").exists():
        names.append(f"{base}_{len(names) + 1}")
    if args.resume and len(names) > 1:
        return root / names[-2]  # the newest run with a checkpoint
    return root / names[-1]


def replay_plan(args: Args, world_size: int = 1) -> str:
    """--plan-only: what MultiGameReplay would do with these flags on DQN-Replay-sized data (51 checkpoints
    of 1M transitions per run), computed without any data: replay.MultiGameReplay.dry_run + plan_report."""
    plan = replay.MultiGameReplay.dry_run(
        list(args.games), runs=tuple(args.runs), checkpoints=parse_checkpoints(args.checkpoints),
        fraction=args.fraction, n_step=args.n_step, memory_budget_gb=args.memory_budget_gb,
        reload_every=args.reload_every, windows_per_slot=args.windows_per_slot,
        total_samples=args.total_steps, seed=args.seed, rank=0, world_size=world_size,
    )  # fmt: skip
    return plan.plan_report(args.batch_size // world_size, args.total_steps)


def drop_history_after(path: Path, step: int) -> None:
    """--resume after a kill: metrics.jsonl may hold lines past the checkpoint's step, which the resumed run
    writes again; keep only lines up to `step` (TensorBoard's events get purge_step for the same reason)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def all_finite(net: torch.nn.Module, step: int) -> bool:
    """Whether every parameter is finite (one small graph and one host sync); if not, warn that the save at
    `step` is skipped, so that the last good checkpoint is kept and the user knows why it is older."""
    if torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all():
        return True
    print(
        f"warning: non-finite weights at step {step}: checkpoint not saved, the last good one stays in place",
        file=sys.stderr,
        flush=True,
    )
    return False


# ----------------------------------------------------------------------------------------------------
# Devices and processes (torchrun DDP, torch-xla)
# ----------------------------------------------------------------------------------------------------


def _xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def select_device(name: str = "auto") -> torch.device:
    """auto: XLA when torch_xla imports, else CUDA, else MPS, else CPU. Any other name is used as given."""
    if name == "auto":
        if _xla_available():
            name = "xla"
        elif torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "xla":
        if not _xla_available():
            raise ConfigError(
                "--device xla needs torch_xla; install requirements-tpu.txt or pick another device."
            )
        import torch_xla

        return torch_xla.device()
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N, mps or xla.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu.")
    return device


@dataclass
class Processes:
    """This process among its peers: the first one (rank 0) logs, evaluates and saves."""

    rank: int = 0
    world_size: int = 1
    xla: bool = False  # gradients are averaged by xm.optimizer_step instead of DDP
    spmd: bool = False  # XLA SPMD: rank/world_size count hosts; the compiler averages the gradients
    mesh: Any = None  # SPMD: the ('data',) mesh over all devices of all hosts

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        # SPMD: no barrier needed (every host runs every step and evaluation; each SPMD graph waits for
        # all hosts), and torch-xla's rendezvous is a collective outside the mesh
        if self.world_size > 1 and not self.spmd:
            if self.xla:
                import torch_xla.core.xla_model as xm

                xm.rendezvous("barrier")
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave torchrun's process group (XLA's runtime needs nothing)."""
        if self.world_size > 1 and not self.xla:
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> Processes:
    """torchrun sets RANK/WORLD_SIZE: join its group (nccl on CUDA, gloo on CPU). XLA: torch_xla's runtime."""
    if device.type == "xla":
        import torch_xla.runtime as xr

        if xr.is_spmd():
            return setup_spmd()
        return Processes(rank=xr.global_ordinal(), world_size=xr.world_size(), xla=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    backend = "nccl" if device.type == "cuda" else "gloo"
    # ours: a long timeout, because the other ranks wait while rank 0 evaluates 40 games.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return Processes(rank=dist.get_rank(), world_size=world_size)


def xla_metrics_line(step: int, rank: int = 0) -> str:
    """Compile/execute counts of torch_xla's metrics; after warm-up only the execute count should grow.
    Executions count single-device graphs (ExecuteTime) and SPMD graphs run on all devices
    (ExecuteReplicatedTime)."""
    import torch_xla.debug.metrics as met

    def count(name: str) -> int:
        data = met.metric_data(name)  # (count, total ns, samples) or None
        return int(data[0]) if data else 0

    compile_s = (met.metric_data("CompileTime") or (0, 0))[1] / 1e9
    fallbacks = {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")}
    return (
        f"[xla rank {rank}] step {step}: compiles {count('CompileTime')} ({compile_s:.1f} s), "
        f"executions {count('ExecuteTime') + count('ExecuteReplicatedTime')}, "
        f"device->host transfers {count('TransferFromDeviceTime')}, "
        f"cpu fallbacks {fallbacks or 'none'}"
    )


def sync_device(device: torch.device) -> None:
    """Cut the lazy XLA graph here (one step = one graph); a no-op elsewhere."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def init_xla_runtime(args: Args) -> None:
    """Before the first XLA tensor: the persistent compilation cache (--xla-cache-dir) and SPMD mode
    (--xla-spmd). Both must precede any computation; without either flag this does nothing."""
    if not (args.xla_spmd or args.xla_cache_dir):
        return
    if args.device not in ("auto", "xla") or not _xla_available():
        raise ConfigError(
            "--xla-spmd and --xla-cache-dir need torch_xla and --device xla (or auto); install "
            "requirements-tpu.txt or drop the flag."
        )
    if args.xla_spmd and args.xla_multiprocess:
        raise ConfigError(
            "--xla-spmd and --xla-multiprocess are two ways of data parallelism on XLA; pass one "
            "(--xla-spmd is torch-xla's recommended one)."
        )
    import torch_xla.runtime as xr

    if args.xla_cache_dir:
        # per host; a pod's other hosts could share one read-only (initialize_cache(readonly=True))
        xr.initialize_cache(args.xla_cache_dir, readonly=False)
    if args.xla_spmd:
        xr.use_spmd()


def setup_spmd() -> Processes:
    """XLA SPMD: one process per host, one ('data',) mesh over the devices of all hosts. Ranks are hosts
    (xr.process_index of xr.process_count): each samples its share of the global batch from its share
    of the data; the compiler splits every step over the mesh and inserts the gradient all-reduce."""
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (n,), ("data",))
    return Processes(rank=xr.process_index(), world_size=xr.process_count(), xla=True, spmd=True, mesh=mesh)


def shard_batch(tensors: dict[str, torch.Tensor], device: torch.device, mesh: Any) -> dict[str, torch.Tensor]:
    """SPMD: this host's rows of the global batch (CPU tensors) onto the devices, every tensor split along
    dim 0 over the 'data' axis. minibatch=True: each host hands over only its own rows (its
    B / process_count), and together they form the global batch; one transfer per tensor rank."""
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    out: dict[str, torch.Tensor] = {}
    for ndim in sorted({v.dim() for v in tensors.values()}):
        group = {k: v for k, v in tensors.items() if v.dim() == ndim}
        spec = xs.ShardingSpec(mesh, ("data",) + (None,) * (ndim - 1), minibatch=True)
        out.update(xm.send_cpu_data_to_device(group, device, spec))
    return {k: out[k] for k in tensors}


def check_spmd_args(args: Args, processes: Processes) -> None:
    """SPMD: the global batch must split evenly over all devices (and then over hosts)."""
    if not processes.spmd:
        return
    import torch_xla.runtime as xr

    n = xr.global_runtime_device_count()
    if args.batch_size % n:
        raise ConfigError(
            f"--batch-size {args.batch_size} does not split over the {n} XLA devices of the SPMD mesh; "
            f"use a multiple of {n}."
        )
    if args.record_missing > 0 and processes.world_size > 1:
        raise ConfigError(
            "--record-missing records on one host only; record the data first (python replay.py) or "
            "run it on a single host."
        )


def broadcast_initial_weights(net: torch.nn.Module, processes: Processes) -> None:
    """XLA with one process per device: start every replica from the first one's weights. On TPU v2/v3
    (and CPU_NUM_DEVICES) replicas are threads of one process sharing one CPU RNG, so the same seed does
    not give the same init. Elsewhere a no-op (DDP broadcasts at wrapping; SPMD has one copy)."""
    if processes.xla and not processes.spmd and processes.world_size > 1:
        import torch_xla.core.xla_model as xm

        xm.broadcast_master_param(net)


def data_parallel(net: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """`net` wrapped in DDP under torchrun (backward averages the gradients); `net` itself otherwise."""
    if processes.world_size > 1 and not processes.xla:
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return net


def _xla_spmd() -> bool:
    import torch_xla.runtime as xr

    return xr.is_spmd()


# ----------------------------------------------------------------------------------------------------
# Batches: replay samples -> device tensors (optionally sampled ahead by a thread)
# ----------------------------------------------------------------------------------------------------


class BatchStream:
    """Hands out (batch, replay_state_after_it). With prefetch > 0 a thread samples ahead.

    The replay state travels with each batch so that a checkpoint stores the state right after the
    last batch the learner used, not after the ones the thread sampled ahead: `--resume` then gives
    the same next batches.
    """

    def __init__(
        self,
        data: replay.MultiGameReplay,
        batch_size: int,
        device: torch.device,
        prefetch: int,
        mesh: Any = None,
    ):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.mesh = mesh  # XLA SPMD: batches are split over this mesh (shard_batch)
        self.games_seen: list[np.ndarray] | None = None  # debug (--save-all-ranks): each batch's games
        self.pin = device.type == "cuda"
        self.wait_time = 0.0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True)
            self._thread.start()

    def _sample(self) -> tuple[dict[str, torch.Tensor], dict]:
        b = self.data.sample(self.batch_size)
        tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in b._asdict().items()}
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors, self.data.state_dict()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._sample()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the learner
            self._queue.put(e)

    def next(self) -> tuple[dict[str, torch.Tensor], dict]:
        start = time.perf_counter()
        if self._queue is None:
            item = self._sample()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        tensors, state = item
        if self.games_seen is not None:
            self.games_seen.append(tensors["game"].numpy().copy())
        if self.mesh is not None:
            tensors = shard_batch(tensors, self.device, self.mesh)
        else:
            tensors = {k: v.to(self.device, non_blocking=self.pin) for k, v in tensors.items()}
        self.wait_time += time.perf_counter() - start
        return tensors, state

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU in one batched transfer:
    on XLA one call for all tensors (as xm.save does), on CUDA non-blocking copies and one synchronize,
    instead of one blocking .cpu() per tensor."""
    tensors: list[torch.Tensor] = []

    def collect(o: Any) -> Any:  # the structure with every tensor replaced by its index in `tensors`
        if torch.is_tensor(o):
            tensors.append(o)
            return _TensorSlot(len(tensors) - 1)
        if isinstance(o, dict):
            return {k: collect(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(collect(v) for v in o)
        return o

    def rebuild(o: Any, cpu: list[torch.Tensor]) -> Any:
        if isinstance(o, _TensorSlot):
            return cpu[o.index]
        if isinstance(o, dict):
            return {k: rebuild(v, cpu) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(rebuild(v, cpu) for v in o)
        return o

    skeleton = collect(obj)
    return rebuild(skeleton, tensors_to_cpu(tensors))


@dataclass(frozen=True)
class _TensorSlot:
    index: int


def tensors_to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> CPU tensors, batched per device type; CPU tensors are returned as they are."""
    out = list(tensors)
    xla = [i for i, t in enumerate(tensors) if t.device.type == "xla"]
    if xla:
        import torch_xla

        moved = [tensors[i] for i in xla]
        # what xm.save does (through xm._maybe_convert_to_cpu): finish pending graphs, then one transfer
        torch_xla._XLAC._xla_sync_multi(moved, devices=[], wait=True, sync_xla_data=False)
        for i, t in zip(xla, torch_xla._XLAC._xla_get_cpu_tensors(moved), strict=True):
            out[i] = t
    cuda = [i for i, t in enumerate(tensors) if t.device.type == "cuda"]
    if cuda:
        for i in cuda:
            out[i] = tensors[i].to("cpu", non_blocking=True)
        torch.cuda.synchronize()
    for i, t in enumerate(out):  # any other device (mps): one by one
        if t.device.type != "cpu":
            out[i] = t.cpu()
    return out


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a killed process leaves the previous checkpoint intact. Tensors are saved on the
    CPU (as xm.save does on XLA), so a checkpoint loads anywhere, also without torch_xla or a GPU.

    The temporary file is unique to this writer (temp_path). A write that fails (full disk, read-only
    folder, permission) or is interrupted removes it; a failed one raises DiskWriteError, one sentence with
    the path and the space needed, and the previous checkpoint stays."""
    state = to_cpu(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # every process creates the folder it writes into
    tmp = temp_path(path)
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _WriteRecorder(f)
            torch.save(state, out)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer turns a failed write (ENOSPC) into an opaque RuntimeError: use the OSError
        error = out.error if out is not None and out.error is not None else e
        if isinstance(error, OSError):
            raise disk_error(path, error, _tensor_bytes(state) + 2**20) from None
        raise


class _WriteRecorder:
    """A binary file for torch.save that keeps the first OSError of a write (torch reports it only as
    "enforce fail ... unexpected pos")."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


RESUME_KEYS = ("model", "target", "optimizer", "step", "args", "net_config", "games", "rng", "replay")


def load_checkpoint(path: str | Path, require: tuple[str, ...] = (), purpose: str = "") -> dict[str, Any]:
    """Load a checkpoint written by this script (weights only, no pickle), with one-sentence errors.
    `require`: keys needed beyond model, net_config and games (e.g. RESUME_KEYS for --resume), named
    in the error with `purpose` ("--resume")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} does not exist; pass the checkpoint.pt of a cql_multigame.py run."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(e).__name__}); "
            "use another checkpoint."
        ) from e
    missing = {"model", "net_config", "games"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)}; it was not written by cql_multigame.py."
        )
    missing = set(require) - set(ckpt)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)}, which {purpose or 'this script'} needs; use a "
            "checkpoint written by cql_multigame.py's training loop, or start a new run."
        )
    return ckpt


def load_rank_replay_state(run_dir: Path, rank: int, step: int) -> dict:
    """The sampler state a rank > 0 saved beside the checkpoint of `step`."""
    path = run_dir / f"replay_state_rank{rank}.pt"
    state = torch.load(path, weights_only=True) if path.is_file() else None
    if state is None or state["step"] != step:
        raise ConfigError(
            f"{path} is missing or not from step {step}; resume with the same number of processes."
        )
    return state["replay"]


def network_from_checkpoint(ckpt: dict[str, Any], which: str = "model", path: str | Path = "the checkpoint"):
    """Rebuild the QNetwork a checkpoint was trained with and load its weights (`which`: model or target).

    A checkpoint this resnet.py cannot rebuild (an unknown arch, weights of another shape) stops with one
    sentence naming the first weight that does not fit.
    """
    try:
        net = resnet.QNetwork(**ckpt["net_config"])
        net.load_state_dict(ckpt[which])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0].rstrip(":.") if str(e).strip() else type(e).__name__
        if isinstance(e, RuntimeError) and "net" in locals():  # name the first weight that does not fit
            built, saved = net.state_dict(), ckpt[which]
            bad = [k for k in built if k not in saved or saved[k].shape != built[k].shape]
            bad = bad or [k for k in saved if k not in built]
            if bad:
                k = bad[0]
                got = tuple(saved[k].shape) if k in saved else "missing"
                want = tuple(built[k].shape) if k in built else "no such weight"
                reason = f"{k} is {got} in its weights but {want} in its net_config"
        raise ConfigError(
            f"checkpoint {path} holds a network this resnet.py cannot rebuild ({reason}); use a checkpoint "
            "written by this version of cql_multigame.py."
        ) from None
    return net


def support_from_checkpoint(ckpt: dict[str, Any] | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The C51 support [K] a checkpoint's network was trained with (support_bounds), on `device`."""
    v_min, v_max, num_atoms = support_bounds(ckpt)
    return torch.linspace(v_min, v_max, num_atoms, device=device)  # [K]


def support_bounds(ckpt: dict[str, Any] | None) -> tuple[float, float, int]:
    """(v_min, v_max, num_atoms) of a checkpoint: its args' v_min/v_max and its net_config's num_atoms.
    The one fallback, for a checkpoint without them or none at all: Args' defaults, C51's [-10, 10] with
    51 atoms (ours), which every run of this repo uses unless told otherwise."""
    defaults = Args()
    run_args = (ckpt or {}).get("args") or {}
    net_config = (ckpt or {}).get("net_config") or {}
    return (
        float(run_args.get("v_min", defaults.v_min)),
        float(run_args.get("v_max", defaults.v_max)),
        int(net_config.get("num_atoms", defaults.num_atoms)),
    )


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def make_q_fn(net: torch.nn.Module, game_index: int, support: torch.Tensor, device: torch.device, bf16: bool):
    """A q_fn for atari.evaluate: uint8 frames [N, 4, 84, 84] -> expected Q [N, 18] of one game's head."""

    @torch.no_grad()
    def q_fn(obs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(obs)).to(device)
        # built on the host and copied: on XLA a device-side full() bakes game ids 0 and 1 into the graph
        # as constants (3 eval graphs); as data, all games share one graph per batch size
        g = torch.full((x.shape[0],), game_index, dtype=torch.int64).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(x, g)
        return expected_q(logits, support).cpu().numpy()

    return q_fn


IQM_CI_KIND = "evaluation-episode noise of one training seed (episodes resampled within games)"


def has_human_score(game: str) -> bool:
    """Carnival and Pooyan have no published human score: they are left out of human-normalized aggregates."""
    return not math.isnan(atari.HUMAN_SCORES.get(game, float("nan")))


def evaluate_games(net, games, support, device, args: Args, seed: int) -> dict[str, Any]:
    """Play every game with its head; per-game mean return and HNS, and the IQM of HNS with a 95% CI.

    The IQM is rliable's over the [runs, games] matrix of per-game MEAN human-normalized scores; one
    training run (this one) is one row, so it is the IQM over the games' mean HNS. Its CI is the noise of
    the evaluation episodes (atari.iqm_episode_noise_interval: episodes resampled within each game), not
    rliable's across-seed CI, which needs several training seeds (atari.iqm_confidence_interval on their
    [seeds, games] matrix of summary.json's per-game hns). Games without a human score: return only.
    """
    was_training = net.training
    net.eval()
    per_game = {}
    for g, game in enumerate(games):
        returns = atari.evaluate(
            make_q_fn(net, g, support, device, args.bf16 and device.type in ("cuda", "xla")),
            game,
            num_episodes=args.eval_episodes,
            num_envs=args.eval_envs,
            num_workers=args.eval_workers,
            epsilon=args.eval_epsilon,
            seed=seed + g,
            max_episode_steps=args.eval_max_steps,
        )
        scored = has_human_score(game)
        per_game[game] = {
            "returns": [float(r) for r in returns],
            "mean_return": float(np.mean(returns)),
            "hns": float(atari.human_normalized_score(game, float(np.mean(returns)))) if scored else None,
        }
    net.train(was_training)
    scored_games = [g for g in games if per_game[g]["hns"] is not None]
    result = {"games": per_game, "iqm_hns": None, "iqm_ci": None}
    if scored_games:
        mean_hns = [per_game[g]["hns"] for g in scored_games]  # one run's row of rliable's matrix
        episode_hns = [atari.human_normalized_score(g, np.array(per_game[g]["returns"]))
                       for g in scored_games]  # fmt: skip
        lo, hi = atari.iqm_episode_noise_interval(episode_hns, seed=seed)
        result.update(iqm_hns=atari.iqm(mean_hns), iqm_ci=[lo, hi], iqm_ci_kind=IQM_CI_KIND)
    return result


def format_summary(result: dict[str, Any], step: int) -> str:
    """A markdown table of one evaluation."""
    lines = [
        f"evaluation at step {step:,}",
        "",
        "| game | mean return | human-normalized |",
        "|---|---:|---:|",
    ]
    for game, r in result["games"].items():
        hns = "n/a (no human score)" if r["hns"] is None else f"{r['hns']:.3f}"
        lines.append(f"| {game} | {r['mean_return']:.1f} | {hns} |")
    if result["iqm_hns"] is not None:
        lo, hi = result["iqm_ci"]
        lines.append(
            f"| **IQM** | | **{result['iqm_hns']:.3f}** (95% CI {lo:.3f} .. {hi:.3f}, evaluation episodes) |"
        )
        lines += ["", f"IQM over the games' mean HNS; CI: {IQM_CI_KIND}, not an across-seed CI."]
    return "\n".join(lines)


def log_evaluation(writer, result: dict[str, Any], step: int) -> None:
    for game, r in result["games"].items():
        writer.add_scalar(f"eval/{game}/return", r["mean_return"], step)
        if r["hns"] is not None:
            writer.add_scalar(f"eval/{game}/hns", r["hns"], step)
    if result["iqm_hns"] is None:
        return
    writer.add_scalar("eval/iqm_hns", result["iqm_hns"], step)
    writer.add_scalar("eval/iqm_hns_ci_low", result["iqm_ci"][0], step)
    writer.add_scalar("eval/iqm_hns_ci_high", result["iqm_ci"][1], step)


# ----------------------------------------------------------------------------------------------------
# Input checks (before any long work)
# ----------------------------------------------------------------------------------------------------


def parse_checkpoints(spec: str) -> str | list[int]:
    spec = spec.strip()
    if spec in ("suboptimal", "nearoptimal"):
        return spec
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(
            f"--checkpoints {spec!r} is not suboptimal, nearoptimal or a list of suffixes like 0,1,2."
        ) from e


def check_flags(args: Any) -> None:
    """The checks every training script runs first, on whichever of these flags it has: --arch (when
    set), every numeric flag's range (check_ranges) and --checkpoints."""
    arch = getattr(args, "arch", "")
    if arch and arch not in resnet.ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(resnet.ARCHS)}.")
    check_ranges(args)
    if hasattr(args, "checkpoints"):
        parse_checkpoints(args.checkpoints)


def check_game(game: str, flag: str = "--game") -> str:
    """The canonical ALE name of a game given by `flag`; an unknown one is one sentence with the closest."""
    try:
        return atari.check_game(game)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def check_args(args: Args, world_size: int) -> None:
    """cql_multigame.py's flags (check_flags, then the games and the batch), before any long work."""
    check_flags(args)
    for game in args.games:
        check_game(game, "--games")
    if len(set(args.games)) != len(args.games):
        raise ConfigError("--games lists a game twice; every game gets one head, list each once.")
    if args.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} does not split over {world_size} processes; "
            f"use a multiple of {world_size}."
        )
    if args.batch_size < len(args.games):  # each process samples a rotating subset of the games
        raise ConfigError(
            f"--batch-size {args.batch_size} is smaller than the {len(args.games)} games; every global "
            f"batch needs each game, use at least {len(args.games)}."
        )
    if args.v_min >= args.v_max:
        raise ConfigError("--v-min must be below --v-max.")


# ----------------------------------------------------------------------------------------------------
# Reliability: flag ranges, resume comparisons, one writer per run folder, interrupts, safe writes.
# Shared by all three training scripts and replay.py's recorder, so a user meets the same one-sentence
# errors everywhere, before any long work starts.
# ----------------------------------------------------------------------------------------------------

# flag (Args field) -> (the allowed range in words, the test). Every script checks the fields it has.
FLAG_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{
        name: ("at least 1", lambda v: v >= 1)
        for name in (
            "total_steps total_env_steps batch_size n_step target_update_every log_every save_every "
            "eval_episodes eval_envs eval_max_steps num_envs train_every max_episode_steps "
            "num_checkpoints buffer_size windows_per_slot"
        ).split()
    },
    **{name: ("0 or more", lambda v: v >= 0) for name in ("learning_starts", "epsilon_decay_steps")},
    "eval_every": ("0 (evaluate only at the end) or more", lambda v: v >= 0),
    "reload_every": ("0 (chosen from --total-steps) or more", lambda v: v >= 0),
    "eval_workers": ("0 (in this process) or more", lambda v: v >= 0),
    "num_workers": ("0 (one per game and run) or more", lambda v: v >= 0),
    "prefetch": ("0 (sample inside the loop) or more", lambda v: v >= 0),
    "record_missing": ("0 (record nothing) or at least 8 (two 4-frame stacks)", lambda v: v == 0 or v >= 8),
    "capacity": ("at least 8 (two 4-frame stacks)", lambda v: v >= 8),
    "seed": ("between 0 and 2**31 - 1", lambda v: 0 <= v < 2**31),
    "num_atoms": ("at least 2", lambda v: v >= 2),
    **{name: ("above 0", lambda v: v > 0) for name in ("lr", "adam_eps", "memory_budget_gb")},
    **{name: ("0 or more", lambda v: v >= 0) for name in ("cql_alpha", "td_weight")},
    "gamma": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    **{
        name: ("a probability in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("eval_epsilon", "epsilon", "epsilon_start", "epsilon_end", "sticky_actions")
    },
}


def flag_name(field: str) -> str:
    """Args field -> its command-line flag (tyro's spelling): total_steps -> --total-steps."""
    return "--" + field.replace("_", "-")


def check_ranges(args: Any) -> None:
    """The one range check of every numeric flag (FLAG_RANGES) that `args` has, for all three training
    scripts and the recorder, run before any data load, recording or network build. Raises ConfigError with
    one sentence naming the flag and its allowed range."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name not in FLAG_RANGES or value is None or isinstance(value, bool):
            continue
        allowed, ok = FLAG_RANGES[field.name]
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and ok(value)):
            flag = flag_name(field.name)
            raise ConfigError(f"{flag} must be {allowed}, got {flag} {value}.")
    if getattr(args, "cql_alpha", None) == 0 and getattr(args, "td_weight", None) == 0:
        raise ConfigError(
            "--cql-alpha and --td-weight are both 0, so the loss is 0 and nothing trains; set at least one "
            "above 0 (--td-weight 0 --cql-alpha 1 is behavior cloning)."
        )


# Flags that may differ on --resume: where things are and how the run is watched, speed switches that do not
# change the math, the length of the run, and the optimizer's lr/eps (applied to the restored Adam). Every
# other field of Args defines the run (network shape, data, objective, seed) and must match the checkpoint.
RESUME_MAY_CHANGE = frozenset({
    "resume", "run_name", "runs_dir", "data_dir", "device", "xla_multiprocess", "prefetch", "record_missing",
    "total_steps", "lr", "adam_eps", "log_every", "save_every", "save_all_ranks", "xla_metrics",
    "eval_every", "eval_episodes", "eval_envs", "eval_workers", "eval_epsilon", "eval_max_steps",
    "channels_last", "compile",
})  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def compare_resume_args(saved: dict[str, Any], args: Any) -> list[str]:
    """The run-defining flags of `args` that differ from the checkpoint's `saved` args, as
    "--flag new (the run used old)". A field the checkpoint lacks (a flag added later) counts as its
    default. Fields in RESUME_MAY_CHANGE are not compared."""
    diffs = []
    for field in dataclasses.fields(args):
        if field.name in RESUME_MAY_CHANGE:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        old, new = saved.get(field.name, default), getattr(args, field.name)
        if not _same(old, new):
            diffs.append(f"{flag_name(field.name)} {_show(new)} (the run used {_show(old)})")
    return diffs


def check_resume(ckpt: dict[str, Any], args: Args, run_dir: Path) -> None:
    """--resume continues the same experiment: one sentence naming every run-defining flag that differs
    from the checkpoint's, and a --total-steps the run has already passed."""
    diffs = compare_resume_args(ckpt["args"], args)
    if diffs:
        raise ConfigError(
            f"--resume would change the run {run_dir}: {', '.join(diffs)}; pass the run's values (only "
            "where the run lives, its length, --lr/--adam-eps, speed, logging, saving and evaluation flags "
            "may change, see the README), or start a new run with another --run-name."
        )
    if args.total_steps < int(ckpt["step"]):
        raise ConfigError(
            f"--total-steps {args.total_steps:,} is below the step the run {run_dir} has reached "
            f"({int(ckpt['step']):,}); pass --total-steps {int(ckpt['step']):,} or more."
        )


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, lr: float, eps: float) -> list[str]:
    """Set lr and eps of a restored optimizer (load_state_dict brings back the saved ones), so that the run
    trains with the values it records. Returns what changed, as "--lr new (was old)"."""
    changed = []
    for key, flag, value in (("lr", "--lr", lr), ("eps", "--adam-eps", eps)):
        old = optimizer.param_groups[0][key]
        if old != value:
            changed.append(f"{flag} {value} (was {old})")
        for group in optimizer.param_groups:
            group[key] = value
    return changed


class DiskWriteError(ConfigError):
    """A write that failed (full disk, read-only folder, missing permission): one sentence with the path and
    the space it needs; the partial temporary file is gone and the previous file is unchanged."""


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` unique to this writer (host and process), so that two writers never
    share one (replay.py's recorder uses the same rule)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _tensor_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def disk_error(path: Path, error: OSError, need_bytes: int | None) -> DiskWriteError:
    """One sentence for a failed write of `path`: the reason, the space needed and free, what is kept."""
    reason = error.strerror or type(error).__name__
    space = ""
    if need_bytes is not None:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free"
        except OSError:
            free = "no free space we could read"
        space = f" it needs about {need_bytes / 2**20:,.1f} MB and {path.parent} has {free};"
    kept = f"{path} is unchanged" if path.exists() else f"no {path.name} was written"
    return DiskWriteError(
        f"could not write {path} ({reason}):{space} {kept}; free space or pass a writable folder, then rerun."
    )


class RunLock:
    """One run folder, one writer: an exclusive flock on <run_dir>/run.lock, held for the whole run.

    The file holds the owner's pid, host and command (for the message a second process prints); the kernel
    drops the flock when its owner exits or is killed, so a lock file left by a dead process never blocks
    (no pid guessing, also on a shared filesystem with working locks). Taking the lock is also the check
    that the run folder is writable, before any data is loaded. release() deletes the file while still
    holding the lock, and acquire() retries if the file it locked was deleted meanwhile, so two processes
    can never both believe they hold it.
    """

    NAME = "run.lock"

    def __init__(self, run_dir: str | Path, flag: str = "--run-name"):
        self.run_dir, self.path, self.flag = Path(run_dir), Path(run_dir) / self.NAME, flag
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        import fcntl

        try:
            self._created_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.read(fd, 4096).decode(errors="replace")
                    os.close(fd)
                    raise ConfigError(
                        f"{self.run_dir} is in use by another process ({self._describe(owner)}); wait for it "
                        f"to finish, or pass another {self.flag}."
                    ) from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # released and deleted while we waited for it: take the new file
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                     "command": " ".join(sys.argv)}  # fmt: skip
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(owner).encode())
        except OSError as e:
            raise DiskWriteError(
                f"cannot write in the run folder {self.run_dir} ({e.strerror or type(e).__name__}); pass a "
                "writable --runs-dir."
            ) from None
        self._fd = fd
        return self

    @staticmethod
    def _describe(owner: str) -> str:
        try:
            o = json.loads(owner)
            return f"pid {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
        except (ValueError, KeyError, TypeError):
            return "its lock file is being written"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self._created_dir and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run that stopped before writing anything leaves no empty folder
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived where the work can be dropped (data load, evaluation, a second signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM; the message is the one line to print (what was saved, how to go
    on). The scripts' run() prints it and exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def stopped_at_once(e: Interrupted, where: str, what_next: str) -> RunInterrupted:
    """The line of a second SIGINT/SIGTERM, which stops a training loop at once: the step or save it cut
    is not saved. `where`: "at step 7"; `what_next`: the last good save and how to go on."""
    return RunInterrupted(
        f"stopped at once by a second {signal.Signals(e.signum).name} ({where}), without saving; {what_next}",
        e.signum,
    )


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) as a stop request, inside `with StopSignals()`.

    While `abandon` is True (start-up, data load, evaluation) a signal raises Interrupted at once: that work
    is dropped. In the training loop the scripts set abandon False: the signal only sets `signum`, the
    current step finishes, and the loop saves a checkpoint and stops. A second signal always raises at once
    (the step it cuts is not saved). Outside the main thread (e.g. torch_xla's launcher threads) nothing is
    installed and `signum` stays None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.abandon = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if self.abandon or not first:
            raise Interrupted(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @contextlib.contextmanager
    def abandonable(self):
        """Work inside may be dropped by a signal (evaluation): it raises Interrupted, also if one came
        before."""
        previous, self.abandon = self.abandon, True
        try:
            if self.signum is not None:
                raise Interrupted(self.signum)
            yield
        finally:
            self.abandon = previous


def agree_to_stop(processes: Processes, requested: bool) -> bool:
    """Every process stops at the same step: True if any process got a signal. One process: no
    communication. DDP: a MAX all-reduce of one integer over a gloo group (host memory, no GPU sync);
    XLA: torch_xla's mesh_reduce (host values)."""
    if processes.world_size == 1:
        return requested
    if processes.xla:
        import torch_xla.core.xla_model as xm

        return bool(xm.mesh_reduce("stop_signal", int(requested), max))
    global _STOP_GROUP
    if _STOP_GROUP is None:
        _STOP_GROUP = dist.new_group(backend="gloo")
    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP_GROUP)
    return bool(flag.item())


_STOP_GROUP = None
STOP_AGREE_EVERY = 10  # ours: steps between the processes' agreement on a stop request (DDP/XLA only)


def stop_requested(stop: StopSignals, processes: Processes, step: int, evaluated: bool) -> bool:
    """After a finished step: stop now? One process: as soon as a signal came. Several: all agree every
    STOP_AGREE_EVERY steps and after every evaluation (where they all wait anyway), so that they all stop
    at the same step and no one waits for a peer that left."""
    if processes.world_size == 1:
        return stop.signum is not None
    if step % STOP_AGREE_EVERY and not evaluated:
        return False
    if agree_to_stop(processes, stop.signum is not None):
        stop.signum = stop.signum or signal.SIGTERM  # a peer got it (torchrun forwards to every process)
        return True
    return False


def resume_command(run_dir: Path, script: str) -> str:
    """The command that continues `run_dir`: this process's own command line with --resume and --run-name
    (as `python script ...` when it was started another way, e.g. from a test)."""
    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == script else ["..."]
    if "--resume" not in argv:
        argv = [*argv, "--resume"]
    if "--run-name" not in argv and not any(a.startswith("--run-name=") for a in argv):
        argv = [*argv, "--run-name", run_dir.name]
    return " ".join(["python", script, *(shlex.quote(a) if a != "..." else a for a in argv)])


def record_missing_games(args: Args) -> None:
    """The demo's cached dataset: record random-policy data for games that have none yet."""
    data_dir = Path(args.data_dir)
    missing = [g for g in args.games if not any((data_dir / g).glob("*/replay_logs/add_count_ckpt.*.gz"))]
    if not missing:
        return
    print(
        f"recording {args.record_missing:,} random-policy transitions for {', '.join(missing)} "
        f"into {data_dir} (once; later runs reuse it)"
    )
    replay.record(
        data_dir,
        missing,
        runs=args.runs,
        num_checkpoints=1,
        capacity=args.record_missing,
        policy="random",
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------


def cli(argv: list[str] | None = None) -> Args:
    """`python cql_multigame.py PRESET [--flag value ...]`, PRESET one of PRESETS."""
    import tyro

    return tyro.extras.overridable_config_cli(PRESETS, args=argv)


def _xla_worker(index: int, args: Args) -> None:
    """torch_xla.launch calls this in every process, with the process index first."""
    main(args)


def run(args: Args) -> None:
    """`main` (or, with --xla-multiprocess, one `main` per TPU device), user mistakes as one line."""
    run_script(_launch_xla if args.xla_multiprocess else main, args)


def _launch_xla(args: Args) -> None:
    import torch_xla

    torch_xla.launch(_xla_worker, args=(args,))


def run_script(main: Callable[[Any], Any], args: Any) -> None:
    """Run a training script's `main(args)` (all three scripts): a user mistake (a flag, a file, a game, a
    non-finite loss) prints one line and exits 1, an interrupted run prints what was saved and how to go on
    and exits 128 + the signal, a refused write prints one line; no traceback for any of them."""
    try:
        main(args)
    except (ConfigError, replay.ReplayDataError, atari.AtariConfigError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (RunInterrupted, Interrupted) as e:
        exit_interrupted(e)
    except OSError as e:
        exit_on_disk_error(e)


def exit_on_disk_error(e: OSError) -> None:
    """A write outside the checkpoint save (logs, summary) that the disk refused: one line, not a
    traceback. Other OSErrors are bugs or unexpected: they keep their traceback."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        raise e
    sys.exit(f"error: could not write {e.filename or 'a file'} ({e.strerror}); free space or pass a writable "
             "--runs-dir, then rerun (with --resume if a checkpoint was written).")  # fmt: skip


def exit_interrupted(e: RunInterrupted | Interrupted) -> None:
    """The one line of an interrupted run on stderr, then exit with 128 + the signal number (130 for
    SIGINT, 143 for SIGTERM, as a shell reports a process killed by it)."""
    if isinstance(e, Interrupted):  # outside the training loop (data load, set-up): nothing to save
        e = RunInterrupted(
            f"interrupted by {e} outside the training steps; checkpoints written so far are kept.", e.signum
        )
    sys.stderr.flush()
    print(f"\n{e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
    run(cli())
