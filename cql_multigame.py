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
`c51_cql_loss`, `target_action`, `compute_loss`; `expected_q` is resnet.py's); one training step
(`update`); the loop (`train`, which finetune_offline.py runs too); `main` and its set-up; the evaluation
(`evaluate_games`); the checks of the flags; the command line. What a real run needs and the paper does
not describe (devices, torchrun DDP and torch-xla, the batch prefetcher, the run folder, checkpoint files,
locks, signals, flag ranges) lives in machinery/, which a reader may skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import atari
import record
import replay
import resnet
from machinery import checkpoints, devices, flags, runs
from machinery.devices import BatchStream, Processes, _xla_spmd, sync_device
from machinery.flags import MachineryArgs, parse_checkpoints
from machinery.runs import IQM_CI_KIND, Interrupted, Run, StopSignals, stop_requested, stopped_at_once
from resnet import expected_q

# Names that lived here before the machinery moved to machinery/: they still resolve from cql_multigame
# (cql_multigame.load_checkpoint, from cql_multigame import RunLock, ...), through __getattr__ below.
MOVED = {
    checkpoints: "RESUME_KEYS RESUME_MAY_CHANGE DiskWriteError _WriteRecorder apply_optimizer_settings "
    "check_resume checkpoint_state compare_network_configs compare_resume_args disk_error load_checkpoint "
    "load_rank_replay_state make_optimizer save_checkpoint temp_path",
    devices: "broadcast_initial_weights check_spmd_args data_parallel init_xla_runtime select_device "
    "setup_distributed setup_spmd shard_batch tensors_to_cpu to_cpu xla_metrics_line",
    flags: "FLAG_RANGES ConfigError check_ranges check_sizes check_support flag_name",
    runs: "NO_RESUME STOP_AGREE_EVERY TRAIN_SCALARS RunInterrupted RunLock agree_to_stop all_finite "
    "drop_history_after fetch_metrics format_summary log_evaluation log_training resume_command "
    "save_rank_debug write_hyperparameters",
    resnet: "network_from_checkpoint support_bounds support_from_checkpoint",
}


def __getattr__(name: str) -> Any:
    for module, names in MOVED.items():
        if name in names.split():
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    capture_video: bool = False
    """save each evaluation's first episode per game as <run_dir>/videos/step<S>/<Game>_return<R>.mp4 (and,
    with Pillow, as an animated GIF in TensorBoard, tag videos/<Game>)"""


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
    """replay memory per process; checkpoints rotate through memory when all don't fit"""
    reload_every: int = 0
    """gradient steps between two swaps of a game's loaded data (0: auto, the longest period up to
    50,000 at which every game loads all its selected data within --total-steps)"""
    windows_per_slot: int = 5
    """when the data does not fit: windows of this many different checkpoints share each game's slot, so a
    batch mixes them (as batch_rl's FixedReplayBuffer mixes 5 checkpoints; 1: one window per slot)"""
    plan_only: bool = False
    """print the replay plan for DQN-Replay's sizes (slots, windows per slot, reload period, data seen over
    the run, distinct checkpoints per batch) and exit; needs no data"""
    prefetch: int = 2
    """batches sampled ahead by a background thread (0: sample inside the loop)"""
    record_missing: int = 0
    """if > 0, record this many transitions per missing game with record.py first (the demo)"""
    record_policy: str = "random"
    """the policy --record-missing records: random, a checkpoint, or module:function (the demo's:
    experiments.behavior:scripted, sub-optimal with systematic mistakes)"""
    compare_to_data: bool = False
    """after the final evaluation, print per game the data's behavior return, the return of always pressing
    the data's most frequent action (BC's limit), and whether the trained policy beats both (the demo)"""

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
    """weight of the CQL regularizer (not stated for the multi-game runs; ours, from Dopamine's offline CQL
    config labs/offline_rl/jax/configs/jax_classy_cql.gin: bc_coefficient = 0.1)"""
    td_weight: float = 1.0
    """weight of the C51 TD loss; 0 with cql_alpha 1 is behavior cloning (see the `bc` preset)"""
    double_q: bool = False
    """pick the target's next action by the ONLINE network's Q (double DQN) instead of the target
    network's (plain C51, ours: the paper does not say; Dopamine's offline configs, e.g.
    labs/offline_rl jax_classy_cql.gin, set double_dqn = True)"""

    # --- speed ---
    channels_last: bool = False
    """store conv activations channels-last (faster on CUDA tensor cores, and for impala and tiny on CPU:
    see docs/performance.md)"""
    bf16: bool = False
    """bfloat16 autocast for the network on CUDA/XLA; the loss math stays float32"""
    compile: bool = False
    """torch.compile the loss computation (meant for CUDA; on CPU it gains nothing, see
    docs/performance.md)"""

    # --- logging, evaluation (and EvalArgs), checkpoints ---
    log_every: int = 1000
    """gradient steps between TensorBoard scalars (the only host syncs of the loop)"""
    eval_every: int = 500_000
    """gradient steps between evaluations (0: only at the end)"""
    save_every: int = 100_000
    """gradient steps between checkpoints (also written at the end)"""
    xla_metrics: bool = False
    """debug on XLA: print the graph compile/execute counts at every log interval (should stop growing)"""
    machinery: tyro.conf.OmitArgPrefixes[MachineryArgs] = field(default_factory=MachineryArgs)
    """--xla-multiprocess and --save-all-ranks (machinery/flags.py): no prefix on the command line"""


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
        "CPU demo, no download: records sub-optimal scripted data for 2 games, trains the tiny net with "
        "C51 + CQL, prints the trained policy beside its data and the data's most frequent action",
        Args(
            data_dir="data/demo_scripted",
            games=("Freeway", "Centipede"),
            runs=(1,),
            checkpoints="nearoptimal",
            record_missing=25_000,
            record_policy="experiments.behavior:scripted",  # mistakes that are systematic (see there)
            compare_to_data=True,
            memory_budget_gb=2.0,
            reload_every=1_000_000,
            arch="tiny",
            total_steps=4000,  # chosen on training-time signals (docs/results.md, the demo)
            batch_size=32,
            lr=1e-4,
            target_update_every=500,
            cql_alpha=0.001,  # chosen on training-time signals for this data (docs/results.md)
            log_every=100,
            eval_every=0,
            eval_episodes=4,
            eval_envs=4,
            eval_max_steps=3000,  # Freeway's whole game (~2,040 steps); Centipede's FIRE episodes end sooner
            save_every=1000,
            device="cpu",
        ),
    ),
    "smoke": (
        "the pipeline in minutes (the test suite's preset): random-policy data for 3 games, the tiny net; "
        "it shows the code running, not learning (random data has almost no action-value signal)",
        None,  # the demo's settings with these changes, below
    ),
    "bc": (
        "behavior cloning on the same network: the CQL term alone (TD off) is the cross-entropy of the "
        "data action under softmax(Q)",
        Args(td_weight=0.0, cql_alpha=1.0),
    ),
}
PRESETS["smoke"] = (PRESETS["smoke"][0], dataclasses.replace(
    PRESETS["demo"][1], data_dir="data/smoke", games=("Breakout", "Boxing", "Freeway"), record_missing=20_000,
    record_policy="random", compare_to_data=False, total_steps=3000, cql_alpha=0.1, eval_max_steps=2000,
))  # fmt: skip


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
        net=learner.model or learner.net, target_net=learner.target_net, batch=batch, support=learner.support,
        legal_table=learner.legal_table, cql_alpha=learner.cql_alpha, td_weight=learner.td_weight,
        bf16=learner.bf16, double_q=learner.double_q,
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
        devices.init_xla_runtime(
            args.device, args.xla_spmd, args.xla_cache_dir, args.machinery.xla_multiprocess
        )
        device = devices.select_device(args.device)
        processes = devices.setup_distributed(device)
        check_args(args, processes.world_size)
        devices.check_spmd_args(args.batch_size, args.record_missing, processes)
        run_dir = choose_run_dir(args)
        checkpoints.check_rank_state(run_dir, processes.rank, args.resume)  # ranks > 0: their own files
        resume_ckpt = checkpoints.checkpoint_to_resume(run_dir, args)  # None for a new run
        # one writer per run folder (and per rank's files); also finds an unwritable --runs-dir now
        cleanup.enter_context(runs.RunLock(run_dir, name=runs.rank_lock_name(processes.rank)))
        if args.record_missing > 0 and processes.is_first:
            record.record_missing(
                args.data_dir, args.games, args.runs, args.record_missing, args.seed, args.record_policy
            )
        processes.barrier()

        # the data, the network, its target copy and Adam (Sec. 4, Appendix B.3)
        torch.manual_seed(args.seed)  # same init on every process
        np.random.seed(args.seed)
        data = make_replay(args, processes)
        cleanup.callback(data.close)
        net = resnet.QNetwork(num_games=len(args.games), arch=args.arch, num_atoms=args.num_atoms).to(device)
        net = net.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        target_net = resnet.target_network(net)  # its weights are set below (a resumed run's target)
        optimizer = checkpoints.make_optimizer(net.parameters(), args.lr, args.adam_eps, device)
        step = 0
        if resume_ckpt is not None:  # weights, Adam, sampler and torch RNG: the same next batches
            step = checkpoints.restore(
                resume_ckpt, net, optimizer, data, args.lr, args.adam_eps, processes.rank, run_dir
            )
        if processes.is_first:  # after a resume: with the checkpoints excluded so far
            print(data.plan_summary())
        devices.broadcast_initial_weights(net, processes)
        target_net.load_state_dict(resume_ckpt["target"] if resume_ckpt is not None else net.state_dict())
        learner = Learner(
            net, target_net, optimizer,
            support=torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device),  # [K]
            legal_table=legal_action_table(args.games).to(device),  # [G, A]
            cql_alpha=args.cql_alpha, td_weight=args.td_weight, double_q=args.double_q,
            bf16=args.bf16 and device.type in ("cuda", "xla"),
            model=devices.data_parallel(net, processes, device),
            loss_fn=torch.compile(compute_loss) if args.compile else compute_loss,
        )  # fmt: skip

        # the loop, then the final evaluation
        if processes.is_first:
            millions = resnet.count_parameters(net)["total"] / 1e6
            print(f"device {device}, {processes.world_size} process(es), {args.arch}: {millions:.2f}M "
                  f"parameters; logs and checkpoint in {run_dir}")  # fmt: skip
        hosts = processes.world_size if processes.spmd else 1  # SPMD: the same line on every host
        again = runs.resume_command(run_dir, "cql_multigame.py", hosts)
        run = Run(args, run_dir, list(args.games), processes, again, play=evaluate_games)
        run.open(step, resumed=resume_ckpt is not None, xla_metrics=args.xla_metrics and device.type == "xla")
        cleanup.callback(run.close)
        stream = BatchStream(data, args.batch_size // processes.world_size, device, args.prefetch,
                             mesh=processes.mesh)  # fmt: skip
        stream.games_seen = [] if args.machinery.save_all_ranks else None
        step = train(args, learner, stream, run, stop, step)
        data.close()  # the loader stops before the final evaluation
        if args.machinery.save_all_ranks:
            runs.save_rank_debug(run_dir, net, stream, processes.rank)
        result = run.final_evaluation(learner, step, stop)
        summary: dict[str, Any] = {"step": step, "run_dir": str(run_dir)}
        if processes.is_first:
            summary.update(result)
            run.finish(summary, result, step)
            if args.compare_to_data:
                print(compare_to_data(args, result, seed=args.seed + step))
        processes.barrier()
        processes.close()
        return summary


# ----------------------------------------------------------------------------------------------------
# main's set-up: the run folder, the replay, the plan (resume: machinery/checkpoints.py)
# ----------------------------------------------------------------------------------------------------


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


def choose_run_dir(args: Args) -> Path:
    """runs/<run_name>, or without --run-name scaledql_<arch>_<G>games_seed<s> (then _2, _3, ...; with
    --resume the newest that holds a checkpoint): machinery.runs.run_folder."""
    base = f"scaledql_{args.arch}_{len(args.games)}games_seed{args.seed}"
    return runs.run_folder(args.runs_dir, args.run_name, base, args.resume)


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


def has_human_score(game: str) -> bool:
    """Carnival and Pooyan have no published human score: they are left out of human-normalized aggregates."""
    return not math.isnan(atari.HUMAN_SCORES.get(game, float("nan")))


def evaluate_games(net, games, support, device, args: Args, seed: int, video_dir: Path | None = None) -> dict:
    """Play every game with its head; per-game mean return and HNS, and the IQM of HNS with a 95% CI.

    The IQM is rliable's over the [runs, games] matrix of per-game MEAN human-normalized scores; one
    training run (this one) is one row, so it is the IQM over the games' mean HNS. Its CI is the noise of
    the evaluation episodes (atari.iqm_episode_noise_interval: episodes resampled within each game), not
    rliable's across-seed CI, which needs several training seeds (atari.iqm_confidence_interval on their
    [seeds, games] matrix of summary.json's per-game hns). Games without a human score: return only.
    video_dir (--capture-video): each game's first episode goes to <video_dir>/<Game>_return<R>.mp4.
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
            video=None if video_dir is None else video_dir / game,
            progress=runs.eval_progress(game),  # a line on the console, not in metrics.jsonl
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


def compare_to_data(args: Args, result: dict, seed: int) -> str:
    """The claim in one table (the demo): per game, the data's behavior (its recorded episodes), always
    pressing the data's most frequent action (what BC's argmax converges to where the data's action does not
    depend on the state; evaluated like the trained policy), and the trained policy."""
    lines = ["", "the claim: does the trained policy beat its data and the data's most frequent action?", "",
             "| game | behavior (data) | most frequent action, always | trained policy | beats both |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    for g, game in enumerate(args.games):
        data = record.data_summary(Path(args.data_dir) / game / str(args.runs[0]) / "replay_logs", game)
        constant = np.zeros(18)
        constant[data["most_frequent_action"]] = 1.0  # Q-values of a policy that always presses it
        always = atari.evaluate(
            lambda obs, q=constant: np.tile(q, (len(obs), 1)), game, num_episodes=args.eval_episodes,
            num_envs=args.eval_envs, epsilon=args.eval_epsilon, seed=seed + g,
            max_episode_steps=args.eval_max_steps,
        ).mean()  # fmt: skip
        episodes = len(data["behavior_returns"])
        behavior = float(np.mean(data["behavior_returns"])) if episodes else float("nan")  # nan: none ended
        trained = result["games"][game]["mean_return"]
        name = f"{atari.ACTION_NAMES[data['most_frequent_action']]} ({data['action_share']:.0%} of the data)"
        beats = "yes" if trained > max(behavior, always) else "no"
        lines.append(f"| {game} | {behavior:.1f} ({episodes} episodes) | {name}: {always:.1f} "
                     f"| {trained:.1f} | {beats} |")  # fmt: skip
    lines.append(f"(means over {args.eval_episodes} episodes of at most {args.eval_max_steps:,} steps each)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Input checks (before any long work)
# ----------------------------------------------------------------------------------------------------


def check_flags(args: Any) -> None:
    """The checks every training script runs first (machinery.flags.check_flags, with resnet's archs)."""
    flags.check_flags(args, resnet.ARCHS)


def check_game(game: str, flag: str = "--game") -> str:
    """The canonical ALE name of a game given by `flag`; an unknown one is one sentence with the closest."""
    return flags.check_games((game,), atari.check_game, flag)[0]


def check_games(games: tuple[str, ...] | list[str], flag: str = "--games") -> tuple[str, ...]:
    """The canonical CamelCase names of `games` (breakout -> Breakout), each listed once."""
    return flags.check_games(games, atari.check_game, flag)


def check_args(args: Args, world_size: int) -> None:
    """cql_multigame.py's flags (check_flags, then the games and the batch), before any long work."""
    check_flags(args)
    args.games = check_games(args.games)  # canonical, as the data folders and checkpoints spell them
    flags.check_batch(args.batch_size, world_size, len(args.games))


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------


def cli(argv: list[str] | None = None) -> Args:
    """`python cql_multigame.py PRESET [--flag value ...]`, PRESET one of PRESETS."""
    return tyro.extras.overridable_config_cli(PRESETS, args=argv)


def run(args: Args) -> None:
    """`main` (with --xla-multiprocess one per TPU device: machinery.devices.launch), user mistakes as one
    line."""
    run_script(
        functools.partial(devices.launch, main, xla_multiprocess=args.machinery.xla_multiprocess), args
    )


def run_script(main: Any, args: Any) -> None:
    """machinery.runs.run_script; atari.py's user mistakes (a mode, a difficulty) are one line too."""
    runs.run_script(main, args, user_errors=(atari.AtariConfigError,))


if __name__ == "__main__":
    run(cli())
