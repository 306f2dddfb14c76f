"""One-command check of a CUDA machine, also an offline one: tests, learner speed, a multi-game CQL training
at ResNet scale (DDP over every GPU); one table, rewritten after every part.

A typical GPU box has torch, numpy, OpenCV, TensorBoard, tqdm and pytest but not tyro, gymnasium or ale-py,
and no network. Fetch those wheels on a machine with network, copy the repo over, run one command:

    bash benchmarks/gpu_wheels.sh                        # networked machine: wheels -> benchmarks/wheels/
    rsync -a ./ gpubox:scaledql/                         # the repo, wheels included (git ignores them)
    python benchmarks/gpu_check.py --out-dir results/gpu # on the GPU box: about 6 minutes, 8 at most
    python benchmarks/gpu_check.py --device cpu          # smoke test of this script (CI runs it)

Packages that do not import are installed from benchmarks/wheels (--wheels) into a folder of their own
(--site; nothing of the box's Python is changed) and found through PYTHONPATH. Then, each part a subprocess
with its own time limit (one failure or hang costs that part, not the table):

1. tests/test_device.py with SCALEDQL_TEST_DEVICE=cuda: the C51 projection and loss with gradients, the
   networks, one full update, bf16 autocast, the pinned-memory batch stream, the training script with an
   exact --resume, each against the CPU; and the per-rank device choice (faked multi-GPU);
2. benchmarks/bench_learner.py for tiny, resnet18, resnet50 and resnet101 at batch 512 over 40 games, float32
   and bf16 autocast: samples/s and MFU (against the float32 peak it measures; bf16 rows can pass 100%);
3. a multi-game CQL training run (8 games, random-policy data recorded on the CPU cores first), resnet50,
   batch 512, bf16, with torchrun on every GPU: steps/s and the loss at every log step (it must go down),
   and with 2+ GPUs whether every rank ends with the same parameters. With one GPU it is one process: a
   training check, NOT a DDP check, and the table says so. Stopped by SIGTERM at its time limit (the run
   saves and reports what it logged).

After every part, <out-dir>/gpu_check.json and gpu_check.md hold everything so far (a hang or a killed
command still leaves the finished parts). Exit status 1 if any part failed. The limits (--budget-s in all,
and each part's) fit one 10-minute command with a margin. With --device cpu everything shrinks (tiny
network, batch 8, a few steps, 2 CPU processes with gloo).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_GAMES = ("Breakout", "Boxing", "Freeway", "Asterix", "Seaquest", "Qbert", "Enduro", "Pooyan")
NEEDED = {"tyro": "tyro", "gymnasium": "gymnasium", "ale_py": "ale-py"}  # import name -> distribution


@dataclass
class Args:
    device: str = "cuda"
    """cuda (every GPU) or cpu (a smoke test of this script, a minute)"""
    out_dir: str = str(ROOT / "benchmarks" / "results" / "gpu_check")
    """where gpu_check.json and gpu_check.md go (rewritten after every part)"""
    wheels: str = str(ROOT / "benchmarks" / "wheels")
    """wheels of packages the machine may lack (benchmarks/gpu_wheels.sh fetches them)"""
    site: str = str(Path(tempfile.gettempdir()) / "scaledql_site")
    """where missing packages are installed from --wheels (added to PYTHONPATH; the machine's Python stays)"""
    archs: tuple[str, ...] = ("tiny", "resnet18", "resnet50", "resnet101")
    """architectures timed by bench_learner (--device cpu: tiny)"""
    batch_size: int = 512
    """batch of the learner benchmark and of the training run (paper: 512; --device cpu: 8)"""
    bench_steps: int = 5
    """timed steps per bench_learner variant"""
    train_arch: str = "resnet50"
    """network of the training run (--device cpu: tiny)"""
    train_steps: int = 400
    """gradient steps of the training run, if its time limit allows (--device cpu: 6)"""
    record: int = 3000
    """random-policy transitions recorded per game for the training run (--device cpu: 600)"""
    nproc: int = 0
    """processes of the training run (0: every GPU; --device cpu: 2)"""
    skip: tuple[str, ...] = ()
    """parts to leave out: tests, bench, train"""
    scratch: str = str(Path(tempfile.gettempdir()) / "scaledql_gpu_check")
    """recorded data and runs of the training run"""
    budget_s: float = 480.0
    """seconds for the whole check; a part starts only with its minimum left, and ends by the budget"""
    limits_s: dict[str, float] = field(
        default_factory=lambda: {"install": 60, "tests": 110, "bench_variant": 40, "bench": 170, "train": 170}
    )
    """time limit of each part (bench_variant: one architecture and dtype); a part ends at its limit"""


# ------------------------------------------------------------------------------------------------ packages


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install_missing(wheels: Path, site: Path, timeout: float) -> dict:
    """The NEEDED packages that do not import, and any of their dependencies this Python lacks, installed
    from `wheels` into `site` without the network and without dependency resolution (each wheel whose
    distribution is not installed yet, once); `site` goes first on sys.path and PYTHONPATH."""
    from importlib import metadata

    site.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    missing = missing_modules()
    row: dict = {"part": "install", "missing_before": missing, "ok": True, "wall_s": 0.0}
    if not missing:
        row["summary"] = f"nothing to install ({', '.join(NEEDED.values())} import)"
        return row
    wheel_files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not wheel_files:
        row.update(ok=False, summary=f"{', '.join(missing)} missing and no wheels in {wheels}; run "
                   "benchmarks/gpu_wheels.sh on a machine with network and copy the folder here")  # fmt: skip
        return row

    def dist_name(path: Path) -> str:  # wheel file names: {distribution}-{version}-... with _ for - and .
        return path.name.split("-")[0].lower().replace("_", "-")

    def installed(name: str) -> bool:
        try:
            metadata.distribution(name)
            return True
        except metadata.PackageNotFoundError:
            return False

    todo = [w for w in wheel_files if not installed(dist_name(w))]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, todo)]  # fmt: skip
    code, text, wall = run(cmd, timeout=timeout)
    importlib.invalidate_caches()
    still = missing_modules()
    row.update(
        ok=code == 0 and not still, wall_s=wall, installed=[w.name for w in todo], missing_after=still,
        summary=(f"installed {len(todo)} wheels into {site}" if code == 0 and not still
                 else f"FAILED: still missing {', '.join(still) or '-'}: {tail(text, 400)}"),
    )  # fmt: skip
    return row


# ------------------------------------------------------------------------------------------------ the parts


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds); 124 if it ran past `timeout` (its process group is killed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code, text = 124, (text or "") + f"\ntimed out after {timeout:.0f} s"
    return code, text, time.perf_counter() - t0


def tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def check_tests(args: Args, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"]
    if args.device == "cpu":  # the smoke test: the fast checks only
        cmd += ["-k", "projection or bf16 or one_update or local_rank"]
    code, text, wall = run(cmd, env={"SCALEDQL_TEST_DEVICE": args.device}, timeout=timeout)
    summary = [line for line in text.splitlines() if re.search(r" (passed|failed|error)", line)]
    return {"part": "tests", "ok": code == 0, "wall_s": wall,
            "summary": (summary or ["no summary"])[-1].strip("= ") + (" (timed out)" if code == 124 else ""),
            "log": tail(text) if code else ""}  # fmt: skip


def check_bench_one(args: Args, arch: str, bf16: bool, timeout: float) -> dict:
    out = Path(args.scratch) / f"bench_learner_{arch}_{'bf16' if bf16 else 'fp32'}.json"
    cmd = [
        sys.executable, "benchmarks/bench_learner.py", "--device", args.device, "--archs", arch,
        "--batch-size", str(args.batch_size), "--num-games", str(min(40, args.batch_size)),
        "--steps", str(args.bench_steps), "--warmup", "1", "--out", str(out),
    ] + (["--bf16"] if bf16 else [])  # fmt: skip
    code, text, wall = run(cmd, timeout=timeout)
    row = {
        "part": "bench",
        "arch": arch,
        "dtype": "bf16" if bf16 else "fp32",
        "ok": code == 0,
        "wall_s": wall,
    }
    if code == 0:
        result = json.loads(out.read_text())
        r, peak = result["rows"][0], result["info"]["peak_flops"]
        row.update(samples_per_s=r["samples_per_s"], steps_per_s=r["steps_per_s"],
                   mfu=r["flops_per_s"] / peak, peak_flops=peak, gpu=result["info"]["gpu"])  # fmt: skip
    else:
        row["log"] = "out of memory" if "out of memory" in text.lower() else tail(text)
    return row


def check_train(args: Args, timeout: float) -> dict:
    """The training run: torchrun over `nproc` processes (one per GPU), SIGTERM at `timeout` minus a margin
    for its save; its metrics.jsonl (the loss at each log step) and TensorBoard's samples/s."""
    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    row: dict = {"part": "train", "nproc": nproc, "arch": args.train_arch, "ok": False,
                 "ddp_check": nproc > 1}  # fmt: skip
    if nproc < 1:
        return {**row, "log": "torch sees no GPU"}
    scratch = Path(args.scratch)
    games = TRAIN_GAMES if args.device == "cuda" else TRAIN_GAMES[:2]
    row["games"] = len(games)
    run_dir = scratch / "runs" / f"train_{nproc}"
    if run_dir.exists():  # a fresh run each time
        import shutil

        shutil.rmtree(run_dir)
    log_every = max(1, args.train_steps // 8)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "cql_multigame.py", "smoke", "--games", *games, "--data-dir", str(scratch / "data"),
        "--runs-dir", str(scratch / "runs"), "--run-name", run_dir.name,
        "--record-missing", str(args.record), "--arch", args.train_arch, "--batch-size", str(args.batch_size),
        "--total-steps", str(args.train_steps),
        "--log-every", str(log_every), "--save-every", str(args.train_steps), "--eval-episodes", "1",
        "--eval-envs", "1", "--eval-max-steps", "50", "--save-all-ranks", "--device", args.device,
        "--target-update-every", str(max(1, args.train_steps // 4)),
    ] + (["--bf16"] if args.device == "cuda" else [])  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    stopped = False
    try:
        text, _ = proc.communicate(timeout=max(timeout - 25, 1))
    except subprocess.TimeoutExpired:  # the run's own stop: save, report, exit 143
        stopped = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            text, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
    row["wall_s"] = time.perf_counter() - t0
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    row["losses"] = {r["step"]: round(r["loss"], 4) for r in rows}
    row["steps_done"] = rows[-1]["step"] if rows else 0
    row["stopped_at_limit"] = stopped
    sps = samples_per_second(run_dir)
    if sps:
        row["steps_per_s"] = sps[-1] / args.batch_size  # the last log interval: warmed up
    if len(rows) >= 2:
        row["loss_down"] = rows[-1]["loss"] < rows[0]["loss"]
    if nproc > 1 and proc.returncode == 0:
        params = [torch.load(run_dir / f"params_rank{k}.pt", weights_only=True) for k in range(nproc)]
        row["ranks_identical"] = all(torch.equal(params[0][k], p[k]) for p in params[1:] for k in params[0])
    learned = row.get("loss_down") or args.device == "cpu"  # the smoke test's few steps need not learn
    row["ok"] = bool(learned) and row.get("ranks_identical", True) and (proc.returncode == 0 or stopped)
    if not row["ok"]:
        row["log"] = tail(text)
    return row


def samples_per_second(run_dir: Path) -> list[float]:
    """charts/samples_per_second of a run's TensorBoard events, in step order."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/samples_per_second" not in acc.Tags().get("scalars", []):
        return []
    return [e.value for e in acc.Scalars("charts/samples_per_second")]


# ------------------------------------------------------------------------------------------------ the table


def table(args: Args, result: dict) -> str:
    gpu = next((r.get("gpu") for r in result["parts"] if r.get("gpu")), None)
    lines = [
        f"## Accelerator check: {args.device}{f' ({gpu})' if gpu else ''}, torch {result['torch']}, "
        f"{result['wall_s']:.0f} s so far{'' if result.get('done') else ' (running)'}",
        "",
        "| part | setting | result |",
        "|---|---|---|",
    ]
    for r in result["parts"]:
        if r["part"] == "install":
            lines.append(
                f"| install | missing: {', '.join(r['missing_before']) or 'none'} | {r['summary']} |"
            )
        elif r["part"] == "tests":
            lines.append(
                f"| tests | tests/test_device.py on {args.device} | {r['summary']} ({r['wall_s']:.0f} s) |"
            )
        elif r["part"] == "bench":
            setting = f"bench_learner {r['arch']}, batch {args.batch_size}, {r['dtype']}"
            if r["ok"]:
                res = (
                    f"{r['samples_per_s']:,.0f} samples/s ({r['steps_per_s']:.2f} steps/s), MFU "
                    f"{100 * r['mfu']:.1f}% (of fp32 peak {r['peak_flops'] / 1e12:.1f} TFLOP/s)"
                )
            elif r.get("skipped"):
                res = f"skipped: {r['skipped']}"
            else:
                res = f"FAILED: {(r.get('log') or '?').splitlines()[-1]}"
            lines.append(f"| learner | {setting} | {res} |")
        elif r["part"] == "train":
            kind = (f"torchrun x{r['nproc']} (DDP check)" if r.get("ddp_check")
                    else "1 process: NOT a DDP check")  # fmt: skip
            setting = f"{kind}, {r.get('games')} games, {r['arch']}, batch {args.batch_size}"
            if r.get("skipped"):
                res = f"skipped: {r['skipped']}"
            elif r.get("losses"):
                losses = list(r["losses"].items())
                limit = " (stopped at its time limit)" if r["stopped_at_limit"] else ""
                res = (
                    f"{r['steps_done']} steps{limit}, {r.get('steps_per_s', float('nan')):.2f} steps/s; loss "
                    + " → ".join(f"{v:.3f}" for _, v in losses[:1] + losses[1:][-3:])
                    + f" ({'down' if r.get('loss_down') else 'NOT down'})"
                )
                if "ranks_identical" in r:
                    res += f"; ranks identical: {r['ranks_identical']}"
            else:
                res = "FAILED: " + ((r.get("log") or "?").splitlines() or ["?"])[-1]
            lines.append(f"| training | {setting} | {res} |")
    return "\n".join(lines) + "\n"


def write(args: Args, result: dict, t0: float) -> None:
    """gpu_check.json and gpu_check.md as they stand: after every part, so a killed command leaves them."""
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(table(args, result))


# ------------------------------------------------------------------------------------------------ main


def main(args: Args, install: dict | None = None) -> int:
    """The check; `install`: install_missing's row when cli() already ran it (tyro itself may be a wheel)."""
    unknown = set(args.skip) - {"tests", "bench", "train"}
    if unknown or args.device not in ("cuda", "cpu"):
        sys.exit("error: --device must be cuda or cpu and --skip a subset of tests, bench, train.")
    t0 = time.perf_counter()
    limits = {"install": 60, "tests": 110, "bench_variant": 40, "bench": 170, "train": 170, **args.limits_s}
    deadline = t0 + args.budget_s

    def left(part: str) -> float:  # this part's limit, cut to what the budget has left
        return min(limits[part], deadline - time.perf_counter())

    if install is None:
        install = install_missing(Path(args.wheels), Path(args.site), left("install"))
    import torch

    result: dict = {"args": asdict(args), "torch": torch.__version__, "parts": [install]}
    write(args, result, t0)
    if not install["ok"]:
        print(table(args, result), file=sys.stderr)
        return 1
    if args.device == "cpu":  # the smoke test
        args.archs, args.batch_size, args.bench_steps, args.train_steps = ("tiny",), 8, 1, 6
        args.train_arch, args.record = "tiny", 600
    elif not torch.cuda.is_available():
        sys.exit("error: torch sees no GPU; run with --device cpu for the smoke test.")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)

    if "tests" not in args.skip:
        result["parts"].append(check_tests(args, left("tests")))
        write(args, result, t0)
    if "bench" not in args.skip:
        bench_end = time.perf_counter() + left("bench")
        for bf16 in (False, True):
            for arch in args.archs:
                remaining = min(limits["bench_variant"], bench_end - time.perf_counter())
                if remaining < 10:
                    row = {"part": "bench", "arch": arch, "dtype": "bf16" if bf16 else "fp32", "ok": True,
                           "skipped": "the bench part's time limit was used up"}  # fmt: skip
                else:
                    row = check_bench_one(args, arch, bf16, remaining)
                result["parts"].append(row)
                write(args, result, t0)
    if "train" not in args.skip:
        limit = left("train")
        if limit < 60:
            row = {"part": "train", "nproc": args.nproc, "arch": args.train_arch, "ok": False,
                   "skipped": f"only {limit:.0f} s of --budget-s left"}  # fmt: skip
        else:
            row = check_train(args, limit)
        result["parts"].append(row)
    result["done"] = True
    write(args, result, t0)
    print("\n" + table(args, result))
    for r in result["parts"]:
        if not r["ok"] and r.get("log"):
            print(f"\n{r['part']} {r.get('arch', '')} log (tail):\n{r['log']}", file=sys.stderr)
    print(f"wrote {Path(args.out_dir) / 'gpu_check.json'} and gpu_check.md")
    return 0 if all(r["ok"] for r in result["parts"]) else 1


def cli(argv: list[str] | None = None) -> tuple[Args, dict]:
    """The flags (tyro) and install_missing's row: the install comes first, since tyro may be one of the
    wheels (--wheels and --site are read before tyro)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--wheels", default=Args.wheels)
    pre.add_argument("--site", default=Args.site)
    known, _ = pre.parse_known_args(argv)
    install = install_missing(Path(known.wheels), Path(known.site), 60)
    try:
        import tyro
    except ImportError:
        sys.exit(
            f"error: tyro is missing and {known.wheels} holds no wheel for it; run benchmarks/gpu_wheels.sh "
            "on a machine with network and copy benchmarks/wheels here (or pip install tyro)."
        )
    return tyro.cli(Args, args=argv), install


if __name__ == "__main__":
    sys.exit(main(*cli()))
