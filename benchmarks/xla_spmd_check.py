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

The stop probe checks how the hosts of an SPMD run agree to stop (machinery.devices.spmd_any: a max over the
devices of all hosts; here one host's devices stand in for the hosts). The HLO check (also alone, with the
stop probe: --hlo-only, about a minute for tiny) compiles one training step under SPMD on
the largest device count with XLA's dumps on, and reads the module after SPMD partitioning, where shapes
are per device: it fails (exit 1) if any convolution or batch norm sees the global batch (every device
would redo that work on all rows), and reports the step's all-gather count. It runs the step twice: with
resnet.GroupNorm (per sample on XLA: must pass) and with nn.GroupNorm's forward (the control: it lowers to
a batch norm over [1, B*G, ...] that the partitioner feeds with an all-gather of the batch; the check must
catch it, or it is blind).

Needs torch 2.9 + torch-xla 2.9 (not in requirements.txt, not run in CI: the venv is ~7 GB):

    python3 -m venv ../xlavenv
    ../xlavenv/bin/pip install torch==2.9.0 torch-xla==2.9.0 numpy gymnasium ale-py \\
        opencv-python-headless tyro tensorboard tqdm pytest
    ../xlavenv/bin/python benchmarks/xla_spmd_check.py
    ../xlavenv/bin/python benchmarks/xla_spmd_check.py --hlo-only --hlo-archs tiny resnet18

Each run is a subprocess with its own PJRT_DEVICE=CPU and CPU_NUM_DEVICES (they must be set before
torch_xla is imported). Writes benchmarks/results/xla_spmd_check.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
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
    scratch: str = str(Path(tempfile.gettempdir()) / "xla_spmd_check")
    """data (recorded once) and run folders"""
    eager: bool = True
    """also run eager PyTorch on the CPU (--device cpu) and compare it"""
    resume: bool = True
    """also stop an SPMD run at the middle and resume it (with the largest device count)"""
    out: str = str(ROOT / "benchmarks" / "results" / "xla_spmd_check.json")
    """where the JSON goes"""
    hlo_only: bool = False
    """run only the HLO check (below), not the training runs"""
    hlo_batch: int = 40
    """global batch of the HLO check: no layer of the networks has 40 channels or a 40-pixel side, so a
    dimension of 40 in a convolution means the global batch (the per-device batch is 40 / devices)"""
    hlo_archs: tuple[str, ...] = ("tiny",)
    """networks whose training step the HLO check compiles (resnet18 takes a few minutes on a CPU)"""


def train(args: Args, name: str, devices: int | None, extra: list[str], steps: int | None = None) -> dict:
    """One cql_multigame.py run in a subprocess; returns its per-step metrics and XLA counter lines."""
    scratch = Path(args.scratch)
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices or 1), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable, "cql_multigame.py", "smoke",
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
from machinery import devices
xr.use_spmd()
processes = devices.setup_spmd()
b = {"obs": torch.zeros(BATCH, 4, 84, 84, dtype=torch.uint8), "game": torch.arange(BATCH)}
for k, v in devices.shard_batch(b, torch_xla.device(), processes.mesh).items():
    shards = [tuple(s.data.shape) for s in xs.wrap_if_sharded(v).local_shards]
    spec = torch_xla._XLAC._get_xla_sharding_spec(v)
    print(f"{k} {tuple(v.shape)} -> {len(shards)} shards of {shards[0]}, {spec}")
"""


STOP_PROBE = """
import torch, torch_xla.runtime as xr
from machinery import devices
xr.use_spmd()
processes = devices.setup_spmd()
n = xr.addressable_runtime_device_count()
for votes in ([0] * n, [0] * (n - 1) + [1], [1] + [0] * (n - 1)):  # one value per device, as hosts hand them
    print("votes", votes, "->", devices.mesh_max(torch.tensor(votes, dtype=torch.int32), processes.mesh))
print("spmd_any", devices.spmd_any(False, processes.mesh), devices.spmd_any(True, processes.mesh))
"""


def stop_probe(devices: int) -> list[str]:
    """How the hosts of an SPMD run agree to stop (machinery.devices.spmd_any): each device's vote, as a host
    hands over one per device it drives, reduced by the devices. One host here: its devices stand in for
    the hosts' (a pod's hosts each hand over their own rows of the same sharded tensor)."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    r = subprocess.run([sys.executable, "-c", STOP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"stop probe failed:\n{r.stderr[-3000:]}")
    lines = [line for line in r.stdout.splitlines() if line.startswith(("votes", "spmd_any"))]
    n = devices
    expected = [
        f"votes {[0] * n} -> 0",
        f"votes {[0] * (n - 1) + [1]} -> 1",
        f"votes {[1] + [0] * (n - 1)} -> 1",
    ]
    if lines != [*expected, "spmd_any False True"]:
        sys.exit(f"stop probe: the devices did not agree as expected: {lines}")
    return lines


def sharding_probe(devices: int, batch: int) -> list[str]:
    """How cql_multigame.shard_batch lays a batch over `devices` CPU devices (one line per tensor rank)."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    code = PROBE.replace("BATCH", str(batch))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sharding probe failed:\n{r.stderr[-3000:]}")
    return [line for line in r.stdout.splitlines() if "shards" in line]


HLO_PROBE = """
import sys, torch, torch_xla, torch_xla.runtime as xr
import cql_multigame as cql, resnet
from machinery import devices
if GROUP_NORM == "torch":  # the control: nn.GroupNorm's own forward, which the check must catch
    resnet.GroupNorm.forward = torch.nn.GroupNorm.forward
xr.use_spmd()
processes = devices.setup_spmd()
device = torch_xla.device()
torch.manual_seed(0)
games = ["Breakout", "Boxing", "Freeway"]
net = resnet.QNetwork(len(games), arch=ARCH).to(device)
learner = cql.Learner(
    net, resnet.target_network(net), cql.make_optimizer(net.parameters(), 1e-4, 3.125e-4, device),
    support=torch.linspace(-10, 10, 51, device=device), legal_table=cql.legal_action_table(games).to(device),
    cql_alpha=0.1,
)
g = torch.Generator().manual_seed(0)
b = BATCH
batch = {
    "obs": torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
    "action": torch.randint(0, 4, (b,), generator=g), "reward": torch.rand(b, generator=g),
    "discount": torch.full((b,), 0.97), "game": torch.arange(b) % len(games),
    "next_obs": torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
}
torch_xla.sync()
metrics = cql.update(learner, devices.shard_batch(batch, device, processes.mesh))  # the training step's graph
torch_xla.sync()
print("loss", float(metrics["loss"]))
"""

_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(([^)]*)\)(.*)$")


def parse_hlo(text: str) -> dict[str, dict]:
    """An HLO text module -> {instruction name: {"op", "dims" (every array shape of its result), "operands",
    "attrs"}}, over all computations (names are unique in a module)."""
    out = {}
    for line in text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            name, shape, op, operands, attrs = m.groups()
            dims = [[int(d) for d in ds.split(",") if d] for ds in re.findall(r"\w+\[([\d,]*)\]", shape)]
            out[name] = {
                "op": op,
                "dims": dims,
                "operands": re.findall(r"%([\w.\-]+)", operands),
                "attrs": attrs,
            }
    return out


def global_batch_ops(hlo: dict[str, dict], batch: int, groups: set[int]) -> list[str]:
    """The convolutions and batch norms of an SPMD-partitioned module (per-device shapes) that see the
    global batch: a convolution with a dimension equal to `batch` in its operands or result (forward,
    input-gradient and weight-gradient convolutions alike), a batch norm over batch * groups features (how
    torch-xla lowers nn.GroupNorm: [1, B*G, ...])."""
    bad = []
    for name, ins in hlo.items():
        shapes = ins["dims"] + [d for o in ins["operands"] if o in hlo for d in hlo[o]["dims"]]
        if ins["op"] == "convolution" and any(batch in s for s in shapes):
            bad.append(f"{name} {shapes}")
        elif ins["op"].startswith("batch-norm") and any(batch * g in s for s in shapes for g in groups):
            bad.append(f"{name} {shapes}")
    return bad


def hlo_check(arch: str, devices: int, batch: int, group_norm: str, scratch: Path) -> dict:
    """Compile one training step (cql_multigame.update on a batch sharded by shard_batch) under SPMD on
    `devices` CPU devices, with XLA dumping the module after SPMD partitioning (per-device shapes) and after
    optimization. Returns the step's all-gather count, its convolutions and batch norms, and those that see
    the global batch. group_norm: "ours" (resnet.GroupNorm) or "torch" (nn.GroupNorm's forward, the
    control)."""
    import torch

    import resnet

    dump = scratch / f"hlo_{arch}_{devices}dev_{group_norm}"
    if dump.exists():
        import shutil

        shutil.rmtree(dump)
    flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=spmd-partitioning"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "XLA_FLAGS": flags}
    code = HLO_PROBE.replace("GROUP_NORM", repr(group_norm)).replace("ARCH", repr(arch))
    code = code.replace("BATCH", str(batch))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"HLO probe ({arch}, {group_norm} GroupNorm) failed:\n{r.stderr[-3000:]}")

    def step_module(pattern: str) -> dict[str, dict]:  # the module with the most convolutions: the step
        modules = [parse_hlo(f.read_text()) for f in dump.glob(pattern)]
        return max(modules, key=lambda h: sum(i["op"] == "convolution" for i in h.values()))

    partitioned = step_module("*after_spmd-partitioning*.txt")
    optimized = step_module("*after_optimizations.txt")
    with torch.device("meta"):
        net = resnet.QNetwork(3, arch=arch)
    groups = {m.num_groups for m in net.modules() if isinstance(m, resnet.GroupNorm)}
    convs = [i for i in partitioned.values() if i["op"] == "convolution"]
    return {
        "arch": arch,
        "devices": devices,
        "batch": batch,
        "group_norm": group_norm,
        "all_gathers": sum(i["op"] in ("all-gather", "all-gather-start") for i in optimized.values()),
        "convolutions": len(convs),
        "batch_norms": sum(i["op"].startswith("batch-norm") for i in partitioned.values()),
        "global_batch_ops": global_batch_ops(partitioned, batch, groups),
        "loss": float(r.stdout.split("loss")[-1]),
    }


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


def hlo_checks(args: Args) -> tuple[list[dict], bool]:
    """The HLO check of every --hlo-archs network on the largest device count, with resnet.GroupNorm and
    with nn.GroupNorm (the control, which must be caught: otherwise the check is blind). Prints a table;
    returns the rows and whether resnet.GroupNorm keeps every convolution on the per-device batch."""
    n = max(args.devices)
    sys.path.insert(0, str(ROOT))
    rows = [
        hlo_check(arch, n, args.hlo_batch, gn, Path(args.scratch))
        for arch in args.hlo_archs
        for gn in ("ours", "torch")
    ]
    print(
        f"\nHLO of one SPMD training step on {n} CPU devices, global batch {args.hlo_batch} "
        f"({args.hlo_batch // n} rows per device): convolutions/batch norms after SPMD partitioning, "
        "all-gathers after optimization\n"
    )
    print(
        "| network | GroupNorm | all-gathers | convolutions | batch norms | ops on the global batch | loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        gn = "resnet.GroupNorm (per sample)" if r["group_norm"] == "ours" else "nn.GroupNorm (control)"
        print(
            f"| {r['arch']} | {gn} | {r['all_gathers']} | {r['convolutions']} | {r['batch_norms']} | "
            f"{len(r['global_batch_ops'])} | {r['loss']:.6f} |"
        )
    ok = True
    for r in rows:
        if r["group_norm"] == "ours" and r["global_batch_ops"]:
            ok = False
            print(
                f"FAIL: {r['arch']}: these ops see the global batch:\n  " + "\n  ".join(r["global_batch_ops"])
            )
        if r["group_norm"] == "torch" and not r["global_batch_ops"] and r["batch_norms"]:
            ok = False
            print(f"FAIL: {r['arch']}: the check missed nn.GroupNorm's gathered batch norms (it is blind)")
    return rows, ok


def main(args: Args) -> None:
    if any(args.batch_size % n for n in args.devices) or args.hlo_batch % max(args.devices):
        sys.exit(
            f"--batch-size {args.batch_size} must split over every device count {args.devices}, and "
            f"--hlo-batch {args.hlo_batch} over {max(args.devices)}."
        )
    if args.hlo_only:
        stop = stop_probe(max(args.devices))
        print(f"stop agreement over {max(args.devices)} devices (spmd_any): " + "; ".join(stop))
        rows, ok = hlo_checks(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"args": asdict(args), "hlo": rows, "stop_probe": stop}, indent=2)
        )
        print(f"\nwrote {args.out}")
        sys.exit(0 if ok else 1)
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
    stop = stop_probe(max(args.devices))
    print(f"stop agreement over {max(args.devices)} devices (spmd_any): " + "; ".join(stop))
    hlo_rows, hlo_ok = hlo_checks(args)
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
                "hlo": hlo_rows,
                "stop_probe": stop,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")
    if not hlo_ok:
        sys.exit(1)


if __name__ == "__main__":
    main(tyro.cli(Args))
