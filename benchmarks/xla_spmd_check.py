"""Check of cql_multigame.py's XLA SPMD data parallelism (--xla-spmd) on a CPU, without a TPU.

torch-xla's PJRT CPU client can pretend to have several devices (CPU_NUM_DEVICES=n). This script trains the
same tiny run (same seed, so the same batches) on:

- one XLA device without SPMD (the reference: the path a single TPU core takes);
- SPMD over a ('data',) mesh of 1, 2 and 4 CPU devices (--xla-spmd; every batch split along dim 0);
- optionally eager PyTorch on the CPU;

and prints, per run, the largest difference of every logged training metric (loss, TD loss, CQL term,
Q-values; every step) from the reference, the XLA compile count after the first steps, at the end of
training and after the final evaluation (it must stop growing: a fixed set of graphs), and whether an SPMD
run stopped at the middle and resumed gives the same losses as the uninterrupted one. Then it counts the
device->host transfers of one checkpoint's tensors, the old way (one .cpu() per tensor) and through
cql_multigame.to_cpu (one batched transfer).

Needs torch 2.9 + torch-xla 2.9 (not in requirements.txt, not run in CI: the venv is ~7 GB):

    python3 -m venv /work/xlavenv
    /work/xlavenv/bin/pip install torch==2.9.0 torch-xla==2.9.0 numpy gymnasium ale-py \\
        opencv-python-headless tyro tensorboard tqdm pytest
    /work/xlavenv/bin/python benchmarks/xla_spmd_check.py

Each run is a subprocess with its own PJRT_DEVICE=CPU and CPU_NUM_DEVICES (they must be set before
torch_xla is imported). Writes benchmarks/results/xla_spmd_check.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("loss", "td_loss", "cql_term", "q_data", "q_max")


@dataclass
class Args:
    devices: tuple[int, ...] = (1, 2, 4)
    """CPU_NUM_DEVICES of the SPMD runs"""
    steps: int = 12
    """training steps of every run (every step is logged and compared)"""
    batch_size: int = 32
    """global batch (must split over every device count)"""
    scratch: str = "/tmp/xla_spmd_check"
    """data (recorded once) and run folders"""
    eager: bool = True
    """also run eager PyTorch on the CPU (--device cpu) and compare it"""
    resume: bool = True
    """also stop an SPMD run at the middle and resume it (with the largest device count)"""
    out: str = str(ROOT / "benchmarks" / "results" / "xla_spmd_check.json")
    """where the JSON goes"""


def train(args: Args, name: str, devices: int | None, extra: list[str], steps: int | None = None) -> dict:
    """One cql_multigame.py run in a subprocess; returns its per-step metrics and XLA counter lines."""
    scratch = Path(args.scratch)
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices or 1), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable, "cql_multigame.py", "demo",
        "--data-dir", str(scratch / "data"), "--runs-dir", str(scratch / "runs"), "--run-name", name,
        "--record-missing", "2000", "--total-steps", str(steps or args.steps),
        "--batch-size", str(args.batch_size),
        "--log-every", "1", "--save-every", str(args.steps // 2), "--target-update-every", "4",
        "--prefetch", "0", "--eval-episodes", "1", "--eval-envs", "1", "--eval-max-steps", "30",
        *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"run {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    text = r.stdout + r.stderr
    rows = [json.loads(line) for line in (scratch / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    compiles = {}  # step -> (compiles, executions, transfers), at the log steps of training
    pattern = r"\[xla rank 0\] step (\d+): compiles (\d+) .*?executions (\d+), device->host transfers (\d+)"
    for line in text.splitlines():
        m = re.search(pattern, line)
        if m and "final evaluation" not in line:
            compiles[int(m.group(1))] = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    final = re.search(r"compiles (\d+) \(.*\(after the final evaluation\)", text)
    return {
        "name": name,
        "devices": devices,
        "wall_s": wall,
        "metrics": {row["step"]: {k: row[k] for k in METRICS} for row in rows},
        "compiles": compiles,  # step -> (compiles, executions, transfers)
        "compiles_after_eval": int(final.group(1)) if final else None,
        "graph_lines": [line.strip() for line in text.splitlines() if "[xla rank 0]" in line],
    }


PROBE = """
import torch, torch_xla, torch_xla.runtime as xr, torch_xla.distributed.spmd as xs
import cql_multigame as cql
xr.use_spmd()
processes = cql.setup_spmd()
b = {"obs": torch.zeros(BATCH, 4, 84, 84, dtype=torch.uint8), "game": torch.arange(BATCH)}
for k, v in cql.shard_batch(b, torch_xla.device(), processes.mesh).items():
    shards = [tuple(s.data.shape) for s in xs.wrap_if_sharded(v).local_shards]
    spec = torch_xla._XLAC._get_xla_sharding_spec(v)
    print(f"{k} {tuple(v.shape)} -> {len(shards)} shards of {shards[0]}, {spec}")
"""


def sharding_probe(devices: int, batch: int) -> list[str]:
    """How cql_multigame.shard_batch lays a batch over `devices` CPU devices (one line per tensor rank)."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    code = PROBE.replace("BATCH", str(batch))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sharding probe failed:\n{r.stderr[-3000:]}")
    return [line for line in r.stdout.splitlines() if "shards" in line]


def max_diff(a: dict, b: dict) -> float:
    steps = sorted(set(a["metrics"]) & set(b["metrics"]))
    assert steps, (a["name"], b["name"])
    return max(abs(a["metrics"][s][k] - b["metrics"][s][k]) for s in steps for k in METRICS)


def checkpoint_transfers() -> dict:
    """Device->host transfers of one checkpoint_state of the tiny 3-game network: per-tensor vs batched."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("CPU_NUM_DEVICES", "1")
    import torch
    import torch_xla
    import torch_xla.debug.metrics as met

    sys.path.insert(0, str(ROOT))
    import cql_multigame as cql
    import resnet

    device = torch_xla.device()
    net = resnet.QNetwork(num_games=3, arch="tiny").to(device)
    target = resnet.QNetwork(**net.config()).to(device)
    opt = cql.make_optimizer(net.parameters(), 1e-4, 3e-4, device)
    net(
        torch.zeros(2, 4, 84, 84, dtype=torch.uint8, device=device),
        torch.zeros(2, dtype=torch.int64, device=device),
    ).sum().backward()
    opt.step()
    torch_xla.sync()
    state = cql.checkpoint_state(net, target, opt, 1, {}, ["a", "b", "c"], {})

    def transfers() -> int:
        data = met.metric_data("TransferFromDeviceTime")
        return int(data[0]) if data else 0

    def one_by_one(o):
        if torch.is_tensor(o):
            return o.cpu()
        if isinstance(o, dict):
            return {k: one_by_one(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(one_by_one(v) for v in o)
        return o

    n0 = transfers()
    old = one_by_one(state)
    n1 = transfers()
    new = cql.to_cpu(state)
    n2 = transfers()
    same = all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])
    tensors = sum(1 for _ in _tensors(state))
    return {"tensors": tensors, "per_tensor_cpu": n1 - n0, "to_cpu": n2 - n1, "same_values": same}


def _tensors(o):
    import torch

    if torch.is_tensor(o):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _tensors(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from _tensors(v)


def main(args: Args) -> None:
    if any(args.batch_size % n for n in args.devices):
        sys.exit(f"--batch-size {args.batch_size} must split over every device count {args.devices}.")
    runs = [train(args, "xla_1device", None, ["--device", "xla", "--xla-metrics"])]
    ref = runs[0]
    for n in args.devices:
        runs.append(train(args, f"spmd_{n}devices", n, ["--device", "xla", "--xla-spmd", "--xla-metrics"]))
    if args.eager:
        runs.append(train(args, "eager_cpu", None, ["--device", "cpu"]))
    resume = None
    if args.resume:
        n = max(args.devices)
        flags = ["--device", "xla", "--xla-spmd", "--xla-metrics"]
        train(args, f"spmd_{n}devices_resumed", n, flags, steps=args.steps // 2)
        resumed = train(args, f"spmd_{n}devices_resumed", n, [*flags, "--resume"])
        full = next(r for r in runs if r["name"] == f"spmd_{n}devices")
        later = [s for s in full["metrics"] if s > args.steps // 2]
        resume = {
            "devices": n,
            "max_diff_vs_uninterrupted": max(
                abs(full["metrics"][s][k] - resumed["metrics"][s][k]) for s in later for k in METRICS
            ),
            "steps_compared": later,
        }

    print(
        f"\nXLA SPMD check on the CPU: tiny network, 3 games, batch {args.batch_size}, "
        f"{args.steps} steps, seed 1"
    )
    print(
        "reference: one XLA device without SPMD; diff = largest |difference| of any logged metric, any step\n"
    )
    print(
        "| run | devices | max diff vs 1 device | compiles after step 2 | at the end of training "
        "| after final eval | executions at end | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in runs:
        c = r["compiles"]
        row = {
            "run": r["name"],
            "devices": r["devices"] or 1,
            "max_diff": 0.0 if r is ref else max_diff(r, ref),
            "compiles_step2": c.get(2, (None,))[0],
            "compiles_end": c.get(args.steps, (None,))[0],
            "compiles_after_eval": r["compiles_after_eval"],
            "executions_end": c.get(args.steps, (None, None))[1],
            "wall_s": round(r["wall_s"], 1),
        }
        rows.append(row)
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(
            f"| {row['run']} | {row['devices']} | {row['max_diff']:.2e} | {fmt(row['compiles_step2'])} | "
            f"{fmt(row['compiles_end'])} | {fmt(row['compiles_after_eval'])} | "
            f"{fmt(row['executions_end'])} | "
            f"{row['wall_s']} |"
        )
    if resume:
        print(
            f"\nresume (SPMD, {resume['devices']} devices, stopped at step {args.steps // 2}): "
            "max diff of the "
            f"later steps' metrics vs the uninterrupted run {resume['max_diff_vs_uninterrupted']:.2e}"
        )
    probe = sharding_probe(max(args.devices), args.batch_size)
    print(f"batch sharding with {max(args.devices)} devices: " + "; ".join(probe))
    ck = checkpoint_transfers()
    print(
        f"checkpoint to CPU ({ck['tensors']} tensors): {ck['per_tensor_cpu']} device->host transfers "
        "one .cpu() "
        f"per tensor, {ck['to_cpu']} with cql_multigame.to_cpu (same values: {ck['same_values']})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": asdict(args),
                "rows": rows,
                "resume": resume,
                "checkpoint_transfers": ck,
                "sharding": probe,
                "graph_lines": {r["name"]: r["graph_lines"] for r in runs},
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
