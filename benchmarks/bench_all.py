"""Run every benchmark of this folder and print docs/performance.md's table (markdown) + one JSON.

Each benchmark runs in its own process (as a user would run it, so that one cannot warm the caches or
the thread pools of the next) and writes its JSON to benchmarks/results/; this script then reads them
and prints one table: each measurement next to the floor it is compared with, the ratio and the goal of
the issue (learner full/bare <= 1.10, replay sample/copy <= 2, environment evaluate/raw >= 0.5).

    python benchmarks/bench_all.py                 # everything, ~6-8 min on a 2-core CPU
    python benchmarks/bench_all.py --quick         # tiny flags: checks that every script runs (~1 min)
    python benchmarks/bench_all.py --only learner pipeline

Writes benchmarks/results/performance.json and performance.md (the table, the machine and the commands).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAMES = ("learner", "learner_channels_last", "learner_unfused", "pipeline", "replay", "env", "network")


@dataclass
class Args:
    only: tuple[str, ...] = NAMES
    """which benchmarks to run (names as in NAMES)"""
    quick: bool = False
    """tiny flags (a few iterations, small data): checks that every script runs; the numbers mean nothing"""
    table_only: bool = False
    """run nothing: rebuild the table from the JSON already in out_dir"""
    device: str = "auto"
    """device for the learner, pipeline and network benchmarks (auto, cpu, cuda, ...)"""
    out_dir: Path | None = None
    """where every JSON and the final table go (default: benchmarks/results, with --quick: <scratch>/quick)"""
    scratch: Path = Path(tempfile.gettempdir()) / "scaledql_bench"
    """recorded data for the replay and pipeline benchmarks (reused when present)"""


def commands(args: Args) -> dict[str, list[str]]:
    """name -> argv (after `python`), full or --quick."""
    o, s = args.out_dir, args.scratch  # main() has set out_dir
    dev = ["--device", args.device]
    full = {
        "learner": ["benchmarks/bench_learner.py", *dev, "--out", f"{o}/bench_learner.json"],
        "learner_channels_last": [
            "benchmarks/bench_learner.py", *dev, "--channels-last",
            "--out", f"{o}/bench_learner_channels_last.json",
        ],
        "learner_unfused": [
            "benchmarks/bench_learner.py", *dev, "--no-fused-adam",
            "--out", f"{o}/bench_learner_unfused.json",
        ],
        "pipeline": [
            "benchmarks/bench_pipeline.py", *dev, "--data-dir", f"{s}/pipeline",
            "--out", f"{o}/bench_pipeline.json",
        ],
        "replay": [
            "benchmarks/bench_replay.py", "--work-dir", f"{s}/replay", "--out", f"{o}/bench_replay.json",
        ],
        "env": ["benchmarks/bench_env.py", "--out", f"{o}/bench_env.json"],
        "network": ["benchmarks/bench_network.py", *dev, "--out-dir", str(o)],
    }  # fmt: skip
    if not args.quick:
        return full
    tiny_learner = ["--archs", "tiny", "--num-games", "3", "--batch-size", "6", "--peak-size", "128"]
    extra = {
        "learner": [*tiny_learner, "--steps", "2", "--warmup", "1"],
        "learner_channels_last": [*tiny_learner, "--steps", "1", "--warmup", "0"],
        "learner_unfused": [*tiny_learner, "--steps", "1", "--warmup", "0"],
        "pipeline": ["--transitions", "300", "--steps", "2", "--rounds", "1", "--batch-size", "6"],
        "replay": ["--record-steps", "300", "--transitions", "600", "--repeats", "2", "--batch-sizes", "32"],
        "env": ["--num-envs", "2", "--episodes-per-env", "1", "--steps", "10"],
        "network": ["--archs", "tiny", "--iters", "1", "--warmup", "0", "--head-batch-sizes", "32"],
    }
    return {k: v + extra[k] for k, v in full.items()}


def row(part, what, value, floor, ratio=None, goal=None, holds=None) -> dict:
    return dict(part=part, measurement=what, value=value, floor=floor, ratio=ratio, goal=goal, holds=holds)


def table_rows(res: dict) -> list[dict]:
    """The Performance table, from whichever benchmark JSONs are present."""
    rows = []
    for key, label in (
        ("learner", ""),
        ("learner_channels_last", ", channels_last"),
        ("learner_unfused", ", Adam without the fused kernel"),
    ):
        if key not in res:
            continue
        r, info = res[key], res[key]["info"]
        batch = r["args"]["batch_size"]
        for a in r["rows"]:
            ratio = a["ratio_paired"]  # the goal is judged on the steadiest reading (see bench_learner.py)
            rows.append(row(
                f"learner {a['arch']}{label}",
                f"full update (compute_loss + backward + Adam), batch {batch}",
                f"{a['steps_per_s']:.2f} steps/s, {a['samples_per_s']:.0f} samples/s",
                f"bare: online fwd + bwd + Adam, target fwd: {a['bare_steps_per_s']:.2f} steps/s",
                f"paired {ratio:.3f} (best {a['ratio_best']:.3f}, median {a['ratio_median']:.3f}; "
                f"from parts {a['ratio_from_parts']:.3f})",
                "<= 1.10", ratio <= 1.10,
            ))  # fmt: skip
            mfu = a["flops_per_s"] / info["peak_flops"]
            rows.append(row(
                f"learner {a['arch']}{label}", "achieved FLOP/s (online fwd+bwd + target fwd)",
                f"{a['flops_per_s'] / 1e9:.1f} GFLOP/s",
                f"measured float32 peak {info['peak_flops'] / 1e9:.0f} GFLOP/s (matmul "
                f"{info['matmul_peak_flops'] / 1e9:.0f}, 3x3 conv {info['conv_peak_flops'] / 1e9:.0f})",
                f"MFU {100 * mfu:.1f}%",
            ))  # fmt: skip
    if "pipeline" in res:
        p = res["pipeline"]
        for k in sorted(k for k in p if k.startswith("prefetch_") and "blocks" not in k):
            rows.append(row(
                "pipeline", f"data wait, % of step time, {k.replace('_', ' ')} ({p['args']['arch']}, "
                f"batch {p['args']['batch_size']})",
                f"{100 * p[k]['wait_fraction_best']:.1f}% (median {100 * p[k]['wait_fraction_median']:.1f}%)",
                f"sample() {1e3 * p['sample_s_best']:.2f} ms vs update {1e3 * p['update_s_best']:.1f} ms",
            ))  # fmt: skip
    if "replay" in res:
        r = res["replay"]
        for bs in r["args"]["batch_sizes"]:
            ratio = r[f"sample_{bs}_s"] / r[f"copy_cold_{bs}_s"]
            rows.append(row(
                "replay", f"sample({bs}), n-step 3", f"{1e3 * r[f'sample_{bs}_s']:.3f} ms",
                f"numpy copy of the same bytes, cold: {1e3 * r[f'copy_cold_{bs}_s']:.3f} ms",
                f"{ratio:.2f} (median {r[f'sample_vs_copy_{bs}_median']:.2f})", "<= 2", ratio <= 2,
            ))  # fmt: skip
        b = r["resident_bytes_per_transition"]
        rows.append(row("replay", "resident bytes per loaded transition", f"{b:,.0f} B",
                        "one 84x84 frame: 7,056 B", f"{b / 7056:.3f}"))  # fmt: skip
        if "load_gzip_dc_s" in r:
            mb = r["raw_bytes"] / 1e6
            rows.append(row(
                "replay", "checkpoint load (observations, decompress + parse)",
                f"{mb / r['load_ours_s']:,.0f} MB/s",
                f"`gzip -dc > /dev/null`: {mb / r['load_gzip_dc_s']:,.0f} MB/s",
                f"{r['load_gzip_dc_s'] / r['load_ours_s']:.2f}x faster",
            ))  # fmt: skip
    if "env" in res:
        e = res["env"]["results"]
        ours = e["atari.evaluate (random q_fn)"]["agent_steps_per_s"]
        raw = e["ale-py AtariVectorEnv (C++, random actions)"]["agent_steps_per_s"]
        one = e.get("ale-py AtariVectorEnv, 1 thread", {}).get("agent_steps_per_s")
        n = res["env"]["args"]["num_envs"]
        rows.append(row(
            "environment", f"atari.evaluate, {n} envs, agent steps/s (stepping; one core)", f"{ours:,.0f}",
            f"ale-py AtariVectorEnv, {n} envs, C++ threads on all cores: {raw:,.0f}", f"{ours / raw:.2f}",
            ">= 0.5", ours / raw >= 0.5,
        ))  # fmt: skip
        if one:
            rows.append(row(
                "environment", "the same, against one core", f"{ours:,.0f}",
                f"ale-py AtariVectorEnv, {n} envs, 1 thread: {one:,.0f}", f"{ours / one:.2f}",
            ))  # fmt: skip
        for r in e.values():
            if r.get("num_workers"):
                k, sps = r["num_workers"], r["agent_steps_per_s"]
                rows.append(row(
                    "environment", f"atari.evaluate(num_workers={k}), {n} envs in {k} subprocesses",
                    f"{sps:,.0f}", f"ale-py AtariVectorEnv, {n} envs, C++ threads: {raw:,.0f}",
                    f"{sps / raw:.2f}", ">= 0.5", sps / raw >= 0.5,
                ))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| part | measurement | value | floor / reference | ratio | goal |", "|---|---|---|---|---|---|"]
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']} ({'holds' if r['holds'] else '**misses**'})"
        cells = [r["part"], r["measurement"], r["value"], r["floor"], r["ratio"] or "", goal]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    unknown = [n for n in args.only if n not in NAMES]
    if unknown:
        raise SystemExit(f"error: unknown --only {unknown[0]!r}; choose from {', '.join(NAMES)}.")
    if args.out_dir is None:
        args.out_dir = args.scratch / "quick" if args.quick else HERE / "results"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cmds = {k: v for k, v in commands(args).items() if k in args.only}
    load_start = os.getloadavg()
    results, ran = {}, {}
    if args.table_only:
        prev_path = args.out_dir / "performance.json"
        prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
        ran = prev.get("commands", {})
        for name, argv in cmds.items():
            out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
            if out is not None and out.is_file():
                results[name] = json.loads(out.read_text())
        cmds = {}
    for name, argv in cmds.items():
        cmd = [sys.executable, *argv]
        shown = shlex.join(argv).replace(f"{ROOT}/", "")  # paths inside the repo, relative to it
        print(f"\n$ python {shown}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
        seconds = time.perf_counter() - t
        print(proc.stdout.strip())
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"error: {name} benchmark failed (exit code {proc.returncode}); see above.")
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if out is not None:
            results[name] = json.loads(out.read_text())
        ran[name] = {"command": f"python {shown}", "seconds": seconds}

    rows = table_rows(results)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
        f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    if args.table_only and prev_path.is_file():
        machine = prev["machine"]
    if args.quick:
        machine += " (--quick: the numbers mean nothing)"
    text = "\n".join([
        "## Performance", "", f"Machine: {machine}.", "", markdown(rows), "", "Commands:", "",
        *[f"    {r['command']}   # {r['seconds']:.0f} s" for r in ran.values()],
    ])  # fmt: skip
    print("\n" + text)
    summary = {"machine": machine, "quick": args.quick, "commands": ran, "rows": rows, "results": results}
    (args.out_dir / "performance.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out_dir / "performance.md").write_text(text + "\n")
    print(f"\nwrote {args.out_dir / 'performance.json'} and performance.md")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
