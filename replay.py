"""DQN-Replay data as a learner sees it: the format's rules, Dopamine's sampling rules, an equal share of
every game per batch, and the multi-game sampler.

Paper: Kumar et al., "Offline Q-Learning on Diverse Multi-Task Data Both Scales and Generalizes" (ICLR 2023),
Section 5 / Appendix B: one Q-network is trained on the DQN-Replay data of 40 games at once, with an equal
share of every game in each batch; "sub-optimal" data = the first 20% of each run's checkpoints,
"near-optimal" = all of them; fine-tuning on held-out games uses a small fraction of the data.

What is here, in this order
- Dopamine's sampling rules (`is_valid_transition`, `sample_index_batch`, `sample_transition_batch`),
  vectorized: `is_valid`, `valid_mask`, `n_step_targets`, `gather_transitions`, and `FrameBuffer` (a
  single-frame circular buffer; the recorder and online fine-tuning use it).
- Choosing the data set (`select_suffixes`: sub-optimal, near-optimal) and the equal per-game share of a
  batch (`rank_batch_games`).
- `MultiGameReplay`: many games x runs x checkpoints under a memory budget, sampled with an equal share per
  game: its construction, which checkpoints each process reads, Dopamine's rules applied when a checkpoint
  is loaded, `sample`, and its state (exact resume). `MultiGameReplay.dry_run(...).plan_report(...)` plans
  DQN-Replay sizes without any data.

Elsewhere: the files themselves (`write_checkpoint`, `read_checkpoint`, `list_checkpoints`, the gzip
reader) live in machinery/dqn_files.py and the streaming of checkpoints through memory (slots, windows,
background loads) in machinery/streaming.py; this module re-exports the names users call. Making new data
in this format: record.py.

Left out: Dopamine's prioritized replay and extra storage elements (DQN-Replay has none); the paper's TPU
input pipeline. Windows of a checkpoint (when a whole one does not fit the budget) drop the at most
3 + n_step transitions whose frame stack or n-step window wraps around the physical end of the file.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from machinery import dqn_files, streaming
from machinery.dqn_files import (
    DOWNLOAD_HINT,
    DQN_REPLAY_CAPACITY,
    DQN_REPLAY_SUFFIXES,
    EPISODE_ENDS,
    FRAME_BYTES,
    FRAME_SHAPE,
    STACK,
    STORE_PREFIX,
    SUBOPTIMAL_SUFFIXES,
    CheckpointInfo,
    ReplayDataError,
    _check_header,
    _file_path,
    _GzipNpy,
    _scan_suffixes,
    _warn_once,
    read_checkpoint,
    scan_checkpoint,
    write_checkpoint,
)
from machinery.streaming import (
    RELOAD_EVERY,
    WINDOWS_PER_SLOT,
    CheckpointRange,
    StreamingSampler,
    _BackgroundLoad,
    _dist_rank_world,
    _frame_range,
    _split_range,
    tune_malloc,
)

# Names users call from replay whose code lives in machinery/ (the files, the streaming): they resolve here
# through __getattr__ below (replay.write_checkpoint, from replay import read_checkpoint, ...).
MOVED = {
    dqn_files: "ReplayWriteError dopamine_invalid_range list_checkpoints open_no_follow read_episode_ends "
    "read_episode_returns remove_stale_temp_files temp_path write_episode_returns write_file",
    streaming: "_ROW_BYTES",
}


def __getattr__(name: str) -> Any:
    if name == "_temp_path":  # temp_path's earlier name
        return dqn_files.temp_path
    for module, names in MOVED.items():
        if name in names.split():
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Dopamine's rules, vectorized
#
# The invariants, each stated once (Dopamine's; stack size K = 4, update horizon n, capacity C, cursor
# c = add_count % C), with the code that enforces it:
# - Transition i is (frame i, action i, reward i, terminal i): the frame seen, the action taken there (an
#   index into the game's minimal action set), the clipped reward it got, and whether the episode ended
#   with it (game over, or the time-limit cut). Its state is the stack of frames i-3..i (mod C)
#   (gather_transitions; MultiGameReplay's _stacks).
# - Each episode starts with K-1 = 3 padding transitions (zero frame, action 0, reward 0, terminal 0), so a
#   stack at an episode start is [0, 0, 0, first frame]. add_count counts the padding too (FrameBuffer.add).
# - i is valid (is_valid, valid_mask) iff (1) no terminal lies among i-3, i-2, i-1 (the first three frames
#   of its stack); (2) i is not one of the K + n indices c-n, ..., c+K-1 (mod C) around the cursor
#   (dopamine_invalid_range; the newest n lack their n-step window, the next K have stacks that straddle
#   the cursor); (3) if the buffer never wrapped (add_count < C): 3 <= i < c - n; (4) newer Dopamine only
#   (the optional 7th file, episode_end_indices): no episode end without a terminal (a time-out) lies in
#   i..i+n-1. The invalid range is the wider of the reader's n and the writer's horizon
#   (CheckpointInfo.rules).
# - Target (n_step_targets): the n-step reward sum_{j<L} gamma^j r_{i+j} stops at the first terminal in
#   i..i+n-1 (inclusive, L = its offset + 1, else L = n); next state = stack ending at i + L; discount =
#   gamma^n * (1 - terminal) (Dopamine's cumulative_gamma * (1 - is_terminal)).


class Batch(NamedTuple):
    """A batch of transitions, as every sampler here returns it (the target invariant above)."""

    obs: np.ndarray  # uint8 [B, 4, 84, 84], oldest frame first
    action: np.ndarray  # int64 [B], full-action-set id 0..17
    reward: np.ndarray  # float32 [B], n-step discounted reward sum (stops at the first terminal)
    discount: np.ndarray  # float32 [B], gamma**n, or 0 where the episode ended within n steps
    next_obs: np.ndarray  # uint8 [B, 4, 84, 84]
    game: np.ndarray  # int64 [B], index into the sampler's `games`


def is_valid(
    index: np.ndarray,
    terminal: np.ndarray,
    add_count: int,
    n_step: int,
    stack: int = STACK,
    *,
    invalid_horizon: int | None = None,
    episode_ends: np.ndarray | None = None,
) -> np.ndarray:
    """Dopamine's is_valid_transition (rules (1)-(4) above) for an array of indices (bool, same shape);
    terminal uint8 [C].

    invalid_horizon: the update horizon of the invalid range around the cursor (default n_step; pass the
    wider of the reader's and the file's, as CheckpointInfo.rules does). episode_ends: indices of the
    optional 7th file; an index whose n-step window i..i+n-1 holds an episode end without a terminal
    (a time-out) is not valid, as in newer Dopamine.
    """
    capacity = len(terminal)
    index = np.asarray(index, np.int64)
    cursor = add_count % capacity
    horizon = n_step if invalid_horizon is None else max(n_step, invalid_horizon)
    ok = (index >= 0) & (index < capacity)
    if add_count < capacity:  # never wrapped: padding of the first episode, and the n-step window
        ok &= (index >= stack - 1) & (index < cursor - n_step)
    ok &= (index - (cursor - horizon)) % capacity >= stack + horizon  # not in invalid_range
    for k in range(1, stack):  # no terminal in the first stack-1 frames of the stack
        ok &= terminal[(index - k) % capacity] == 0
    if episode_ends is not None and len(episode_ends):
        time_out = np.zeros(capacity, bool)  # episode ends without a terminal signal
        time_out[np.asarray(episode_ends, np.int64) % capacity] = True
        time_out &= terminal == 0
        for j in range(n_step):
            ok &= ~time_out[(index + j) % capacity]
    return ok


def valid_mask(
    terminal: np.ndarray,
    add_count: int,
    n_step: int,
    stack: int = STACK,
    *,
    invalid_horizon: int | None = None,
    episode_ends: np.ndarray | None = None,
) -> np.ndarray:
    """bool [C]: which indices of a circular-buffer snapshot may be sampled (rules (1)-(4) above)."""
    return is_valid(
        np.arange(len(terminal)), terminal, add_count, n_step, stack,
        invalid_horizon=invalid_horizon, episode_ends=episode_ends,
    )  # fmt: skip


def n_step_targets(
    reward: np.ndarray, terminal: np.ndarray, index: np.ndarray, n_step: int, gamma: float, mode: str = "wrap"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dopamine's n-step target (the invariant above) for transitions `index` [B] of one store
    (reward/terminal [F]): (return float32 [B], length L int64 [B] = offset of the next state, discount
    float32 [B]). mode: np.take's "wrap" for a circular buffer, "clip" for an unrolled one (rows whose
    window runs off the end are then never sampled)."""
    window = np.asarray(index, np.int64)[:, None] + np.arange(n_step)  # [B, n]
    term = np.take(terminal, window, mode=mode) != 0  # [B, n]
    rew = np.take(reward, window, mode=mode)  # [B, n] float32
    counted = np.cumsum(term, axis=1) - term == 0  # [B, n]: no terminal strictly before step j
    powers = (gamma ** np.arange(n_step)).astype(np.float32)  # [n]
    ret = (rew * counted * powers).sum(axis=1, dtype=np.float32)  # [B]
    done = term.any(axis=1)  # [B]
    length = np.where(done, term.argmax(axis=1) + 1, n_step)  # [B]
    discount = np.where(done, 0.0, gamma**n_step).astype(np.float32)
    return ret, length, discount


def gather_transitions(
    frames: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    index: np.ndarray,
    n_step: int,
    gamma: float,
    game: np.ndarray | int = 0,
    action_map: np.ndarray | None = None,
) -> Batch:
    """Build a Batch for valid indices [B] of a store; indices wrap modulo len(frames) (circular buffer).

    frames uint8 [F, 84, 84]; action/reward/terminal [F]. Stacks are gathered with np.take straight into
    the output arrays (no Python loop over the batch). action_map maps stored actions to full-set ids.
    """
    index = np.asarray(index, np.int64)  # [B]
    batch_size = len(index)
    offsets = np.arange(1 - STACK, 1)  # [4]: oldest frame first
    ret, length, discount = n_step_targets(reward, terminal, index, n_step, gamma)
    obs = np.empty((batch_size, STACK, *frames.shape[1:]), np.uint8)  # [B, 4, 84, 84]
    np.take(frames, index[:, None] + offsets, axis=0, out=obs, mode="wrap")
    next_obs = np.empty_like(obs)
    np.take(frames, (index + length)[:, None] + offsets, axis=0, out=next_obs, mode="wrap")
    act = np.take(action, index, mode="wrap").astype(np.int64)
    if action_map is not None:
        act = action_map[act]
    games = np.broadcast_to(np.asarray(game, np.int64), (batch_size,)).copy()
    return Batch(obs, act, ret, discount, next_obs, games)


# ----------------------------------------------------------------------------------------------------------
# FrameBuffer: Dopamine's circular buffer (the recorder and online fine-tuning)


class FrameBuffer:
    """Dopamine's single-frame circular replay buffer (OutOfGraphReplayBuffer) with vectorized sampling.

    add(frame, action, reward, terminal) stores one transition, first adding the 3 padding transitions of
    an episode start (the invariant above) when the buffer is empty or the last one ended an episode. One
    buffer holds ONE stream of episodes: with several environments, keep one FrameBuffer per environment.
    The recorder saves snapshots of it (`save`) and online fine-tuning samples it. Sampling draws uniformly
    over valid indices (rejection from Dopamine's index range, vectorized).
    """

    def __init__(
        self,
        capacity: int,
        *,
        n_step: int = 3,
        gamma: float = 0.99,
        action_map: Sequence[int] | np.ndarray | None = None,
        game: int = 0,
    ):
        if capacity < STACK + n_step:
            raise ValueError(f"FrameBuffer capacity {capacity} is below stack + n_step; use a larger one.")
        tune_malloc()
        self.capacity, self.n_step, self.gamma, self.game = capacity, n_step, gamma, game
        self.action_map = None if action_map is None else np.asarray(action_map, np.int64)
        self.frames = np.zeros((capacity, *FRAME_SHAPE), np.uint8)  # [C, 84, 84]
        self.action = np.zeros(capacity, np.int32)
        self.reward = np.zeros(capacity, np.float32)
        self.terminal = np.zeros(capacity, np.uint8)
        self.add_count = 0
        # set by from_checkpoint when the file says so (Dopamine's rules; see CheckpointInfo.rules)
        self.invalid_horizon: int | None = None
        self.episode_ends: np.ndarray | None = None  # bool [C] where an episode ended (7th file)

    @property
    def cursor(self) -> int:
        return self.add_count % self.capacity

    def __len__(self) -> int:
        return min(self.add_count, self.capacity)

    def _put(self, frame: np.ndarray | None, action: int, reward: float, terminal: bool) -> None:
        c = self.cursor
        if frame is None:
            self.frames[c] = 0
        else:
            self.frames[c] = frame
        self.action[c], self.reward[c], self.terminal[c] = action, reward, terminal
        if self.episode_ends is not None:  # Dopamine discards the overwritten row's end flag
            self.episode_ends[c] = False
        self.add_count += 1

    def add(self, frame: np.ndarray, action: int, reward: float, terminal: bool) -> None:
        """frame uint8 [84, 84] (the newest frame of the state), the action taken, its reward, and whether
        the episode ended with this step (game over or time-limit cut)."""
        if self.add_count == 0 or self.terminal[self.cursor - 1]:
            for _ in range(STACK - 1):
                self._put(None, 0, 0.0, False)
        self._put(frame, action, reward, terminal)

    def _rules(self) -> dict[str, Any]:
        ends = None if self.episode_ends is None else np.flatnonzero(self.episode_ends)
        return {"invalid_horizon": self.invalid_horizon, "episode_ends": ends}

    def is_valid(self, index: np.ndarray) -> np.ndarray:
        return is_valid(index, self.terminal, self.add_count, self.n_step, **self._rules())

    def valid_indices(self) -> np.ndarray:
        """int64 [V]: every index that may be sampled now."""
        if self.add_count == 0:
            return np.zeros(0, np.int64)
        return np.flatnonzero(valid_mask(self.terminal, self.add_count, self.n_step, **self._rules()))

    def sample_indices(
        self, batch_size: int, rng: np.random.Generator, max_attempts: int = 1000
    ) -> np.ndarray:
        c = self.cursor
        lo = c - self.capacity + STACK - 1 if self.add_count >= self.capacity else STACK - 1
        hi = c - self.n_step
        if hi <= lo:
            raise ValueError(
                f"FrameBuffer holds {self.add_count} transitions; sampling needs more than "
                f"{STACK + self.n_step}, add more before sampling."
            )
        out = np.empty(batch_size, np.int64)
        todo = np.arange(batch_size)
        for _ in range(max_attempts):
            cand = rng.integers(lo, hi, size=len(todo)) % self.capacity
            ok = self.is_valid(cand)
            out[todo[ok]] = cand[ok]
            todo = todo[~ok]
            if len(todo) == 0:
                return out
        raise RuntimeError(f"FrameBuffer: no valid transition found in {max_attempts} attempts.")

    def gather(self, index: np.ndarray) -> Batch:
        return gather_transitions(
            self.frames, self.action, self.reward, self.terminal, index, self.n_step, self.gamma,
            self.game, self.action_map,
        )  # fmt: skip

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """A Batch of `batch_size` transitions drawn uniformly over the valid indices."""
        return self.gather(self.sample_indices(batch_size, rng))

    def save(self, directory: str | Path, suffix: int, **kwargs: Any) -> None:
        """Write the buffer as DQN-Replay checkpoint `suffix` (invalid_range for update_horizon 1)."""
        write_checkpoint(
            directory, suffix, self.frames, self.action, self.reward, self.terminal, self.add_count, **kwargs
        )

    @classmethod
    def from_checkpoint(cls, directory: str | Path, suffix: int, **kwargs: Any) -> FrameBuffer:
        data = read_checkpoint(directory, suffix)
        buf = cls(len(data["observation"]), **kwargs)
        buf.frames, buf.action, buf.reward = data["observation"], data["action"], data["reward"]
        buf.terminal, buf.add_count = data["terminal"], int(data["add_count"])
        buf.invalid_horizon = len(data["invalid_range"]) - STACK
        if EPISODE_ENDS in data:
            buf.episode_ends = np.zeros(buf.capacity, bool)
            buf.episode_ends[data[EPISODE_ENDS]] = True
        return buf


# ----------------------------------------------------------------------------------------------------------
# Choosing the data set, and the multi-game sampler


def select_suffixes(available: Sequence[int], checkpoints: str | Sequence[int], where: str = "") -> list[int]:
    """Which checkpoint suffixes of one run make the data set.

    "suboptimal": suffixes 0..9 by number (SUBOPTIMAL_SUFFIXES: the first 20% of DQN-Replay's 51 checkpoints
    0..50, as in the paper), not a share of whatever is downloaded; of a partial download it takes those of
    0..9 that are there and warns which are missing, and stops with one sentence if none are.
    "nearoptimal": all; or an explicit list of suffixes (or a string "0,1,5").
    """
    available = sorted(available)
    if isinstance(checkpoints, str) and checkpoints not in ("suboptimal", "nearoptimal"):
        try:
            checkpoints = [int(s) for s in checkpoints.split(",") if s.strip()]
        except ValueError:
            raise ReplayDataError(
                f"checkpoints {checkpoints!r} is not suboptimal, nearoptimal or suffixes like 0,1,2."
            ) from None
    if checkpoints == "suboptimal":
        chosen = [s for s in SUBOPTIMAL_SUFFIXES if s in set(available)]
        if not chosen:
            raise ReplayDataError(
                f"{where or 'this run'} holds none of the sub-optimal checkpoints 0..9 (found {available}); "
                "download suffixes 0..9 of the run or pick --checkpoints by number."
            )
        missing = [s for s in SUBOPTIMAL_SUFFIXES if s not in set(available)]
        if missing:
            _warn_once(
                f"{where or 'this run'} lacks sub-optimal checkpoints {missing} (of 0..9); using {chosen}."
            )
        return chosen
    if checkpoints == "nearoptimal":
        return available
    chosen = sorted({int(s) for s in checkpoints})
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ReplayDataError(
            f"checkpoint suffixes {missing} are not in {where} (found {available}); pick from those."
        )
    return chosen


def rank_batch_games(
    global_batch: int, num_games: int, call: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """The game of each row of `rank`'s part of the `call`-th global batch: int64 [B // world_size].

    The global batch (all ranks together) holds global_batch // G rows of every game, and one more row of
    global_batch % G games that rotate from call to call (512 over 40 games: 12 or 13 each, 12.8 on
    average), sorted by game. Each of the world_size ranks takes one block of global_batch // world_size
    consecutive rows, so a rank samples only a subset of the games at each call and the global batch still
    has the equal per-game share however many ranks there are (40 games at batch 512 run on 64 replicas:
    8 rows, 1-2 games each). Which block a rank takes moves on by one after every full turn of the extras
    (P = G / gcd(extra, G) calls): over P * world_size calls every rank has drawn every game equally often,
    so the disjoint shares of each game's data that the ranks hold are sampled at the same rate. With one
    rank this is the whole global batch (the 1-process layout).
    """
    G = num_games
    start, block = _extra_start_and_block(global_batch, G, call, rank, world_size)
    counts = np.full(G, global_batch // G, np.int64)
    counts[(start + np.arange(global_batch % G)) % G] += 1
    game = np.repeat(np.arange(G), counts)  # [global_batch], sorted by game
    b = global_batch // world_size
    return game[block * b : (block + 1) * b]


def _extra_start_and_block(
    global_batch: int, num_games: int, call: int, rank: int, world_size: int
) -> tuple[int, int]:
    """(where the extra rows start, which block of the global batch this rank takes) at `call`."""
    extra = global_batch % num_games
    period = num_games // math.gcd(extra, num_games)  # calls per full turn of the extras (1 if none)
    return call * extra % num_games, (rank + call // period) % world_size


# The sampler state's earlier key names (checkpoints written before they took the attributes' names) -> now.
OLD_STATE_KEYS = {"calls": "sample_calls", "phase": "period", "next_event": "next_swap"}


class MultiGameReplay(StreamingSampler):
    """Samples DQN-Replay transitions of several games, an equal share of each game per batch.

    Data: `<data_dir>/<Game>/<run>/replay_logs/`, the checkpoints chosen by `checkpoints` (see
    select_suffixes) of each run in `runs`; `fraction` keeps the first fraction (file order) of each
    selected checkpoint's stored transitions (for fine-tuning with little data).

    Distributed: rank r of world_size (default: torch.distributed if initialized) takes every world_size-th
    checkpoint of each game, or, if a game has fewer checkpoints than ranks, every world_size-th of equal
    windows of them, so ranks see disjoint data.

    Memory (per process): all of this rank's data stays resident if it fits in memory_budget_gb. Otherwise
    every game gets a slot of budget / (G + 1) bytes and there is one spare slot of the same size. A slot
    holds a set of CheckpointRanges from up to `windows_per_slot` different checkpoints (or runs): whole
    checkpoints where 1/windows_per_slot of a slot holds one, else windows of them, so that a batch mixes
    several checkpoints (batch_rl's FixedReplayBuffer mixes 5); every range is in exactly one set, so a pass
    over a game's sets covers all its selected data. A background thread loads the next set of one game
    into the spare slot, and every reload_every // G_rotating sample() calls the next rotating game swaps in
    its new set (round-robin), so each game's set changes every reload_every calls and the overhead is 1/G
    of the budget. reload_every=0 (auto) picks the longest period up to 50,000 at which every game visits
    all its sets within total_samples calls. dry_run() and plan_report() show the plan for DQN-Replay sizes.
    Swaps happen at fixed sample counts (if the thread is late, the learner waits and stats() counts it).
    A checkpoint found corrupt by the thread is reported (warning), excluded and replaced by the next set
    of that game; errors at start-up stop the run.

    Sampling: batch_size // G transitions per game, the batch_size % G extra ones to games in rotating
    order (with world_size > 1, of the global batch: each rank draws a rotating block of it, see
    rank_batch_games); within a game, uniform over the valid transitions of its loaded set (Dopamine's
    rules). Static shapes. Each row's n-step return, discount and next-state offset are worked out when
    its checkpoint is loaded (n_step_targets), so sample() only gathers: obs and next_obs as one 4-frame
    block per state.
    """

    def __init__(
        self,
        data_dir: str | Path,
        games: Sequence[str],
        *,
        runs: Sequence[int] = (1,),  # run 1: "suboptimal" is then the paper's amount (as cql_multigame.Args)
        checkpoints: str | Sequence[int] = "suboptimal",
        fraction: float = 1.0,
        n_step: int = 3,
        gamma: float = 0.99,
        memory_budget_gb: float = 32.0,  # per process
        reload_every: int = RELOAD_EVERY,  # sample() calls between two sets of the same game (0: auto)
        windows_per_slot: int = WINDOWS_PER_SLOT,  # batch_rl's FixedReplayBuffer mixes 5 checkpoints
        total_samples: int | None = None,  # sample() calls the run will make (for reload_every=0)
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self._configure(
            data_dir, games, runs, checkpoints, fraction, n_step, gamma, memory_budget_gb, reload_every,
            windows_per_slot, total_samples, seed, rank, world_size,
        )  # fmt: skip
        self._ranges = self._plan_ranges()  # per game: this rank's CheckpointRanges (checkpoints or windows)
        self._plan_memory()
        self._sample_calls = 0
        # _batch_layout()'s layouts, one per rotation step
        self._layout_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._rng = np.random.default_rng(seed)
        self._period = [0] * len(self.games)  # per game: its swaps so far = the set it holds (_set_in_period)
        self._loaded: list[list[CheckpointRange]] = [[] for _ in self.games]
        for g in range(len(self.games)):  # start-up: errors stop the run
            self._load_into_slot(self._game_slot[g], self._set_in_period(g, 0))
            self._loaded[g] = self._set_in_period(g, 0)
        self._next_swap = 1  # the next swap's number k (it happens at sample call k * _swap_interval)
        self._start_next_load()

    @classmethod
    def dry_run(
        cls,
        games: Sequence[str],
        *,
        runs: Sequence[int] = (1,),
        checkpoints: str | Sequence[int] = "suboptimal",
        fraction: float = 1.0,
        n_step: int = 3,
        memory_budget_gb: float = 32.0,
        reload_every: int = RELOAD_EVERY,
        windows_per_slot: int = WINDOWS_PER_SLOT,
        total_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> MultiGameReplay:
        """The plan the sampler would make for DQN-Replay-sized data that need not exist (51 checkpoints
        0..50 of 1M transitions per run; checkpoint 0 saved at add_count = 1M - 1, the others full): the same
        slots, windows, sets and swap schedule, without reading a file or allocating the arena. For
        plan_report() and plan_summary() only; it cannot sample."""
        self = cls.__new__(cls)
        self._configure(
            "<dqn-replay>", games, runs, checkpoints, fraction, n_step, 0.99, memory_budget_gb, reload_every,
            windows_per_slot, total_samples, seed, rank, world_size,
        )  # fmt: skip
        self._ranges = self._plan_ranges(dqn_replay_sizes=True)
        self._plan_memory(allocate=False)
        return self

    def _configure(
        self, data_dir, games, runs, checkpoints, fraction, n_step, gamma, memory_budget_gb, reload_every,
        windows_per_slot, total_samples, seed, rank, world_size,
    ) -> None:  # fmt: skip
        """Argument checks and the attributes every sampler has (also a dry run)."""
        import atari  # lazy: only the sampler needs the action sets

        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); pass a matching pair.")
        if not 0.0 < fraction <= 1.0:
            raise ReplayDataError(f"fraction {fraction} must be in (0, 1].")
        if n_step < 1 or not 0.0 <= gamma <= 1.0:
            raise ReplayDataError(f"n_step {n_step} must be >= 1 and gamma {gamma} in [0, 1].")
        if n_step > 255:
            raise ReplayDataError(
                f"n_step {n_step} is above 255, the largest next-state offset the sampler stores per row "
                "(uint8); use n_step <= 255."
            )
        if reload_every < 0 or memory_budget_gb <= 0 or windows_per_slot < 1:
            raise ReplayDataError(
                "reload_every must be >= 0 (0: auto), windows_per_slot >= 1 and memory_budget_gb > 0."
            )
        if reload_every == 0 and not total_samples:
            raise ReplayDataError("reload_every 0 (auto) needs total_samples, the run's sample() calls.")
        if len(games) == 0 or len(set(games)) != len(games):
            raise ReplayDataError(f"games {list(games)} must be a non-empty list without repeats.")
        tune_malloc()  # batches reuse freed heap memory instead of fresh pages (see tune_malloc)
        self.data_dir = Path(data_dir)
        try:
            self.games = [atari.check_game(g) for g in games]
        except ValueError as e:
            raise ReplayDataError(str(e)) from None
        self.runs, self.checkpoints, self.fraction = tuple(int(r) for r in runs), checkpoints, fraction
        self.n_step, self.gamma, self.seed = n_step, gamma, seed
        self.rank, self.world_size, self.reload_every = rank, world_size, reload_every
        self.windows_per_slot, self.total_samples = windows_per_slot, total_samples
        self.budget_bytes = int(memory_budget_gb * 2**30)
        self._action_map = [np.asarray(atari.legal_actions(g), np.int64) for g in self.games]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._job: _BackgroundLoad | None = None
        self._infos: dict[tuple[int, int, int], CheckpointInfo] = {}
        self._excluded: set[tuple[int, int, int]] = set()
        self._readmitted: list[tuple[int, int, int]] = []  # excluded before a resume, readable again
        self._warned_terminal = False
        # _group_into_sets()'s sets per (game, excluded checkpoints)
        self._sets_cache: dict[tuple[int, frozenset], list[list[CheckpointRange]]] = {}
        self._stats = {"reloads": 0, "reload_waits": 0, "reload_wait_s": 0.0, "excluded_checkpoints": 0}

    def sample(self, batch_size: int) -> Batch:
        """batch_size transitions: this rank's rows of a global batch of batch_size x world_size that holds
        an equal share of every game plus rotating extras (rank_batch_games)."""
        G = len(self.games)
        if batch_size * self.world_size < G:
            raise ValueError(
                f"batch_size {batch_size} x {self.world_size} rank(s) is smaller than the {G} games; every "
                f"global batch needs each game, use at least {math.ceil(G / self.world_size)} per rank."
            )
        if self._rotating and self._sample_calls == self._next_swap * self._swap_interval:
            self._swap()
        game, num_valid, valid_start = self._batch_layout(batch_size)  # [B] each
        # [B] uniform within each game: floor(u * n), not Generator.integers with per-row bounds (faster; see
        # docs/performance.md); the minimum catches the one-in-2**53 draw that rounds up to n.
        choice = np.minimum((self._rng.random(batch_size) * num_valid).astype(np.int64), num_valid - 1)
        pos = self._valid_rows[valid_start + choice]  # [B] arena rows; stacks and n-step windows are loaded
        self._sample_calls += 1
        oldest = pos - (STACK - 1)  # [B] row of each state's oldest frame
        return Batch(
            obs=self._stacks[oldest],  # [B, 4, 84, 84]
            action=self._action[pos].astype(np.int64),
            reward=self._return[pos],
            discount=self._discount[pos],
            next_obs=self._stacks[oldest + self._next_offset[pos]],
            game=game.copy(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state (cheap; fine to take after every batch): with load_state_dict, the next
        batches after a restart equal those of an uninterrupted run."""
        with self._lock:
            excluded = sorted(list(k) for k in self._excluded)
        return {
            "games": list(self.games),
            "rank": self.rank,
            "world_size": self.world_size,
            "sample_calls": self._sample_calls,
            "rng": self._rng.bit_generator.state,
            "period": list(self._period),
            "next_swap": self._next_swap,
            "reload_every": self.reload_every,  # resolved (auto depends on total_samples)
            "loaded": [[p.to_list() for p in ps] for ps in self._loaded],
            "excluded": excluded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["games"]) != self.games or (state["rank"], state["world_size"]) != (
            self.rank,
            self.world_size,
        ):
            raise ReplayDataError(
                "replay state is from other games or another rank/world size; resume with the same settings."
            )
        self._cancel_load()
        with self._lock:
            self._excluded = self._recheck_excluded({tuple(k) for k in state["excluded"]})
            self._stats["excluded_checkpoints"] = len(self._excluded)
        for g, ps in enumerate(state["loaded"]):
            ranges = [CheckpointRange(*p) for p in ps]
            if any(p.key() not in self._infos for p in ranges):
                raise ReplayDataError(
                    "replay state names checkpoints outside this selection; resume with the same one."
                )
            if ranges != self._loaded[g]:
                self._load_into_slot(self._game_slot[g], ranges)
                self._loaded[g] = ranges
        self._layout_cache.clear()
        state = {
            OLD_STATE_KEYS.get(k, k): v for k, v in state.items()
        }  # also a state saved before the rename
        self._sample_calls, self._period = int(state["sample_calls"]), [int(x) for x in state["period"]]
        self._next_swap = int(state["next_swap"])
        if "reload_every" in state and self._rotating:  # keep the swap schedule the run started with
            self.reload_every = int(state["reload_every"])  # (an auto period changes with --total-steps)
            self._swap_interval = max(1, self.reload_every // len(self._rotating))
        self._rng.bit_generator.state = state["rng"]
        self._start_next_load()

    # --- streaming: planning slots, windows and sets --------------------------------------------------------

    def _plan_ranges(self, dqn_replay_sizes: bool = False) -> list[list[CheckpointRange]]:
        """Per game: this rank's share of the selected checkpoints (whole, or disjoint windows of them when
        there are fewer checkpoints than ranks); scans every checkpoint (or takes DQN-Replay's sizes)."""
        d = self.data_dir
        hint = DOWNLOAD_HINT.format(d=d)
        if not dqn_replay_sizes and d.exists() and not d.is_dir():
            raise ReplayDataError(f"data dir {d} is a file, not a folder: pass the folder of <Game>/<run>/.")
        if not dqn_replay_sizes and not d.is_dir():
            raise ReplayDataError(f"data dir {d} does not exist: {hint}.")
        if not dqn_replay_sizes and not any(p.is_dir() for p in d.iterdir()):
            raise ReplayDataError(f"data dir {d} is empty: {hint}.")
        ranges: list[list[CheckpointRange]] = []
        for g, game in enumerate(self.games):
            game_dir = d / game
            if not dqn_replay_sizes and not game_dir.is_dir():
                have = sorted(p.name for p in d.iterdir() if p.is_dir())
                raise ReplayDataError(
                    f"no data for game {game} in {d} (it has {', '.join(have)}): "
                    + DOWNLOAD_HINT.format(d=d).replace("<Game>", game)
                    + "."
                )
            units: list[tuple[CheckpointInfo, int, int, int]] = []  # (info, run, lo, hi)
            for run in self.runs:
                logs = game_dir / str(run) / "replay_logs"
                C = DQN_REPLAY_CAPACITY
                sizes = {s: (C, C * (s + 1) - 1) for s in DQN_REPLAY_SUFFIXES}  # (capacity, add_count)
                found = sizes if dqn_replay_sizes else _scan_suffixes(logs)
                if not found:
                    have = sorted(p.name for p in game_dir.iterdir() if (p / "replay_logs").is_dir())
                    raise ReplayDataError(
                        f"no checkpoints in {logs} (runs found for {game}: {', '.join(have) or 'none'}): "
                        f"pass runs that exist, or {hint.replace('<Game>', game)}."
                    )
                for suffix in select_suffixes(sorted(found), self.checkpoints, str(logs)):
                    if dqn_replay_sizes:
                        info = CheckpointInfo(str(logs), suffix, *sizes[suffix])
                    else:
                        info = scan_checkpoint(logs, suffix)
                    if info.capacity < STACK + self.n_step + 1:
                        raise ReplayDataError(
                            f"checkpoint {suffix} in {logs} holds {info.capacity} rows, too few for stacks of"
                            f" {STACK} and n_step {self.n_step}; leave it out of the selection."
                        )
                    self._infos[(g, run, suffix)] = info
                    hi = max(1, round(self.fraction * info.num_stored))
                    units.append((info, run, 0, hi))
            if len(units) < self.world_size:  # fewer checkpoints than ranks: disjoint windows of them
                k = math.ceil(self.world_size / len(units))
                units = [(i, r, a, b) for (i, r, lo, hi) in units for a, b in _split_range(lo, hi, k)]
            mine = [
                CheckpointRange(g, r, i.suffix, lo, hi)
                for (i, r, lo, hi) in units[self.rank :: self.world_size]
            ]
            if not mine:
                raise ReplayDataError(
                    f"{game} has too little data to give each of {self.world_size} ranks a share; "
                    "use fewer processes or more checkpoints."
                )
            ranges.append(mine)
        return ranges

    # --- streaming: loading at start-up and in the background -----------------------------------------------

    def _load_range(self, p: CheckpointRange, at: int) -> tuple[int, np.ndarray]:
        """Load range p into arena rows starting at `at`; returns (rows used, arena positions of its valid
        transitions)."""
        info = self._infos[p.key()]
        d, s, C = Path(info.directory), info.suffix, info.capacity
        frame_lo, frame_hi = _frame_range(info, p.lo, p.hi, self.n_step)
        small = {}
        for name in ("action", "reward", "terminal"):
            with _GzipNpy(_file_path(d, STORE_PREFIX + name, s), self._stop) as f:
                _check_header(f, name, C)
                small[name] = f.read_all()
        if info.add_count < C:  # rows never written (Dopamine stores with np.empty: any value) read as zeros
            for name in ("action", "reward", "terminal"):
                small[name][info.add_count :] = 0
        mask = valid_mask(small["terminal"], info.add_count, self.n_step, **info.rules(self.n_step))  # [C]
        index = np.arange(p.lo, p.hi)
        ok = mask[index]
        # Per-row checks look only at rows Dopamine's rules can touch: the action of a valid index.
        legal = len(self._action_map[p.game])
        bad = np.flatnonzero(mask & ((small["action"] < 0) | (small["action"] >= legal)))
        if len(bad):
            raise ReplayDataError(
                f"{_file_path(d, STORE_PREFIX + 'action', s)} holds actions outside {self.games[p.game]}'s "
                f"{legal} legal actions ({int(small['action'][bad[0]])} at index {int(bad[0])}): is this "
                "another game's data?"
            )
        self._check_reward_terminal(small["reward"], small["terminal"], d, s)
        frames = self._frames_arena[at : at + frame_hi - frame_lo]  # [frame_hi - frame_lo, 84, 84]
        read_lo, read_hi = max(frame_lo, 0), min(frame_hi, C)  # rows read from the file
        with _GzipNpy(_file_path(d, STORE_PREFIX + "observation", s), self._stop) as f:
            _check_header(f, "observation", C)
            f.skip(read_lo * FRAME_BYTES)
            f.readinto(frames[read_lo - frame_lo : read_hi - frame_lo])
            if read_hi == C:
                f.finish()
        if frame_lo < 0:  # circular: the last frames precede index 0, the first ones follow index C-1
            frames[:-frame_lo] = frames[C : C - frame_lo]
            frames[C - frame_lo :] = frames[-frame_lo : -frame_lo + frame_hi - C]
        file_rows = np.arange(frame_lo, frame_hi) % C  # [frame_hi - frame_lo] the file row of each frame
        rows = slice(at, at + frame_hi - frame_lo)
        act = small["action"][file_rows]
        # rows no rule reads (never valid) may hold any action; they map to NOOP instead of raising
        act = np.where((act >= 0) & (act < legal), act, 0)
        self._action[rows] = self._action_map[p.game][act]
        # Rows whose n-step window runs past frame_hi are not valid (below): their clipped values go unused.
        ret, length, discount = n_step_targets(
            small["reward"][file_rows], small["terminal"][file_rows], np.arange(frame_hi - frame_lo),
            self.n_step, self.gamma, mode="clip",
        )  # fmt: skip
        self._return[rows], self._discount[rows], self._next_offset[rows] = ret, discount, length
        ok &= (index - (STACK - 1) >= frame_lo) & (index + self.n_step < frame_hi)  # stack, window loaded
        return frame_hi - frame_lo, at + (index[ok] - frame_lo)

    def _batch_layout(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For this call: each row's game [B] (this rank's rows of the global batch, see rank_batch_games),
        and its game's number of valid transitions and first row in _valid_rows. Cached per rotation step (at
        most G x world_size of them) until a swap or a resume changes the slots."""
        G, W = len(self.games), self.world_size
        key = (batch_size, *_extra_start_and_block(batch_size * W, G, self._sample_calls, self.rank, W))
        if key not in self._layout_cache:
            game = rank_batch_games(batch_size * W, G, self._sample_calls, self.rank, W)  # [B]
            slot = np.asarray(self._game_slot)[game]  # [B]
            self._layout_cache[key] = (game, self._slot_num_valid[slot], self._slot_start[slot])
        return self._layout_cache[key]
