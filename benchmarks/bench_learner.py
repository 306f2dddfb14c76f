"""Benchmark of the learner update of cql_multigame.py (Scaled QL, Sec. 4) against the work it cannot avoid.

For each architecture, on one fixed batch already on the device (sampling excluded: bench_pipeline.py
measures that), it times, interleaved step by step so that background load hits all of them alike:

- full:   the training loop's update: cql_multigame.compute_loss (target forward, C51 projection,
          online forward, C51 + CQL loss) + backward + Adam step;
- bare:   the work no implementation can skip on the same batch: the target forward (no_grad) and the
          online forward + backward + Adam step with a trivial loss (the sum of the logits);
- parts:  the target forward alone, and the loss math alone (projection + loss, forward and backward, on
          fixed logits), to show where any difference comes from.

It prints gradient steps/s, samples/s, the ratio full/bare (goal <= 1.10) and the achieved FLOP/s next to
this machine's measured float32 peak (model FLOPs utilization, as nanoGPT's bench.py reports it): the
faster of a large matmul and a large 3x3 convolution, timed in the same interleaved rounds.
FLOPs are counted with torch.utils.flop_counter on the meta device: online forward + backward (about 3x
the forward) plus the target forward; the loss math adds < 0.01% and is not counted. The per-game heads
count as executed (all G heads, resnet.GameHeads form (a)). Writes JSON to benchmarks/results/.

    python benchmarks/bench_learner.py                                  # tiny, impala, resnet18 on CPU
    python benchmarks/bench_learner.py --no-fused-adam                  # unfused Adam, for comparison
    python benchmarks/bench_learner.py --threads 1 --steps 8            # steadier on a shared machine
    python benchmarks/bench_learner.py --device cuda --batch-size 512 --bf16   # + resnet34/50/101 on GPU

Left out: data-parallel all-reduce (one process), the target-network copy every 2000 steps (amortized
to nothing), logging.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atari  # noqa: E402
import cql_multigame as cql  # noqa: E402
import resnet  # noqa: E402

CPU_ARCHS = ("tiny", "impala", "resnet18")


@dataclass
class Args:
    archs: tuple[str, ...] = ()
    """architectures (resnet.ARCHS); empty: tiny, impala, resnet18, plus resnet34/50/101 on a GPU or TPU"""
    batch_size: int = 40
    """samples per update (ours: 40 on a CPU, one per game, to keep the run short; paper: 512)"""
    num_games: int = 40
    """games (one head each); the batch holds an equal share of each (paper: 40)"""
    steps: int = 8
    """timed steps per variant, interleaved (best, median and paired ratios reported)"""
    warmup: int = 1
    """untimed steps of every variant first (with --compile: the compilation)"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N, mps or xla (cql_multigame.select_device)"""
    channels_last: bool = False
    """networks and inputs channels-last (as cql_multigame --channels-last)"""
    bf16: bool = False
    """bfloat16 autocast for the networks on CUDA/XLA, as cql_multigame --bf16 (ignored on CPU, like there)"""
    bf16_cpu: bool = False
    """with --bf16: autocast on CPU too (cql_multigame ignores --bf16 on CPU; this measures what it gives)"""
    compile: bool = False
    """torch.compile both the full loss and the bare work (as cql_multigame --compile)"""
    fused_adam: bool = True
    """the training scripts' optimizer (cql.make_optimizer: fused Adam on CPU/CUDA); off: Adam's loop"""
    threads: int | None = None
    """torch.set_num_threads; None keeps torch's default (all cores)"""
    peak_size: int = 2048
    """side of the square float32 matmul that measures the machine's peak FLOP/s"""
    out: Path = field(
        default_factory=lambda: Path(__file__).resolve().parent / "results" / "bench_learner.json"
    )
    """where the JSON goes"""


# ----------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait until the device has finished all queued work (timing needs it on CUDA and XLA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla
        import torch_xla.core.xla_model as xm

        torch_xla.sync()
        xm.wait_device_ops()


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, steps: int, warmup: int):
    """{name: [seconds per call]}: the fns are called in turn, `steps` times each, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def matmul(device: torch.device, n: int) -> tuple[Callable[[], None], int]:
    """One float32 n x n matmul and its FLOPs: timed next to the update, it gives the machine's peak."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return (lambda: torch.matmul(a, b)), 2 * n**3


def conv(device: torch.device) -> tuple[Callable[[], None], int]:
    """One large float32 3x3 convolution (channels-last, [16, 512, 14, 14]) and its FLOPs.

    The second peak: on CPUs where the BLAS takes a slower path than the convolution library (this
    repo's AMD EPYC: MKL's sgemm reaches ~200 GFLOP/s, oneDNN's convolutions ~500), the networks' convs
    run faster than any matmul, and a matmul-only peak would give an MFU above 100%.
    """
    x = torch.randn(16, 512, 14, 14, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 512, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    return (lambda: torch.nn.functional.conv2d(x, w, padding=1)), 2 * 16 * 512 * 512 * 9 * 14 * 14


# ----------------------------------------------------------------------------------------------------
# The batch, the FLOP count, the variants
# ----------------------------------------------------------------------------------------------------


def fixed_batch(batch_size: int, games: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """A replay-shaped batch of random frames: equal share per game, legal data actions, some terminals."""
    g = torch.Generator().manual_seed(0)
    game = torch.arange(batch_size) % len(games)  # [B]
    legal = [atari.legal_actions(name) for name in games]
    pick = torch.randint(18, (batch_size,), generator=g)
    action = torch.tensor([legal[i][int(j) % len(legal[i])] for i, j in zip(game, pick, strict=True)])
    discount = torch.where(torch.rand(batch_size, generator=g) < 0.1, 0.0, 0.99**3)  # [B]
    batch = {
        "obs": torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8, generator=g),
        "next_obs": torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8, generator=g),
        "action": action.long(),
        "reward": torch.randint(-1, 2, (batch_size,), generator=g).float(),
        "discount": discount.float(),
        "game": game.long(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def update_flops(arch: str, batch_size: int, num_games: int) -> tuple[int, int]:
    """(FLOPs of one update: online forward+backward + target forward, FLOPs of one forward), on meta."""
    with torch.device("meta"):
        net = resnet.QNetwork(num_games, arch)
        obs = torch.zeros(batch_size, 4, 84, 84, dtype=torch.uint8)
        game = torch.zeros(batch_size, dtype=torch.long)
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                net(obs, game)
        with FlopCounterMode(display=False) as train:
            net(obs, game).sum().backward()
    return train.get_total_flops() + fwd.get_total_flops(), fwd.get_total_flops()


def bench_arch(arch: str, args: Args, device: torch.device, bf16: bool) -> dict:
    games = list(atari.TRAIN_GAMES[: args.num_games])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = resnet.QNetwork(len(games), arch).to(device).to(memory_format=memory_format)
    target = copy.deepcopy(net).requires_grad_(False)
    bare_net = copy.deepcopy(net)  # same weights, its own optimizer: the two variants never share state
    if args.fused_adam:
        opt = cql.make_optimizer(net.parameters(), 2e-4, 3.125e-4, device)
        bare_opt = cql.make_optimizer(bare_net.parameters(), 2e-4, 3.125e-4, device)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, eps=3.125e-4)
        bare_opt = torch.optim.Adam(bare_net.parameters(), lr=2e-4, eps=3.125e-4)
    batch = fixed_batch(args.batch_size, games, device)
    support = torch.linspace(-10.0, 10.0, net.num_atoms, device=device)
    legal_table = cql.legal_action_table(games).to(device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def bare_loss(net, target_net, batch):
        with torch.no_grad(), autocast():
            target_net(batch["next_obs"], batch["game"])  # the target forward the update needs
        with autocast():
            logits = net(batch["obs"], batch["game"])  # [B, A, K]
        return logits.float().sum()  # trivial loss: backward is the network's own backward only

    loss_fn, bare_fn = cql.compute_loss, bare_loss
    if args.compile:
        loss_fn, bare_fn = torch.compile(loss_fn), torch.compile(bare_fn)

    def full():  # exactly cql_multigame.main's update
        loss, _ = loss_fn(net, target, batch, support, legal_table, 0.1, 1.0, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cql.sync_device(device)

    def bare():
        loss = bare_fn(bare_net, target, batch)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()
        cql.sync_device(device)

    def target_fwd():
        with torch.no_grad(), autocast():
            target(batch["next_obs"], batch["game"])
        cql.sync_device(device)

    # the loss math alone (projection + C51/CQL loss, forward and backward) on fixed logits
    with torch.no_grad():
        logits0 = net(batch["obs"], batch["game"])
        next_logits0 = target(batch["next_obs"], batch["game"])

    def loss_math():
        logits = logits0.detach().requires_grad_(True)
        next_probs = next_logits0.softmax(-1)  # [B, A, K]
        next_q = (next_probs * support).sum(-1).masked_fill(~legal_table[batch["game"]], float("-inf"))
        idx = torch.arange(next_probs.shape[0], device=device)
        tp = cql.categorical_projection(
            next_probs[idx, next_q.argmax(-1)], batch["reward"], batch["discount"], support
        )
        loss, _ = cql.c51_cql_loss(logits, batch["action"], tp, support, legal_table[batch["game"]], 0.1)
        loss.backward()
        cql.sync_device(device)

    peak_mm, mm_flops = matmul(device, args.peak_size)
    peak_conv, conv_flops = conv(device)
    t0 = time.perf_counter()
    full()
    bare()
    sync(device)
    first_s = time.perf_counter() - t0  # with --compile: the compilation of both
    times = time_interleaved(
        {
            "full": full,
            "bare": bare,
            "target_fwd": target_fwd,
            "loss_math": loss_math,
            "peak_matmul": peak_mm,  # the peaks, under the same load
            "peak_conv": peak_conv,
        },
        device,
        args.steps,
        max(args.warmup - 1, 0),
    )
    flops, fwd_flops = update_flops(arch, args.batch_size, len(games))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "arch": arch,
        "params": resnet.count_parameters(net)["total"],
        "first_step_s": first_s,
        "best_s": best,
        "median_s": med,
        "times_s": times,
        "ratio_best": best["full"] / best["bare"],
        "ratio_median": med["full"] / med["bare"],
        # median of full_i / bare_i over the rounds: the two steps of a round run back to back, so a slow
        # spell of the shared machine hits both and cancels; the steadiest reading of the three
        "ratio_paired": statistics.median(f / b for f, b in zip(times["full"], times["bare"], strict=True)),
        # the same ratio from the parts: bare + the loss math (everything compute_loss adds to the networks)
        "ratio_from_parts": (best["bare"] + best["loss_math"]) / best["bare"],
        "steps_per_s": 1.0 / best["full"],
        "samples_per_s": args.batch_size / best["full"],
        "bare_steps_per_s": 1.0 / best["bare"],
        "flops_per_update": flops,
        "fwd_flops": fwd_flops,
        "flops_per_s": flops / best["full"],
        "matmul_peak_flops": mm_flops / best["peak_matmul"],
        "conv_peak_flops": conv_flops / best["peak_conv"],
    }


def main(args: Args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = cql.select_device(args.device)
    except cql.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    accelerator = device.type in ("cuda", "xla")
    archs = args.archs or (tuple(resnet.ARCHS) if accelerator else CPU_ARCHS)
    unknown = [a for a in archs if a not in resnet.ARCHS]
    if unknown:
        raise SystemExit(f"error: unknown --archs {unknown[0]!r}; choose from {', '.join(resnet.ARCHS)}.")
    if not 1 <= args.num_games <= len(atari.TRAIN_GAMES) or args.batch_size < args.num_games:
        raise SystemExit(
            f"error: --num-games must be in 1..{len(atari.TRAIN_GAMES)} and --batch-size at least "
            "--num-games (every batch holds each game)."
        )
    bf16 = args.bf16 and (accelerator or (args.bf16_cpu and device.type == "cpu"))  # as cql_multigame.main
    if args.bf16 and not bf16:
        print(
            f"note: --bf16 is ignored on {device.type}, as in cql_multigame.py (see --bf16-cpu)",
            file=sys.stderr,
        )

    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_avg_start": os.getloadavg(),
        "bf16": bf16,
    }
    rows = []
    for arch in archs:
        r = bench_arch(arch, args, device, bf16)
        rows.append(r)
        print(
            f"  {arch:9s} full {1e3 * r['best_s']['full']:8.1f} ms  bare {1e3 * r['best_s']['bare']:8.1f} ms"
            f"  ratio {r['ratio_best']:.3f} (paired {r['ratio_paired']:.3f})",
            file=sys.stderr,
        )
    info["load_avg_end"] = os.getloadavg()
    info["matmul_peak_flops"] = max(r["matmul_peak_flops"] for r in rows)  # least disturbed of all rounds
    info["conv_peak_flops"] = max(r["conv_peak_flops"] for r in rows)
    peak = max(info["matmul_peak_flops"], info["conv_peak_flops"])
    info["peak_flops"] = peak

    flags = [f for f in ("channels_last", "compile", "fused_adam") if getattr(args, f)] + (
        ["bf16"] if bf16 else []
    )
    print(
        f"\nLearner update, batch {args.batch_size}, {args.num_games} games, {device} "
        f"({info['threads']} threads), torch {torch.__version__}, flags: {', '.join(flags) or 'none'}; "
        f"measured float32 peak: matmul {info['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, 3x3 conv "
        f"{info['conv_peak_flops'] / 1e9:.0f} GFLOP/s (MFU uses the larger); "
        f"load average {info['load_avg_start'][0]:.1f}\n"
    )
    print(
        "| arch | params | full ms (best / median) | bare ms (best / median) "
        "| full / bare (best / median / paired) | steps/s | samples/s | target fwd ms | loss math ms "
        "| GFLOP/update | GFLOP/s | MFU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, m = r["best_s"], r["median_s"]
        print(
            f"| {r['arch']} | {r['params'] / 1e6:.1f}M | {1e3 * b['full']:.1f} / {1e3 * m['full']:.1f} "
            f"| {1e3 * b['bare']:.1f} / {1e3 * m['bare']:.1f} "
            f"| {r['ratio_best']:.3f} / {r['ratio_median']:.3f} / {r['ratio_paired']:.3f} "
            f"| {r['steps_per_s']:.2f} | {r['samples_per_s']:.0f} | {1e3 * b['target_fwd']:.1f} "
            f"| {1e3 * b['loss_math']:.2f} | {r['flops_per_update'] / 1e9:.2f} "
            f"| {r['flops_per_s'] / 1e9:.1f} | {100 * r['flops_per_s'] / peak:.1f}% |"
        )
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}}
    result.update(info=info, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
