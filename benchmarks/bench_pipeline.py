"""Benchmark of the input pipeline of cql_multigame.py: how much of the step time the learner waits for data.

Runs the training loop's update (cql_multigame.compute_loss + backward + Adam) on batches from
cql_multigame.BatchStream over a replay.MultiGameReplay of recorded data, once with the background loader
(prefetch 2, the default of --prefetch) and once sampling inside the loop (prefetch 0), alternating short
blocks of steps so that background load hits both alike. Reports the fraction of wall time spent in
BatchStream.next() (the wait), next to the time of one sample() + tensor conversion and of one update
on a fixed batch: with prefetch 0 the wait is the sampling itself; with prefetch the thread hides it
when there is a core free for it.

The data: `transitions` random-policy transitions per game recorded with record.record into `data_dir`
(reused when present), as the `demo` preset does.

    python benchmarks/bench_pipeline.py                        # tiny, 3 games, batch 32 on CPU
    python benchmarks/bench_pipeline.py --device cuda --arch resnet18 --batch-size 512

Left out: checkpoint rotation under a memory budget (all data is resident here; replay.py's stats() count
the learner's waits for a late reload) and data-parallel ranks.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cql_multigame as cql  # noqa: E402
import record  # noqa: E402
import replay  # noqa: E402
import resnet  # noqa: E402


@dataclass
class Args:
    games: tuple[str, ...] = ("Breakout", "Boxing", "Freeway")
    """games of the recorded data (the smoke preset's)"""
    transitions: int = 5000
    """random-policy transitions recorded per game (once; reused from data_dir)"""
    data_dir: Path = Path(tempfile.gettempdir()) / "bench_pipeline_data"
    """where the recorded data goes"""
    arch: str = "tiny"
    """network (resnet.ARCHS)"""
    batch_size: int = 32
    """samples per update (the smoke preset's)"""
    steps: int = 10
    """timed steps per block"""
    rounds: int = 3
    """blocks per prefetch setting, alternating (best and median reported)"""
    prefetch: tuple[int, ...] = (0, 2)
    """prefetch settings compared (BatchStream's prefetch: batches sampled ahead by a thread)"""
    device: str = "auto"
    """auto, cpu, cuda, ... (cql_multigame.select_device)"""
    threads: int | None = None
    """torch.set_num_threads; None keeps torch's default (all cores)"""
    out: Path = field(
        default_factory=lambda: Path(__file__).resolve().parent / "results" / "bench_pipeline.json"
    )
    """where the JSON goes"""


def record_data(args: Args) -> None:
    missing = [g for g in args.games if not replay.list_checkpoints(args.data_dir / g / "1" / "replay_logs")]
    if missing:
        record.record(args.data_dir, missing, capacity=args.transitions, overwrite=True, progress=False)


def main(args: Args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.arch not in resnet.ARCHS:
        raise SystemExit(f"error: unknown --arch {args.arch!r}; choose from {', '.join(resnet.ARCHS)}.")
    if args.steps < 1 or args.rounds < 1 or any(p < 0 for p in args.prefetch):
        raise SystemExit("error: --steps and --rounds must be >= 1 and every --prefetch >= 0.")
    try:
        device = cql.select_device(args.device)
        record_data(args)
        data = replay.MultiGameReplay(args.data_dir, list(args.games), runs=(1,), checkpoints="nearoptimal")
    except (cql.ConfigError, replay.ReplayDataError) as e:
        raise SystemExit(f"error: {e}") from None

    torch.manual_seed(0)
    net = resnet.QNetwork(len(args.games), args.arch).to(device)
    target = resnet.QNetwork(**net.config()).to(device).requires_grad_(False)
    target.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=3.125e-4)
    support = torch.linspace(-10.0, 10.0, net.num_atoms, device=device)
    legal_table = cql.legal_action_table(args.games).to(device)

    def update(batch: dict[str, torch.Tensor]) -> None:  # cql_multigame.main's update
        loss, _ = cql.compute_loss(net, target, batch, support, legal_table, 0.1, 1.0, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cql.sync_device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def block(prefetch: int) -> dict[str, float]:
        stream = cql.BatchStream(data, args.batch_size, device, prefetch)
        try:
            for _ in range(2):  # warm-up: thread start, queue filled
                update(stream.next()[0])
            wait0, t0 = stream.wait_time, time.perf_counter()
            for _ in range(args.steps):
                update(stream.next()[0])
            total = time.perf_counter() - t0
            return {"wait_fraction": (stream.wait_time - wait0) / total, "step_s": total / args.steps}
        finally:
            stream.close()

    # the two floors: one sample() + conversion, one update on a fixed batch
    fixed = cql.BatchStream(data, args.batch_size, device, 0)
    fixed_batch, _ = fixed.next()

    def sample_only() -> float:
        t = time.perf_counter()
        b = data.sample(args.batch_size)
        {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in b._asdict().items()}
        return time.perf_counter() - t

    def update_only() -> float:
        t = time.perf_counter()
        update(fixed_batch)
        return time.perf_counter() - t

    load_start = os.getloadavg()
    results: dict[str, list] = {f"prefetch_{p}": [] for p in args.prefetch}
    floors: dict[str, list[float]] = {"sample_s": [], "update_s": []}
    update_only()
    for _ in range(args.rounds):
        for p in args.prefetch:
            results[f"prefetch_{p}"].append(block(p))
        for _ in range(3):
            floors["sample_s"].append(sample_only())
            floors["update_s"].append(update_only())
    data.close()

    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "sample_s_best": min(floors["sample_s"]),
        "update_s_best": min(floors["update_s"]),
        "blocks": results,
    }
    print(
        f"\nInput pipeline, {args.arch}, batch {args.batch_size}, {len(args.games)} games, {device} "
        f"({torch.get_num_threads()} threads, {os.cpu_count()} cores), load average {load_start[0]:.1f}; "
        f"sample() + to tensors {1e3 * summary['sample_s_best']:.2f} ms, "
        f"update alone {1e3 * summary['update_s_best']:.1f} ms (best)\n"
    )
    print("| prefetch | step ms (best / median) | steps/s | samples/s | data wait, % of step (best / med.) |")
    print("|---:|---:|---:|---:|---:|")
    for p in args.prefetch:
        blocks = results[f"prefetch_{p}"]
        step = [b["step_s"] for b in blocks]
        wait = [b["wait_fraction"] for b in blocks]
        summary[f"prefetch_{p}"] = {
            "step_s_best": min(step),
            "step_s_median": statistics.median(step),
            "wait_fraction_best": min(wait),
            "wait_fraction_median": statistics.median(wait),
        }
        print(
            f"| {p} | {1e3 * min(step):.1f} / {1e3 * statistics.median(step):.1f} | {1 / min(step):.2f} "
            f"| {args.batch_size / min(step):.0f} "
            f"| {100 * min(wait):.1f}% / {100 * statistics.median(wait):.1f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
