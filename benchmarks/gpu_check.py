"""One-command check of an accelerator machine (CUDA): tests, learner speed, multi-GPU training; one table.

Run it on the first CUDA machine this project gets (under 8 minutes on one modern GPU; the README's
Performance section says where its table goes):

    python benchmarks/gpu_check.py                  # CUDA: all GPUs
    python benchmarks/gpu_check.py --device cpu     # smoke test of this script (CI runs it: seconds)

It runs, each as a subprocess so that one failure does not hide the others:

1. tests/test_device.py with SCALEDQL_TEST_DEVICE=<device>: the C51 projection and C51 + CQL loss with
   gradients, the networks' forward/backward, one full update (fused Adam), bf16 autocast, the pinned-memory
   batch stream and the training script with an exact --resume, each against the CPU;
2. benchmarks/bench_learner.py for tiny, impala, resnet18, resnet50 and resnet101 at batch 512 over 40 games,
   in float32 and in bf16 autocast: samples/s and MFU (against the float32 peak bench_learner measures on
   the same device, so bf16 rows can exceed 100%);
3. a 300-step multi-game training run (8 games recorded on the spot with replay.py, random policy) with
   torchrun on all GPUs (nccl DDP), batch 512, bf16: samples/s and whether all ranks end with identical
   parameters.

Then it prints one markdown table and writes benchmarks/results/gpu_check.json. Exit status 1 if any part
failed. With --device cpu everything shrinks (tiny network, batch 8, 4 steps, 2 CPU processes with gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
TRAIN_GAMES = ("Breakout", "Boxing", "Freeway", "Asterix", "Seaquest", "Qbert", "Enduro", "Pooyan")


@dataclass
class Args:
    device: str = "cuda"
    """cuda (all GPUs) or cpu (a smoke test of this script, seconds)"""
    archs: tuple[str, ...] = ("tiny", "impala", "resnet18", "resnet50", "resnet101")
    """architectures timed by bench_learner (with --device cpu: tiny only)"""
    batch_size: int = 512
    """batch of the learner benchmark and of the training run (paper: 512; --device cpu: 8)"""
    bench_steps: int = 5
    """timed steps per bench_learner variant (interleaved; best and median reported)"""
    train_steps: int = 300
    """gradient steps of the torchrun training run (--device cpu: 4)"""
    train_arch: str = "resnet18"
    """network of the training run (--device cpu: tiny)"""
    nproc: int = 0
    """processes of the training run (0: every GPU; --device cpu: 2)"""
    skip: tuple[str, ...] = ()
    """parts to leave out: tests, bench, train"""
    scratch: str = "/tmp/scaledql_gpu_check"
    """recorded data and runs of the training run"""
    out: str = str(ROOT / "benchmarks" / "results" / "gpu_check.json")
    """where the JSON goes"""


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds)"""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        code, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout} s: {e}"
    return code, text, time.perf_counter() - t0


def tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def check_tests(args: Args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"]
    if args.device == "cpu":  # the smoke test: the fast checks only
        cmd += ["-k", "projection or bf16 or one_update"]
    code, text, wall = run(cmd, env={"SCALEDQL_TEST_DEVICE": args.device})
    summary = [
        line for line in text.splitlines() if " passed" in line or " failed" in line or " error" in line
    ]
    return {"ok": code == 0, "summary": (summary or ["no summary"])[-1].strip("= "), "wall_s": wall,
            "log": tail(text) if code else ""}  # fmt: skip


def check_bench(args: Args, bf16: bool) -> list[dict]:
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"bench_learner_{'bf16' if bf16 else 'fp32'}.json"
    rows = []
    for arch in args.archs:  # one process per arch: an out-of-memory error costs one row
        cmd = [
            sys.executable, "benchmarks/bench_learner.py", "--device", args.device, "--archs", arch,
            "--batch-size", str(args.batch_size), "--num-games", str(min(40, args.batch_size)),
            "--steps", str(args.bench_steps), "--warmup", "1", "--out", str(out),
        ] + (["--bf16"] if bf16 else [])  # fmt: skip
        code, text, wall = run(cmd)
        row = {"arch": arch, "dtype": "bf16" if bf16 else "fp32", "ok": code == 0, "wall_s": wall}
        if code == 0:
            result = json.loads(out.read_text())
            r, peak = result["rows"][0], result["info"]["peak_flops"]
            row.update(
                samples_per_s=r["samples_per_s"], steps_per_s=r["steps_per_s"], mfu=r["flops_per_s"] / peak,
                peak_flops=peak, gpu=result["info"]["gpu"],
            )  # fmt: skip
        else:
            row["log"] = "out of memory" if "out of memory" in text.lower() else tail(text)
        rows.append(row)
    return rows


def check_train(args: Args) -> dict:
    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if nproc < 1:
        return {"ok": False, "log": "torch sees no GPU"}
    scratch = Path(args.scratch)
    games = TRAIN_GAMES if args.device == "cuda" else TRAIN_GAMES[:2]
    run_dir = scratch / "runs" / f"train_{nproc}"
    if run_dir.exists():  # a fresh run each time
        import shutil

        shutil.rmtree(run_dir)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "cql_multigame.py", "demo", "--games", *games, "--data-dir", str(scratch / "data"),
        "--runs-dir", str(scratch / "runs"), "--run-name", run_dir.name,
        "--record-missing", "3000" if args.device == "cuda" else "600", "--arch", args.train_arch,
        "--batch-size", str(args.batch_size), "--total-steps", str(args.train_steps),
        "--log-every", str(max(1, args.train_steps // 3)), "--save-every", str(args.train_steps),
        "--eval-episodes", "1", "--eval-envs", "1", "--eval-max-steps", "50", "--save-all-ranks",
        "--device", args.device,
    ] + (["--bf16"] if args.device == "cuda" else [])  # fmt: skip
    code, text, wall = run(cmd, env={"OMP_NUM_THREADS": "2"})
    row = {"nproc": nproc, "games": len(games), "arch": args.train_arch, "ok": code == 0, "wall_s": wall}
    if code != 0:
        row["log"] = tail(text)
        return row
    params = [torch.load(run_dir / f"params_rank{k}.pt", weights_only=True) for k in range(nproc)]
    row["ranks_identical"] = all(torch.equal(params[0][k], p[k]) for p in params[1:] for k in params[0])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row["final_loss"] = metrics[-1]["loss"]
    row["ok"] = row["ranks_identical"]
    # samples/s of the whole command (start-up, recording and the final evaluation included: a lower bound)
    row["samples_per_s_overall"] = args.train_steps * args.batch_size / wall
    return row


def main(args: Args) -> int:
    unknown = set(args.skip) - {"tests", "bench", "train"}
    if unknown or args.device not in ("cuda", "cpu"):
        sys.exit("error: --device must be cuda or cpu and --skip a subset of tests, bench, train.")
    if args.device == "cpu":  # the smoke test
        args.archs, args.batch_size, args.bench_steps, args.train_steps = ("tiny",), 8, 1, 4
        args.train_arch = "tiny"
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: torch sees no GPU; run with --device cpu for the smoke test.")
    t0 = time.perf_counter()
    result: dict = {"args": asdict(args)}
    if "tests" not in args.skip:
        result["tests"] = check_tests(args)
    if "bench" not in args.skip:
        result["bench"] = check_bench(args, bf16=False) + check_bench(args, bf16=True)
    if "train" not in args.skip:
        result["train"] = check_train(args)
    result["wall_s"] = time.perf_counter() - t0

    gpu = next((r.get("gpu") for r in result.get("bench", []) if r.get("gpu")), None)
    print(
        f"\n## Accelerator check: {args.device}{f' ({gpu})' if gpu else ''}, "
        f"{result['wall_s']:.0f} s in all\n"
    )
    print("| part | setting | result |")
    print("|---|---|---|")
    if "tests" in result:
        t = result["tests"]
        print(f"| tests | tests/test_device.py on {args.device} | {t['summary']} ({t['wall_s']:.0f} s) |")
    for r in result.get("bench", []):
        setting = f"bench_learner {r['arch']}, batch {args.batch_size}, {r['dtype']}"
        if r["ok"]:
            res = (
                f"{r['samples_per_s']:,.0f} samples/s, MFU {100 * r['mfu']:.1f}% "
                f"(of fp32 peak {r['peak_flops'] / 1e12:.1f} TFLOP/s)"
            )
        else:
            res = f"FAILED: {r['log'].splitlines()[-1] if r['log'] else '?'}"
        print(f"| learner | {setting} | {res} |")
    if "train" in result:
        t = result["train"]
        setting = (
            f"torchrun x{t.get('nproc')}, {t.get('games')} games, {args.train_arch}, "
            f"batch {args.batch_size}, {args.train_steps} steps"
        )
        if "ranks_identical" in t:
            res = (
                f"final loss {t['final_loss']:.3f}, ranks identical: {t['ranks_identical']}, "
                f"{t['samples_per_s_overall']:,.0f} samples/s over the whole command ({t['wall_s']:.0f} s)"
            )
        else:
            res = "FAILED: " + (t.get("log", "?").splitlines() or ["?"])[-1]
        print(f"| training | {setting} | {res} |")
    for part in ("tests", "train"):
        if part in result and not result[part]["ok"] and result[part].get("log"):
            print(f"\n{part} log (tail):\n{result[part]['log']}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    ok = all(result[p]["ok"] for p in ("tests", "train") if p in result)
    ok = ok and all(r["ok"] for r in result.get("bench", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
