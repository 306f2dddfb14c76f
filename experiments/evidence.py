"""The paper's headline at CPU scale: offline Q-learning on sub-optimal multi-game data beats the data and BC.

Scaled QL (Kumar et al. 2023) exists to show that offline Q-learning (C51 + CQL) trained on the sub-optimal
DQN-Replay data of many games at once learns policies better than the data's own behavior, and better than
behavior cloning (BC) of the same data (Sec. 5.1, Fig. 3 and Table 1). The real data cannot be downloaded
here, so this script makes its own, in the DQN-Replay format, with scripted behavior policies whose mistakes
are systematic (experiments/behavior.py), then runs the comparison end to end:

1. data: record.record(policy="experiments.behavior:scripted") for every game (cached in --data-dir), and
   the behavior's return (mean and 95% CI over the recorded episodes, from the returns saved beside the data);
2. one multi-game network per (method, seed), trained offline on all games together with cql_multigame.main:
   `cql` (the full algorithm), `bc` (cql_multigame's `bc` preset: TD off, the CQL term alone is the
   cross-entropy of the data action), `td` (--cql-alpha 0: C51 alone, the ablation);
3. evaluation under the DQN-Replay protocol (sticky actions 0.25, epsilon 0.001) at the --eval-at steps,
   with every episode capped at --eval-max-steps agent steps (stated in every table);
4. diagnostics on dataset states: the greedy action's share of each action, and how often it agrees with
   the data's most frequent action (a BC-like policy) or with the behavior's good action;
5. results.json with every number, and PNG plots (matplotlib, an optional dependency of this script only).

Every stage is cached: the data on disk, each training run in its run folder (cql_multigame's --resume
continues it), each evaluation in the run's stages.json. Re-running the same command skips what is done, so
a stopped run (a session limit, Ctrl-C) continues where it was. A long run can also be cut into stages on
purpose: --until STEP trains every run only through that evaluation step and reports there; the next
invocation resumes every run from its checkpoint (the stages of a chain are the same either way).

    python experiments/evidence.py                # docs/results.md (see there for time and machine)
    python experiments/evidence.py --until 20000  # one stage: every run through step 20,000, then report
    python experiments/evidence.py --until 40000  # the next stage (resumes every run from its checkpoint)
    python experiments/evidence.py --quick        # seconds: the whole path on a few hundred transitions
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's modules are one folder up
    sys.path.insert(0, str(ROOT))

import atari  # noqa: E402
import record  # noqa: E402
import replay  # noqa: E402

BEHAVIOR_POLICY = "experiments.behavior:scripted"
METHODS = ("cql", "bc", "td")  # the order of every table and plot
ACTION_NAMES = atari.ACTION_NAMES
RARE_SHARE = 0.01  # ours: an action the data takes on under 1% of its transitions is "rare" ("why CQL")
METHOD_LABELS = {
    "behavior": "behavior (data)", "bc": "BC", "td": "TD only (alpha 0)", "cql": "CQL (Scaled QL)"
}  # fmt: skip


@dataclass
class Args:
    """Offline CQL vs BC vs TD-only vs the data's behavior, on scripted sub-optimal data of several games."""

    out_dir: str = "experiments/results/evidence"
    """where results.json and the PNG plots go"""
    data_dir: str = "data/evidence"
    """DQN-Replay-format data of the scripted behavior (recorded once, then reused)"""
    runs_dir: str = "runs/evidence"
    """run folders of the training runs (checkpoints, TensorBoard, stages.json)"""
    games: tuple[str, ...] = ("Freeway", "DemonAttack", "Breakout", "Centipede")
    """training games with a scripted behavior in experiments/behavior.py (Centipede was added after the
    first three had been evaluated; experiments/behavior.py says why)"""
    transitions_per_game: int = 100_000
    """recorded transitions per game (ours: what a 2-core CPU records in about a minute per game)"""
    checkpoints_per_game: int = 2
    """DQN-Replay checkpoints the transitions are split into (a snapshot every transitions/checkpoints)"""
    data_seed: int = 0
    """seed of the recording (environments and behavior policy)"""
    behavior: str = BEHAVIOR_POLICY
    """the recorder's behavior policy (module:function): experiments.behavior:scripted (the first data set:
    a good action mixed with a more frequent bad one at every step) or experiments.dqn_like:improving (the
    second: an improving epsilon-greedy agent, like DQN-Replay's; :narrow is its epsilon-0.01 variant)"""

    # --- training (cql_multigame.Args; the values are ours, chosen for a 2-core CPU, see docs/results.md) ---
    arch: str = "tiny"
    """network (resnet.py); tiny is the CPU-sized trunk"""
    total_steps: int = 60_000
    """gradient steps of every run (ours). The first plan was 20,000: values travel n_step agent steps back
    per target update, so n_step * 20,000 / target_update_every = 120 agent steps, one Freeway crossing (the
    longest reward horizon here). At 20,000 the Q-values on dataset states were still rising and still
    ranked by how often the data takes each action; two runs continued to 40,000 with evaluation off showed
    both still true, so the run goes on to 60,000 (4.8 passes over each game's data). Stages: --until."""
    batch_size: int = 32
    """global batch over all games (10 or 11 per game for 3 games; the demo's value)"""
    lr: float = 1e-4
    """Adam learning rate (the demo's value)"""
    target_update_every: int = 500
    """gradient steps between hard target updates (the demo's value: values propagate fast in short runs)"""
    n_step: int = 3
    """n-step return of the TD target (the paper's 3)"""
    cql_alpha: float = 0.001
    """CQL weight of the `cql` method (ours, chosen on training-time signals only; see
    experiments/alpha_pilot.py and docs/results.md). 2,000-step pilots on seed 0, no evaluation: the
    greedy action on Freeway's dataset states is the data's most frequent one (NOOP) at alpha 0.01 and 0.003,
    and TD-only's (UP) at 0.001 and 0.0003. TD's one-step Q-gap here is ~0.005, the CQL term's pull toward
    frequent actions ~3 per unit alpha, so 0.001 is the largest value that leaves the TD signal on top. The
    first plan's 0.01 came from a linear estimate that was ~10x too low (its runs: cql_alpha0.01_seed*)."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds of cql and bc"""
    td_seeds: tuple[int, ...] = (1,)
    """training seeds of the TD-only ablation"""
    methods: tuple[str, ...] = METHODS
    """which of cql, bc, td to run (tables and plots show n/a for the others)"""

    # --- evaluation ---
    eval_at: tuple[int, ...] = (2000, 5000, 10_000, 20_000, 40_000, 60_000)
    """gradient steps at which every run is evaluated (the last one is the result)"""
    eval_episodes: int = 10
    """episodes per game and evaluation"""
    eval_max_steps: int = 3000
    """agent steps per evaluation episode (ours: a cap to bound CPU time; DQN-Replay's protocol is 27,000)"""
    diag_states: int = 600
    """dataset states (over all games) for the greedy-action diagnostics"""

    # --- execution ---
    jobs: int = 2
    """training runs in parallel (processes)"""
    threads: int = 0
    """torch threads per training run (0: cpu_count // jobs; more threads than free cores makes torch's
    thread pool spin and run many times slower)"""
    plots: bool = True
    """write PNG plots (needs matplotlib: pip install matplotlib)"""
    until: int = 0
    """stop every run at this --eval-at step and report there (0: at --total-steps): one stage of a long
    run; the next invocation with a later --until (or none) resumes every run from its checkpoint"""
    report_only: bool = False
    """train nothing: tabulate and plot the evaluations the runs have finished so far (n/a for the rest)"""
    claim_se: float = 1.0
    """the claim holds in a game where CQL's mean is above the behavior's and BC's by more than this many
    standard errors of the difference (the first data set's runs used 1; the DQN-like target is 2)"""
    claim_min_games: int = 2
    """the claim holds overall in at least this many games (the DQN-like target is 3), one of them a game
    where no constant action reaches the behavior's return where the behavior module names such games
    (its STATE_DEPENDENT)"""
    replot: bool = False
    """draw the PNG plots again from --out-dir's results.json (no data, no training)"""
    quick: bool = False
    """seconds: a few hundred transitions, a few steps, one seed, 1 short episode (the path, not skill)"""


def quick_args(args: Args) -> Args:
    """The --quick variant: the same path at toy size (used by the test suite)."""
    return dataclasses.replace(
        args,
        transitions_per_game=300,
        checkpoints_per_game=1,
        total_steps=20,
        batch_size=len(args.games) * 2,
        target_update_every=10,
        seeds=(1,),
        td_seeds=(1,),
        eval_at=(10, 20),
        eval_episodes=1,
        eval_max_steps=30,
        diag_states=len(args.games) * 4,
        jobs=1,
    )


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def logs_dir(args: Args, game: str) -> Path:
    return Path(args.data_dir) / game / "1" / "replay_logs"


def make_data(args: Args) -> None:
    """Record the data unless every game's is complete (its last checkpoint and episode returns are there).

    All games are recorded together, even if only one is missing: the recorder seeds each game's stream from
    its position in the list, so the data of a game is the same whichever games were recorded before."""
    capacity = args.transitions_per_game // args.checkpoints_per_game
    todo = [
        g
        for g in args.games
        if not (logs_dir(args, g) / f"episode_returns_ckpt.{args.checkpoints_per_game - 1}.json").is_file()
    ]
    if not todo:
        return
    print(f"recording {capacity * args.checkpoints_per_game:,} transitions of {args.behavior} for "
          f"{list(args.games)} ({todo} missing)")  # fmt: skip
    record.record(
        args.data_dir,
        list(args.games),
        runs=(1,),
        num_checkpoints=args.checkpoints_per_game,
        capacity=capacity,
        policy=args.behavior,
        seed=args.data_seed,
        overwrite=True,
        progress=not args.quick,
    )


def data_action_shares(args: Args) -> dict[str, dict[str, float]]:
    """Per game: the share of every full-set action among the recorded transitions (padding rows left out)."""
    out = {}
    for game in args.games:
        counts = record.action_counts(logs_dir(args, game), game)
        out[game] = {str(a): float(counts[a] / counts.sum()) for a in atari.legal_actions(game)}
    return out


def behavior_returns(args: Args) -> dict[str, dict[str, Any]]:
    """Per game: the returns of the recorded episodes, their mean and a 95% normal CI of the mean."""
    out = {}
    for game in args.games:
        returns = np.array(replay.read_episode_returns(logs_dir(args, game)), dtype=np.float64)
        out[game] = {"episodes": len(returns), **mean_ci(returns)}
    return out


def mean_ci(x: np.ndarray) -> dict[str, float | None]:
    """Mean, standard error and a 95% normal-approximation CI of the mean (None where undefined)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "se": None, "ci95": None}
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    ci = None if se is None else [float(x.mean() - 1.96 * se), float(x.mean() + 1.96 * se)]
    return {"mean": float(x.mean()), "se": se, "ci95": ci}


# ----------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------


def method_overrides(args: Args, method: str) -> dict[str, float]:
    if method == "cql":
        return {"cql_alpha": args.cql_alpha, "td_weight": 1.0}
    if method == "bc":  # cql_multigame's `bc` preset
        import cql_multigame

        bc = cql_multigame.PRESETS["bc"][1]
        return {"cql_alpha": bc.cql_alpha, "td_weight": bc.td_weight}
    if method == "td":
        return {"cql_alpha": 0.0, "td_weight": 1.0}
    raise ValueError(f"unknown method {method}")


def run_name(args: Args, method: str, seed: int) -> str:
    """The run folder of one (method, seed): the cql runs also name their alpha, so runs of another
    --cql-alpha never resume one another."""
    return f"cql_alpha{args.cql_alpha:g}_seed{seed}" if method == "cql" else f"{method}_seed{seed}"


def train_args(args: Args, method: str, seed: int, steps: int, resume: bool):
    import cql_multigame

    return cql_multigame.Args(
        run_name=run_name(args, method, seed),
        runs_dir=args.runs_dir,
        seed=seed,
        resume=resume,
        device="cpu",
        data_dir=args.data_dir,
        games=tuple(args.games),
        runs=(1,),
        checkpoints="nearoptimal",  # every recorded checkpoint: the whole behavior data set
        memory_budget_gb=8.0,
        reload_every=10**9,
        arch=args.arch,
        total_steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        target_update_every=args.target_update_every,
        n_step=args.n_step,
        log_every=min(500, steps),
        eval_every=0,
        eval_episodes=args.eval_episodes,
        eval_envs=args.eval_episodes,
        eval_max_steps=args.eval_max_steps,
        save_every=min(2500, steps),
        **method_overrides(args, method),
    )


def run_chain(args: Args, method: str, seed: int, threads: int) -> dict[str, Any]:
    """Train one (method, seed) run through every --eval-at stage, evaluating at each; resumable."""
    import torch

    import cql_multigame

    torch.set_num_threads(threads)
    run_dir = Path(args.runs_dir) / run_name(args, method, seed)
    stages_path = run_dir / "stages.json"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    for at in args.eval_at:
        if str(at) in stages:
            continue
        resume = (run_dir / "checkpoint.pt").is_file()
        t0 = time.perf_counter()
        log = run_dir / "train.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            summary = cql_multigame.main(train_args(args, method, seed, at, resume))
        stages[str(at)] = {
            "step": summary["step"],
            "returns": {g: r["returns"] for g, r in summary["games"].items()},
            "diagnostics": greedy_diagnostics(args, run_dir / "checkpoint.pt", seed),
            "seconds": time.perf_counter() - t0,
        }
        write_stages(stages_path, stages)
        print(f"{method} seed {seed}: step {at:,} done in {stages[str(at)]['seconds']:.0f} s", flush=True)
    return stages


def run_config(args: Args, method: str) -> dict[str, Any]:
    """What a run folder's cached stages depend on, besides its method and seed (which name the folder)."""
    keys = ("games", "transitions_per_game", "checkpoints_per_game", "data_seed", "arch", "batch_size", "lr",
            "target_update_every", "eval_episodes", "eval_max_steps")  # fmt: skip
    extra = {}  # settings added later: recorded only where they differ from what every older run used
    if args.behavior != BEHAVIOR_POLICY:
        extra["behavior"] = args.behavior
    if args.n_step != 3:
        extra["n_step"] = args.n_step
    return {**{k: list(v) if isinstance(v := getattr(args, k), tuple) else v for k in keys},
            **method_overrides(args, method), **extra}  # fmt: skip


def check_run_config(args: Args, method: str, run_dir: Path) -> None:
    """A run folder is reused only by the configuration that made it (run_config.json): a folder of another
    configuration (e.g. other --games) would otherwise pass its finished stages off as this one's."""
    if not (run_dir / "run_config.json").is_file() and (run_dir / "stages.json").is_file():
        raise SystemExit(f"error: {run_dir} holds stages without a run_config.json (an older run); "
                         "pass another --runs-dir.")  # fmt: skip
    remember_or_refuse(run_dir / "run_config.json", run_config(args, method), "another configuration")


def repo_relative(obj: Any) -> Any:
    """A copy of nested dicts/lists with every absolute path inside this repo written relative to it, and
    other absolute paths as their name only: results files hold no machine's paths."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        path = Path(obj)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return obj


def remember_or_refuse(path: Path, record: dict[str, Any], other: str) -> None:
    """A folder's cached results belong to what made them: the first call writes `record` to `path`; a later
    call with another record stops with one sentence naming `other` and every key that differs."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        return
    saved = json.loads(path.read_text())
    if saved != record:
        diff = ", ".join(
            f"{k}: {saved.get(k)} there, {v} here" for k, v in record.items() if saved.get(k) != v
        )
        raise SystemExit(f"error: {path.parent} holds runs from {other} ({diff}); pass another --runs-dir.")


def write_stages(path: Path, stages: dict[str, Any]) -> None:
    """stages.json, replaced atomically (a killed write leaves the previous file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stages, indent=1))
    os.replace(tmp, path)


def episode_starts(args: Args, game: str, limit: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The first state of every recorded episode of `game` in run 1 (at most `limit`, oldest checkpoint
    first), uint8 [N, 4, 84, 84]: the stack [0, 0, 0, first frame] after an episode's 3 padding transitions;
    and the action the data took there, int64 [N] (full-set id). In Breakout this is the serve, where only
    FIRE puts the ball in play."""
    logs = Path(args.data_dir) / game / "1" / "replay_logs"
    legal = atari.legal_actions(game)
    obs, actions = [], []
    for suffix in replay.list_checkpoints(logs):
        buf = replay.FrameBuffer.from_checkpoint(logs, suffix, n_step=args.n_step, action_map=legal)
        empty = ~buf.frames.reshape(buf.capacity, -1).any(axis=1)  # [C] padding rows (zero frames)
        index = buf.valid_indices()
        first = ~empty[index] & np.all([empty[(index - k) % buf.capacity] for k in (1, 2, 3)], axis=0)
        batch = buf.gather(index[first])
        obs.append(batch.obs)
        actions.append(batch.action)
        if sum(len(a) for a in actions) >= limit:
            break
    return np.concatenate(obs)[:limit], np.concatenate(actions)[:limit]


def greedy_diagnostics(args: Args, checkpoint: Path, seed: int) -> dict[str, Any]:
    """On dataset states of every game: the greedy action's shares, the sampled states' action shares, and the
    Q-gap between the best and second-best action (aggregate() relates the shares to the whole data's); and
    on the episodes' first states (`episode_starts`): the greedy action's shares and the data's actions."""
    import torch

    import cql_multigame

    ckpt = cql_multigame.load_checkpoint(checkpoint)
    net = cql_multigame.network_from_checkpoint(ckpt, path=checkpoint).eval()
    support = cql_multigame.support_from_checkpoint(ckpt)  # [K]
    data = replay.MultiGameReplay(
        args.data_dir, list(args.games), runs=(1,), checkpoints="nearoptimal", memory_budget_gb=8.0, seed=seed
    )
    try:
        batch = data.sample(args.diag_states)
    finally:
        data.close()

    def q_values(obs: np.ndarray, game: np.ndarray) -> np.ndarray:  # [B, 18]
        with torch.no_grad():
            out = net(torch.from_numpy(obs), torch.from_numpy(game))
            return cql_multigame.expected_q(out, support).numpy()

    q = q_values(batch.obs, batch.game)
    out = {}
    for g, game in enumerate(args.games):
        legal = atari.legal_actions(game)
        rows = batch.game == g
        qg = q[rows][:, legal]  # [b, A_legal]
        greedy = np.asarray(legal)[qg.argmax(1)]
        data_actions = batch.action[rows]
        values, counts = np.unique(data_actions, return_counts=True)
        top2 = np.sort(qg, axis=1)[:, -2:]
        out[game] = {
            "greedy_share": {str(a): float(np.mean(greedy == a)) for a in legal},
            "data_share": {str(int(a)): float(c / counts.sum()) for a, c in zip(values, counts, strict=True)},
            "q_gap_best_second": float(np.mean(top2[:, 1] - top2[:, 0])),
            # per legal action: its mean expected Q on the sampled states (does it follow the data shares?)
            "mean_q": {str(a): float(q[rows][:, a].mean()) for a in legal},
        }
        start_obs, start_actions = episode_starts(args, game)
        start = out[game]["start"] = {"states": len(start_obs), "greedy_share": {}, "data_share": {},
                                      "mean_q": {}, "margin": None}  # fmt: skip
        if len(start_obs):  # (none where no episode starts in the data, e.g. --quick's few hundred steps)
            q_start = q_values(start_obs, np.full(len(start_obs), g))[:, legal]  # [N, A_legal]
            start_greedy = np.asarray(legal)[q_start.argmax(1)]
            start["greedy_share"] = {str(a): float(np.mean(start_greedy == a)) for a in legal}
            start["data_share"] = {str(a): float(np.mean(start_actions == a)) for a in legal}
            start["mean_q"] = {str(a): float(q_start[:, i].mean()) for i, a in enumerate(legal)}
            # how far the network prefers the data's usual action there (Breakout: FIRE, the serve) over the
            # best other one, per state; under the true Q a NOOP at the serve only delays it one step, so
            # Q(NOOP) ~ gamma * Q(FIRE) there: a margin of about (1 - gamma) * Q(FIRE) to resolve
            start["margin"] = q_margin(q_start, legal.index(int(np.bincount(start_actions).argmax())))
    return out


def advantage_shift(at: dict[str, float], everywhere: dict[str, float]) -> float | None:
    """How much a network's action preferences change between two sets of states: the largest, over actions,
    change of the advantage (mean Q of the action minus the mean over actions) from `everywhere` (all sampled
    dataset states) to `at` (e.g. the episodes' first states). 0: the same preferences in both."""
    if not at or not everywhere:
        return None
    a = np.array([at[k] for k in at])
    b = np.array([everywhere[k] for k in at])
    return float(np.abs((a - a.mean()) - (b - b.mean())).max())


def q_margin(q: np.ndarray, column: int) -> float:
    """Mean over states (rows of q, [N, A]) of Q(s, a) - max over the other actions of Q(s, a'), a = column:
    above 0 where the network prefers that action."""
    return float(np.mean(q[:, column] - np.delete(q, column, axis=1).max(1)))


DIAGNOSTICS = {"greedy_share", "mean_q", "start"}  # what greedy_diagnostics writes per game (its newest keys)


def diagnosed(diagnostics: dict[str, Any]) -> bool:
    """Whether a stage's diagnostics have every entry greedy_diagnostics writes today."""
    return all(DIAGNOSTICS <= set(d) and "margin" in d["start"] for d in diagnostics.values())


def rediagnose(args: Args, runs: dict[str, dict[str, Any]]) -> None:
    """Runs whose final stage was diagnosed before `mean_q` or the episode-start diagnostics (and their Q
    margin) existed: diagnose their final checkpoint again (the same sample: same checkpoint and seed) and
    store it in stages.json."""
    import cql_multigame

    final = str(args.eval_at[-1])
    for name, stages in runs.items():
        if final not in stages or diagnosed(stages[final]["diagnostics"]):
            continue
        method, seed = name.rsplit("_seed", 1)
        run_dir = Path(args.runs_dir) / run_name(args, method, int(seed))
        if int(cql_multigame.load_checkpoint(run_dir / "checkpoint.pt")["step"]) != int(final):
            continue  # the checkpoint is no longer the final stage's network
        stages[final]["diagnostics"] = greedy_diagnostics(args, run_dir / "checkpoint.pt", int(seed))
        write_stages(run_dir / "stages.json", stages)


def _chain_process(args: Args, method: str, seed: int, threads: int) -> None:
    """One chain in a process of its own (run_all with --jobs > 1). It gets a session of its own, so a Ctrl-C
    at the terminal reaches evidence.py only, which then sends it exactly one SIGTERM (a second would cut the
    save the first starts), and SIGTERM when evidence.py dies. Its results are its stages.json."""
    import cql_multigame

    with contextlib.suppress(OSError):  # (already a session leader: never for a spawned process)
        os.setsid()
    _die_with_parent()
    try:
        run_chain(args, method, seed, threads)
    except (cql_multigame.RunInterrupted, cql_multigame.Interrupted) as e:  # the run saved what it could
        sys.exit(128 + e.signum)


def _raise_interrupted(signum: int, frame: Any) -> None:
    import cql_multigame

    raise cql_multigame.Interrupted(signum)


def _die_with_parent(signum: int = 15) -> None:
    """On Linux, the kernel sends this process `signum` (SIGTERM: a run saves its step and stops) when the
    process that started it dies (a killed evidence.py must not leave a process training into a run
    folder). settings_pilot.py's pool passes SIGKILL: its workers would go on to the next stage after a
    SIGTERM, and a pilot stage resumes from its last checkpoint anyway."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_all(args: Args) -> dict[str, dict[str, Any]]:
    """Every (method, seed) chain, --jobs at a time, each in a process of its own (spawned: no torch threads
    inherited; no pool: a pool's workers take the chains already queued to them even after a stop, and a
    worker killed while it sends a result leaves the others waiting on the queue's lock)."""
    # seed by seed, cql and bc side by side, so a stopped invocation leaves comparable partial results
    chains = [(m, s) for s in args.seeds for m in args.methods if m != "td"]
    chains += [("td", s) for s in args.td_seeds if "td" in args.methods]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    def stages_of(m: str, s: int) -> dict[str, Any]:
        path = Path(args.runs_dir) / run_name(args, m, s) / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    if args.report_only:
        return {f"{m}_seed{s}": stages_of(m, s) for m, s in chains}
    for m, s in chains:  # before anything trains: one sentence for a folder of another configuration
        check_run_config(args, m, Path(args.runs_dir) / run_name(args, m, s))
    if args.jobs <= 1:
        return {f"{m}_seed{s}": run_chain(args, m, s, threads) for m, s in chains}
    ctx = multiprocessing.get_context("spawn")
    queued, running = list(chains), {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # as Ctrl-C: stop the chains, then exit
    try:
        while queued or running:
            while queued and len(running) < args.jobs:
                m, s = queued.pop(0)
                running[(m, s)] = ctx.Process(target=_chain_process, args=(args, m, s, threads))
                running[(m, s)].start()
            multiprocessing.connection.wait([proc.sentinel for proc in running.values()])  # until one ends
            for (m, s), proc in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[(m, s)]
                if proc.exitcode != 0:
                    raise SystemExit(
                        f"error: the {m} seed {s} run stopped with exit code {proc.exitcode} (its error is "
                        f"above; its log: {Path(args.runs_dir) / run_name(args, m, s) / 'train.log'})."
                    )
    except BaseException:  # Ctrl-C, SIGTERM or a failed chain: the running runs save their step and stop
        for proc in running.values():
            proc.terminate()  # one SIGTERM each (their own session: a Ctrl-C did not reach them)
        for proc in running.values():
            proc.join()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {f"{m}_seed{s}": stages_of(m, s) for m, s in chains}


# ----------------------------------------------------------------------------------------------------
# Aggregation, claim, plots
# ----------------------------------------------------------------------------------------------------


TRAINING_SIGNALS = ("td_loss", "q_data", "q_max")  # metrics.jsonl's keys that training.png draws


def metrics_rows(run_dir: Path, up_to: int) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows (one per --log-every steps) up to step `up_to`; a line cut by a kill is
    skipped (the resumed run drops it too). Also settings_pilot.py's reader."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if row.get("step", up_to + 1) <= up_to:
                rows.append(row)
    return rows


def training_signals(args: Args, runs: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per run: its metrics.jsonl up to the last evaluated step (every --log-every steps): the TD loss, the
    mean Q of the data's actions and the mean max_a Q on the batches. Did Q stop rising, did the loss
    flatten? Kept in results.json so --replot draws them without the run folders."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in runs:
        method, seed = name.rsplit("_seed", 1)
        run_dir = Path(args.runs_dir) / run_name(args, method, int(seed))
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        rows = [r for r in metrics_rows(run_dir, args.eval_at[-1]) if all(k in r for k in TRAINING_SIGNALS)]
        out[name] = {k: [float(r[k]) for r in rows] for k in ("step", *TRAINING_SIGNALS)}
    return out


def aggregate(args: Args, behavior: dict, runs: dict, data_shares: dict) -> dict[str, Any]:
    """Per game and method: the mean over seeds of each seed's mean return, with its standard error over
    seeds, at every evaluation step; the claim check at the last step; and, per run, how often its greedy
    action on dataset states is the data's most frequent action (what BC's argmax picks) or the good one."""
    final = str(args.eval_at[-1])
    table: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    module = importlib.import_module(args.behavior.partition(":")[0])
    good_actions = module.GOOD_ACTION
    state_dependent = [g for g in getattr(module, "STATE_DEPENDENT", ()) if g in args.games]

    greedy: dict[str, Any] = {}
    for game in args.games:
        mode = max(data_shares[game], key=data_shares[game].get)
        good = good_actions.get(game)
        rare = [a for a, v in data_shares[game].items() if v < RARE_SHARE]
        greedy[game] = {"data_mode": int(mode), "good_action": good, "rare_actions": [int(a) for a in rare],
                        "runs": {}}  # fmt: skip
        for name, stages in runs.items():
            if final in stages:
                diag = stages[final]["diagnostics"][game]
                share = diag["greedy_share"]
                start = diag["start"] if diag.get("start", {}).get("states") else None  # (no episode start)
                if start:  # the data's part is the same for every run
                    greedy[game]["start"] = {"states": start["states"], "data_share": start["data_share"]}
                greedy[game]["runs"][name] = {
                    **rare_action_signals(diag, rare, mode),
                    "greedy_is_data_mode": share.get(mode, 0.0),
                    "greedy_is_good_action": None if good is None else share.get(str(good), 0.0),
                    # 1.0: one action on every dataset state (a constant policy); lower: state-dependent
                    "greedy_mode_share": max(share.values()),
                    "q_gap_best_second": diag["q_gap_best_second"],
                    "mean_q": diag.get("mean_q"),
                    "start_greedy_share": start["greedy_share"] if start else None,
                    "start_margin": start["margin"] if start else None,
                    "start_mean_q": start["mean_q"] if start else None,
                    "start_advantage_shift": (
                        advantage_shift(start["mean_q"], diag["mean_q"]) if start else None
                    ),
                }
    for game in args.games:
        table[game] = {"behavior": behavior[game]}
        curves[game] = {}
        for m in METHODS:
            seeds = (args.td_seeds if m == "td" else args.seeds) if m in args.methods else ()
            per_step = {}
            for at in args.eval_at:
                means = [
                    float(np.mean(runs[f"{m}_seed{s}"][str(at)]["returns"][game]))
                    for s in seeds
                    if str(at) in runs.get(f"{m}_seed{s}", {})
                ]
                per_step[str(at)] = {"seeds": len(means), "per_seed": means, **mean_ci(np.array(means))}
            curves[game][m] = per_step
            table[game][m] = per_step[final]
    claim = {}
    for game in args.games:
        row = table[game]
        cql = row["cql"]
        checks = {}
        for other in ("behavior", "bc"):
            o = row[other]
            if cql["mean"] is None or o["mean"] is None:
                checks[other] = None
                continue
            gap = cql["mean"] - o["mean"]
            se = math.sqrt((cql["se"] or 0.0) ** 2 + (o["se"] or 0.0) ** 2)
            checks[other] = {"gap": gap, "se": se, "holds": bool(gap > args.claim_se * se and gap > 0)}
        claim[game] = {**checks, "holds": all(c is not None and c["holds"] for c in checks.values())}
    games_holding = [g for g in args.games if claim[g]["holds"]]
    enough = len(games_holding) >= min(args.claim_min_games, len(args.games))
    return {
        "data_action_shares": data_shares,
        "table": table,
        "curves": curves,
        "greedy_actions": greedy,
        "claim": claim,
        "claim_games": games_holding,
        "state_dependent_games": state_dependent,
        "claim_holds": enough and (not state_dependent or any(g in state_dependent for g in games_holding)),
    }


def rare_action_signals(diag: dict[str, Any], rare: list[str], mode: str) -> dict[str, float | None]:
    """Why CQL, on one run's dataset-state diagnostics: how often its greedy action is one the data rarely
    takes (share < RARE_SHARE), and the mean Q of those actions minus the mean Q of the data's most frequent
    one. Without the conservative term nothing holds the rare actions' values down (TD only bootstraps from
    max_a Q), so a positive, growing difference is the overestimation CQL is there to prevent."""
    mean_q = diag.get("mean_q") or {}
    if not rare or not mean_q:
        return {"greedy_is_rare": None, "q_rare_minus_mode": None}
    return {
        "greedy_is_rare": float(sum(diag["greedy_share"].get(a, 0.0) for a in rare)),
        "q_rare_minus_mode": float(np.mean([mean_q[a] for a in rare]) - mean_q[mode]),
    }


def runs_of(game_entry: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """One method's runs (every seed) in an aggregate()["greedy_actions"][game] entry."""
    return [r for name, r in game_entry["runs"].items() if name.startswith(f"{method}_seed")]


def format_table(args: Args, agg: dict[str, Any]) -> str:
    n = len(args.seeds)
    lines = [
        f"mean return at step {args.eval_at[-1]:,} (episodes capped at {args.eval_max_steps:,} agent steps; "
        f"methods: mean ± s.e. over seeds (planned {n}) of each seed's {args.eval_episodes}-episode mean; "
        "behavior: mean ± s.e. over the recorded episodes)",
        "",
        "| game | behavior (data) | BC | TD only | CQL | CQL > behavior and BC |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def cell(c: dict, method: str) -> str:
        if c["mean"] is None:
            return "n/a"
        text = f"{c['mean']:.1f}" + ("" if c["se"] is None else f" ± {c['se']:.1f}")
        planned = len(args.td_seeds if method == "td" else args.seeds)
        if method != "behavior" and c["seeds"] < planned:
            text += f" ({c['seeds']} of {planned} seeds)"
        return text

    for game in args.games:
        row = agg["table"][game]
        holds = "yes" if agg["claim"][game]["holds"] else "no"
        cells = " | ".join(cell(row[m], m) for m in ("behavior", "bc", "td", "cql"))
        lines.append(f"| {game} | {cells} | {holds} |")
    lines += [
        "",
        "greedy action on dataset states (mean over seeds): share that is the data's most frequent action "
        "(BC's argmax) / share that is the good action",
        "",
        "| game | data's most frequent | good | BC | TD only | CQL |",
        "|---|---|---|---:|---:|---:|",
    ]
    for game in args.games:
        g = agg["greedy_actions"][game]
        cells = []
        for m in ("bc", "td", "cql"):
            rs = runs_of(g, m)
            if not rs:
                cells.append("n/a")
                continue
            mode = np.mean([r["greedy_is_data_mode"] for r in rs])
            good = (
                "-"
                if g["good_action"] is None
                else f"{np.mean([r['greedy_is_good_action'] for r in rs]):.2f}"
            )
            cells.append(f"{mode:.2f} / {good}")
        good_name = "state-dependent" if g["good_action"] is None else ACTION_NAMES[g["good_action"]]
        lines.append(f"| {game} | {ACTION_NAMES[g['data_mode']]} | {good_name} | {' | '.join(cells)} |")
    starts = [g for g in args.games if agg["greedy_actions"][g].get("start")]
    if starts:
        lines += [
            "",
            "at the first state of every recorded episode (Breakout's serve): the action the data takes "
            "there most often (its share) / share of those states where each method's greedy action is that "
            "one (mean over seeds); the Q margin: that action's Q minus the best other action's, mean over "
            "those states and seeds (BC: its logits); the advantage shift: the largest change of an action's "
            "advantage (Q minus the mean over actions) from all dataset states to these (0: the same "
            "preferences in every state)",
            "",
            "| game | states | data's action there | BC | TD only | CQL | Q margin, BC / TD only / CQL "
            "| advantage shift, BC / TD only / CQL |",
            "|---|---:|---|---:|---:|---:|---|---|",
        ]
        for game in starts:
            g = agg["greedy_actions"][game]
            data = g["start"]["data_share"]
            top = max(data, key=data.get)
            cells, margins, shifts = [], [], []
            for m in ("bc", "td", "cql"):
                rs = [r["start_greedy_share"] for r in runs_of(g, m) if r["start_greedy_share"]]
                cells.append(f"{np.mean([r.get(top, 0.0) for r in rs]):.2f}" if rs else "n/a")
                for key, spec, out in (("start_margin", "+.3f", margins),
                                       ("start_advantage_shift", ".3f", shifts)):  # fmt: skip
                    vs = [r[key] for r in runs_of(g, m) if r.get(key) is not None]
                    out.append(format(np.mean(vs), spec) if vs else "n/a")
            head = f"| {game} | {g['start']['states']} | {ACTION_NAMES[int(top)]} {data[top]:.0%} | "
            lines.append(head + " | ".join(cells) + f" | {' / '.join(margins)} | {' / '.join(shifts)} |")
    if any(agg["greedy_actions"][g]["rare_actions"] for g in args.games):
        lines += [
            "",
            f"why CQL: the actions the data takes on under {RARE_SHARE:.0%} of its transitions (rare): "
            "their mean Q minus the mean Q of the data's most frequent action / share of states whose "
            "greedy action is rare (mean over seeds)",
            "",
            "| game | rare actions | BC | TD only | CQL |",
            "|---|---:|---:|---:|---:|",
        ]
        for game in args.games:
            g = agg["greedy_actions"][game]
            if not g["rare_actions"]:
                continue
            cells = []
            for m in ("bc", "td", "cql"):
                rs = [r for r in runs_of(g, m) if r["greedy_is_rare"] is not None]
                if not rs:
                    cells.append("n/a")
                    continue
                q = np.mean([r["q_rare_minus_mode"] for r in rs])
                cells.append(f"{q:+.3f} / {np.mean([r['greedy_is_rare'] for r in rs]):.2f}")
            lines.append(f"| {game} | {len(g['rare_actions'])} | {' | '.join(cells)} |")
    lines += [
        "",
        "mean Q of every action on dataset states, best first (mean over seeds; in brackets: the action's "
        "share of the data; the actions the data never takes in one cell, with their highest mean Q)",
        "",
    ]
    rows = []
    for game in args.games:
        g = agg["greedy_actions"][game]
        shares = agg["data_action_shares"][game]
        for m in ("bc", "td", "cql"):
            rs = [r["mean_q"] for r in runs_of(g, m) if r["mean_q"]]
            if not rs:
                continue
            q = {a: float(np.mean([r[a] for r in rs])) for a in rs[0]}
            ranked = sorted(q.items(), key=lambda kv: -kv[1])
            cells = [
                f"{ACTION_NAMES[int(a)]} {v:.3f} ({shares[a]:.0%})" for a, v in ranked if shares.get(a, 0) > 0
            ]
            unseen = [v for a, v in ranked if shares.get(a, 0) == 0]
            if unseen:
                cells.append(f"never taken ({len(unseen)}) {max(unseen):.3f}")
            rows.append((f"| {game} | {METHOD_LABELS[m]} | ", cells))
    width = max((len(c) for _, c in rows), default=1)
    lines += [
        "| game | method | " + " | ".join(f"Q (share) {i + 1}" for i in range(width)) + " |",
        "|---|---|" + "---:|" * width,
    ]
    lines += [head + " | ".join(cells + [""] * (width - len(cells))) + " |" for head, cells in rows]
    return "\n".join(lines)


def plot(
    args: Args, agg: dict[str, Any], runs: dict[str, Any], out: Path, training: dict[str, Any] | None = None
) -> list[str]:
    """bars.png (per game, every method with its standard error), curves.png (return vs steps),
    q_gaps.png (every run's Q-gap between its best and second-best action on dataset states vs steps),
    where the data has rare actions rare_actions.png (their mean Q minus the data's mode's, vs steps), and
    training.png (`training_signals`: TD loss and Q on the training batches vs steps, mean over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []

    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def thousands(axes) -> None:  # step ticks as 20,000, at most 5 of them (no "1000012500")
        for ax in axes[0]:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return str(out / name)

    colors = {"behavior": "#7f7f7f", "bc": "#ff7f0e", "td": "#2ca02c", "cql": "#1f77b4"}
    order = ("behavior", "bc", "td", "cql")
    fig, axes = plt.subplots(1, len(args.games), figsize=(3.6 * len(args.games), 3.4), squeeze=False)
    for ax, game in zip(axes[0], args.games, strict=True):
        row = agg["table"][game]
        means = [row[m]["mean"] if row[m]["mean"] is not None else 0.0 for m in order]
        errs = [row[m]["se"] or 0.0 for m in order]
        ax.bar(range(len(order)), means, yerr=errs, capsize=4, color=[colors[m] for m in order])
        ax.set_xticks(range(len(order)), ["data", "BC", "TD", "CQL"])
        ax.set_title(game)
        ax.axhline(0, color="black", lw=0.5)
    axes[0][0].set_ylabel(f"return (step {args.eval_at[-1]:,})")
    data = "scripted" if args.behavior == BEHAVIOR_POLICY else args.behavior.partition(":")[2] + " DQN-like"
    td = f"TD: {len(args.td_seeds)} seed(s)" if len(args.td_seeds) < len(args.seeds) else "TD too"
    title = (f"Offline on {data} sub-optimal data, one network for all games. BC, CQL ({td}): mean over "
             f"{len(args.seeds)} seeds, error bar ± 1 s.e. over seeds; data: its recorded episodes, ± 1 s.e.")
    fig.suptitle(title, fontsize=9)
    bars = save(fig, "bars.png")

    fig, axes = plt.subplots(1, len(args.games), figsize=(3.6 * len(args.games), 3.2), squeeze=False)
    steps = np.array(args.eval_at)
    for ax, game in zip(axes[0], args.games, strict=True):
        for m in METHODS:
            c = agg["curves"][game][m]
            mean = np.array([c[str(s)]["mean"] if c[str(s)]["mean"] is not None else np.nan for s in steps])
            se = np.array([c[str(s)]["se"] or 0.0 for s in steps])
            ax.plot(steps, mean, marker="o", color=colors[m], label=METHOD_LABELS[m])
            ax.fill_between(steps, mean - se, mean + se, color=colors[m], alpha=0.2,
                            label=f"{METHOD_LABELS[m]}: ± 1 s.e. over seeds")  # fmt: skip
        b = agg["table"][game]["behavior"]["mean"]
        if b is not None:
            ax.axhline(b, color=colors["behavior"], ls="--", label=METHOD_LABELS["behavior"])
        ax.set_title(game)
        ax.set_xlabel("gradient steps")
    axes[0][0].set_ylabel("evaluation return")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Evaluation return over training: CQL, TD-only and BC on the same data", fontsize=9)
    thousands(axes)
    curves = save(fig, "curves.png")

    # training-time signal: the Q-gap between the best and the second-best action on dataset states
    fig, axes = plt.subplots(1, len(args.games), figsize=(3.6 * len(args.games), 3.2), squeeze=False)
    for ax, game in zip(axes[0], args.games, strict=True):
        for name, stages in sorted(runs.items()):
            method = name.split("_seed")[0]
            done = [s for s in steps if str(s) in stages]
            if not done:
                continue
            gaps = [stages[str(s)]["diagnostics"][game]["q_gap_best_second"] for s in done]
            ax.plot(done, gaps, marker="o", color=colors[method], label=name, alpha=0.8)
        ax.set_title(game)
        ax.set_xlabel("gradient steps")
    axes[0][0].set_ylabel("Q(best) - Q(second), dataset states")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Training-time signal: Q(best) - Q(second best) on dataset states, every run", fontsize=9)
    thousands(axes)
    plots = [bars, curves, save(fig, "q_gaps.png")]

    # why CQL: the values of the actions the data rarely takes, relative to its most frequent one
    games = [g for g in args.games if agg["greedy_actions"][g].get("rare_actions")]
    if games:
        fig, axes = plt.subplots(1, len(games), figsize=(3.6 * len(games), 3.2), squeeze=False)
        for ax, game in zip(axes[0], games, strict=True):
            g = agg["greedy_actions"][game]
            rare, mode = [str(a) for a in g["rare_actions"]], str(g["data_mode"])
            for name, stages in sorted(runs.items()):
                done = [s for s in steps if str(s) in stages]
                signals = [rare_action_signals(stages[str(s)]["diagnostics"][game], rare, mode) for s in done]
                diffs = [x["q_rare_minus_mode"] for x in signals]
                if done and None not in diffs:
                    method = name.split("_seed")[0]
                    ax.plot(done, diffs, marker="o", color=colors[method], label=name, alpha=0.8)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_title(f"{game}: {len(rare)} rare actions")
            ax.set_xlabel("gradient steps")
        axes[0][0].set_ylabel("mean Q(rare) - Q(data's most frequent)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"Why CQL: values of the actions the data takes on under {RARE_SHARE:.0%} of its "
                     "transitions, on dataset states, every run", fontsize=9)  # fmt: skip
        thousands(axes)
        plots.append(save(fig, "rare_actions.png"))

    if training:  # training-time signals: does Q stop rising, does the TD loss flatten?
        panels = (("td_loss", "TD loss (C51 cross-entropy)"), ("q_data", "mean Q of the data's action"),
                  ("q_max", "mean max_a Q"))  # fmt: skip
        fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.2), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            for m in METHODS:
                if m == "bc" and key == "td_loss":
                    continue  # BC has no TD term (its logged td_loss is 0)
                curves = [training[n] for n in sorted(training) if n.rsplit("_seed", 1)[0] == m]
                length = min((len(c["step"]) for c in curves), default=0)
                if not length:
                    continue
                values = np.array([c[key][:length] for c in curves])  # [seeds, points]
                x, mean = np.array(curves[0]["step"][:length]), values.mean(0)
                se = values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros(length)
                ax.plot(x, mean, color=colors[m], label=f"{METHOD_LABELS[m]} ({len(values)} seeds)")
                ax.fill_between(x, mean - se, mean + se, color=colors[m], alpha=0.2)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("gradient steps")
        axes[0][1].legend(fontsize=7)  # the middle panel has every method
        fig.suptitle("Training-time signals on the training batches (all games), mean ± 1 s.e. over seeds",
                     fontsize=9)  # fmt: skip
        thousands(axes)
        plots.append(save(fig, "training.png"))
    return plots


def main(args: Args) -> dict[str, Any]:
    if args.replot:  # the PNGs again from the committed numbers, no training
        saved = json.loads((Path(args.out_dir) / "results.json").read_text())
        fields = {f.name for f in dataclasses.fields(Args)} - {"replot"}
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["args"].items() if k in fields}
        saved_args = dataclasses.replace(args, **kept)
        training = saved.get("training", {})
        return {"plots": plot(saved_args, saved, saved["runs"], Path(args.out_dir), training)}
    if args.quick:
        args = quick_args(args)
    for game in args.games:
        atari.check_game(game)
    if not set(args.methods) <= set(METHODS):
        raise SystemExit(f"error: --methods {list(args.methods)} must be among {', '.join(METHODS)}.")
    if list(args.eval_at) != sorted(set(args.eval_at)) or args.eval_at[-1] != args.total_steps:
        raise SystemExit(
            f"error: --eval-at {list(args.eval_at)} must be increasing and end at --total-steps "
            f"{args.total_steps}."
        )
    if args.until:
        if args.until not in args.eval_at:
            raise SystemExit(f"error: --until {args.until} must be one of --eval-at {list(args.eval_at)}.")
        stage = tuple(at for at in args.eval_at if at <= args.until)
        args = dataclasses.replace(args, total_steps=args.until, eval_at=stage)
    start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        make_data(args)
    behavior = behavior_returns(args)
    shares = data_action_shares(args)
    runs = run_all(args)
    rediagnose(args, runs)
    agg = aggregate(args, behavior, runs, shares)
    result = {
        "args": dataclasses.asdict(args),
        "behavior": behavior,
        "runs": runs,
        **agg,
        "wall_seconds_this_invocation": time.perf_counter() - start,
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
    }
    result["training"] = training_signals(args, runs)
    table = format_table(args, agg)
    result["plots"] = plot(args, agg, runs, out, result["training"]) if args.plots else []
    (out / "results.json").write_text(json.dumps(repo_relative(result), indent=1))
    print(table)
    holds = ", ".join(agg["claim_games"]) or "no game"
    print(f"\nCQL above both the behavior and BC (gap > {args.claim_se:g} x its standard error): {holds}")
    needs = f" (needs {args.claim_min_games} games" + (
        f", one of {', '.join(agg['state_dependent_games'])})" if agg["state_dependent_games"] else ")")
    print(f"the claim: {'holds' if agg['claim_holds'] else 'does not hold'}{needs}")
    print(f"results: {out / 'results.json'}" + "".join(f"\nplot:    {p}" for p in result["plots"]))
    return result


def run_experiment(main_fn, args: Any, script: str) -> None:
    """Run an experiment's main(args) (evidence.py, transfer.py): an interrupt is one line (the interrupted
    run saved its checkpoint; finished stages are cached) and a user error one line, no traceback."""
    import cql_multigame

    try:
        main_fn(args)
    except (cql_multigame.RunInterrupted, cql_multigame.Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", 2)
        print(f"\n{e}\n{script}: run the same command again to continue.", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except (cql_multigame.ConfigError, replay.ReplayDataError, atari.AtariConfigError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    import tyro

    run_experiment(main, tyro.cli(Args), "evidence.py")
