"""The learner on the device named by SCALEDQL_TEST_DEVICE (default: cpu), checked against the CPU.

In CI this runs on the CPU, where device and reference are the same machine (a smoke test of the checks
themselves). benchmarks/gpu_check.py runs it with SCALEDQL_TEST_DEVICE=cuda on a GPU machine: the C51
projection and the C51 + CQL loss with their gradients, the networks' forward and backward, one full
update (fused Adam on CUDA), bf16 autocast, the pinned-memory batch stream, and the training script end to
end with an exact --resume, each compared with the same computation on the CPU.
"""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import cql_multigame as cql
import record
import replay
import resnet

DEVICE = torch.device(os.environ.get("SCALEDQL_TEST_DEVICE", "cpu"))
# CUDA runs convolutions in TF32 by default and sums in another order: a few 1e-3 relative
TOL = {} if DEVICE.type == "cpu" else {"rtol": 2e-3, "atol": 2e-3}
GAMES = ("Breakout", "Pong")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(), **TOL)


def batch(b: int = 8, num_games: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8),
        "next_obs": torch.randint(0, 256, (b, 4, 84, 84), generator=g, dtype=torch.uint8),
        "action": torch.randint(0, 4, (b,), generator=g),  # full-set ids legal in Breakout and Pong
        "reward": torch.rand(b, generator=g) * 2 - 1,
        "discount": (torch.rand(b, generator=g) > 0.2).float() * 0.99**3,
        "game": torch.arange(b) % num_games,
    }


def to(x: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in x.items()}


def test_projection_and_loss_with_gradient_match_the_cpu():
    g = torch.Generator().manual_seed(1)
    support = torch.linspace(-10, 10, 51)
    logits = torch.randn(16, 18, 51, generator=g)
    next_probs = torch.randn(16, 51, generator=g).softmax(-1)
    reward, discount = torch.rand(16, generator=g) * 2 - 1, torch.full((16,), 0.97)
    legal = torch.rand(16, 18, generator=g) > 0.3
    legal[:, 0] = True
    action = torch.zeros(16, dtype=torch.int64)
    out = {}
    for device in (torch.device("cpu"), DEVICE):
        x = logits.to(device).requires_grad_(True)
        target = cql.categorical_projection(next_probs.to(device), reward.to(device), discount.to(device),
                                            support.to(device))  # fmt: skip
        loss, metrics = cql.c51_cql_loss(
            x, action.to(device), target, support.to(device), legal.to(device), 0.1
        )
        loss.backward()
        out[device.type] = (target, loss, x.grad, metrics)
    ref, dev = out["cpu"], out[DEVICE.type]
    for a, b in zip(ref[:3], dev[:3], strict=True):
        close(a, b)
    for k in ref[3]:
        close(ref[3][k], dev[3][k])


@pytest.mark.parametrize("arch", ["tiny", "impala", "resnet18"])
def test_network_forward_and_backward_match_the_cpu(arch):
    torch.manual_seed(0)
    net = resnet.QNetwork(num_games=2, arch=arch)
    dev_net = copy.deepcopy(net).to(DEVICE)
    b = batch(4)
    ref = net(b["obs"], b["game"])
    out = dev_net(b["obs"].to(DEVICE), b["game"].to(DEVICE))
    close(ref, out)
    ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), dev_net.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(
                q.grad.cpu(), p.grad, rtol=1e-2 if TOL else 1.3e-6, atol=1e-4 if TOL else 1e-5, msg=name
            )


def test_one_update_matches_the_cpu():
    torch.manual_seed(0)
    nets = {}
    for device in (torch.device("cpu"), DEVICE):
        torch.manual_seed(0)
        net = resnet.QNetwork(num_games=2, arch="tiny").to(device)
        target = copy.deepcopy(net)
        opt = cql.make_optimizer(net.parameters(), 1e-3, 3.125e-4, device)
        support = torch.linspace(-10, 10, 51, device=device)
        legal = cql.legal_action_table(GAMES).to(device)
        loss, _ = cql.compute_loss(net, target, to(batch(), device), support, legal, 0.1)
        cql.gradient_step(loss, opt, device)
        nets[device.type] = (net, loss)
    close(nets["cpu"][1], nets[DEVICE.type][1])
    for p, q in zip(nets["cpu"][0].parameters(), nets[DEVICE.type][0].parameters(), strict=True):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=2e-4 if TOL else 1e-6)


def test_bf16_autocast_keeps_the_loss_close_to_float32():
    torch.manual_seed(0)
    net = resnet.QNetwork(num_games=2, arch="tiny").to(DEVICE)
    support = torch.linspace(-10, 10, 51, device=DEVICE)
    legal = cql.legal_action_table(GAMES).to(DEVICE)
    b = to(batch(), DEVICE)
    f32, _ = cql.compute_loss(net, net, b, support, legal, 0.1, bf16=False)
    bf16, metrics = cql.compute_loss(net, net, b, support, legal, 0.1, bf16=True)
    assert bf16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    assert abs(float(bf16.detach()) - float(f32.detach())) < 0.02 * abs(float(f32.detach()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    record.record(path, GAMES, runs=(1,), num_checkpoints=1, capacity=1200, seed=0, progress=False)
    return path


def test_batch_stream_brings_the_same_batches_to_the_device(data_dir):
    kw = dict(runs=(1,), checkpoints="nearoptimal", seed=3)
    cpu = cql.BatchStream(replay.MultiGameReplay(data_dir, GAMES, **kw), 8, torch.device("cpu"), prefetch=0)
    dev = cql.BatchStream(replay.MultiGameReplay(data_dir, GAMES, **kw), 8, DEVICE, prefetch=2)
    assert dev.pin == (DEVICE.type == "cuda")
    for _ in range(3):
        (a, sa), (b, sb) = cpu.next(), dev.next()
        assert sa == sb
        for k in a:
            assert b[k].device.type == DEVICE.type and b[k].dtype == a[k].dtype
            assert torch.equal(a[k], b[k].cpu()), k
    for s in (cpu, dev):
        s.close()
        s.data.close()


@pytest.mark.skipif(
    DEVICE.type == "cpu", reason="on the CPU, test_cql_multigame.py's resume tests already run this (CI time)"
)
def test_training_script_runs_and_resumes_on_the_device(data_dir, tmp_path):
    base = dataclasses.replace(
        cql.PRESETS["smoke"][1], games=GAMES, data_dir=str(data_dir), runs_dir=str(tmp_path),
        record_missing=0, total_steps=6, batch_size=8, log_every=1, save_every=3, target_update_every=2,
        eval_episodes=1, eval_envs=1, eval_max_steps=20, device=str(DEVICE),
    )  # fmt: skip
    cql.main(dataclasses.replace(base, run_name="full"))
    cql.main(dataclasses.replace(base, run_name="cut", total_steps=3))
    cql.main(dataclasses.replace(base, run_name="cut", resume=True))

    def losses(name):
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {x["step"]: x["loss"] for x in map(json.loads, rows)}

    a, b = losses("full"), losses("cut")
    assert sorted(b) == list(range(1, 7)) and all(np.isfinite(list(a.values())))
    for step in range(4, 7):  # CUDA's convolution backward may add in any order: float tolerance there
        assert a[step] == pytest.approx(b[step], rel=1e-5 if TOL else 0, abs=1e-6 if TOL else 0), step


# --------------------------------------------------------------------------------------------------------
# Multi-GPU nodes: each torchrun rank works on GPU LOCAL_RANK. On a CPU machine CUDA is faked: these tests
# check which device the code asks for (the current device is per thread, so the sampler thread must set
# it too); that the GPUs then really do their work there needs a machine with several GPUs.
# --------------------------------------------------------------------------------------------------------


class FakeGPUs:
    """torch.cuda's device calls on a machine with `n` pretend GPUs: the current device per thread."""

    def __init__(self, monkeypatch, n: int):
        import threading

        self.n, self.current, self.calls = n, threading.local(), []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: self.calls.append(("synchronize", d)))

    def set_device(self, device) -> None:
        self.current.device = torch.device(device)
        self.calls.append(("set_device", torch.device(device)))

    def device(self) -> torch.device:
        return getattr(self.current, "device", torch.device("cuda:0"))  # CUDA's default: GPU 0


def test_each_torchrun_rank_uses_and_sets_the_gpu_of_its_local_rank(monkeypatch):
    gpus = FakeGPUs(monkeypatch, 4)
    for local_rank in ("0", "3"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert cql.select_device("cuda") == torch.device(f"cuda:{local_rank}")
        assert gpus.device() == torch.device(f"cuda:{local_rank}")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(cql.ConfigError, match="sees 4; start at most that many processes per node"):
        cql.select_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    gpus.calls.clear()
    assert cql.select_device("cpu") == torch.device("cpu") and gpus.calls == []


def test_the_sampler_thread_pins_memory_for_the_ranks_gpu(data_dir, monkeypatch):
    gpus = FakeGPUs(monkeypatch, 4)
    pinned_on = []

    def pin_memory(t):  # pinned memory belongs to the thread's current device when it is allocated
        pinned_on.append(gpus.device())
        return t

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    data = replay.MultiGameReplay(data_dir, GAMES, runs=(1,), checkpoints="nearoptimal", seed=3)
    stream = cql.BatchStream(data, 8, torch.device("cuda:2"), prefetch=1)
    try:
        item = stream._queue.get(timeout=60)  # the thread's first batch (next() would copy it to the GPU)
        assert not isinstance(item, BaseException), item
        assert pinned_on and set(pinned_on) == {torch.device("cuda:2")}
    finally:
        stream.close()
        data.close()


class _OnGPU:
    """A stand-in for a CUDA tensor: its device, and a non-blocking copy to the CPU."""

    def __init__(self, value: torch.Tensor, index: int):
        self.value, self.device = value, torch.device(f"cuda:{index}")

    def to(self, device, non_blocking=False):
        assert device == "cpu" and non_blocking
        return self.value.clone()


def test_checkpoint_copies_wait_for_the_gpus_they_come_from(monkeypatch):
    gpus = FakeGPUs(monkeypatch, 4)
    gpus.set_device("cuda:0")  # a thread whose current device is not the tensors' (the bug: it waited there)
    gpus.calls.clear()
    values = [torch.arange(3.0), torch.ones(2)]
    out = cql.tensors_to_cpu([_OnGPU(values[0], 3), _OnGPU(values[1], 3), torch.zeros(1)])
    assert [c for c in gpus.calls if c[0] == "synchronize"] == [("synchronize", torch.device("cuda:3"))]
    assert all(torch.equal(a, b) for a, b in zip(out, [*values, torch.zeros(1)], strict=True))
