"""DQN-Replay data for Scaled QL: the file format, Dopamine's sampling rules, a streaming multi-game
sampler, and a recorder that writes new data in the same format.

Paper: Kumar et al., "Offline Q-Learning on Diverse Multi-Task Data Both Scales and Generalizes" (ICLR 2023),
Section 5 / Appendix B: one Q-network is trained on the DQN-Replay data of 40 games at once, with an equal
share of every game in each batch; "sub-optimal" data = the first 20% of each run's checkpoints,
"near-optimal" = all of them; fine-tuning on held-out games uses a small fraction of the data.

What is here
- The DQN-Replay format (Agarwal et al. 2020) exactly as Dopamine's `OutOfGraphReplayBuffer.save` writes
  it: `<data_dir>/<Game>/<run>/replay_logs/{$store$_observation,$store$_action,$store$_reward,
  $store$_terminal,add_count,invalid_range}_ckpt.<N>.gz`, each one `np.save(..., allow_pickle=False)`
  through a gzip stream (add_count a 0-d int64 array): `write_checkpoint`, `read_checkpoint`,
  `list_checkpoints`. Rows Dopamine never wrote (np.empty storage) are never checked or read. The optional
  7th file `episode_end_indices_ckpt.<N>.gz` is honoured when it is an np.save'd array (`read_episode_ends`);
  nothing is ever unpickled.
- Dopamine's sampling rules (`is_valid_transition`, `sample_index_batch`, `sample_transition_batch`),
  vectorized: `valid_mask` and `FrameBuffer` (a single-frame circular buffer; the recorder and online
  fine-tuning use it).
- `MultiGameReplay`: many games x runs x checkpoints under a memory budget, sampled with an equal share per
  game; sets of windows from several checkpoints rotate through memory, loaded ahead by a background
  thread; `MultiGameReplay.dry_run(...).plan_report(...)` plans DQN-Replay sizes without any data.
- The recorder, `python replay.py --help`: plays ALE (atari.make_env) with a random or epsilon-greedy
  Q-network policy and writes DQN-Replay checkpoints.

Left out: Dopamine's prioritized replay and extra storage elements (DQN-Replay has none); the paper's TPU
input pipeline. Windows of a checkpoint (when a whole one does not fit the budget) drop the at most
3 + n_step transitions whose frame stack or n-step window wraps around the physical end of the file.

Dopamine's invariants (what a transition is, which indices are valid, what the n-step target is) are
stated once, beside the functions that enforce them: the section "Dopamine's rules" below.

The file reads in this order: the file format; Dopamine's rules; FrameBuffer; choosing the data set and
the sampler (MultiGameReplay: its public face first, then its streaming methods); the streaming helpers
(windows, the background loader, the gzip reader, malloc tuning); the recorder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# The DQN-Replay file format (the files named in the module docstring). Every file is read through _GzipNpy,
# which sits with the streaming machinery below.


STACK = 4  # frames per state (Dopamine's stack_size; DQN-Replay was recorded with it)
FRAME_SHAPE = (84, 84)
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1]  # 7,056
STORE_PREFIX = "$store$_"
# the four arrays with one row per transition: name -> dtype
_STORE_DTYPES = {
    "observation": np.dtype(np.uint8),
    "action": np.dtype(np.int32),
    "reward": np.dtype(np.float32),
    "terminal": np.dtype(np.uint8),
}
# the six files every checkpoint has (list_checkpoints, scan_checkpoint)
_FILE_NAMES = [STORE_PREFIX + k for k in _STORE_DTYPES] + ["add_count", "invalid_range"]
# The optional 7th file of newer Dopamine: the indices where an episode ended, also without a terminal
# (time-outs). Dopamine's save() pickles it (a Python set); this reader never unpickles (see
# read_episode_ends). DQN-Replay lacks it.
EPISODE_ENDS = "episode_end_indices"
# DQN-Replay's numbering: 51 checkpoints 0..50 per run, 1M transitions each (the last one partial).
DQN_REPLAY_SUFFIXES = tuple(range(51))
DQN_REPLAY_CAPACITY = 1_000_000
# "sub-optimal" = the first 20% of a run's checkpoints counted on DQN-Replay's numbering: suffixes 0..9
# (10 of 51, as in Kumar et al. 2023 and Agarwal et al. 2020), whatever part of the run is downloaded.
SUBOPTIMAL_SUFFIXES = tuple(range(10))
_FILE_RE = re.compile(r"^(.+)_ckpt\.(\d+)\.gz$")
DOWNLOAD_HINT = (
    "download DQN-Replay with `gsutil -m cp -R gs://atari-replay-datasets/dqn/<Game> {d}` "
    "or record data with `python replay.py --out-dir {d} --games <Game>`"
)


class ReplayDataError(ValueError):
    """A problem with replay data or replay flags that the user can fix; the message says how."""


class ReplayWriteError(ReplayDataError):
    """A write of replay files that failed (full disk, read-only folder, permission): one sentence with the
    path and the space needed; the partial temporary files are removed and earlier files are unchanged."""


def _file_path(directory: str | Path, name: str, suffix: int) -> Path:
    return Path(directory) / f"{name}_ckpt.{suffix}.gz"


def _temp_path(path: Path) -> Path:
    """A temporary name beside `path` unique to this writer (host and process), as cql_multigame.temp_path."""
    import socket

    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _write_error(path: Path, error: OSError, need_bytes: int) -> ReplayWriteError:
    import shutil

    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free"
    except OSError:
        free = "no free space we could read"
    return ReplayWriteError(
        f"could not write {path} ({error.strerror or type(error).__name__}): it needs up to "
        f"{need_bytes / 2**20:,.1f} MB and {path.parent} has {free}; earlier files there are unchanged and "
        "the partial ones were removed; free space or pass another --out-dir."
    )


def write_checkpoint(
    directory: str | Path,
    suffix: int,
    observation: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    add_count: int | None = None,
    invalid_range: np.ndarray | None = None,
    *,
    compresslevel: int = 6,
) -> None:
    """Write one DQN-Replay checkpoint (the six files) into `directory` (created if needed).

    observation uint8 [C, 84, 84], action int32 [C] (minimal-set index), reward float32 [C] (clipped),
    terminal uint8 [C]. add_count defaults to C (a buffer filled exactly once) and is written as a 0-d int64
    array, as Dopamine's save() writes it; invalid_range defaults to Dopamine's for update_horizon 1 (the DQN
    agent that recorded DQN-Replay). The optional 7th file (episode_end_indices) is never written: DQN-Replay
    lacks it and Dopamine's load() accepts its absence.
    compresslevel: ours, 6 (Dopamine's GzipFile uses 9: much slower for slightly smaller files, see the
    README's Performance section); readers do not care.
    """
    import gzip

    arrays = {"observation": observation, "action": action, "reward": reward, "terminal": terminal}
    capacity = len(observation)
    for name, arr in arrays.items():
        dtype = _STORE_DTYPES[name]
        if arr.dtype != dtype or len(arr) != capacity or (name != "observation" and arr.ndim != 1):
            raise ReplayDataError(
                f"write_checkpoint: {name} is {arr.dtype} {arr.shape}, expected {dtype} with {capacity} rows."
            )
    add_count = capacity if add_count is None else int(add_count)
    if invalid_range is None:
        invalid_range = dopamine_invalid_range(add_count % capacity, capacity, 1)
    arrays |= {"add_count": np.array(add_count, np.int64), "invalid_range": np.asarray(invalid_range)}
    # All six files go to temporary names unique to this writer first, then replace the real names: a
    # killed writer never leaves a half file under a real name, and a failed write (full disk) leaves the
    # previous checkpoint's files as they were.
    paths = {n: _file_path(directory, STORE_PREFIX + n if n in _STORE_DTYPES else n, suffix) for n in arrays}
    tmps = {n: _temp_path(p) for n, p in paths.items()}
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            with (
                open(tmps[name], "wb") as fh,
                gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=compresslevel) as gz,
            ):
                # 0-d stays 0-d: Dopamine's and batch_rl's samplers use add_count as a scalar
                # (np.ascontiguousarray would make it shape (1,), and their sampling then crashes)
                np.save(gz, arr if arr.ndim == 0 else np.ascontiguousarray(arr), allow_pickle=False)
        for name in arrays:
            os.replace(tmps[name], paths[name])
    except BaseException as e:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(paths["observation"], e, sum(a.nbytes for a in arrays.values())) from None
        raise


def _scan_suffixes(directory: Path) -> dict[int, set[str]]:
    """suffix -> names of the checkpoint files present."""
    found: dict[int, set[str]] = {}
    if directory.is_dir():
        for entry in os.scandir(directory):
            m = _FILE_RE.match(entry.name)
            if m and m.group(1) in _FILE_NAMES:
                found.setdefault(int(m.group(2)), set()).add(m.group(1))
    return found


def list_checkpoints(directory: str | Path) -> list[int]:
    """Sorted suffixes N for which all six files of checkpoint N are present in `directory`."""
    return sorted(s for s, names in _scan_suffixes(Path(directory)).items() if len(names) == len(_FILE_NAMES))


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a start-up scan learns about one checkpoint (headers and the two small arrays only)."""

    directory: str
    suffix: int
    capacity: int  # C, rows of every store array
    add_count: int  # transitions ever added (cursor = add_count % C)
    horizon: int = 1  # update horizon the writer's invalid_range was made for (DQN-Replay: 1)
    episode_ends: tuple[int, ...] | None = None  # the 7th file's indices, when present and readable

    @property
    def num_stored(self) -> int:
        return min(self.add_count, self.capacity)

    def rules(self, n_step: int) -> dict[str, Any]:
        """Keyword arguments of is_valid/valid_mask for a reader with update horizon n_step: the wider of the
        reader's and the file's invalid range (Dopamine's load() uses the file's), and the episode ends."""
        ends = None if self.episode_ends is None else np.asarray(self.episode_ends, np.int64)
        return {"invalid_horizon": max(n_step, self.horizon), "episode_ends": ends}


_WARNED_MESSAGES: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED_MESSAGES:
        _WARNED_MESSAGES.add(message)
        warnings.warn(message, stacklevel=3)


def read_episode_ends(directory: str | Path, suffix: int, capacity: int) -> np.ndarray | None:
    """The optional 7th file, `episode_end_indices_ckpt.N.gz`: int64 [E] indices where an episode ended
    (with or without a terminal), or None when the file is absent or cannot be read without pickle.

    Dopamine's save() writes this Python set with pickle.dump. Unpickling runs arbitrary code, so this reader
    never does it: a pickled file is skipped with a warning that says so (its time-outs are then not
    honoured, as for DQN-Replay, which lacks the file). An np.save'd integer array (allow_pickle=False) is
    read and honoured as Dopamine's is_valid_transition does: convert a file you trust with
    `np.save(gz, np.fromiter(pickle.load(f), np.int64), allow_pickle=False)` through a gzip stream.
    """
    path = _file_path(directory, EPISODE_ENDS, suffix)
    if not path.is_file():
        return None
    import gzip

    try:
        with gzip.open(path, "rb") as f:
            head = f.read(6)
    except (OSError, EOFError) as e:
        raise ReplayDataError(f"{path} is not a gzip file ({e}); re-download or delete it.") from None
    if head != b"\x93NUMPY":
        _warn_once(
            f"{path} is a pickle (Dopamine's save() pickles this set) and this reader never unpickles, so "
            f"checkpoint {suffix}'s episode ends without a terminal (time-outs) are not honoured; convert it "
            "to an np.save'd int64 array to honour them (see replay.read_episode_ends)."
        )
        return None
    ends = _read_small_array(path)
    out_of_range = ends.size > 0 and (ends.min() < 0 or ends.max() >= capacity)
    if ends.ndim > 1 or ends.dtype.kind not in "iu" or out_of_range:
        raise ReplayDataError(
            f"{path} holds {ends.dtype} {ends.shape}, expected integer indices in [0, {capacity}); "
            "re-download it or delete it."
        )
    return np.unique(ends.reshape(-1).astype(np.int64))


def _check_header(f: _GzipNpy, name: str, capacity: int | None) -> int:
    """The rows of store file `f` after checking its dtype and shape (capacity None: any row count)."""
    dtype = _STORE_DTYPES[name]
    rows = "C" if capacity is None else str(capacity)
    want = f"({rows}, 84, 84)" if name == "observation" else f"({rows},)"
    ok_shape = len(f.shape) == (3 if name == "observation" else 1) and (
        name != "observation" or f.shape[1:] == FRAME_SHAPE
    )
    if f.dtype != dtype or not ok_shape or (capacity is not None and f.shape[0] != capacity):
        raise ReplayDataError(
            f"{f.path} holds a {f.dtype} array of shape {f.shape}, expected {dtype} of shape {want}; "
            "re-download or re-record this checkpoint."
        )
    return f.shape[0]


def scan_checkpoint(directory: str | Path, suffix: int) -> CheckpointInfo:
    """Check that checkpoint `suffix` in `directory` is complete and consistent, reading only the .npy
    headers of the four big files and the two small arrays; raises ReplayDataError naming the file."""
    directory = Path(directory)
    for name in _FILE_NAMES:
        if not _file_path(directory, name, suffix).is_file():
            raise ReplayDataError(
                f"checkpoint {suffix} in {directory} lacks {_file_path(directory, name, suffix).name}: "
                f"re-download or re-record it, or leave suffix {suffix} out of the selection."
            )
    capacity = None
    for name in _STORE_DTYPES:
        with _GzipNpy(_file_path(directory, STORE_PREFIX + name, suffix)) as f:
            capacity = _check_header(f, name, capacity)
    add_path = _file_path(directory, "add_count", suffix)
    add = _read_small_array(add_path)
    if add.size != 1 or add.dtype.kind not in "iu" or int(add.reshape(-1)[0]) < 0:
        raise ReplayDataError(
            f"{add_path} holds {add.dtype} {add.shape}, expected one non-negative integer; re-download it."
        )
    add_count = int(add.reshape(-1)[0])
    if add_count == 0:
        raise ReplayDataError(
            f"checkpoint {suffix} in {directory} holds no transitions (add_count 0); "
            "leave it out of the selection."
        )
    inv_path = _file_path(directory, "invalid_range", suffix)
    inv = _read_small_array(inv_path)
    horizon = inv.size - STACK
    if (
        inv.ndim != 1
        or inv.dtype.kind not in "iuf"
        or horizon < 0
        or not np.array_equal(inv, dopamine_invalid_range(add_count % capacity, capacity, horizon))
    ):
        raise ReplayDataError(
            f"{inv_path} does not match add_count {add_count} (cursor {add_count % capacity}): the files "
            "come from different snapshots; re-download or re-record this checkpoint."
        )
    ends = read_episode_ends(directory, suffix, capacity)
    ends_t = None if ends is None else tuple(int(x) for x in ends)
    return CheckpointInfo(str(directory), suffix, capacity, add_count, horizon, ends_t)


def read_checkpoint(
    directory: str | Path, suffix: int, store: Sequence[str] = tuple(_STORE_DTYPES)
) -> dict[str, np.ndarray]:
    """Read a checkpoint (validated) -> observation uint8 [C,84,84], action int32 [C] (minimal-set index),
    reward float32 [C], terminal uint8 [C], add_count int64 [], invalid_range int64 [K+n], and
    episode_end_indices int64 [E] when the optional 7th file is present and readable without pickle.
    `store`: which of the four per-transition arrays to read (e.g. ("action", "terminal") skips the frames,
    ~99% of the bytes); the small arrays are always read."""
    info = scan_checkpoint(directory, suffix)
    out: dict[str, np.ndarray] = {}
    for name in store:
        with _GzipNpy(_file_path(directory, STORE_PREFIX + name, suffix)) as f:
            out[name] = f.read_all()
    out["add_count"] = np.array(info.add_count, np.int64)
    out["invalid_range"] = _read_small_array(_file_path(directory, "invalid_range", suffix)).astype(np.int64)
    if info.episode_ends is not None:
        out[EPISODE_ENDS] = np.asarray(info.episode_ends, np.int64)
    return out


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


def dopamine_invalid_range(cursor: int, capacity: int, update_horizon: int, stack: int = STACK) -> np.ndarray:
    """Dopamine's `invalid_range`: the stack + update_horizon indices c-n, ..., c+stack-1 (mod capacity)."""
    return (cursor - update_horizon + np.arange(stack + update_horizon, dtype=np.int64)) % capacity


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


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when a process group is up, else (0, 1)."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# Resident bytes per loaded transition in MultiGameReplay: frame + action (uint8 full-set id) + the n-step
# target worked out at load time (return float32, discount float32, next-state offset uint8) + one int32
# slot of the valid-index table (int64 past 2**31 rows).
_ROW_BYTES = FRAME_BYTES + 1 + 4 + 4 + 1 + 4
RELOAD_EVERY = 50_000  # ours: sample() calls between two sets of the same game (the cap of reload_every=0)
WINDOWS_PER_SLOT = 5  # ours: windows of different checkpoints per slot (batch_rl's FixedReplayBuffer mixes 5)


class MultiGameReplay:
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
        runs: Sequence[int] = (1, 2, 3, 4, 5),
        checkpoints: str | Sequence[int] = "suboptimal",
        fraction: float = 1.0,
        n_step: int = 3,
        gamma: float = 0.99,
        memory_budget_gb: float = 32.0,  # ours: per process
        reload_every: int = RELOAD_EVERY,  # ours: sample() calls between two sets of the same game (0: auto)
        windows_per_slot: int = WINDOWS_PER_SLOT,  # ours: batch_rl's FixedReplayBuffer mixes 5 checkpoints
        total_samples: int | None = None,  # sample() calls the run will make (for reload_every=0)
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        verbose: bool = False,
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
        if verbose:
            print(self.plan_summary())

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
        # the README's Performance section); the minimum catches the one-in-2**53 draw that rounds up to n.
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
        # the keys keep their first names ("calls", "phase", "next_event"): saved runs hold them
        return {
            "games": list(self.games),
            "rank": self.rank,
            "world_size": self.world_size,
            "calls": self._sample_calls,
            "rng": self._rng.bit_generator.state,
            "phase": list(self._period),
            "next_event": self._next_swap,
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
        self._sample_calls, self._period = int(state["calls"]), [int(x) for x in state["phase"]]
        self._next_swap = int(state["next_event"])
        if "reload_every" in state and self._rotating:  # keep the swap schedule the run started with
            self.reload_every = int(state["reload_every"])  # (an auto period changes with --total-steps)
            self._swap_interval = max(1, self.reload_every // len(self._rotating))
        self._rng.bit_generator.state = state["rng"]
        self._start_next_load()

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

    # --- streaming: planning slots, windows and sets --------------------------------------------------------

    def _plan_ranges(self, dqn_replay_sizes: bool = False) -> list[list[CheckpointRange]]:
        """Per game: this rank's share of the selected checkpoints (whole, or disjoint windows of them when
        there are fewer checkpoints than ranks); scans every checkpoint (or takes DQN-Replay's sizes)."""
        d = self.data_dir
        hint = DOWNLOAD_HINT.format(d=d)
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
        # (faster, see the README's Performance section). Fancy indexing only: np.take would copy it whole.
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


# ----------------------------------------------------------------------------------------------------------
# The streaming machinery's helpers: windows, the background loader, the gzip reader, malloc


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
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # handed to the learner at the swap
            self.error = e
        finally:
            self.done.set()


# plan_report's checkpoint load speed (gzip inflate + parse): measured by benchmarks/bench_replay.py on this
# project's CPU (the README's Performance section)
INFLATE_BYTES_PER_S = 1.439e9


class _LoadCancelled(Exception):
    """Ends a background load when the sampler stops its loader (close, load_state_dict)."""


# Why not np.load(gzip.open(...)): inflating straight into the arena, skipping to a window and stopping on
# request loads a checkpoint faster than `gzip -dc` alone (README's Performance section, bench_replay.py).
class _GzipNpy:
    """One np.save'd array read out of a .gz file at zlib speed: the header first, then rows decompressed
    straight into numpy buffers (no Python loop per element, no pickle). Raises ReplayDataError for
    missing, truncated or corrupt files and for object dtypes."""

    _IN_CHUNK = 1 << 18  # compressed bytes per read
    _OUT_CHUNK = 1 << 20  # decompressed bytes per zlib call: small enough to copy while in cache

    def __init__(self, path: Path, stop: threading.Event | None = None):
        self.path, self._stop = path, stop
        try:
            self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        except FileNotFoundError:
            raise ReplayDataError(f"{path} is missing: re-download or re-record this checkpoint.") from None
        self._inflater = zlib.decompressobj(wbits=31)  # 31: gzip container, CRC32 checked at the end
        self._in_chunk = 1 << 16  # small first read: headers are all that a scan needs
        self._ended = False
        try:
            version = np.lib.format.read_magic(self)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ReplayDataError:
            self.close()
            raise
        except (ValueError, OSError, EOFError) as e:
            self.close()
            raise ReplayDataError(
                f"{path} does not hold a .npy array ({e}); re-download or re-record this checkpoint."
            ) from None
        if dtype.hasobject or fortran:
            self.close()
            raise ReplayDataError(
                f"{path} holds an object or Fortran-order array, which DQN-Replay never writes (and which "
                "would need pickle); re-download or re-record this checkpoint."
            )
        self.shape, self.dtype = tuple(shape), dtype

    def _corrupt(self, why: str) -> ReplayDataError:
        return ReplayDataError(f"{self.path} is truncated or corrupt ({why}); re-download or re-record it.")

    def _inflate(self, max_len: int) -> bytes:
        """Up to max_len (>= 1) decompressed bytes; b'' only at the clean end of the gzip stream."""
        while True:
            if self._stop is not None and self._stop.is_set():
                raise _LoadCancelled
            if self._inflater.eof:
                data = self._inflater.unused_data or self._file.read(self._in_chunk)
                if not data.strip(b"\x00"):  # end of file (gzip tolerates zero padding)
                    self._ended = True
                    return b""
                self._inflater = zlib.decompressobj(wbits=31)  # another gzip member
            else:
                data = self._inflater.unconsumed_tail or self._file.read(self._in_chunk)
                self._in_chunk = self._IN_CHUNK
            try:
                out = self._inflater.decompress(data, max_len)  # b"" input still flushes pending output
            except zlib.error as e:
                raise self._corrupt(str(e)) from None
            if out:
                return out
            if not data and not self._inflater.eof:
                raise self._corrupt("the gzip stream ends early")

    def read(self, n: int) -> bytes:  # used by np.lib.format's header parser
        parts, have = [], 0
        while have < n:
            out = self._inflate(n - have)
            if not out:
                break
            parts.append(out)
            have += len(out)
        return b"".join(parts)

    def readinto(self, buffer: np.ndarray) -> None:
        """Fill a C-contiguous array completely with the next bytes of the stream."""
        mv = memoryview(buffer).cast("B")
        pos, total = 0, len(mv)
        while pos < total:
            out = self._inflate(min(total - pos, self._OUT_CHUNK))
            if not out:
                raise self._corrupt(f"the data ends after {pos:,} of {total:,} bytes")
            mv[pos : pos + len(out)] = out
            pos += len(out)

    def skip(self, nbytes: int) -> None:
        while nbytes > 0:
            out = self._inflate(min(nbytes, self._OUT_CHUNK))
            if not out:
                raise self._corrupt("the data ends early")
            nbytes -= len(out)

    def finish(self) -> None:
        """Check that nothing follows the array and that the gzip CRC matched."""
        if self._inflate(1):
            raise self._corrupt("extra bytes after the array")

    def read_all(self) -> np.ndarray:
        arr = np.empty(self.shape, self.dtype)
        self.readinto(arr)
        self.finish()
        return arr

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _GzipNpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_small_array(path: Path) -> np.ndarray:
    """A whole (small) np.save'd array out of a .gz file."""
    with _GzipNpy(path) as f:
        return f.read_all()


_MALLOC_TUNED = False


# Why: a batch of frames (0.9 MB at batch 32, 14 MB at 512) is above glibc's mmap threshold, so each sample()
# would map fresh pages and fault on every 4 KB, which costs more than the copy (README, Performance).
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


# ----------------------------------------------------------------------------------------------------------
# The recorder: play ALE, write DQN-Replay checkpoints


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
    import cql_multigame

    net.eval()
    head = torch.tensor([list(ckpt["games"]).index(game)])
    support = cql_multigame.support_from_checkpoint(ckpt)  # [K], with its one documented fallback
    legal_t = torch.as_tensor(legal)

    def act(obs: np.ndarray) -> int:
        with torch.no_grad():
            q = cql_multigame.expected_q(net(torch.from_numpy(obs[None]), head), support)  # [1, 18]
        return int(atari.epsilon_greedy(q[:, legal_t].numpy(), epsilon, rng)[0])  # the evaluation's rule

    return act


def _is_scripted(policy: str) -> bool:
    """A `module:function` policy, as opposed to "random" or a checkpoint file."""
    module = policy.partition(":")[0]
    return ":" in policy and not Path(policy).is_file() and module.replace(".", "").isidentifier()


def write_episode_returns(directory: str | Path, suffix: int, returns: Sequence[float]) -> Path:
    """`episode_returns_ckpt.N.json` beside checkpoint N: the unclipped returns of the episodes that ended
    while its transitions were written (plain JSON; Dopamine's and this project's readers ignore the file)."""
    path = Path(directory) / f"episode_returns_ckpt.{suffix}.json"
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps({"suffix": int(suffix), "returns": [float(r) for r in returns]}))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e, 64 * len(returns) + 64) from None
    return path


def read_episode_returns(directory: str | Path, suffixes: Sequence[int] | None = None) -> list[float]:
    """The episode returns saved beside the checkpoints `suffixes` (all that have a file if None)."""
    directory = Path(directory)
    paths = (
        sorted(directory.glob("episode_returns_ckpt.*.json"))
        if suffixes is None
        else [directory / f"episode_returns_ckpt.{s}.json" for s in suffixes]
    )
    out: list[float] = []
    for p in paths:
        out.extend(float(r) for r in json.loads(p.read_text())["returns"])
    return out


def load_policy(policy: str) -> tuple[dict[str, Any], Any]:
    """A --policy checkpoint and its network, through the training scripts' loader: a missing, truncated or
    foreign file is one sentence (ReplayDataError), as in cql_multigame.py and the fine-tuning scripts."""
    import cql_multigame  # lazy: the random policy needs neither torch nor the training script

    try:
        ckpt = cql_multigame.load_checkpoint(policy)
        return ckpt, cql_multigame.network_from_checkpoint(ckpt, path=policy)
    except cql_multigame.ConfigError as e:
        raise ReplayDataError(f"--policy: {e}") from None


def _record_one(job: dict[str, Any], report: Callable[[int], None] | None = None) -> str:
    """Record num_checkpoints snapshots of one (game, run) stream; returns the replay_logs directory."""
    if job["policy"] == "random" or _is_scripted(job["policy"]):
        return _record_stream(job, report)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ours: batch-1 acting is much faster on one thread (README, Performance)
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
    buf = FrameBuffer(job["capacity"], n_step=1)
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
    progress: bool = True,
) -> list[Path]:
    """Play each game under `policy` and write DQN-Replay checkpoints to <out_dir>/<Game>/<run>/replay_logs/.

    Each (game, run) is one stream of episodes through one FrameBuffer of `capacity` transitions;
    checkpoint k is its snapshot after (k+1) * capacity agent steps (so, as in DQN-Replay, consecutive
    checkpoints hold disjoint data and the padding puts the cursor mid-buffer). Rewards are clipped to
    [-1, 1]; game over and the max_episode_steps cut are both terminal. num_workers processes record
    (game, run) pairs in parallel (0: one per pair, at most the CPU count). Returns the directories.
    """
    import atari

    try:
        games = [atari.check_game(g) for g in games]
    except ValueError as e:
        raise ReplayDataError(str(e)) from None
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
    jobs = []
    for gi, game in enumerate(games):
        for run in runs:
            logs = Path(out_dir) / game / str(run) / "replay_logs"
            if _scan_suffixes(logs) and not overwrite:
                raise ReplayDataError(
                    f"{logs} already holds checkpoints; pass --overwrite or other --out-dir."
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
    return [Path(p) for p in out]


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
    probe = _temp_path(out_dir / ".write_test")
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
    """Record DQN-Replay-format data: python replay.py --out-dir data/demo --games Pong Breakout"""

    out_dir: str = "data/recorded"
    """folder that receives <Game>/<run>/replay_logs/ (the layout of gs://atari-replay-datasets/dqn); default
    ours"""
    games: tuple[str, ...] = ("Pong",)
    """games to record (ALE / DQN-Replay names, e.g. MsPacman); default ours, a demo"""
    runs: tuple[int, ...] = (1,)
    """run folder names; each run is an independent stream with its own seed"""
    num_checkpoints: int = 1
    """snapshots per run (suffixes 0, 1, ...); default ours, a demo (DQN-Replay: 51, suffixes 0..50)"""
    capacity: int = 100_000
    """transitions per checkpoint = agent steps between snapshots; default ours, a demo (DQN-Replay:
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


def main(args: Args) -> None:
    import signal

    import cql_multigame  # the training scripts' range checker (this also imports torch)

    got = [signal.SIGINT]

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (a scheduler) stops the recording like Ctrl-C
        got[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        cql_multigame.check_ranges(args)
        dirs = record(
            args.out_dir, args.games, args.runs, num_checkpoints=args.num_checkpoints, capacity=args.capacity,
            policy=args.policy, epsilon=args.epsilon, seed=args.seed, sticky_actions=args.sticky_actions,
            max_episode_steps=args.max_episode_steps, num_workers=args.num_workers, overwrite=args.overwrite,
        )  # fmt: skip
    except (ReplayDataError, cql_multigame.ConfigError, cql_multigame.replay.ReplayDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"\ninterrupted by {signal.Signals(got[0]).name}: recording stopped; complete checkpoints in "
            f"{args.out_dir} stay, partial files were removed (rerun with --overwrite to record again).",
            file=sys.stderr,
        )
        raise SystemExit(128 + got[0]) from None
    for d in dirs:
        print(f"wrote {d} (checkpoints {list_checkpoints(d)})")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
