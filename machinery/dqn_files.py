"""DQN-Replay file I/O: the files of one checkpoint, read and written exactly as Dopamine does.

`<data_dir>/<Game>/<run>/replay_logs/{$store$_observation,$store$_action,$store$_reward,$store$_terminal,
add_count,invalid_range}_ckpt.<N>.gz`, each one `np.save(..., allow_pickle=False)` through a gzip stream
(add_count a 0-d int64 array), as Dopamine's `OutOfGraphReplayBuffer.save` writes it: `write_checkpoint`,
`read_checkpoint`, `scan_checkpoint` (headers and the two small arrays), `list_checkpoints`. The optional
7th file `episode_end_indices_ckpt.<N>.gz` is honoured when it is an np.save'd array (`read_episode_ends`);
nothing is ever unpickled. Rows Dopamine never wrote (np.empty storage) are never checked or read.
Beside the format: `episode_returns_ckpt.<N>.json`, the recorder's unclipped episode returns.

Machinery: replay.py re-exports what a user calls (write_checkpoint, read_checkpoint, list_checkpoints,
ReplayDataError, the format's constants); a reader of the paper may skip this file. No torch here.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import socket
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    "or record data with `python record.py --out-dir {d} --games <Game>`"
)


def dopamine_invalid_range(cursor: int, capacity: int, update_horizon: int, stack: int = STACK) -> np.ndarray:
    """Dopamine's invalid range around the cursor (the file invalid_range holds it; replay.is_valid
    excludes it). `invalid_range`: the stack + update_horizon indices c-n, ..., c+stack-1 (mod capacity)."""
    return (cursor - update_horizon + np.arange(stack + update_horizon, dtype=np.int64)) % capacity


class ReplayDataError(ValueError):
    """A problem with replay data or replay flags that the user can fix; the message says how."""


class ReplayWriteError(ReplayDataError):
    """A write of replay files that failed (full disk, read-only folder, permission): one sentence with the
    path and the space needed; the partial temporary files are removed and earlier files are unchanged."""


def _file_path(directory: str | Path, name: str, suffix: int) -> Path:
    return Path(directory) / f"{name}_ckpt.{suffix}.gz"


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` unique to this writer (host and process), so that two writers never
    share one (checkpoint saves and the recorder use it)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def open_no_follow(path: str | Path, mode: str = "wb") -> Any:
    """open(path, mode) for writing ("wb", "w", "ab", "a") that never follows a symbolic link at `path`
    (O_NOFOLLOW: a link there is an OSError, ELOOP), so that a crafted or shared folder cannot redirect a
    write to a file outside it."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    return os.fdopen(os.open(path, flags, 0o644), mode)


def write_file(path: str | Path, text: str) -> None:
    """Write a small text file (a summary) atomically and without following links: a temporary name unique
    to this writer, opened with O_NOFOLLOW, then renamed over `path` (a rename replaces a link, it does not
    write through it)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open_no_follow(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(
    folder: str | Path, *, names: Sequence[str] | None = None, any_host: bool = False, recursive: bool = True
) -> int:
    """Remove the temporary files (see temp_path: <name>.<host>.<pid>.tmp) of writers that are gone, left by
    a killed save; returns how many. A writer is gone when it ran on this host and its pid is not alive, or,
    with any_host (the caller holds the folder's run lock: no one else writes there), whenever it is not
    this process. `names`: only the temporary files of these file names."""
    host, own = socket.gethostname(), f".{socket.gethostname()}.{os.getpid()}.tmp"
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.rglob("*.tmp") if recursive else folder.glob("*.tmp"):
        stem, _, pid = tmp.name[: -len(".tmp")].rpartition(".")
        if not pid.isdigit() or tmp.name.endswith(own) or tmp.is_dir():
            continue
        if names is not None and not any(tmp.name.startswith(f"{n}.") for n in names):
            continue
        local = stem.endswith(f".{host}")
        if not any_host and not (local and not _pid_alive(int(pid))):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_error(path: Path, error: OSError, need_bytes: int) -> ReplayWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free"
    except OSError:
        free = "no free space we could read"
    return ReplayWriteError(
        f"could not write {path} ({error.strerror or type(error).__name__}): it needs up to "
        f"{need_bytes / 2**20:,.1f} MB and {path.parent} has {free}; earlier files there are unchanged and "
        "the partial ones were removed; free space or write to another folder."
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
    compresslevel: 6 (Dopamine's GzipFile uses 9: much slower for slightly smaller files, see the
    docs/performance.md); readers do not care.
    """

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
    tmps = {n: temp_path(p) for n, p in paths.items()}
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            with (
                open_no_follow(tmps[name], "wb") as fh,
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


class _LoadCancelled(Exception):
    """Ends a background load when the sampler stops its loader (close, load_state_dict)."""


# Why not np.load(gzip.open(...)): inflating straight into the arena, skipping to a window and stopping on
# request loads a checkpoint faster than `gzip -dc` alone (docs/performance.md, bench_replay.py).
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


def write_episode_returns(directory: str | Path, suffix: int, returns: Sequence[float]) -> Path:
    """`episode_returns_ckpt.N.json` beside checkpoint N: the unclipped returns of the episodes that ended
    while its transitions were written (plain JSON; Dopamine's and this project's readers ignore the file)."""
    path = Path(directory) / f"episode_returns_ckpt.{suffix}.json"
    try:
        write_file(path, json.dumps({"suffix": int(suffix), "returns": [float(r) for r in returns]}))
    except OSError as e:
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
