"""Benchmark of replay.py against the machine's limits (not a test).

- checkpoint load throughput: replay.py's reader vs `gzip -dc` (and np.load through gzip.open) on the same
  100k-transition observation file of real Atari frames;
- resident bytes per loaded transition (RSS growth / transitions) vs one 84x84 frame (7,056 B);
- sample() at batch 32 and 512 (n=3) vs numpy copying the same bytes (obs + next_obs) from a new place of
  the arena at every call (cold caches, as sample() reads them): ratio, goal <= 2;
- recording speed of the random-policy recorder (steps per second, one process).

The checkpoint: `record_steps` real frames recorded with record.record, repeated to `transitions` rows
(gzip's 32 KB window never sees the repeat, so compression matches real data), written by replay.py.

    python benchmarks/bench_replay.py            # prints a markdown table, writes benchmarks/results/
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402
import replay  # noqa: E402


@dataclasses.dataclass
class Args:
    work_dir: str = str(Path(tempfile.gettempdir()) / "bench_replay")
    """scratch folder for the recorded and written checkpoints (reused when present)"""
    game: str = "Breakout"
    """game whose frames fill the checkpoint"""
    record_steps: int = 20_000
    """real frames recorded (random policy); repeated to --transitions rows"""
    transitions: int = 100_000
    """rows of the benchmark checkpoint"""
    num_games: int = 3
    """games sampled from (copies of the same checkpoint under other game names)"""
    batch_sizes: tuple[int, ...] = (32, 512)
    """sample() batch sizes timed (32: the demo's, 512: the paper's)"""
    repeats: int = 500
    """timed sample() calls per batch size (the fastest is reported, see interleaved()); many, so that the
    timings span ~0.2 s and a brief disturbance of the shared VM cannot set all of them"""
    out: Path = Path(__file__).resolve().parent / "results" / "bench_replay.json"
    """where the JSON results go"""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def huge_page_fraction(arr: np.ndarray) -> float:
    """Share of arr's resident memory on transparent huge pages (Linux; nan elsewhere). Random reads of
    a multi-GB arena miss the TLB far less on 2 MB pages: a run that did not get them samples slower."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return float("nan")
    start, end = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    rss = huge = 0
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's header line: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and head == "Rss:":
            rss += int(line.split()[1])
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1])
    return huge / rss if rss else float("nan")


def timed(fn, repeats: int) -> float:
    """Fastest of `repeats` calls (after a warm-up): the least disturbed by other processes."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """(fastest, median) time of each fn, calling them in turn so that background load hits them alike."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.min(v)) for k, v in times.items()}, {k: float(np.median(v)) for k, v in times.items()}


def make_data(args: Args) -> tuple[Path, float]:
    work = Path(args.work_dir)
    rec_dir = work / "recorded"
    t = time.perf_counter()
    steps_per_s = float("nan")
    if not replay.list_checkpoints(rec_dir / args.game / "1" / "replay_logs"):
        record.record(rec_dir, [args.game], capacity=args.record_steps, num_workers=1, overwrite=True)
        steps_per_s = args.record_steps / (time.perf_counter() - t)
    data_dir = work / "data"
    logs = data_dir / args.game / "1" / "replay_logs"
    if replay.list_checkpoints(logs) != [0]:
        src = replay.read_checkpoint(rec_dir / args.game / "1" / "replay_logs", 0)
        reps = -(-args.transitions // args.record_steps)
        take = lambda a: np.concatenate([a] * reps)[: args.transitions]
        replay.write_checkpoint(
            logs,
            0,
            take(src["observation"]),
            take(src["action"]),
            take(src["reward"]),
            take(src["terminal"]),
            add_count=args.transitions + 12_345,
        )
    import atari

    others = [g for g in ("Pong", "Boxing", "Seaquest", "Asterix") if g != args.game]
    for g in others[: args.num_games - 1]:  # the same files under other names (their action sets are larger)
        assert len(atari.legal_actions(g)) >= len(atari.legal_actions(args.game))
        (data_dir / g).mkdir(parents=True, exist_ok=True)
        if not (data_dir / g / "1").exists():
            (data_dir / g / "1").symlink_to(data_dir / args.game / "1", target_is_directory=True)
    return data_dir, steps_per_s


def main(args: Args) -> dict:
    data_dir, rec_sps = make_data(args)
    obs_path = data_dir / args.game / "1" / "replay_logs" / "$store$_observation_ckpt.0.gz"
    raw_bytes = args.transitions * replay.FRAME_BYTES
    results: dict = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()},
        "load_avg_start": os.getloadavg(),
        "transitions": args.transitions,
        "gz_bytes": obs_path.stat().st_size,
        "raw_bytes": raw_bytes,
    }
    if rec_sps == rec_sps:
        results["record_steps_per_s"] = rec_sps

    # --- load throughput ----------------------------------------------------------------------------------
    def ours():
        with replay._GzipNpy(obs_path) as f:
            f.read_all()

    def np_load():
        import gzip

        with gzip.open(obs_path) as f:
            np.load(f, allow_pickle=False)

    def gzip_dc():
        subprocess.run(f"gzip -dc '{obs_path}' > /dev/null", shell=True, check=True)

    for name, fn in [("load_ours", ours), ("load_np_gzip_open", np_load)] + (
        [("load_gzip_dc", gzip_dc)] if shutil.which("gzip") else []
    ):
        results[name + "_s"] = timed(fn, 3)

    # --- resident memory ----------------------------------------------------------------------------------
    games = [args.game] + [g for g in ("Pong", "Boxing", "Seaquest", "Asterix") if g != args.game][
        : args.num_games - 1
    ]
    before = rss_bytes()
    t = time.perf_counter()
    r = replay.MultiGameReplay(data_dir, games, runs=(1,), checkpoints="nearoptimal", memory_budget_gb=16)
    results["sampler_start_s"] = time.perf_counter() - t
    grown = rss_bytes() - before
    loaded = args.transitions * len(games)
    results["resident_bytes_per_transition"] = grown / loaded
    results["arena_bytes_per_transition"] = int(r._slot_start[-1]) * replay._ROW_BYTES / loaded
    results["arena_huge_page_fraction"] = huge_page_fraction(r._frames_arena)
    print(r.plan_summary())

    # --- sampling vs numpy copy ---------------------------------------------------------------------------
    # The floor: numpy copying the same number of bytes into two new arrays, as sample() returns obs and
    # next_obs (so both pay for fresh output memory). sample() reads random rows of an arena far larger
    # than the caches, so the fair floor copies from a new random place of the arena at every call
    # ("cold"); copying one block again and again into the same buffer ("hot") measures the caches
    # instead (the 1.8 MB of batch 32 fit in L2/L3), shown for reference.
    rng = np.random.default_rng(0)
    frames = r._frames_arena
    for bs in args.batch_sizes:
        rows = 2 * bs * replay.STACK
        nbytes = rows * replay.FRAME_BYTES
        src = frames[:rows]
        dst = np.empty_like(src)
        starts = iter(rng.integers(0, len(frames) - rows, size=args.repeats + 1).tolist())

        def copy_cold(rows=rows, starts=starts):
            start = next(starts)
            half = start + rows // 2
            return frames[start:half].copy(), frames[half : start + rows].copy()

        t, median = interleaved(
            {
                "sample": lambda bs=bs: r.sample(bs),
                "copy_cold": copy_cold,
                "copy_hot": lambda src=src, dst=dst: np.copyto(dst, src),
            },
            args.repeats,
        )
        results[f"sample_{bs}_s"] = t["sample"]
        results[f"copy_cold_{bs}_s"] = t["copy_cold"]
        results[f"copy_hot_{bs}_s"] = t["copy_hot"]
        results[f"sample_{bs}_bytes"] = nbytes
        results[f"sample_vs_copy_{bs}"] = t["sample"] / t["copy_cold"]
        results[f"sample_vs_copy_{bs}_median"] = median["sample"] / median["copy_cold"]
    r.close()

    # --- report -------------------------------------------------------------------------------------------
    mb = raw_bytes / 1e6
    rows = [
        (
            "checkpoint",
            f"{args.transitions:,} transitions, {mb:,.0f} MB raw, "
            f"{results['gz_bytes'] / 1e6:,.1f} MB gz ({raw_bytes / results['gz_bytes']:.0f}x)",
            "",
        ),
        (
            "load, replay.py reader",
            f"{mb / results['load_ours_s']:,.0f} MB/s",
            f"{results['load_ours_s']:.2f} s",
        ),
        (
            "load, np.load(gzip.open)",
            f"{mb / results['load_np_gzip_open_s']:,.0f} MB/s",
            f"{results['load_np_gzip_open_s']:.2f} s",
        ),
    ]
    if "load_gzip_dc_s" in results:
        rows.append(
            (
                "load, `gzip -dc > /dev/null`",
                f"{mb / results['load_gzip_dc_s']:,.0f} MB/s",
                f"{results['load_gzip_dc_s']:.2f} s",
            )
        )
    rows += [
        (
            "sampler start-up (scan + load + validity)",
            f"{len(games)} games x {args.transitions:,}",
            f"{results['sampler_start_s']:.2f} s",
        ),
        (
            "resident bytes / loaded transition (RSS)",
            f"{results['resident_bytes_per_transition']:,.0f} B",
            f"{results['resident_bytes_per_transition'] / replay.FRAME_BYTES:.4f} x 7,056",
        ),
        (
            "arena on transparent huge pages",
            f"{results['arena_huge_page_fraction']:.0%}",
            "random reads miss the TLB less on 2 MB pages",
        ),
        (
            "arena bytes / loaded transition",
            f"{results['arena_bytes_per_transition']:,.1f} B",
            f"{results['arena_bytes_per_transition'] / replay.FRAME_BYTES:.4f} x 7,056",
        ),
    ]
    for bs in args.batch_sizes:
        s, c, h = results[f"sample_{bs}_s"], results[f"copy_cold_{bs}_s"], results[f"copy_hot_{bs}_s"]
        rows.append(
            (
                f"sample({bs}), n=3",
                f"{s * 1e3:.3f} ms ({results[f'sample_{bs}_bytes'] / s / 1e9:.1f} GB/s)",
                f"{s / c:.2f}x a cold numpy copy of the same bytes ({c * 1e3:.3f} ms; goal <= 2; median "
                f"{results[f'sample_vs_copy_{bs}_median']:.2f}x); "
                f"{s / h:.1f}x a cache-hot copy ({h * 1e3:.3f} ms)",
            )
        )
    if "record_steps_per_s" in results:
        rows.append(
            ("recorder, random policy, 1 process", f"{results['record_steps_per_s']:,.0f} steps/s", "")
        )
    print("\n| measurement | value | reference |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    results["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
