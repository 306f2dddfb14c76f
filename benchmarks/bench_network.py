"""Benchmark of resnet.py: forward+backward throughput of the Scaled QL network, and its per-game heads.

Times one forward+backward pass (no optimizer step) on random uint8 frames, for each architecture with and
without channels_last, and reports samples/s and the achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter, forward+backward). A second table times the three forms of per-game heads that
resnet.GameHeads discusses, and prints the heads' share of the FLOPs for a resnet101 with 40 games.
Prints markdown tables and writes JSON to benchmarks/results/.

    python benchmarks/bench_network.py                       # tiny, impala, resnet18 at batch 32 on CPU
    python benchmarks/bench_network.py --heads-only          # only the heads comparison
    python benchmarks/bench_network.py --device cuda --archs resnet50 resnet101 --batch-size 512
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cql_multigame import ConfigError, select_device  # noqa: E402
from resnet import ARCHS, QNetwork, count_parameters  # noqa: E402


@dataclass
class Args:
    archs: tuple[str, ...] = ("tiny", "impala", "resnet18")
    """architectures to time (names from resnet.ARCHS)"""
    batch_size: int = 32
    """samples per forward+backward pass"""
    num_games: int = 40
    """number of per-game heads (the batch holds an equal share of each, rounded)"""
    mlp_dim: int = 640
    """shared feature width D (resnet.QNetwork's default)"""
    iters: int = 10
    """timed iterations per configuration"""
    warmup: int = 3
    """untimed iterations first"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N, mps or xla (cql_multigame.select_device)"""
    threads: int | None = None
    """torch.set_num_threads; None keeps torch's default"""
    heads_only: bool = False
    """skip the network table, time only the heads"""
    head_batch_sizes: tuple[int, ...] = (32, 512)
    """batch sizes for the heads comparison"""
    out_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parent / "results")
    """where the JSON goes"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Fastest seconds per call (the minimum is the least disturbed by other work on a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _inputs(batch: int, num_games: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=g).to(device)
    game = (torch.arange(batch) % num_games).to(device)
    return obs, game


def step_flops(arch: str, batch: int, num_games: int, mlp_dim: int) -> tuple[int, int]:
    """(forward+backward FLOPs of the whole step, forward FLOPs of the heads), counted on the meta device."""
    with torch.device("meta"):
        net = QNetwork(num_games, arch, mlp_dim=mlp_dim)
        obs = torch.zeros(batch, 4, 84, 84, dtype=torch.uint8)
        game = torch.zeros(batch, dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            F.log_softmax(net(obs, game), -1).mean().backward()
        total = fc.get_total_flops()
        feats = torch.zeros(batch, mlp_dim)
        with FlopCounterMode(display=False) as fh:
            net.heads(feats, game)
    return total, fh.get_total_flops()


def bench_networks(args: Args, device: torch.device) -> list[dict]:
    rows = []
    for arch in args.archs:
        flops, _ = step_flops(arch, args.batch_size, args.num_games, args.mlp_dim)
        for channels_last in (False, True):
            torch.manual_seed(0)
            net = QNetwork(args.num_games, arch, mlp_dim=args.mlp_dim).to(device)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            obs, game = _inputs(args.batch_size, args.num_games, device)

            def step(net=net, obs=obs, game=game):
                net.zero_grad(set_to_none=True)
                F.log_softmax(net(obs, game), -1).mean().backward()

            sec = _time(step, device, args.iters, args.warmup)
            rows.append(
                {
                    "arch": arch,
                    "channels_last": channels_last,
                    "params": count_parameters(net)["total"],
                    "ms_per_step": 1e3 * sec,
                    "samples_per_s": args.batch_size / sec,
                    "gflop_per_step": flops / 1e9,
                    "gflops_achieved": flops / sec / 1e9,
                }
            )
            print(
                f"  {arch:9s} channels_last={channels_last!s:5s} {args.batch_size / sec:8.1f} samples/s",
                file=sys.stderr,
            )
    return rows


def bench_heads(args: Args, device: torch.device) -> list[dict]:
    """Forward+backward of the three head forms on random features; (c) only on an equal-share batch."""
    g, d, o = args.num_games, args.mlp_dim, 18 * 51
    w = (0.01 * torch.randn(g, o, d, device=device)).requires_grad_()
    b = torch.zeros(g, o, device=device, requires_grad=True)
    rows = []
    for batch in args.head_batch_sizes:
        per = -(-batch // g)  # form (c) needs equal shares: round the batch up to a multiple of G
        x = torch.randn(batch, d, device=device, requires_grad=True)
        game = (torch.arange(batch) % g).to(device)
        xc = torch.randn(g, per, d, device=device, requires_grad=True)

        # (a) one matmul against all heads, then gather each sample's block
        def form_a(x=x, game=game, batch=batch):
            w.grad = b.grad = x.grad = None
            y = F.linear(x, w.reshape(g * o, d), b.reshape(-1)).view(batch, g, o)
            y.gather(1, game.view(-1, 1, 1).expand(-1, 1, o)).sum().backward()

        def form_b(x=x, game=game):  # gather each sample's weights, then a batched matrix-vector product
            w.grad = b.grad = x.grad = None
            y = torch.bmm(w[game], x.unsqueeze(-1)).squeeze(-1) + b[game]
            y.sum().backward()

        def form_c(xc=xc):  # batched matmul over games; the batch must come grouped in equal shares
            w.grad = b.grad = xc.grad = None
            y = torch.baddbmm(b.unsqueeze(1), xc, w.transpose(1, 2))
            y.sum().backward()

        for name, fn in [
            ("a: matmul all heads + gather", form_a),
            ("b: gather weights + bmm", form_b),
            (f"c: bmm over games ({per}/game, equal shares only)", form_c),
        ]:
            sec = _time(fn, device, args.iters, args.warmup)
            rows.append({"form": name, "batch": batch, "ms_fwd_bwd": 1e3 * sec})
            print(f"  heads {name:45s} B={batch:4d} {1e3 * sec:8.2f} ms", file=sys.stderr)
    return rows


def main(args: Args) -> None:
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"unknown arch {unknown[0]!r}: choose from {', '.join(ARCHS)}.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = select_device(args.device)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    result: dict = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "info": info,
    }

    if not args.heads_only:
        rows = bench_networks(args, device)
        result["networks"] = rows
        print(
            f"\nForward+backward, batch {args.batch_size}, {args.num_games} games, D={args.mlp_dim}, "
            f"{info['device']} ({info['threads']} threads), torch {info['torch']}\n"
        )
        print("| arch | channels_last | params | ms/step | samples/s | GFLOP/step | GFLOP/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['arch']} | {r['channels_last']} | {r['params'] / 1e6:.1f}M | {r['ms_per_step']:.1f} "
                f"| {r['samples_per_s']:.1f} | {r['gflop_per_step']:.2f} | {r['gflops_achieved']:.1f} |"
            )

    heads = bench_heads(args, device)
    result["heads"] = heads
    print(f"\nPer-game heads, forward+backward, G={args.num_games}, D={args.mlp_dim}, A*K=918\n")
    print("| form | batch | ms |")
    print("|---|---:|---:|")
    for r in heads:
        print(f"| {r['form']} | {r['batch']} | {r['ms_fwd_bwd']:.2f} |")

    _, head_fwd = step_flops("resnet101", 1, 40, args.mlp_dim)
    with torch.device("meta"):
        net = QNetwork(40, "resnet101", mlp_dim=args.mlp_dim)
        with FlopCounterMode(display=False) as fc:
            net.trunk(torch.zeros(1, 4, 84, 84))
    result["resnet101_40_games"] = {
        "trunk_fwd_flops_per_sample": fc.get_total_flops(),
        "heads_fwd_flops_per_sample": head_fwd,
    }
    trunk_flops = fc.get_total_flops()
    print(
        f"\nresnet101, 40 games: trunk {trunk_flops / 1e9:.2f} GFLOP/sample forward, heads (form a) "
        f"{head_fwd / 1e6:.1f} MFLOP/sample = {100 * head_fwd / trunk_flops:.2f}% of the trunk"
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"bench_network_{device.type}_b{args.batch_size}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
