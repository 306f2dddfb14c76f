"""Tests for finetune_offline.py on tiny recorded data and a checkpoint made here by cql_multigame.py.

What transfers (trunk, spatial embedding, shared MLP: bit-for-bit) and what does not (a fresh head), what
--freeze-trunk keeps fixed, the --from-scratch baseline, --fine-tune-existing-head, the CLI end to end
(single run and --compare), and every bad-input error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cql_multigame
import finetune_offline
import record
import replay
from finetune_offline import Args, ConfigError

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["Breakout", "Boxing", "Freeway"]  # the cql_multigame.py smoke preset's games
HELDOUT = "Pong"
SHARED = ("trunk.", "spatial_embedding.", "shared_mlp.")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = dict(
    total_steps=4, batch_size=16, runs=(1,), checkpoints="nearoptimal", fraction=1.0, prefetch=0,
    log_every=2, eval_every=0, save_every=100, eval_episodes=1, eval_envs=1, eval_max_steps=30, device="cpu",
)  # fmt: skip
TINY_FLAGS = (
    "--total-steps 4 --batch-size 16 --runs 1 --fraction 1.0 --log-every 2 --eval-every 2 "
    "--eval-episodes 1 --eval-envs 1 --eval-max-steps 30 --device cpu"
).split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random-policy data for 3 training games + 1 held-out game; a 10-step cql_multigame.py checkpoint."""
    root = tmp_path_factory.mktemp("finetune")
    data = root / "data"
    record.record(data, [*TRAIN, HELDOUT], runs=(1,), capacity=2000, seed=0, progress=False)
    flags = (
        f"--data-dir {data} --runs-dir {root} --run-name pretrain --total-steps 10 --record-missing 0 "
        "--prefetch 0 --eval-episodes 1 --eval-envs 1 --eval-max-steps 50"
    ).split()
    out = subprocess.run(
        [sys.executable, "cql_multigame.py", "smoke", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = root / "pretrain" / "checkpoint.pt"
    return {"root": root, "data": data, "ckpt": ckpt, "state": torch.load(ckpt, weights_only=True)}


def args_for(setup, tmp_path, **kw) -> Args:
    base = dict(
        checkpoint=str(setup["ckpt"]), game=HELDOUT, data_dir=str(setup["data"]), runs_dir=str(tmp_path)
    )
    return Args(**{**base, **TINY, **kw})


def shared_params(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(SHARED)}


# ---------------------------------------------------------------------------------------------- the network


def test_transfer_copies_shared_parts_and_makes_a_fresh_head(setup, tmp_path):
    src = setup["state"]["model"]
    net = finetune_offline.build_network(args_for(setup, tmp_path), setup["state"], HELDOUT)
    new = net.state_dict()
    assert shared_params(new).keys() == shared_params(src).keys() and shared_params(src)
    for k, v in shared_params(src).items():
        assert torch.equal(new[k], v), k  # exactly the checkpoint's weights
    assert net.num_games == 1 and net.config() == {**setup["state"]["net_config"], "num_games": 1}
    G, out_dim, d = src["heads.weight"].shape
    assert G == len(TRAIN) and new["heads.weight"].shape == (1, out_dim, d)
    assert new["heads.bias"].shape == (1, out_dim) and not new["heads.bias"].any()  # fresh: zero bias
    for g in range(G):  # unlike every pre-trained head
        assert not torch.allclose(new["heads.weight"][0], src["heads.weight"][g], atol=1e-4)
    assert 0.005 < new["heads.weight"].std().item() < 0.02  # resnet.GameHeads' init, std 0.01
    other = finetune_offline.build_network(args_for(setup, tmp_path, seed=2), setup["state"], HELDOUT)
    assert not torch.equal(other.heads.weight, net.heads.weight)  # the head's init follows --seed


def test_from_scratch_is_the_same_network_randomly_initialized(setup, tmp_path):
    net = finetune_offline.build_network(
        args_for(setup, tmp_path, from_scratch=True), setup["state"], HELDOUT
    )
    assert net.config() == {**setup["state"]["net_config"], "num_games": 1}
    new, src = net.state_dict(), setup["state"]["model"]
    for k, v in shared_params(src).items():
        assert new[k].shape == v.shape
    assert not torch.equal(new["trunk.0.weight"], src["trunk.0.weight"])
    assert not torch.equal(new["shared_mlp.0.weight"], src["shared_mlp.0.weight"])


def test_from_scratch_without_checkpoint_uses_arch():
    net = finetune_offline.build_network(Args(from_scratch=True, arch="tiny"), None, HELDOUT)
    assert net.arch == "tiny" and net.num_games == 1
    with pytest.raises(ConfigError, match="--from-scratch with --arch"):
        finetune_offline.check_args(Args(from_scratch=True))


def test_final_line_and_table_handle_games_without_a_human_score():
    r = {
        "game": "Carnival",
        "init": "from scratch",
        "step": 5,
        "mean_return": 120.0,
        "hns": None,
        "returns": [1],
    }
    line = finetune_offline.final_line("Carnival", r, 5, "scratch")
    assert "return 120.0" in line and "human-normalized n/a (Carnival has no human score)" in line
    assert finetune_offline.compare_table(r, r, 10).endswith("| from scratch | 120.0 | n/a |")


def test_fine_tune_existing_head(setup, tmp_path):
    args = args_for(setup, tmp_path, game="Boxing")
    with pytest.raises(ConfigError, match="trained on Boxing.*--fine-tune-existing-head"):
        finetune_offline.load_source(args, "Boxing")
    args = args_for(setup, tmp_path, game="Boxing", fine_tune_existing_head=True)
    ckpt = finetune_offline.load_source(args, "Boxing")
    net = finetune_offline.build_network(args, ckpt, "Boxing")
    g = TRAIN.index("Boxing")
    assert torch.equal(net.heads.weight[0], ckpt["model"]["heads.weight"][g])
    assert torch.equal(net.heads.bias[0], ckpt["model"]["heads.bias"][g])
    with pytest.raises(ConfigError, match="has no head for Pong"):
        finetune_offline.load_source(args_for(setup, tmp_path, fine_tune_existing_head=True), HELDOUT)


def test_freeze_trunk_trains_only_the_head(setup, tmp_path):
    args = args_for(setup, tmp_path, freeze_trunk=True, run_name="frozen")
    torch.manual_seed(args.seed)  # as main does before building the network: the same fresh head
    start = finetune_offline.build_network(args, setup["state"], HELDOUT).state_dict()
    finetune_offline.main(args)
    end = torch.load(tmp_path / "frozen" / "checkpoint.pt", weights_only=True)["model"]
    for k, v in shared_params(setup["state"]["model"]).items():
        assert torch.equal(end[k], v), k
    assert not torch.equal(end["heads.weight"], start["heads.weight"])
    assert not torch.equal(end["heads.bias"], start["heads.bias"])


def test_compare_with_freeze_trunk_freezes_the_baseline_too(setup, tmp_path):
    args = args_for(setup, tmp_path, freeze_trunk=True, compare=True, run_name="cmpfrozen")
    finetune_offline.main(args)
    for variant in ("finetune", "scratch"):
        path = tmp_path / "cmpfrozen" / variant / "checkpoint.pt"
        ckpt = torch.load(path, weights_only=True)
        torch.manual_seed(args.seed)  # the init main gave this run
        run_args = args if variant == "finetune" else finetune_offline.dataclasses.replace(
            args, from_scratch=True, fine_tune_existing_head=False
        )  # fmt: skip
        assert run_args.freeze_trunk
        start = finetune_offline.build_network(run_args, setup["state"], HELDOUT).state_dict()
        for k, v in shared_params(start).items():  # frozen in both runs
            assert torch.equal(ckpt["model"][k], v), (variant, k)
        assert not torch.equal(ckpt["model"]["heads.weight"], start["heads.weight"])


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_fine_tunes_a_held_out_game(setup, tmp_path):
    out = subprocess.run(
        [sys.executable, "finetune_offline.py", "--checkpoint", str(setup["ckpt"]), "--game", HELDOUT,
         "--data-dir", str(setup["data"]), "--runs-dir", str(tmp_path), "--run-name", "ft", *TINY_FLAGS],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{HELDOUT} after 4 steps (finetune): return ") and "human-normalized " in last
    ckpt = cql_multigame.load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert ckpt["games"] == [HELDOUT] and ckpt["step"] == 4
    trained = cql_multigame.network_from_checkpoint(ckpt).state_dict()  # loadable like any checkpoint
    assert not torch.equal(trained["trunk.0.weight"], setup["state"]["model"]["trunk.0.weight"])
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["variant"] == "finetune" and summary["hns"] is not None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ft")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("losses/td_loss", "losses/cql_term", "q/data_action", f"eval/{HELDOUT}/return",
                f"eval/{HELDOUT}/hns"):  # fmt: skip
        assert tag in tags
    assert [e.step for e in events.Scalars(f"eval/{HELDOUT}/return")] == [2, 4]  # periodic + final


def test_cli_compare_prints_both_and_writes_json(setup, tmp_path):
    out = subprocess.run(
        [sys.executable, "finetune_offline.py", "--checkpoint", str(setup["ckpt"]), "--game", HELDOUT,
         "--data-dir", str(setup["data"]), "--runs-dir", str(tmp_path), "--compare", *TINY_FLAGS],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-3] == "|---|---:|---:|" and lines[-4] == "| init | return | human-normalized |"
    assert lines[-2].startswith("| fine-tuned from ") and lines[-1].startswith("| from scratch | ")
    base = tmp_path / f"finetune_{HELDOUT}_compare_seed1"
    result = json.loads((base / "compare.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["finetune", "scratch"]
    assert (base / "finetune" / "checkpoint.pt").is_file() and (base / "scratch" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------------- bad input


def test_errors_before_any_training(setup, tmp_path):
    def fails(exc, match, **kw):
        with pytest.raises(exc, match=match):
            finetune_offline.main(args_for(setup, tmp_path, **kw))

    fails(ConfigError, "does not exist", checkpoint=str(tmp_path / "nope.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    fails(ConfigError, "corrupt", checkpoint=str(tmp_path / "corrupt.pt"))
    state = setup["state"]
    for name, config, why in [
        ("arch", {"arch": "resnet9000"}, "unknown arch 'resnet9000'"),
        ("width", {"mlp_dim": 7}, r"shared_mlp.0.weight is \(\d+, \d+\) in its weights"),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save({**state, "net_config": {**state["net_config"], **config}}, path)
        fails(ConfigError, f"cannot rebuild \\({why}", checkpoint=str(path))
    fails(ConfigError, "trained on Breakout .*not held out.*--fine-tune-existing-head", game="Breakout")
    fails(ConfigError, "did you mean 'Pong'", game="Pongg")
    fails(replay.ReplayDataError, "no data for game Alien", game="Alien")
    fails(ConfigError, "--compare already runs", compare=True, from_scratch=True)
    fails(ConfigError, "pass --checkpoint", checkpoint="")
    fails(ConfigError, "differs from the checkpoint's tiny", from_scratch=True, arch="resnet18")
    assert not any(tmp_path.glob("finetune_*"))  # nothing was trained


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "finetune_offline.py", "--checkpoint", str(tmp_path / "missing.pt")],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
        and "does not exist" in out.stderr
    )
