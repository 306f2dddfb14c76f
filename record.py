"""Make DQN-Replay data: play ALE with a behavior policy and write checkpoints in exactly Dopamine's format.

    python record.py --out-dir data/demo --games Pong Breakout            # random policy
    python record.py --out-dir data/mine --games Pong --policy runs/<run>/checkpoint.pt --epsilon 0.01

DQN-Replay (Agarwal et al. 2020) is the logged replay of DQN agents: one 1M-transition snapshot each time
the buffer fills. This recorder writes the same files (machinery/dqn_files.py: write_checkpoint), one
(game, run) stream per process, with the behavior policy a user picks: uniform random over the legal
actions, a checkpoint.pt of cql_multigame.py (epsilon-greedy over its head's expected Q), or a scripted
`module:function`. Episodes start with 3 zero-filled padding transitions and a time-limit cut is stored as
a terminal, as in DQN-Replay; each checkpoint also gets `episode_returns_ckpt.<N>.json` (unclipped returns).
Used by the demo preset (cql_multigame.py --record-missing) and the experiments.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import replay
from machinery.dqn_files import (
    STACK,
    ReplayDataError,
    ReplayWriteError,
    _scan_suffixes,
    list_checkpoints,
    read_episode_returns,
    remove_stale_temp_files,
    scan_checkpoint,
    temp_path,
    write_episode_returns,
)

_progress_counter: Any = None  # a multiprocessing.Value in worker processes


def _worker_init(counter: Any) -> None:
    global _progress_counter
    _progress_counter = counter
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the recording (and these workers) alone, so
    # a worker ignores SIGINT instead of printing a KeyboardInterrupt traceback; SIGTERM ends it quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _scripted_policy(
    policy: str, game: str, legal: list[int], env: Any, rng: np.random.Generator
) -> Callable[[np.ndarray], int]:
    """`module:function`, called as function(game, env, rng) -> act(obs) -> full-set action id (e.g.
    experiments.behavior:scripted, which reads the emulator RAM); wrapped to give minimal-set indices."""
    import importlib

    module, _, name = policy.partition(":")
    try:
        make = getattr(importlib.import_module(module), name)
        act_full = make(game, env, rng)
    except (ImportError, AttributeError, ValueError) as e:
        raise ReplayDataError(f"--policy {policy}: {e}") from None
    index = {a: i for i, a in enumerate(legal)}

    def act(obs: np.ndarray) -> int:
        a = int(act_full(obs))
        if a not in index:
            raise ReplayDataError(f"--policy {policy} chose action {a}, not one of {game}'s legal {legal}.")
        return index[a]

    return act


def _make_policy(
    policy: str, game: str, legal: list[int], epsilon: float, rng: np.random.Generator, env: Any = None
) -> Callable[[np.ndarray], int]:
    """obs uint8 [4, 84, 84] -> minimal-set action index."""
    if policy == "random":
        return lambda obs: int(rng.integers(len(legal)))
    if _is_scripted(policy):
        return _scripted_policy(policy, game, legal, env, rng)
    import torch  # lazy: the random policy needs no torch

    ckpt, net = load_policy(policy)
    if game not in list(ckpt["games"]):
        raise ReplayDataError(
            f"--policy {policy} has no head for {game} (it knows {', '.join(ckpt['games'])}); "
            "record other games or use --policy random."
        )
    import atari
    import resnet

    net.eval()
    head = torch.tensor([list(ckpt["games"]).index(game)])
    support = resnet.support_from_checkpoint(ckpt)  # [K], with its one documented fallback
    legal_t = torch.as_tensor(legal)

    def act(obs: np.ndarray) -> int:
        with torch.no_grad():
            q = resnet.expected_q(net(torch.from_numpy(obs[None]), head), support)  # [1, 18]
        return int(atari.epsilon_greedy(q[:, legal_t].numpy(), epsilon, rng)[0])  # the evaluation's rule

    return act


def _is_scripted(policy: str) -> bool:
    """A `module:function` policy, as opposed to "random" or a checkpoint file."""
    module = policy.partition(":")[0]
    return ":" in policy and not Path(policy).is_file() and module.replace(".", "").isidentifier()


def load_policy(policy: str) -> tuple[dict[str, Any], Any]:
    """A --policy checkpoint and its network, through the training scripts' loader: a missing, truncated or
    foreign file is one sentence (ReplayDataError), as in cql_multigame.py and the fine-tuning scripts."""
    import resnet  # lazy: the random policy needs no torch
    from machinery.checkpoints import load_checkpoint
    from machinery.flags import ConfigError

    try:
        ckpt = load_checkpoint(policy)
        return ckpt, resnet.network_from_checkpoint(ckpt, path=policy)
    except ConfigError as e:
        raise ReplayDataError(f"--policy: {e}") from None


def _record_one(job: dict[str, Any], report: Callable[[int], None] | None = None) -> str:
    """Record num_checkpoints snapshots of one (game, run) stream; returns the replay_logs directory."""
    if job["policy"] == "random" or _is_scripted(job["policy"]):
        return _record_stream(job, report)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 acting is much faster on one thread (docs/performance.md)
    try:
        return _record_stream(job, report)
    finally:
        torch.set_num_threads(threads)


def _record_stream(job: dict[str, Any], report: Callable[[int], None] | None) -> str:
    import atari

    game, logs = job["game"], Path(job["logs"])
    ss = np.random.SeedSequence([job["seed"], job["run"], job["game_index"]])
    env_seed, policy_seed = (int(x) for x in ss.generate_state(2) % 2**31)
    rng = np.random.default_rng(policy_seed)
    legal = atari.legal_actions(game)
    env = atari.make_env(
        game, sticky_actions=job["sticky_actions"], seed=env_seed, max_episode_steps=job["max_episode_steps"]
    )
    policy = _make_policy(job["policy"], game, legal, job["epsilon"], rng, env)
    buf = replay.FrameBuffer(job["capacity"], n_step=1)
    obs, _ = env.reset()  # [4, 84, 84]
    pending, episode_return = 0, 0.0
    for k in range(job["num_checkpoints"]):
        returns = []  # unclipped game scores of the episodes that end inside this checkpoint
        for _ in range(job["capacity"]):  # a snapshot after every `capacity` agent steps, as DQN-Replay
            a = policy(obs)
            next_obs, reward, terminated, truncated, _ = env.step(legal[a])
            done = terminated or truncated  # the time-limit cut is a terminal in DQN-Replay too
            buf.add(obs[-1], a, float(np.clip(reward, -1.0, 1.0)), done)
            episode_return += float(reward)
            if done:
                returns.append(episode_return)
                episode_return = 0.0
            obs = env.reset()[0] if done else next_obs
            pending += 1
            if pending == 1000:
                if report is not None:
                    report(pending)
                elif _progress_counter is not None:
                    with _progress_counter.get_lock():
                        _progress_counter.value += pending
                pending = 0
        buf.save(logs, k)
        write_episode_returns(logs, k, returns)
    env.close()
    if report is not None:
        report(pending)
    elif _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += pending
    return str(logs)


def record(
    out_dir: str | Path,
    games: Sequence[str],
    runs: Sequence[int] = (1,),
    *,
    num_checkpoints: int = 1,
    capacity: int = 100_000,
    policy: str = "random",
    epsilon: float = 0.01,
    seed: int = 0,
    sticky_actions: float = 0.25,
    max_episode_steps: int = 27_000,
    num_workers: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Play each game under `policy` and write DQN-Replay checkpoints to <out_dir>/<Game>/<run>/replay_logs/.

    Each (game, run) is one stream of episodes through one FrameBuffer of `capacity` transitions;
    checkpoint k is its snapshot after (k+1) * capacity agent steps (so, as in DQN-Replay, consecutive
    checkpoints hold disjoint data and the padding puts the cursor mid-buffer). Rewards are clipped to
    [-1, 1]; game over and the max_episode_steps cut are both terminal. num_workers processes record
    (game, run) pairs in parallel (0: one per pair, at most the CPU count). Returns the directories.

    resume: continue an interrupted recording with the same arguments: a (game, run) stream whose
    num_checkpoints checkpoints of `capacity` are all there is kept, every other one is recorded again from
    its start (its seeds give the same episodes). Temporary files of killed writers are removed first.
    """
    import atari

    try:
        canonical = [atari.check_game(g) for g in games]
    except ValueError as e:
        raise ReplayDataError(str(e)) from None
    for i, game in enumerate(canonical):
        if game in canonical[:i]:  # two streams would write one folder at once
            raise ReplayDataError(
                f"--games lists {game} twice; list each game once (--runs makes more streams of a game)."
            )
    games = canonical
    if capacity < 2 * STACK or num_checkpoints < 1:
        raise ReplayDataError(f"capacity {capacity} must be >= {2 * STACK} and num_checkpoints >= 1.")
    if policy != "random" and not Path(policy).is_file() and not _is_scripted(policy):
        raise ReplayDataError(
            f"--policy {policy} is neither 'random', an existing checkpoint file, nor module:function."
        )
    if not 0.0 <= epsilon <= 1.0:
        raise ReplayDataError(f"--epsilon {epsilon} must be in [0, 1].")
    if policy != "random" and not _is_scripted(policy):
        load_policy(policy)  # a truncated or foreign checkpoint: one sentence now, not in a worker
    _check_writable(Path(out_dir))
    jobs, kept = [], []
    for gi, game in enumerate(games):
        for run in runs:
            logs = Path(out_dir) / game / str(run) / "replay_logs"
            remove_stale_temp_files(logs, recursive=False)  # of killed recorders on this host
            if resume and _stream_complete(logs, num_checkpoints, capacity):
                kept.append(logs)
                continue
            if _scan_suffixes(logs) and not (overwrite or resume):
                raise ReplayDataError(
                    f"{logs} already holds checkpoints; pass --resume to continue an interrupted recording, "
                    "--overwrite to record it again, or another --out-dir."
                )
            jobs.append(
                dict(
                    game=game, game_index=gi, run=int(run), logs=str(logs), seed=seed, policy=policy,
                    epsilon=epsilon, capacity=capacity, num_checkpoints=num_checkpoints,
                    sticky_actions=sticky_actions, max_episode_steps=max_episode_steps,
                )
            )  # fmt: skip
    from tqdm import tqdm

    total = len(jobs) * num_checkpoints * capacity
    bar = tqdm(total=total, desc="recording", unit="step", disable=not progress, smoothing=0.1)
    workers = min(len(jobs), os.cpu_count() or 1) if num_workers <= 0 else min(num_workers, len(jobs))
    pids = {os.getpid()}  # the writers whose temporary files an interrupted recording removes
    try:
        if workers <= 1:
            out = [_record_one(j, bar.update) for j in jobs]
        else:
            import concurrent.futures
            import multiprocessing

            # fork is fastest and the random and scripted policies never touch torch; a Q-network policy needs
            # spawn (torch threads in the parent), which re-imports the caller's main module in the children
            no_torch = policy == "random" or _is_scripted(policy)
            use_fork = no_torch and "fork" in multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if use_fork else "spawn")
            counter = ctx.Value("q", 0)
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_worker_init, initargs=(counter,)
            ) as pool:
                futures = _submit_ignoring_sigint(pool, jobs)
                try:
                    while not all(f.done() for f in futures):
                        concurrent.futures.wait(futures, timeout=0.5)
                        bar.update(counter.value - bar.n)
                        pids |= set((pool._processes or {}).keys())
                    out = [f.result() for f in futures]
                except BaseException:  # interrupted, or a worker failed: stop the others now, not at the end
                    for f in futures:
                        f.cancel()
                    for proc in list((pool._processes or {}).values()):
                        proc.terminate()
                    raise
                bar.update(counter.value - bar.n)
    except BaseException:
        _remove_temp_files([Path(j["logs"]) for j in jobs], pids)
        raise
    finally:
        bar.close()
    return kept + [Path(p) for p in out]


def record_missing(
    data_dir: str | Path, games: Sequence[str], runs: Sequence[int], capacity: int, seed: int,
    policy: str = "random",
) -> None:
    """The demo's cached dataset (cql_multigame.py --record-missing, --record-policy): `capacity`
    transitions of `policy` for each game that has no data in `data_dir` yet."""
    data_dir = Path(data_dir)
    missing = [g for g in games if not any((data_dir / g).glob("*/replay_logs/add_count_ckpt.*.gz"))]
    if not missing:
        return
    print(
        f"recording {capacity:,} transitions of the {policy} policy for {', '.join(missing)} "
        f"into {data_dir} (once; later runs reuse it)"
    )
    record(data_dir, missing, runs=runs, num_checkpoints=1, capacity=capacity, policy=policy, seed=seed)


def action_counts(logs: str | Path, game: str, suffixes: Sequence[int] | None = None) -> np.ndarray:
    """How often the recorded data takes each full-set action, int64 [18], over the checkpoints `suffixes`
    (all if None); the padding rows at episode starts and the never-written row are left out."""
    import atari

    legal = np.asarray(atari.legal_actions(game))
    counts = np.zeros(18, np.int64)
    for k in list_checkpoints(logs) if suffixes is None else suffixes:
        d = replay.read_checkpoint(logs, k, store=("action", "terminal"))
        written = replay.valid_mask(d["terminal"], int(d["add_count"]), 1)  # real transitions, no padding
        counts += np.bincount(legal[d["action"][written]], minlength=18)
    return counts


def data_summary(logs: str | Path, game: str) -> dict[str, Any]:
    """What one stream of recorded data holds, for comparing a trained policy with it: the behavior's
    episode returns (saved beside the checkpoints) and the full-set action the data takes most often (BC's
    argmax converges to it where the data's action does not depend on the state)."""
    counts = action_counts(logs, game)
    return {"behavior_returns": read_episode_returns(logs), "most_frequent_action": int(counts.argmax()),
            "action_share": float(counts.max() / max(1, counts.sum()))}  # fmt: skip


def _stream_complete(logs: Path, num_checkpoints: int, capacity: int) -> bool:
    """Whether `logs` holds checkpoints 0..num_checkpoints-1, each of `capacity` rows (a finished stream)."""
    if not set(range(num_checkpoints)) <= set(list_checkpoints(logs)):
        return False
    try:
        return all(scan_checkpoint(logs, k).capacity == capacity for k in range(num_checkpoints))
    except ReplayDataError:
        return False


def _submit_ignoring_sigint(pool: Any, jobs: list[dict[str, Any]]) -> list[Any]:
    """Submit the jobs (this starts the workers) with SIGINT ignored for that moment: a worker inherits
    the ignored disposition, so a Ctrl-C while it still imports prints no traceback (the parent stops it)."""
    import signal

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        return [pool.submit(_record_one, j) for j in jobs]
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _check_writable(out_dir: Path) -> None:
    """Before recording: --out-dir can be created and written (one sentence if not)."""
    probe = temp_path(out_dir / ".write_test")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ReplayWriteError(
            f"cannot write in --out-dir {out_dir} ({e.strerror or type(e).__name__}); pass a writable folder."
        ) from None


def _remove_temp_files(dirs: list[Path], pids: set[int]) -> None:
    """Remove the temporary files of writers `pids` on this host (see _temp_path) after an interruption."""
    import socket

    host = socket.gethostname()
    for d in dirs:
        for pid in pids:
            for tmp in d.glob(f"*.{host}.{pid}.tmp") if d.is_dir() else ():
                tmp.unlink(missing_ok=True)


@dataclasses.dataclass
class Args:
    """Record DQN-Replay-format data: python record.py --out-dir data/demo --games Pong Breakout"""

    out_dir: str = "data/recorded"
    """folder that receives <Game>/<run>/replay_logs/ (the layout of gs://atari-replay-datasets/dqn)"""
    games: tuple[str, ...] = ("Pong",)
    """games to record (ALE / DQN-Replay names, e.g. MsPacman); the default is a demo's"""
    runs: tuple[int, ...] = (1,)
    """run folder names; each run is an independent stream with its own seed"""
    num_checkpoints: int = 1
    """snapshots per run (suffixes 0, 1, ...); the default is a demo's (DQN-Replay: 51, suffixes 0..50)"""
    capacity: int = 100_000
    """transitions per checkpoint = agent steps between snapshots; the default is a demo's (DQN-Replay:
    1,000,000)"""
    policy: str = "random"
    """behavior policy: random (uniform over legal actions), a checkpoint.pt of cql_multigame.py
    (epsilon-greedy), or module:function of a scripted policy, e.g. experiments.behavior:scripted"""
    epsilon: float = 0.01
    """random-action probability of the Q-network policy (ours: DQN's final training epsilon)"""
    seed: int = 0
    """seed of the environments and the policy"""
    sticky_actions: float = 0.25
    """ALE repeat-action probability (DQN-Replay: 0.25)"""
    max_episode_steps: int = 27_000
    """time limit in agent steps; the cut is stored as a terminal (DQN-Replay: 27,000)"""
    num_workers: int = 0
    """processes recording (game, run) pairs in parallel (0: one per pair, up to the CPU count)"""
    overwrite: bool = False
    """replace checkpoints that already exist in --out-dir"""
    resume: bool = False
    """continue an interrupted recording (the same flags): finished (game, run) streams are kept, the others
    are recorded again from their start, which gives the same data"""


def main(args: Args) -> None:
    import signal

    from machinery.flags import ConfigError, check_ranges  # the training scripts' range checker

    got = [signal.SIGINT]

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (a scheduler) stops the recording like Ctrl-C
        got[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        check_ranges(args)
        dirs = record(
            args.out_dir, args.games, args.runs, num_checkpoints=args.num_checkpoints, capacity=args.capacity,
            policy=args.policy, epsilon=args.epsilon, seed=args.seed, sticky_actions=args.sticky_actions,
            max_episode_steps=args.max_episode_steps, num_workers=args.num_workers, overwrite=args.overwrite,
            resume=args.resume,
        )  # fmt: skip
    except (ReplayDataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        import shlex

        own = Path(sys.argv[0]).name == "record.py"
        again = [shlex.quote(a) for a in sys.argv[1:] if a != "--resume"] if own else ["..."]
        command = " ".join(["python record.py", *again, "--resume"])
        print(
            f"\ninterrupted by {signal.Signals(got[0]).name}: recording stopped; complete checkpoints in "
            f"{args.out_dir} stay, partial files were removed; continue it with: {command} (finished "
            "streams are kept, the others recorded again from their start: the same data)",
            file=sys.stderr,
        )
        raise SystemExit(128 + got[0]) from None
    for d in dirs:
        print(f"wrote {d} (checkpoints {list_checkpoints(d)})")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
