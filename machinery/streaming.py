"""The streaming machinery of replay.MultiGameReplay: slots, windows, sets, background loads, malloc tuning.

When the selected data does not fit the memory budget, every game gets a slot of budget / (G + 1) bytes
and there is one spare slot; each game's data is cut into windows and grouped into sets of one slot; a
background thread loads the next set of one game into the spare slot and, at fixed sample counts, the
game swaps it in (round-robin). `plan_report` says what this does over a run on DQN-Replay's sizes.

Machinery: `StreamingSampler` is the base class of replay.MultiGameReplay, which holds the face a reader
needs (construction, which checkpoints, Dopamine's rules at load time, `sample`, the state). A reader of
the paper may skip this file. It calls back into the sampler for one thing: `_load_range` (the rules).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from machinery.dqn_files import (
    FRAME_BYTES,
    FRAME_SHAPE,
    STACK,
    STORE_PREFIX,
    CheckpointInfo,
    ReplayDataError,
    _file_path,
)

# Resident bytes per loaded transition in MultiGameReplay: frame + action (uint8 full-set id) + the n-step
# target worked out at load time (return float32, discount float32, next-state offset uint8) + one int32
# slot of the valid-index table (int64 past 2**31 rows).
_ROW_BYTES = FRAME_BYTES + 1 + 4 + 4 + 1 + 4
RELOAD_EVERY = 50_000  # sample() calls between two sets of the same game (the cap of reload_every=0)
WINDOWS_PER_SLOT = 5  # windows of different checkpoints per slot (batch_rl's FixedReplayBuffer mixes 5)


@dataclasses.dataclass(frozen=True)
class CheckpointRange:
    """A contiguous range [lo, hi) of one checkpoint's transition indices (file order), loaded as one unit:
    a whole checkpoint (its first `fraction`), or a window of one. The sampler state saves it as to_list()."""

    game: int
    run: int
    suffix: int
    lo: int
    hi: int

    def key(self) -> tuple[int, int, int]:
        """(game, run, suffix): which checkpoint the range is of."""
        return (self.game, self.run, self.suffix)

    def to_list(self) -> list[int]:
        return [self.game, self.run, self.suffix, self.lo, self.hi]


def _frame_range(info: CheckpointInfo, lo: int, hi: int, n_step: int) -> tuple[int, int]:
    """Frames [frame_lo, frame_hi) that transitions [lo, hi) need: the 3 before lo (the first stack) and the
    n_step after hi (the last n-step window). Indices may run past the file's ends (circular wrap)."""
    full = info.add_count >= info.capacity
    if full and lo == 0 and hi == info.capacity:  # a whole circular buffer: pad with its wrapped frames
        return 1 - STACK, info.capacity + n_step
    return max(0, lo - (STACK - 1)), min(info.num_stored, hi + n_step)


def _split_range(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into `parts` near-equal, non-empty ranges."""
    edges = np.linspace(lo, hi, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


class _BackgroundLoad:
    """A background load (daemon thread) whose result the learner collects at a fixed sample count."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # handed to the learner at the swap
            self.error = e
        finally:
            self.done.set()


# plan_report's checkpoint load speed (gzip inflate + parse): measured by benchmarks/bench_replay.py on this
# project's CPU (docs/performance.md)
INFLATE_BYTES_PER_S = 1.439e9


_MALLOC_TUNED = False


# Why: a batch of frames (0.9 MB at batch 32, 14 MB at 512) is above glibc's mmap threshold, so each sample()
# would map fresh pages and fault on every 4 KB, which costs more than the copy (docs/performance.md).
def tune_malloc() -> None:
    """Let glibc keep the memory of freed batches instead of handing it back to the OS after every batch:
    the mmap threshold goes to glibc's 32 MB maximum and the trim threshold to 256 MB, so freed batches stay
    reusable heap memory. Process-wide; it changes no result; a no-op without glibc (macOS, Windows, musl).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when a process group is up, else (0, 1)."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingSampler:
    """The slots, windows, sets and background loads of replay.MultiGameReplay (its base class). The
    subclass sets the attributes (replay.MultiGameReplay._configure) and implements `_load_range`."""

    def plan_report(self, batch_size: int, total_samples: int) -> str:
        """What the streaming does over a run of total_samples sample() calls of batch_size (this rank's):
        slots, windows per slot, reload period, the fraction of the selected data that is ever loaded,
        distinct checkpoints per batch (expected, uniform draws within each game's slot) and the gzip work
        per swap. Works on a dry_run() sampler: python cql_multigame.py paper-suboptimal --plan-only."""
        G = len(self.games)
        per_game = batch_size / G  # samples of each game per batch (on average)
        rows = lambda ps: sum(p.hi - p.lo for p in ps)  # noqa: E731
        total_rows = [rows(ps) for ps in self._ranges]
        ckpts = [len({p.key() for p in ps}) for ps in self._ranges]
        swaps = self._swaps_per_game(total_samples)
        seen_frac, distinct, inflated = [], [], []  # per game; inflated: bytes per swap, per set
        for g in range(G):
            seen: set[CheckpointRange] = set()
            distinct_sum = 0.0
            for period in range(swaps[g] + 1):
                ranges = self._set_in_period(g, period)
                seen.update(ranges)
                weight: dict[tuple[int, int, int], int] = {}
                for p in ranges:
                    weight[p.key()] = weight.get(p.key(), 0) + p.hi - p.lo
                n = sum(weight.values())
                distinct_sum += sum(1 - (1 - w / n) ** per_game for w in weight.values())
            seen_frac.append(rows(seen) / total_rows[g])
            distinct.append(distinct_sum / (swaps[g] + 1))
            for ranges in self._sets[g] if g in self._rotating else []:
                # gzip inflates each observation file up to the window's end, and the whole small files
                work = 0
                for p in ranges:
                    info = self._infos[p.key()]
                    end = min(_frame_range(info, p.lo, p.hi, self.n_step)[1], info.capacity)
                    work += end * FRAME_BYTES + 9 * info.capacity
                inflated.append(work)
        slot_gib = self._slot_frames * _ROW_BYTES / 2**30
        windows = sorted(set(self._windows_in_slot))

        def span(xs: list[int]) -> str:
            return f"{min(xs):,}" if min(xs) == max(xs) else f"{min(xs):,}-{max(xs):,}"

        lines = [
            f"plan: {G} games x runs {list(self.runs)} x checkpoints {self.checkpoints!r}, fraction "
            f"{self.fraction}, n_step {self.n_step}; rank {self.rank} of {self.world_size}, "
            f"{self.budget_bytes / 2**30:g} GiB, {total_samples:,} steps of {batch_size} samples",
            f"  data: {span(ckpts)} checkpoints, {span(total_rows)} transitions per game "
            f"({sum(total_rows):,} in all)",
        ]
        if not self._rotating:
            lines.append(f"  slots: {G}, all data resident (static), no reloads")
        else:
            sets = [len(self._sets[g]) for g in self._rotating]
            swap_s = np.mean(inflated) / INFLATE_BYTES_PER_S
            lines += [
                f"  slots: {G + 1} of {self._slot_frames:,} frames ({slot_gib:.2f} GiB): one per game, one "
                "spare for the background loader",
                f"  windows per slot: {'/'.join(map(str, windows))}, each from a different checkpoint, up to "
                f"{self._slot_frames // max(windows):,} frames; {span(sets)} sets per game",
                f"  reload period: each game swaps every {self._swap_interval * len(self._rotating):,} steps "
                f"(one swap every {self._swap_interval:,} steps), {span([swaps[g] for g in self._rotating])} "
                "swaps per game over the run",
                f"  gzip work per swap: {np.mean(inflated) / 1e9:.1f} GB inflated (observation files up to "
                f"each window's end + the small files), ~{swap_s:.0f} s at {INFLATE_BYTES_PER_S / 1e9:.2f} "
                f"GB/s: the loader keeps up below ~{self._swap_interval / swap_s:.0f} steps/s",
            ]
        lines += [
            f"  data seen over the run: {100 * np.mean(seen_frac):.1f}% of the selected transitions on "
            f"average, {100 * min(seen_frac):.1f}% for the least-covered game",
            f"  distinct checkpoints per batch: {sum(distinct):.0f} ({np.mean(distinct):.2f} per game's "
            f"{per_game:.1f} samples, expected)",
        ]
        return "\n".join(lines)

    def _recheck_excluded(self, excluded: set[tuple[int, int, int]]) -> set[tuple[int, int, int]]:
        """On resume: checkpoints excluded before (missing or corrupt files found while streaming) whose
        files were scanned fine at this start-up are taken back (the files may be back); the rest stay
        excluded. A file still corrupt inside is found again when loaded, and excluded again."""
        self._readmitted = sorted(k for k in excluded if k in self._infos)
        return excluded - set(self._readmitted)

    def stats(self) -> dict[str, Any]:
        """For logging: loaded (valid) transitions, reloads, waits for the loader, excluded checkpoints."""
        per_game = {game: int(self._slot_num_valid[self._game_slot[g]]) for g, game in enumerate(self.games)}
        with self._lock:
            out = dict(self._stats)
        return {"loaded_transitions": sum(per_game.values()), **out, "loaded_per_game": per_game}

    def plan_summary(self) -> str:
        """The data plan of this process: per game its checkpoints, transitions and sets; memory; streams."""
        G = len(self.games)
        lines = [
            f"replay plan (rank {self.rank}/{self.world_size}): {G} games x runs {list(self.runs)} x "
            f"checkpoints {self.checkpoints!r}, fraction {self.fraction}, n_step {self.n_step}"
        ]
        for g, game in enumerate(self.games):
            ckpts = sorted({(p.run, p.suffix) for p in self._ranges[g]})
            n = sum(p.hi - p.lo for p in self._ranges[g])
            lines.append(
                f"  {game}: {len(ckpts)} checkpoints, {n:,} transitions ({n * FRAME_BYTES / 2**30:.2f} GiB "
                f"of frames), {len(self._sets[g])} set(s) of up to {self._slot_frames:,} frames"
            )
        arena = int(self._slot_start[-1]) * _ROW_BYTES
        lines.append(
            f"  memory: {arena / 2**30:.2f} GiB resident of {self.budget_bytes / 2**30:.2f} GiB budget "
            f"({_ROW_BYTES:,} B per loaded transition)"
        )
        if self._rotating:
            lines.append(
                f"  streaming: {len(self._rotating)} games rotate; every {self._swap_interval:,} samples one "
                "game swaps in its next set (each game every "
                f"~{self._swap_interval * len(self._rotating):,}), loaded ahead by a background thread into "
                f"one spare slot; up to {max(self._windows_in_slot)} windows of different checkpoints per "
                "slot"
            )
        else:
            lines.append("  static: all selected data is resident, no reloads")
        return "\n".join(lines + self._excluded_lines())

    def _excluded_lines(self) -> list[str]:
        """plan_summary's lines on excluded and re-admitted checkpoints."""

        def name(k: tuple[int, ...]) -> str:
            return f"{self.games[k[0]]} run {k[1]} checkpoint {k[2]}"

        lines = []
        with self._lock:
            excluded = sorted(self._excluded)
        if excluded:
            lines.append(f"  excluded (unreadable while streaming): {', '.join(map(name, excluded))}")
        if self._readmitted:
            back = ", ".join(map(name, self._readmitted))
            lines.append(f"  taken back on resume (their files read fine again): {back}")
        return lines

    def _check_reward_terminal(self, reward: np.ndarray, terminal: np.ndarray, d: Path, s: int) -> None:
        """NaN or inf rewards would poison every target that sums them: the file is refused (at start-up
        the run stops; in the background the checkpoint is excluded). Terminal values other than 0/1 are
        read as "episode ended" (nonzero, as Dopamine does): a warning, once per sampler."""
        bad = np.flatnonzero(~np.isfinite(reward))
        if len(bad):
            raise ReplayDataError(
                f"{_file_path(d, STORE_PREFIX + 'reward', s)} holds {len(bad):,} non-finite rewards (row "
                f"{bad[0]}: {reward[bad[0]]}); DQN-Replay rewards are clipped to [-1, 1]: re-download or "
                "re-record it."
            )
        if terminal.max(initial=0) > 1 and not self._warned_terminal:
            self._warned_terminal = True
            odd = sorted(set(np.unique(terminal).tolist()) - {0, 1})
            warnings.warn(
                f"replay: {_file_path(d, STORE_PREFIX + 'terminal', s)} holds terminal values other than 0 "
                f"and 1 ({', '.join(map(str, odd[:5]))}); every nonzero value is read as the end of an "
                "episode (shown once; other files may hold them too).",
                stacklevel=2,
            )

    def _swaps_per_game(self, total_samples: int) -> list[int]:
        """Per game: how many swaps it makes in total_samples sample() calls (periods 0..that are used)."""
        if not self._rotating:
            return [0] * len(self.games)
        R = len(self._rotating)
        swaps = (total_samples - 1) // self._swap_interval  # swaps happen at calls k * _swap_interval
        out = [0] * len(self.games)
        for r, g in enumerate(self._rotating):  # the k-th swap goes to rotating game (k - 1) % R
            out[g] = (swaps - (r + 1)) // R + 1 if swaps >= r + 1 else 0
        return out

    def _cancel_load(self) -> None:
        if self._job is not None:
            self._stop.set()
            self._job.done.wait()
            self._stop.clear()
            self._job = None

    def close(self) -> None:
        """Stop the background loader."""
        self._cancel_load()

    def __del__(self) -> None:
        if getattr(self, "_job", None) is not None:
            self._stop.set()

    # --- planning slots, windows and sets ------------------------------------------------------------

    def _frame_count(self, p: CheckpointRange) -> int:
        """Arena rows that range p takes: its frames plus the stack before and the n-step window after."""
        frame_lo, frame_hi = _frame_range(self._infos[p.key()], p.lo, p.hi, self.n_step)
        return frame_hi - frame_lo

    def _plan_memory(self, allocate: bool = True) -> None:
        """Slots, windows and sets: all data resident (static) if it fits the budget, else one slot per
        game plus a spare one, each game's data cut into windows and grouped into sets of one slot."""
        G = len(self.games)
        frames_needed = [sum(self._frame_count(p) for p in ps) for ps in self._ranges]  # per game
        self.static = sum(frames_needed) * _ROW_BYTES <= self.budget_bytes
        self._windows_in_slot = [1] * G  # windows per slot of each game (from distinct checkpoints)
        if self.static:
            sizes, self._slot_frames = frames_needed, max(frames_needed)
            self._sets = [[list(ps)] for ps in self._ranges]
        else:
            slot_frames = self.budget_bytes // ((G + 1) * _ROW_BYTES)
            slot_rows = slot_frames - (STACK - 1) - self.n_step  # transitions a slot-long window can hold
            if slot_rows < STACK + self.n_step:  # a window must be able to hold a valid transition
                min_gb = (G + 1) * (2 * STACK + 2 * self.n_step) * _ROW_BYTES / 2**30
                raise ReplayDataError(f"memory_budget_gb is too small for {G} games; use >= {min_gb:.6f}.")
            self._slot_frames = slot_frames
            for g, ps in enumerate(self._ranges):
                # Mixing: a slot holds `num_windows` windows from as many different checkpoints (or runs),
                # so that a batch draws from several of them, as batch_rl's FixedReplayBuffer mixes 5
                # checkpoints. Fewer when the game has fewer checkpoints or a window would get too short.
                checkpoints = len({p.key() for p in ps})
                most = slot_frames // (2 * (STACK + self.n_step))
                num_windows = max(1, min(self.windows_per_slot, checkpoints, most))
                window_frames = slot_frames // num_windows
                window_rows = window_frames - (STACK - 1) - self.n_step
                windows = []
                for p in ps:  # windows of the checkpoints that do not fit 1/num_windows of a slot
                    if self._frame_count(p) <= window_frames:
                        windows.append(p)
                    else:
                        parts = math.ceil((p.hi - p.lo) / window_rows)
                        windows += [
                            dataclasses.replace(p, lo=a, hi=b) for a, b in _split_range(p.lo, p.hi, parts)
                        ]
                self._ranges[g], self._windows_in_slot[g] = windows, num_windows
            self._sets = [self._group_into_sets(g, set()) for g in range(G)]
            sizes = [
                min(frames_needed[g], slot_frames) if len(self._sets[g]) == 1 else slot_frames
                for g in range(G)
            ]
        self._rotating = [g for g in range(G) if len(self._sets[g]) > 1]
        if self._rotating:
            sizes = sizes + [self._slot_frames]  # the spare slot
            if self.reload_every == 0:  # auto: every set of every game at least once within the run
                most = max(len(self._sets[g]) for g in self._rotating)
                self.reload_every = max(1, min(RELOAD_EVERY, self.total_samples // (most + 1)))
            self._swap_interval = max(1, self.reload_every // len(self._rotating))
        elif self.reload_every == 0:
            self.reload_every = RELOAD_EVERY  # nothing rotates
        self._slot_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self._slot_start[-1])
        self._game_slot = list(range(G))
        self._spare_slot = G if self._rotating else None
        if not allocate:  # a dry run
            return
        self._frames_arena = np.empty((total, *FRAME_SHAPE), np.uint8)  # [F, 84, 84], touched when loaded
        # A read-only view with one 4-frame stack per row: _stacks[j] = frames j..j+3 (the state of
        # transition j + 3). Why: indexing it copies each stack as one 28 KB block instead of four frames
        # (faster, see docs/performance.md). Fancy indexing only: np.take would copy it whole.
        self._stacks = np.lib.stride_tricks.as_strided(
            self._frames_arena,
            shape=(total - (STACK - 1), STACK, *FRAME_SHAPE),
            strides=(FRAME_BYTES, FRAME_BYTES, FRAME_SHAPE[1], 1),
            writeable=False,
        )  # [F - 3, 4, 84, 84]
        # Per row, the n-step target of the transition starting there (n_step_targets at load time, so
        # that sample() only gathers): return, discount and the offset of the next state's newest frame.
        self._action = np.zeros(total, np.uint8)  # full-set ids
        self._return = np.zeros(total, np.float32)
        self._discount = np.zeros(total, np.float32)
        self._next_offset = np.zeros(total, np.uint8)
        # per slot, from its _slot_start: the arena rows of its valid transitions (_slot_num_valid of them)
        self._valid_rows = np.zeros(total, np.int32 if total < 2**31 else np.int64)
        self._slot_num_valid = np.zeros(len(sizes), np.int64)

    def _group_into_sets(self, g: int, excluded: set[tuple[int, int, int]]) -> list[list[CheckpointRange]]:
        """Group game g's ranges (minus excluded checkpoints) into sets that fit one slot, each range in
        exactly one set (so a pass over the sets covers all of the game's selected data).

        A set takes at most one range of each checkpoint, from the checkpoints with the most ranges left
        first (seeded ties), until the slot is full: a slot then holds windows of several different
        checkpoints, and the checkpoints run out together, so the last sets mix as well as the first.
        """
        key = (g, frozenset(excluded))
        if key in self._sets_cache:
            return self._sets_cache[key]
        ps = [p for p in self._ranges[g] if p.key() not in excluded]
        left: dict[tuple[int, int, int], list[CheckpointRange]] = {}  # per checkpoint: ranges not in a set
        for i in np.random.default_rng([self.seed, g]).permutation(len(ps)):
            left.setdefault(ps[i].key(), []).append(ps[i])  # seeded order of checkpoints and ranges
        tie_rank = {k: r for r, k in enumerate(left)}
        smallest = min((self._frame_count(p) for p in ps), default=0)
        sets: list[list[CheckpointRange]] = []
        while left:
            chosen, size = [], 0
            for k in sorted(left, key=lambda k: (-len(left[k]), tie_rank[k])):
                frames = self._frame_count(left[k][-1])
                if size + frames <= self._slot_frames:
                    chosen.append(left[k].pop())
                    size += frames
                    if not left[k]:
                        del left[k]
                    if size + smallest > self._slot_frames:
                        break
            sets.append(chosen)
        if len(self._sets_cache) < 4 * len(self.games):
            self._sets_cache[key] = sets
        return sets

    def _set_in_period(self, g: int, period: int) -> list[CheckpointRange]:
        """The set of ranges game g holds in its `period`-th period, the one after its period-th swap (each
        pass over the sets in a new seeded order)."""
        with self._lock:
            sets = self._group_into_sets(g, self._excluded) if self._excluded else self._sets[g]
        if not sets:
            raise ReplayDataError(
                f"every checkpoint of {self.games[g]} was excluded as corrupt; re-download its data."
            )
        if len(sets) == 1:
            return sets[0]
        perm = np.random.default_rng([self.seed, g, period // len(sets)]).permutation(len(sets))
        return sets[perm[period % len(sets)]]

    # --- loading at start-up and in the background --------------------------------------------------

    def _load_into_slot(self, slot: int, ranges: list[CheckpointRange]) -> None:
        """Load a set into `slot` and index its valid transitions; a ReplayDataError names its bad_range."""
        at, positions = int(self._slot_start[slot]), []
        for p in ranges:
            try:
                used, pos = self._load_range(p, at)
            except ReplayDataError as e:
                e.bad_range = p  # type: ignore[attr-defined]
                raise
            at += used
            positions.append(pos)
        pos = np.concatenate(positions)
        if len(pos) == 0:
            e = ReplayDataError(
                f"nothing left to sample for {self.games[ranges[0].game]} after selection (checkpoints "
                f"{sorted({(p.run, p.suffix) for p in ranges})}, fraction {self.fraction}); select more data."
            )
            e.bad_range = ranges[0]  # type: ignore[attr-defined]
            raise e
        start = int(self._slot_start[slot])
        self._valid_rows[start : start + len(pos)] = pos
        self._slot_num_valid[slot] = len(pos)

    def _load_next_set(self, g: int, period: int, slot: int) -> list[CheckpointRange] | None:
        """Background job: load game g's set for `period` into `slot`; a corrupt checkpoint is reported,
        excluded and replaced by the next set. None when the set equals the loaded one."""
        while True:
            ranges = self._set_in_period(g, period)
            if ranges == self._loaded[g]:
                return None
            try:
                self._load_into_slot(slot, ranges)
                return ranges
            except ReplayDataError as e:
                bad = e.bad_range.key()  # type: ignore[attr-defined]
                warnings.warn(
                    f"replay: {e} Excluding {self.games[g]} run {bad[1]} checkpoint {bad[2]} and going on.",
                    stacklevel=1,
                )
                with self._lock:
                    self._excluded.add(bad)
                    self._stats["excluded_checkpoints"] = len(self._excluded)

    def _swap_game(self, k: int) -> int:
        """The rotating game that makes swap number k (round-robin)."""
        return self._rotating[(k - 1) % len(self._rotating)]

    def _start_next_load(self) -> None:
        if not self._rotating:
            return
        g = self._swap_game(self._next_swap)
        period, slot = self._period[g] + 1, self._spare_slot
        self._job = _BackgroundLoad(lambda: self._load_next_set(g, period, slot))

    def _swap(self) -> None:
        job, g = self._job, self._swap_game(self._next_swap)
        if not job.done.is_set():
            self._stats["reload_waits"] += 1
            t0 = time.perf_counter()
            job.done.wait()
            self._stats["reload_wait_s"] += time.perf_counter() - t0
        if job.error is not None:
            raise job.error
        self._period[g] += 1
        if job.result is not None:
            self._game_slot[g], self._spare_slot = self._spare_slot, self._game_slot[g]
            self._loaded[g] = job.result
            self._stats["reloads"] += 1
            self._layout_cache.clear()
        self._next_swap += 1
        self._start_next_load()

    # --- streaming: the per-call batch layout, cached -------------------------------------------------------
