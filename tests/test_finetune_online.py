"""Tests for finetune_online.py: the online buffers against a slow reference of the DQN-Replay rules, driven
by a scripted vector env with SAME_STEP autoreset; the network set-up (head copied, fresh head, from scratch);
subprocess and in-process runs with tiny flags (--from-scratch, --freeze-trunk); one-sentence errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import atari
import cql_multigame
import finetune_online as fo

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = dict(  # a few hundred env steps, 2 envs, tiny evaluation
    total_env_steps=240,
    num_envs=2,
    learning_starts=64,
    buffer_size=400,
    batch_size=8,
    target_update_every=10,
    eval_every=0,
    eval_episodes=1,
    eval_envs=1,
    eval_max_steps=30,
    max_episode_steps=60,
    log_every=50,
    device="cpu",
)


def flags(**kw):
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny cql_multigame.py checkpoint (games Breakout, Boxing, Freeway), made the way users make one."""
    root = tmp_path_factory.mktemp("pretrain")
    cmd = [sys.executable, "cql_multigame.py", "smoke", "--data-dir", str(root / "data"), "--runs-dir",
           str(root / "runs"), "--record-missing", "2000", "--total-steps", "10", "--eval-episodes", "1",
           "--eval-envs", "1", "--eval-max-steps", "50"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (root / "runs").glob("*/checkpoint.pt")
    return str(path)


# ---------------------------------------------------------------------------------------------- buffers


def frame_with_id(i):
    """A frame that names itself: id i >= 1 in the first three pixels (padding frames are all zero)."""
    f = np.zeros((84, 84), np.uint8)
    f[0, :3] = (i % 256, (i // 256) % 256, i // 65536)
    f[40:44, (i * 7) % 80 : (i * 7) % 80 + 4] = 200
    return f


def frame_id(frames):
    px = frames[..., 0, :3].astype(np.int64)
    return px[..., 0] + 256 * px[..., 1] + 65536 * px[..., 2]


class FakeVecEnv:
    """N scripted envs with atari.make_vec_env's interface and SAME_STEP autoreset.

    Env i plays episodes[i][0], episodes[i][1], ...; an episode of L steps has frames f_0..f_L (f_L only in
    info["final_obs"]), rewards r_0..r_{L-1} (unclipped) and ends by "terminated" or "truncated". The
    observation at step t is the stack [f_{t-3}, .., f_t] with zero frames before f_0, oldest first.
    """

    def __init__(self, num_envs, rng, legal, max_len=7):
        self.n, self.legal, self.next_id = num_envs, set(legal), 1
        self.episodes = [[self._episode(rng, max_len) for _ in range(400)] for _ in range(num_envs)]
        self.pos = [(0, 0)] * num_envs  # (episode, t) of each env
        self.taken = {}  # frame id of the state -> full-set action received there

    def _episode(self, rng, max_len):
        length = int(rng.integers(1, max_len + 1))
        ids = list(range(self.next_id, self.next_id + length + 1))
        self.next_id += length + 1
        rewards = rng.choice([-3.0, -1.0, 0.0, 0.0, 0.5, 2.0], size=length)
        return {"ids": ids, "rewards": rewards, "end": str(rng.choice(["terminated", "truncated"]))}

    def stack(self, i, e, t):
        ids = self.episodes[i][e]["ids"]
        return np.stack([frame_with_id(ids[k]) if k >= 0 else np.zeros((84, 84), np.uint8)
                         for k in range(t - 3, t + 1)])  # fmt: skip

    def reset(self, seed=None):
        self.pos = [(0, 0)] * self.n
        return np.stack([self.stack(i, 0, 0) for i in range(self.n)]), {}

    def step(self, actions):
        obs = np.zeros((self.n, 4, 84, 84), np.uint8)
        reward, term, trunc = np.zeros(self.n), np.zeros(self.n, bool), np.zeros(self.n, bool)
        final = [None] * self.n
        for i, a in enumerate(actions):
            assert int(a) in self.legal
            e, t = self.pos[i]
            ep = self.episodes[i][e]
            self.taken[ep["ids"][t]] = int(a)
            reward[i] = ep["rewards"][t]
            if t + 1 == len(ep["rewards"]):  # the episode ends: autoreset within this step
                term[i], trunc[i] = ep["end"] == "terminated", ep["end"] == "truncated"
                final[i] = self.stack(i, e, t + 1)
                self.pos[i] = (e + 1, 0)
            else:
                self.pos[i] = (e, t + 1)
            obs[i] = self.stack(i, *self.pos[i])
        return obs, reward, term, trunc, {"final_obs": final}

    def reference(self, n, gamma):
        """frame id -> the transition from that state by the DQN-Replay rules, computed from the script."""
        ref = {}
        for i, episodes in enumerate(self.episodes):
            for e, ep in enumerate(episodes):
                length = len(ep["rewards"])
                clipped = np.clip(ep["rewards"], -1.0, 1.0)
                for t in range(length):
                    if ep["ids"][t] not in self.taken:
                        continue
                    steps = min(n, length - t)  # the n-step window stops at the episode's end (inclusive)
                    done = t + n >= length
                    ref[ep["ids"][t]] = dict(
                        env=i,
                        obs=self.stack(i, e, t),
                        action=self.taken[ep["ids"][t]],
                        reward=sum(gamma**j * clipped[t + j] for j in range(steps)),
                        discount=0.0 if done else gamma**n,
                        next_obs=None if done else self.stack(i, e, t + n),
                        cut_by=ep["end"] if done else None,
                    )
        return ref

    def storage_order(self, i):
        """What buffer i holds, oldest first: per episode 3 padding entries (None), then its frame ids."""
        order = []
        for ep in self.episodes[i]:
            seen = [k for k in ep["ids"][:-1] if k in self.taken]
            if not seen:
                break
            order += [None] * 3 + seen
        return order


def drive(num_envs, buffer_size, steps, seed, n=3, gamma=0.9, game="Breakout"):
    legal = np.asarray(atari.legal_actions(game))
    rng = np.random.default_rng(seed)
    env = FakeVecEnv(num_envs, rng, legal.tolist())
    args = fo.Args(num_envs=num_envs, buffer_size=buffer_size, n_step=n, gamma=gamma)
    buffers = fo.make_buffers(args, legal.tolist())
    obs, _ = env.reset()
    for _ in range(steps):  # the script's own acting loop step: act, collect, carry on from its next obs
        action_index = rng.integers(len(legal), size=num_envs)
        obs, _, _ = fo.collect(env, obs, action_index, legal, buffers)
    return env, buffers


def check_rows(batch, ref):
    for row, fid in enumerate(frame_id(batch.obs[:, -1])):
        r = ref[int(fid)]
        np.testing.assert_array_equal(batch.obs[row], r["obs"])  # zero padding at episode starts
        assert batch.action[row] == r["action"]  # minimal-set index -> full-set id
        assert batch.reward[row] == pytest.approx(r["reward"], abs=1e-5)
        assert batch.discount[row] == pytest.approx(r["discount"], abs=1e-6)
        if r["next_obs"] is not None:  # with discount 0 the next state never enters the target
            np.testing.assert_array_equal(batch.next_obs[row], r["next_obs"])
        assert batch.game[row] == 0


@pytest.mark.parametrize("num_envs", [2, 3])
def test_online_buffers_match_the_replay_rules_and_cover_every_valid_transition(num_envs):
    env, buffers = drive(num_envs, buffer_size=num_envs * 400, steps=150, seed=num_envs)
    ref = env.reference(3, 0.9)
    assert all(b.add_count < b.capacity for b in buffers)  # not wrapped: the valid set is easy to state
    rng, seen, cuts = np.random.default_rng(0), set(), set()
    for call in range(12):  # ~1200 draws per env for ~250 valid transitions each: all get drawn
        batch = fo.sample_batch(buffers, 301, rng, call)
        check_rows(batch, ref)
        envs_of_rows = [ref[int(f)]["env"] for f in frame_id(batch.obs[:, -1])]
        shares = [301 // num_envs + ((i - call) % num_envs < 301 % num_envs) for i in range(num_envs)]
        assert envs_of_rows == sorted(envs_of_rows)  # concatenated env by env
        assert np.bincount(envs_of_rows, minlength=num_envs).tolist() == shares
        ids = frame_id(batch.obs[:, -1]).tolist()
        seen |= set(ids)
        cuts |= {ref[i]["cut_by"] for i in ids}
    valid = set()
    for i in range(num_envs):  # every stored transition except the newest n entries (padding included)
        order = env.storage_order(i)
        valid |= {k for k in order[: len(order) - 3] if k is not None}
    assert seen == valid
    assert {"terminated", "truncated", None} <= cuts  # both kinds of episode end cut the n-step return


def test_online_buffers_after_wrapping_around():
    env, buffers = drive(2, buffer_size=2 * 60, steps=500, seed=7, n=3, gamma=0.97)
    assert all(b.add_count > 3 * b.capacity for b in buffers)
    ref = env.reference(3, 0.97)
    rng = np.random.default_rng(1)
    for call in range(40):
        check_rows(fo.sample_batch(buffers, 16, rng, call), ref)


def test_epsilon_schedule():
    args = fo.Args(epsilon_start=0.5, epsilon_end=0.1, epsilon_decay_steps=100, learning_starts=50)
    got = [fo.epsilon_at(args, s) for s in (0, 50, 100, 150, 10_000)]
    assert got == pytest.approx([0.5, 0.5, 0.3, 0.1, 0.1])


# ---------------------------------------------------------------------------------------------- network


def test_network_starts_from_the_checkpoint(checkpoint):
    ckpt = cql_multigame.load_checkpoint(checkpoint)
    pre = cql_multigame.network_from_checkpoint(ckpt)
    g = list(ckpt["games"]).index("Freeway")
    net, origin = fo.build_network(ckpt, checkpoint, "Freeway", False, seed=0)
    assert net.num_games == 1 and "Freeway head" in origin
    for part in ("trunk", "spatial_embedding", "shared_mlp"):
        for a, b in zip(getattr(net, part).parameters(), getattr(pre, part).parameters(), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(net.heads.weight[0], pre.heads.weight[g])
    assert torch.equal(net.heads.bias[0], pre.heads.bias[g])
    fresh, origin = fo.build_network(ckpt, checkpoint, "Pong", False, seed=0)
    assert "fresh" in origin and torch.equal(fresh.trunk[0].weight, pre.trunk[0].weight)
    assert not any(torch.equal(fresh.heads.weight[0], pre.heads.weight[k]) for k in range(pre.num_games))
    scratch, _ = fo.build_network(ckpt, checkpoint, "Freeway", True, seed=0)
    assert scratch.config() == {**pre.config(), "num_games": 1}
    assert not torch.equal(scratch.trunk[0].weight, pre.trunk[0].weight)


# ---------------------------------------------------------------------------------------------- runs


def test_cli_run_on_a_variant(checkpoint, tmp_path):
    cmd = [sys.executable, "finetune_online.py", "--checkpoint", checkpoint, "--game", "Breakout",
           "--mode", "4", "--difficulty", "1", "--runs-dir", str(tmp_path),
           *flags(**{**TINY, "eval_every": 120})]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "| game | mode | difficulty | env steps | mean return | human-normalized (base game) |" in out.stdout
    )
    assert "| Breakout | 4 | 1 | 240 |" in out.stdout and "| Breakout | 4 | 1 | 0 |" in out.stdout
    run_dir = tmp_path / "online_Breakout_m4_d1_pretrained_seed1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == 240 and summary["updates"] == (240 - 64) // 4
    assert [e["env_steps"] for e in summary["evaluations"]] == [0, 120, 240]
    assert summary["mode"] == 4 and summary["difficulty"] == 1 and summary["final_hns"] is not None
    tuned = cql_multigame.load_checkpoint(run_dir / "checkpoint.pt")  # cql_multigame.py's format
    assert tuned["games"] == ["Breakout"] and cql_multigame.network_from_checkpoint(tuned).num_games == 1
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.fixture
def one_thread():
    """In-process runs: one torch thread, like the subprocess runs (OMP_NUM_THREADS=1); much faster on a
    busy 2-core machine for the tiny network."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_net(run_dir):
    return cql_multigame.network_from_checkpoint(cql_multigame.load_checkpoint(run_dir / "checkpoint.pt"))


def test_freeze_trunk_trains_only_the_head(checkpoint, tmp_path, one_thread):
    args = fo.Args(checkpoint=checkpoint, game="Pong", freeze_trunk=True, runs_dir=str(tmp_path), **TINY)
    summary = fo.main(args)  # Pong has no head in the checkpoint: a fresh one
    assert summary["updates"] > 0 and summary["freeze_trunk"]
    pre = cql_multigame.network_from_checkpoint(cql_multigame.load_checkpoint(checkpoint))
    net = trained_net(Path(summary["run_dir"]))
    for part in ("trunk", "spatial_embedding", "shared_mlp"):
        for a, b in zip(getattr(net, part).parameters(), getattr(pre, part).parameters(), strict=True):
            assert torch.equal(a, b)
    fresh, _ = fo.build_network(
        cql_multigame.load_checkpoint(checkpoint), checkpoint, "Pong", False, args.seed
    )
    assert not torch.equal(net.heads.weight, fresh.heads.weight)  # the head learned


def test_from_scratch_runs_the_same_loop(checkpoint, tmp_path, one_thread):
    args = fo.Args(checkpoint=checkpoint, game="Freeway", mode=1, from_scratch=True, runs_dir=str(tmp_path),
                   **TINY)  # fmt: skip
    summary = fo.main(args)
    assert summary["init"] == "scratch" and summary["updates"] == (240 - 64) // 4
    assert Path(summary["run_dir"]).name == "online_Freeway_m1_ddefault_scratch_seed1"
    start, _ = fo.build_network(cql_multigame.load_checkpoint(checkpoint), checkpoint, "Freeway", True, 1)
    assert not torch.equal(trained_net(Path(summary["run_dir"])).trunk[0].weight, start.trunk[0].weight)
    with pytest.raises(cql_multigame.ConfigError, match="already holds a finished run"):
        fo.main(args)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_is_one_sentence(checkpoint, tmp_path):
    base = dict(checkpoint=checkpoint, runs_dir=str(tmp_path), **TINY)
    with pytest.raises(atari.AtariConfigError, match=r"Breakout has no mode 3; valid modes are \[0, 4, 8"):
        fo.main(fo.Args(**{**base, "game": "Breakout", "mode": 3}))
    with pytest.raises(atari.AtariConfigError, match=r"no difficulty 2; valid difficulties are \[0, 1\]"):
        fo.main(fo.Args(**{**base, "game": "Freeway", "difficulty": 2}))
    with pytest.raises(cql_multigame.ConfigError, match="did you mean 'Breakout'"):
        fo.main(fo.Args(**{**base, "game": "Breakot"}))
    with pytest.raises(cql_multigame.ConfigError, match="does not exist"):
        fo.main(fo.Args(**{**base, "checkpoint": str(tmp_path / "nope.pt")}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(cql_multigame.ConfigError, match="corrupt"):
        fo.main(fo.Args(**{**base, "checkpoint": str(tmp_path / "junk.pt")}))
    ckpt = cql_multigame.load_checkpoint(checkpoint)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("shared_mlp")}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(cql_multigame.ConfigError, match="cannot rebuild"):
        fo.main(fo.Args(**{**base, "checkpoint": str(tmp_path / "bad.pt")}))
    with pytest.raises(cql_multigame.ConfigError, match="--buffer-size 10 gives"):
        fo.main(fo.Args(**{**base, "buffer_size": 10}))
    assert not list(tmp_path.glob("online_*"))  # nothing started

    cmd = [sys.executable, "finetune_online.py", "--checkpoint", checkpoint, "--game", "Hero",
           "--difficulty", "1", "--runs-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: Hero has no difficulty 1; valid difficulties are [0]."
    )


# ------------------------------------------------------------------------------------------ DQN-Replay maker


def test_replay_logger_writes_what_batch_rl_writes(tmp_path):
    """Snapshots at add_count % capacity == capacity - 1 after a real add (suffixes 0, 1, ...), the final
    partial buffer with add_count = cursor, episode returns beside each; MultiGameReplay reads them."""
    import replay

    legal = np.asarray(atari.legal_actions("Breakout"))
    rng = np.random.default_rng(3)
    env = FakeVecEnv(2, rng, legal.tolist(), max_len=40)  # padding is 3 of every ~23 adds
    args = fo.Args(num_envs=2, buffer_size=2 * 50, n_step=3, gamma=0.9)
    buffers = fo.make_buffers(args, legal.tolist())
    logger = fo.ReplayLogger(tmp_path, "Breakout", buffers, args.n_step)
    expected = [[], []]  # per env: (suffix, add_count) of every snapshot, by batch_rl's rule
    returns, ep_return = [[[]], [[]]], np.zeros(2)
    obs, _ = env.reset()
    for _ in range(170):
        before = [b.add_count for b in buffers]
        obs, reward, done = fo.collect(env, obs, rng.integers(len(legal), size=2), legal, buffers)
        ep_return += reward
        finished = {int(i): float(ep_return[i]) for i in np.flatnonzero(done)}
        for i in finished:
            returns[i][-1].append(finished[i])
            ep_return[i] = 0.0
        logger.after_step(finished)
        for i, b in enumerate(buffers):
            assert b.add_count > before[i]
            if b.add_count % b.capacity == b.capacity - 1:
                expected[i].append((len(expected[i]), b.add_count))
                returns[i].append([])
    logger.final()
    for i, b in enumerate(buffers):
        logs = tmp_path / "Breakout" / str(i + 1) / "replay_logs"
        if replay.valid_mask(b.terminal, b.cursor, 3).any():  # else the final partial buffer is skipped
            expected[i].append((len(expected[i]), b.cursor))
        assert len(expected[i]) >= 3  # at least two fills were logged (a fill whose capacity - 1 lands on a
        # padding row is not, as in batch_rl)
        assert replay.list_checkpoints(logs) == [k for k, _ in expected[i]]
        for k, add_count in expected[i]:
            data = replay.read_checkpoint(logs, k)
            assert int(data["add_count"]) == add_count and np.asarray(data["add_count"]).ndim <= 1
            assert set(np.asarray(data["invalid_range"]).tolist()) == set(
                replay.dopamine_invalid_range(add_count % b.capacity, b.capacity, 3).tolist()
            )
            assert replay.read_episode_returns(logs, [k]) == pytest.approx(returns[i][k])
        assert expected[i][0][1] % b.capacity == b.capacity - 1  # the cursor of a snapshot: capacity - 1
        if expected[i][-1][1] == b.cursor:  # the final partial buffer holds the buffer as it is now
            last = replay.read_checkpoint(logs, expected[i][-1][0])
            np.testing.assert_array_equal(last["observation"], b.frames)
    empty = fo.ReplayLogger(tmp_path / "empty", "Breakout", fo.make_buffers(args, legal.tolist()), 3)
    empty.final()  # nothing a reader could sample: no checkpoint
    assert not list((tmp_path / "empty").rglob("*.gz"))
    data = replay.MultiGameReplay(tmp_path, ["Breakout"], runs=(1, 2), checkpoints="nearoptimal", n_step=3)
    batch = data.sample(16)
    assert batch.obs.shape == (16, 4, 84, 84) and set(batch.action.tolist()) <= set(legal.tolist())
    data.close()


def test_log_replay_and_resume_after_an_interruption(checkpoint, tmp_path, one_thread, monkeypatch):
    """--log-replay-dir through the real loop, and --resume after a run was stopped right after a save."""
    import replay

    logs = tmp_path / "logged"
    base = dict(TINY, total_env_steps=480, buffer_size=2 * 100, save_every=200, log_replay_dir=str(logs))
    args = fo.Args(checkpoint=checkpoint, game="Breakout", from_scratch=True, runs_dir=str(tmp_path), **base)
    real_collect, calls = fo.collect, {"n": 0}

    def collect_then_stop(*a, **k):  # 2 envs: call 130 reaches 260 env steps, after the save at 200
        calls["n"] += 1
        if calls["n"] > 130:
            raise KeyboardInterrupt
        return real_collect(*a, **k)

    monkeypatch.setattr(fo, "collect", collect_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fo.main(args)
    run_dir = tmp_path / "online_Breakout_mdefault_ddefault_scratch_seed1"
    saved = cql_multigame.load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["online"]["env_steps"] == 200 and not (run_dir / "summary.json").exists()
    with pytest.raises(cql_multigame.ConfigError, match="pass --resume"):
        fo.main(args)
    monkeypatch.setattr(fo, "collect", real_collect)
    summary = fo.main(fo.Args(**{**vars(args), "resume": True}))
    assert summary["env_steps"] == 480 and summary["updates"] == (480 - 64) // 4
    for env in (1, 2):  # 240 real adds per env plus padding fill a 100-row buffer at least twice
        suffixes = replay.list_checkpoints(logs / "Breakout" / str(env) / "replay_logs")
        assert suffixes == list(range(len(suffixes))) and len(suffixes) >= 3
    data = replay.MultiGameReplay(logs, ["Breakout"], runs=(1, 2), checkpoints="nearoptimal", n_step=3)
    assert data.sample(8).obs.shape == (8, 4, 84, 84)
    data.close()
