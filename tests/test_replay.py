"""Tests for replay.py: the DQN-Replay format, Dopamine's validity and n-step rules against a slow per-index
transcription of Dopamine written here, equal game shares, selection, streaming, resume, distributed shares,
every bad-input error, and the recorder."""

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import atari
import record
import replay

REPO = Path(__file__).resolve().parents[1]
GAMES = ("Pong", "Breakout")  # 6 and 4 legal actions


# ---------------------------------------------------------------------------------------------- reference


class RefBuffer:
    """Dopamine's OutOfGraphReplayBuffer (add / is_valid_transition / sample_transition_batch), one index
    at a time, transcribed without vectorization."""

    def __init__(self, capacity, stack=4):
        self.C, self.K = capacity, stack
        self.obs = np.zeros((capacity, 84, 84), np.uint8)
        self.action = np.zeros(capacity, np.int32)
        self.reward = np.zeros(capacity, np.float32)
        self.terminal = np.zeros(capacity, np.uint8)
        self.add_count = 0
        self.episode_end_indices = set()  # newer Dopamine: episode ends, with or without a terminal
        self.next_is_start = True
        self.file_horizon = None  # update horizon of the invalid_range Dopamine's load() read from a file

    def cursor(self):
        return self.add_count % self.C

    def _add(self, o, a, r, t):
        c = self.cursor()
        self.obs[c], self.action[c], self.reward[c], self.terminal[c] = o, a, r, t
        self.add_count += 1

    def add(self, o, a, r, t, episode_end=False):
        if self.next_is_start:
            for _ in range(self.K - 1):
                self.episode_end_indices.discard(self.cursor())
                self._add(np.zeros((84, 84), np.uint8), 0, 0.0, 0)
            self.next_is_start = False
        if episode_end or t:
            self.episode_end_indices.add(self.cursor())
            self.next_is_start = True
        else:
            self.episode_end_indices.discard(self.cursor())
        self._add(o, a, r, t)

    def invalid_range(self, n):
        return [(self.cursor() - n + i) % self.C for i in range(self.K + n)]

    def is_valid(self, index, n):
        if index < 0 or index >= self.C:
            return False
        if self.add_count < self.C:
            if index >= self.cursor() - n:
                return False
            if index < self.K - 1:
                return False
        invalid = set(self.invalid_range(n))
        if self.file_horizon is not None:  # what load() read; the reader also keeps its own n's range
            invalid |= set(self.invalid_range(self.file_horizon))
        if index in invalid:
            return False
        stack = [self.terminal[(index - self.K + 1 + j) % self.C] for j in range(self.K)]
        if any(stack[:-1]):
            return False
        for j in range(n):  # an episode end without a terminal inside the n-step window
            i = (index + j) % self.C
            if i in self.episode_end_indices and not self.terminal[i]:
                return False
        return True

    def transition(self, index, n, gamma):
        traj = [(index + j) % self.C for j in range(n)]
        terms = self.terminal[traj]
        is_terminal = bool(terms.any())
        length = int(np.argmax(terms.astype(bool))) + 1 if is_terminal else n
        disc = np.array([gamma**j for j in range(length)], np.float32)
        rew = np.array([self.reward[(index + j) % self.C] for j in range(length)], np.float32)
        nxt = index + length
        return dict(
            obs=np.stack([self.obs[(index - self.K + 1 + j) % self.C] for j in range(self.K)]),
            action=int(self.action[index]),
            reward=float(disc.dot(rew)),
            discount=gamma**n * (1.0 - is_terminal),
            next_obs=np.stack([self.obs[(nxt - self.K + 1 + j) % self.C] for j in range(self.K)]),
        )

    def valid(self, n):
        return [i for i in range(self.C) if self.is_valid(i, n)]


def frame_with_id(i):
    """A frame that names its transition: id i >= 1 in the first three pixels (padding frames are 0)."""
    f = np.zeros((84, 84), np.uint8)
    f[0, :3] = (i % 256, (i // 256) % 256, i // 65536)
    f[40:44, (i * 7) % 80 : (i * 7) % 80 + 4] = 200  # some content
    return f


def frame_id(frames):
    """ids of frames [..., 84, 84] -> int [...]"""
    px = frames[..., 0, :3].astype(np.int64)
    return px[..., 0] + 256 * px[..., 1] + 65536 * px[..., 2]


class Ids:
    def __init__(self, start=1):
        self.next = start

    def __call__(self):
        self.next += 1
        return self.next - 1


def fill(buf, rng, ids, num_steps, max_len=3, num_actions=4, stop_at_cursor=None):
    """Episodes of 1..max_len steps (the last may stay unfinished), random clipped rewards."""
    left = rng.integers(1, max_len + 1)
    for _ in range(num_steps):
        left -= 1
        terminal = left == 0
        buf.add(
            frame_with_id(ids()), int(rng.integers(num_actions)), float(rng.choice([-1, 0, 0, 1])), terminal
        )
        if terminal:
            left = rng.integers(1, max_len + 1)
    if stop_at_cursor is not None:  # keep adding short episodes until the cursor lands there
        while buf.cursor() != stop_at_cursor:
            terminal = rng.random() < 0.4
            buf.add(
                frame_with_id(ids()), int(rng.integers(num_actions)), float(rng.choice([-1, 0, 1])), terminal
            )
    return buf


def plain_write(directory, suffix, buf, invalid_horizon=1, **override):
    """A writer that is not replay.py's: Dopamine's save(), gzip.GzipFile + np.save."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "$store$_observation": buf.obs,
        "$store$_action": buf.action,
        "$store$_reward": buf.reward,
        "$store$_terminal": buf.terminal,
        "add_count": np.array(buf.add_count),
        "invalid_range": np.array(buf.invalid_range(invalid_horizon)),
    }
    arrays.update(override)
    for name, arr in arrays.items():
        with (
            open(directory / f"{name}_ckpt.{suffix}.gz", "wb") as f,
            gzip.GzipFile(fileobj=f, mode="wb") as g,
        ):
            np.save(g, arr, allow_pickle=False)


# Hand-built buffers covering the rules: (capacity, steps, max episode length, cursor to stop at)
CASES = {
    "not_full_short_episodes": (64, 30, 3, None),
    "one_step_episodes": (40, 9, 1, None),
    "exactly_full": (48, None, 2, 0),  # stops when add_count hits capacity (cursor 0, just wrapped)
    "wrapped_cursor_mid": (40, 70, 3, 17),
    "wrapped_cursor_near_end": (37, 90, 3, 35),
    "wrapped_cursor_at_1": (33, 60, 2, 1),
    "long_episodes_wrapped": (50, 200, 9, None),
}


def build(case, seed=0, ids=None):
    capacity, steps, max_len, stop = CASES[case]
    rng = np.random.default_rng(seed)
    buf = RefBuffer(capacity)
    ids = ids or Ids()
    if steps is None:
        while buf.add_count < capacity - 1:
            fill(buf, rng, ids, 1, max_len)
        if buf.add_count < capacity:
            buf.add(frame_with_id(ids()), 0, 0.0, 0)
        if buf.add_count != capacity:  # padding overshot: start again with another seed
            return build(case, seed + 1)
        return buf
    return fill(buf, rng, ids, steps, max_len, stop_at_cursor=stop)


# ---------------------------------------------------------------------------------------------- format


def test_round_trip_and_file_names(tmp_path):
    buf = build("wrapped_cursor_mid")
    replay.write_checkpoint(tmp_path, 7, buf.obs, buf.action, buf.reward, buf.terminal, buf.add_count)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{n}_ckpt.7.gz"
        for n in [
            "$store$_observation",
            "$store$_action",
            "$store$_reward",
            "$store$_terminal",
            "add_count",
            "invalid_range",
        ]
    )
    data = replay.read_checkpoint(tmp_path, 7)
    for key, ref in [("observation", buf.obs), ("action", buf.action), ("reward", buf.reward)]:
        assert data[key].dtype == ref.dtype and np.array_equal(data[key], ref)
    assert np.array_equal(data["terminal"], buf.terminal) and data["terminal"].dtype == np.uint8
    assert int(data["add_count"]) == buf.add_count
    assert data["invalid_range"].tolist() == buf.invalid_range(1)  # DQN-Replay: recorded with horizon 1
    # what replay.py writes, a plain gzip + np.load reader reads (allow_pickle=False)
    with gzip.open(tmp_path / "$store$_action_ckpt.7.gz") as f:
        assert np.array_equal(np.load(f, allow_pickle=False), buf.action)
    assert replay.list_checkpoints(tmp_path) == [7]


def test_reads_files_of_a_plain_gzip_npsave_writer(tmp_path):
    bufs = [build("wrapped_cursor_near_end", seed=s) for s in range(3)]
    for s, b in enumerate(bufs):
        plain_write(tmp_path, s * 5, b)
    (tmp_path / "$store$_action_ckpt.99.gz").write_bytes(b"")  # an incomplete checkpoint is not listed
    assert replay.list_checkpoints(tmp_path) == [0, 5, 10]
    for s, b in enumerate(bufs):
        data = replay.read_checkpoint(tmp_path, s * 5)
        assert np.array_equal(data["observation"], b.obs) and np.array_equal(data["reward"], b.reward)
        assert int(data["add_count"]) == b.add_count


def dopamine_save(directory, suffix, buf, invalid_horizon=1, episode_ends="pickle", garbage_seed=0):
    """Files as Dopamine's OutOfGraphReplayBuffer.save() writes them: storage made with np.empty (rows never
    written hold whatever was in memory; here: seeded garbage, out-of-range actions and NaN rewards
    included), add_count as the 0-d array np.array(n), invalid_range for the writer's update horizon, and the
    7th file episode_end_indices: pickle.dump of the Python set of np.int64 cursors (Dopamine's own
    format), or an np.save'd int64 array ("npy"), or none (None)."""
    import pickle

    rng = np.random.default_rng(garbage_seed)
    store = {
        "observation": rng.integers(0, 256, buf.obs.shape, dtype=np.uint8),
        "action": rng.integers(-(2**31), 2**31 - 1, buf.C, dtype=np.int64).astype(np.int32),
        "reward": rng.standard_normal(buf.C).astype(np.float32) * 1e30,
        "terminal": rng.integers(0, 256, buf.C, dtype=np.uint8),
    }
    store["reward"][::3] = np.nan
    written = np.arange(min(buf.add_count, buf.C))  # the rows add() ever reached
    for name, ref in [("observation", buf.obs), ("action", buf.action), ("reward", buf.reward),
                      ("terminal", buf.terminal)]:  # fmt: skip
        store[name][written] = ref[written]
    directory.mkdir(parents=True, exist_ok=True)
    files = {f"$store$_{k}": v for k, v in store.items()}
    files["add_count"] = np.array(buf.add_count)  # 0-d, as Dopamine keeps it
    files["invalid_range"] = np.array(buf.invalid_range(invalid_horizon))
    for name, arr in files.items():
        with gzip.open(directory / f"{name}_ckpt.{suffix}.gz", "wb") as g:
            np.save(g, arr, allow_pickle=False)
    if episode_ends is not None:
        with (
            open(directory / f"episode_end_indices_ckpt.{suffix}.gz", "wb") as f,
            gzip.GzipFile(fileobj=f, mode="wb") as g,
        ):
            if episode_ends == "pickle":
                pickle.dump({np.int64(i) for i in buf.episode_end_indices}, g)
            else:
                np.save(g, np.array(sorted(buf.episode_end_indices), np.int64), allow_pickle=False)
    return store


def load_npy_gz(path):
    with gzip.open(path) as f:
        return np.load(f, allow_pickle=False)


def test_add_count_is_written_0d_as_dopamine_writes_it_and_both_shapes_read(tmp_path):
    buf = build("wrapped_cursor_mid")
    replay.write_checkpoint(tmp_path / "a", 0, buf.obs, buf.action, buf.reward, buf.terminal, buf.add_count)
    add = load_npy_gz(tmp_path / "a" / "add_count_ckpt.0.gz")
    assert add.shape == () and add.dtype == np.int64 and int(add) == buf.add_count
    fb = replay.FrameBuffer(buf.C, n_step=1)  # the recorder's path
    fb.add(frame_with_id(1), 0, 0.0, False)
    fb.save(tmp_path / "b", 3)
    assert load_npy_gz(tmp_path / "b" / "add_count_ckpt.3.gz").shape == ()
    # Dopamine's sample_index_batch + is_valid_transition on what its load() reads, transcribed: with a 0-d
    # add_count the index is a scalar; with the shape (1,) array this repo used to write it is an array and
    # `index in set(self.invalid_range)` raises "unhashable type: 'numpy.ndarray'"
    def dopamine_index(add_count, invalid_range):
        min_id = add_count % buf.C - buf.C + 4 - 1  # is_full(): cursor - capacity + stack_size - 1
        index = np.random.randint(min_id, add_count % buf.C - 1) % buf.C
        return index in set(invalid_range)

    inv = load_npy_gz(tmp_path / "a" / "invalid_range_ckpt.0.gz")
    dopamine_index(add, inv)  # works
    with pytest.raises(TypeError, match="unhashable"):
        dopamine_index(add.reshape(1), inv)
    # and the reader still takes the shape (1,) files that earlier versions of this repo wrote
    plain_write(tmp_path / "c", 0, buf, add_count=np.array([buf.add_count], np.int64))
    assert int(replay.read_checkpoint(tmp_path / "c", 0)["add_count"]) == buf.add_count
    assert replay.read_checkpoint(tmp_path / "a", 0)["add_count"].shape == ()


def test_never_filled_checkpoint_with_np_empty_garbage_loads_and_samples_like_dopamine(tmp_path):
    # batch_rl saves checkpoint 0 at add_count = capacity - 1: one row was never written
    buf = RefBuffer(60)
    rng, ids = np.random.default_rng(4), Ids()
    while buf.add_count < buf.C - 1:
        buf.add(frame_with_id(ids()), int(rng.integers(6)), float(rng.choice([-1, 0, 1])), rng.random() < 0.2)
    if buf.add_count != buf.C - 1:
        pytest.skip("padding overshot")  # not with this seed
    d = tmp_path / "Pong" / "1" / "replay_logs"
    store = dopamine_save(d, 0, buf, episode_ends=None)
    assert not 0 <= store["action"][buf.C - 1] < 6  # the unwritten row holds an impossible action
    where = {int(frame_id(buf.obs[i])): i for i in range(buf.C) if frame_id(buf.obs[i])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN/overflow warnings from garbage rows either
        r = replay.MultiGameReplay(d.parents[2], ["Pong"], runs=(1,), checkpoints="nearoptimal")
        batch = r.sample(2000)
    legal = atari.legal_actions("Pong")
    seen = set()
    for row, i in enumerate(frame_id(batch.obs[:, -1])):
        index = where[int(i)]
        ref = buf.transition(index, 3, 0.99)
        assert buf.is_valid(index, 3) and batch.action[row] == legal[ref["action"]]
        assert batch.reward[row] == pytest.approx(ref["reward"], abs=1e-6)
        assert np.array_equal(batch.next_obs[row], ref["next_obs"])
        seen.add(index)
    assert seen == set(buf.valid(3))
    # a real out-of-range action in a row the rules read is still refused
    store_bad = store["action"].copy()
    store_bad[buf.valid(3)[0]] = 9
    with open(d / "$store$_action_ckpt.0.gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as g:
        np.save(g, store_bad, allow_pickle=False)
    bad = f"outside Pong's 6 legal actions \\(9 at index {buf.valid(3)[0]}"
    with pytest.raises(replay.ReplayDataError, match=bad):
        replay.MultiGameReplay(d.parents[2], ["Pong"], runs=(1,), checkpoints="nearoptimal")


def sampled_indices(obs, buf, n):
    """Indices of buf that the sampled states obs [B, 4, 84, 84] are, by the ids of all 4 frames (after a
    time-out Dopamine also samples stacks whose newest frame is padding)."""
    stack = lambda i: tuple(frame_id(buf.obs[[(i - 3 + j) % buf.C for j in range(4)]]).tolist())
    key = {stack(i): i for i in buf.valid(n)}
    assert len(key) == len(buf.valid(n))
    return {key[tuple(ids)] for ids in frame_id(obs).tolist()}


def timeout_buffer(capacity=70, steps=160, seed=2):
    """Episodes that end by a time-out (episode_end without a terminal) as well as by terminals."""
    buf, rng, ids = RefBuffer(capacity), np.random.default_rng(seed), Ids()
    left = 3
    for _ in range(steps):
        left -= 1
        end = left == 0
        terminal = end and rng.random() < 0.5
        buf.add(frame_with_id(ids()), int(rng.integers(6)), float(rng.choice([-1, 0, 1])), terminal, end)
        if end:
            left = int(rng.integers(2, 6))
    return buf


@pytest.mark.parametrize("n", [1, 3])
def test_episode_end_indices_are_honoured_like_dopamine(tmp_path, n):
    buf = timeout_buffer()
    timeouts = [i for i in buf.episode_end_indices if not buf.terminal[i]]
    assert timeouts  # the case this file exists for
    ends = np.array(sorted(buf.episode_end_indices))
    mask = replay.valid_mask(buf.terminal, buf.add_count, n, episode_ends=ends)
    assert np.flatnonzero(mask).tolist() == buf.valid(n)
    without = replay.valid_mask(buf.terminal, buf.add_count, n)
    assert (without & ~mask).any()  # the time-outs make some indices invalid

    root = tmp_path / "npy"
    dopamine_save(root / "Pong" / "1" / "replay_logs", 0, buf, episode_ends="npy")
    data = replay.read_checkpoint(root / "Pong" / "1" / "replay_logs", 0)
    assert data["episode_end_indices"].tolist() == ends.tolist()
    fb = replay.FrameBuffer.from_checkpoint(root / "Pong" / "1" / "replay_logs", 0, n_step=n)
    assert fb.valid_indices().tolist() == buf.valid(n)
    r = replay.MultiGameReplay(root, ["Pong"], runs=(1,), checkpoints="nearoptimal", n_step=n)
    assert sampled_indices(r.sample(3000).obs, buf, n) == set(buf.valid(n))


def test_pickled_episode_end_indices_are_skipped_with_a_warning_never_unpickled(tmp_path, monkeypatch):
    import pickle

    buf = timeout_buffer(seed=5)
    d = tmp_path / "Pong" / "1" / "replay_logs"
    dopamine_save(d, 0, buf, episode_ends="pickle")  # what Dopamine's save() really writes
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.warns(UserWarning, match="is a pickle .* never unpickles, so checkpoint 0's episode ends"):
        r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")
    assert replay.list_checkpoints(d) == [0]
    buf.episode_end_indices = {i for i in buf.episode_end_indices if buf.terminal[i]}  # as without the file
    assert sampled_indices(r.sample(3000).obs, buf, 3) == set(buf.valid(3))


@pytest.mark.parametrize("writer_horizon", [1, 5])
def test_invalid_range_of_a_wider_writer_horizon_is_kept(tmp_path, writer_horizon):
    buf = build("wrapped_cursor_mid")
    d = tmp_path / "Pong" / "1" / "replay_logs"
    dopamine_save(d, 0, buf, invalid_horizon=writer_horizon, episode_ends=None)
    info = replay.scan_checkpoint(d, 0)
    assert info.horizon == writer_horizon
    buf.file_horizon = writer_horizon  # Dopamine's load() reads the file's range
    mask = replay.valid_mask(buf.terminal, buf.add_count, 3, **info.rules(3))
    assert np.flatnonzero(mask).tolist() == buf.valid(3)
    if writer_horizon == 5:
        narrow = replay.valid_mask(buf.terminal, buf.add_count, 3)
        assert (narrow & ~mask).sum() == 2  # c-5 and c-4 are in the file's range only
    fb = replay.FrameBuffer.from_checkpoint(d, 0, n_step=3)
    assert fb.valid_indices().tolist() == buf.valid(3)


# ---------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 3, 4])
def test_validity_matches_dopamine(case, n):
    buf = build(case)
    mask = replay.valid_mask(buf.terminal, buf.add_count, n)
    assert np.flatnonzero(mask).tolist() == buf.valid(n)
    assert mask.any()
    # single indices, out-of-range ones included
    idx = np.arange(-3, buf.C + 3)
    assert replay.is_valid(idx, buf.terminal, buf.add_count, n).tolist() == [buf.is_valid(i, n) for i in idx]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 3])
def test_nstep_targets_match_dopamine(case, n):
    buf, gamma = build(case), 0.9
    fb = replay.FrameBuffer(buf.C, n_step=n, gamma=gamma)
    fb.frames, fb.action, fb.reward, fb.terminal, fb.add_count = (
        buf.obs,
        buf.action,
        buf.reward,
        buf.terminal,
        buf.add_count,
    )
    valid = fb.valid_indices()
    batch = fb.gather(valid)
    saw_cut = False
    for row, i in enumerate(valid):
        ref = buf.transition(int(i), n, gamma)
        assert np.array_equal(batch.obs[row], ref["obs"])
        assert np.array_equal(batch.next_obs[row], ref["next_obs"])
        assert batch.action[row] == ref["action"]
        assert batch.reward[row] == pytest.approx(ref["reward"], abs=1e-6)
        assert batch.discount[row] == pytest.approx(ref["discount"], abs=1e-6)
        saw_cut |= n > 1 and ref["discount"] == 0 and buf.terminal[i] == 0  # terminal inside the window
    assert batch.obs.dtype == np.uint8 and batch.action.dtype == np.int64
    assert batch.reward.dtype == np.float32 and batch.discount.dtype == np.float32
    if n > 1 and case != "one_step_episodes":
        assert saw_cut


def test_episode_start_stack_is_zero_padded():
    buf = RefBuffer(32)
    fill(buf, np.random.default_rng(1), Ids(), 12, 3)
    fb = replay.FrameBuffer(32, n_step=1)
    fb.frames, fb.terminal, fb.add_count = buf.obs, buf.terminal, buf.add_count
    starts = [i for i in fb.valid_indices() if buf.terminal[i - 1] == 0 and frame_id(buf.obs[i - 1]) == 0]
    assert starts  # first steps of episodes: the stack is [0, 0, 0, first frame]
    obs = fb.gather(np.array(starts)).obs
    assert (obs[:, :3] == 0).all() and (frame_id(obs[:, 3]) > 0).all()


def test_frame_buffer_add_matches_dopamine_and_samples_uniformly():
    rng, ids = np.random.default_rng(3), Ids()
    ref, fb = RefBuffer(41), replay.FrameBuffer(41, n_step=3, action_map=atari.legal_actions("Pong"))
    fill(ref, np.random.default_rng(5), ids, 100, 4, num_actions=6)
    ids.next = 1
    fill(fb, np.random.default_rng(5), ids, 100, 4, num_actions=6)  # FrameBuffer has Dopamine's add()
    assert fb.add_count == ref.add_count
    assert np.array_equal(fb.frames, ref.obs) and np.array_equal(fb.terminal, ref.terminal)
    batch = fb.sample(6000, rng)
    sampled = frame_id(batch.obs[:, -1])
    where = {int(frame_id(ref.obs[i])): i for i in ref.valid(3)}
    assert set(sampled.tolist()) == set(where)  # exactly the valid indices
    counts = np.unique(sampled, return_counts=True)[1]
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    legal = np.array(atari.legal_actions("Pong"))
    first = where[int(sampled[0])]
    assert batch.action[0] == legal[ref.action[first]]  # minimal-set index -> full-set id
    with pytest.raises(ValueError, match="add more"):
        replay.FrameBuffer(16, n_step=3).sample(4, rng)


# ---------------------------------------------------------------------------------------------- sampler


def make_dataset(
    root, games=GAMES, runs=(1,), num_ckpts=2, cases=("wrapped_cursor_mid", "not_full_short_episodes")
):
    """Hand-built DQN-Replay tree, written by the plain writer; returns {id: (game, ref buffer, index)}."""
    ids, where = Ids(), {}
    for g, game in enumerate(games):
        num_actions = len(atari.legal_actions(game))
        for run in runs:
            for s in range(num_ckpts):
                capacity, steps, max_len, stop = CASES[cases[s % len(cases)]]
                buf = fill(
                    RefBuffer(capacity),
                    np.random.default_rng([g, run, s]),
                    ids,
                    steps or capacity,
                    max_len,
                    num_actions=num_actions,
                    stop_at_cursor=stop,
                )
                plain_write(root / game / str(run) / "replay_logs", s, buf)
                for i in range(buf.C):
                    if frame_id(buf.obs[i]):
                        where[int(frame_id(buf.obs[i]))] = (g, run, s, buf, i)
    return where


def check_batch(batch, where, legal, n, gamma, expect_game=None):
    """Every row equals Dopamine's transition for the index its newest frame names; returns the ids."""
    ids = frame_id(batch.obs[:, -1])
    for row, i in enumerate(ids):
        g, _, _, buf, index = where[int(i)]
        assert buf.is_valid(index, n)
        ref = buf.transition(index, n, gamma)
        assert batch.game[row] == g
        assert np.array_equal(batch.obs[row], ref["obs"]) and np.array_equal(
            batch.next_obs[row], ref["next_obs"]
        )
        assert batch.action[row] == legal[g][ref["action"]]
        assert batch.reward[row] == pytest.approx(ref["reward"], abs=1e-6)
        assert batch.discount[row] == pytest.approx(ref["discount"], abs=1e-6)
    return ids


def all_valid(where, n, keep=lambda key, buf, i: True):
    return {k for k, (g, r, s, buf, i) in where.items() if buf.is_valid(i, n) and keep((g, r, s), buf, i)}


def test_multigame_sample_matches_dopamine_and_covers_every_valid_transition(tmp_path):
    where = make_dataset(tmp_path)
    legal = [atari.legal_actions(g) for g in GAMES]
    r = replay.MultiGameReplay(tmp_path, GAMES, runs=(1,), checkpoints="nearoptimal", n_step=3, gamma=0.97)
    assert r.static and "static" in r.plan_summary()
    seen = set()
    for _ in range(60):
        batch = r.sample(64)
        assert batch.obs.shape == (64, 4, 84, 84) and batch.game.dtype == np.int64
        seen |= set(check_batch(batch, where, legal, 3, 0.97).tolist())
    assert seen == all_valid(where, 3)
    assert r.stats()["loaded_transitions"] == len(seen)
    r.close()


def test_equal_game_shares_with_rotating_remainder(tmp_path):
    games = ("Pong", "Breakout", "Boxing")
    make_dataset(tmp_path, games=games, num_ckpts=1)
    r = replay.MultiGameReplay(tmp_path, games, runs=(1,), checkpoints="nearoptimal")
    per_call = [np.bincount(r.sample(8).game, minlength=3).tolist() for _ in range(6)]
    assert all(sum(c) == 8 and min(c) >= 2 for c in per_call)  # 8 // 3 = 2 each, 2 extra slots rotate
    assert np.sum(per_call[:3], axis=0).tolist() == [8, 8, 8]  # equal over a cycle
    assert per_call[:3] == per_call[3:]
    with pytest.raises(ValueError, match="smaller than the 3 games"):
        r.sample(2)


def test_selection_rules(tmp_path):
    # "suboptimal" = suffixes 0..9 by number (the first 20% of DQN-Replay's 0..50), not a share of the files
    assert replay.select_suffixes(range(51), "suboptimal") == list(range(10))
    assert replay.select_suffixes(range(11), "suboptimal") == list(range(10))
    with pytest.warns(UserWarning, match=r"run-a lacks sub-optimal checkpoints \[3, 4, 5, 6, 7, 8, 9\]"):
        assert replay.select_suffixes(range(3), "suboptimal", "run-a") == [0, 1, 2]
    with pytest.warns(UserWarning, match=r"run-b lacks sub-optimal checkpoints \[0, 1, 5\].*using \[2, 3, 4"):
        got = replay.select_suffixes([2, 3, 4, 6, 7, 8, 9, 10, 30], "suboptimal", "run-b")
    assert got == [2, 3, 4, 6, 7, 8, 9]
    with pytest.raises(replay.ReplayDataError, match=r"run-c holds none of the sub-optimal checkpoints 0..9"):
        replay.select_suffixes(range(40, 51), "suboptimal", "run-c")  # was [40, 41] by position
    assert replay.select_suffixes([4, 1, 2], "nearoptimal") == [1, 2, 4]
    assert replay.select_suffixes(range(5), [3, 1]) == [1, 3]
    assert replay.select_suffixes(range(5), "0,4") == [0, 4]
    with pytest.raises(replay.ReplayDataError, match=r"\[7\] are not in"):
        replay.select_suffixes(range(5), [7])
    with pytest.raises(replay.ReplayDataError, match="not suboptimal, nearoptimal"):
        replay.select_suffixes(range(5), "best")

    where = make_dataset(tmp_path, games=("Pong",), num_ckpts=12, cases=("wrapped_cursor_mid",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0..9 all there: nothing to warn about
        r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="suboptimal")
    assert {where[int(i)][2] for i in frame_id(r.sample(3000).obs[:, -1])} == set(range(10))  # not 10, 11
    r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints=[2, 5])
    assert {where[int(i)][2] for i in frame_id(r.sample(600).obs[:, -1])} == {2, 5}
    r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal", fraction=0.5)
    idx = {where[int(i)][4] for i in frame_id(r.sample(2000).obs[:, -1])}
    assert max(idx) < 20 and len(idx) > 5  # the first half (20 of 40) of each checkpoint, in file order


def test_streaming_rotation_covers_all_checkpoints_and_resume_repeats_batches(tmp_path):
    where = make_dataset(tmp_path, num_ckpts=3, cases=("wrapped_cursor_mid", "long_episodes_wrapped"))
    legal = [atari.legal_actions(g) for g in GAMES]
    slot = 26  # frames per slot: no checkpoint (40-50 transitions) fits, so all come in windows
    budget = slot * 3 * replay._ROW_BYTES / 2**30  # 2 games + 1 spare slot
    kw = dict(runs=(1,), checkpoints="nearoptimal", memory_budget_gb=budget, reload_every=16, seed=3)
    r = replay.MultiGameReplay(tmp_path, GAMES, **kw)
    assert not r.static and "streaming" in r.plan_summary()
    seen, states, batches = set(), {}, []
    for call in range(500):
        states[call] = json.loads(json.dumps(r.state_dict()))  # plain types
        batch = r.sample(32)
        batches.append(batch)
        seen |= set(check_batch(batch, where, legal, 3, 0.99).tolist())
    # windows drop only the transitions whose stack or n-step window wraps around the file's end
    expected = all_valid(where, 3, keep=lambda k, buf, i: i >= 3 and i + 3 < buf.C)
    assert seen == expected
    stats = r.stats()
    assert stats["reloads"] > 20 and stats["excluded_checkpoints"] == 0
    r.close()

    r2 = replay.MultiGameReplay(tmp_path, GAMES, **kw)
    r2.load_state_dict(states[201])
    for call in range(201, 260):
        b = r2.sample(32)
        for x, y in zip(b, batches[call], strict=True):
            assert np.array_equal(x, y)
    r2.close()


def test_streaming_mixes_windows_of_different_checkpoints_covers_all_and_resumes_exactly(tmp_path):
    games = ("Pong",)
    cases = ("wrapped_cursor_mid", "long_episodes_wrapped")
    where = make_dataset(tmp_path, games=games, num_ckpts=4, cases=cases)
    legal = [atari.legal_actions(g) for g in games]
    slot = 60  # frames per slot; checkpoints hold 40-50 transitions, so 3 windows of ~20 frames fit
    budget = slot * 2 * replay._ROW_BYTES / 2**30  # 1 game + 1 spare slot
    kw = dict(runs=(1,), checkpoints="nearoptimal", memory_budget_gb=budget, seed=5)
    r = replay.MultiGameReplay(tmp_path, games, reload_every=0, total_samples=400, windows_per_slot=3, **kw)
    sets = r._sets[0]
    assert len(sets) > 3 and all(len({p.key() for p in s}) == len(s) for s in sets)  # distinct checkpoints
    assert sum(len(s) == 3 for s in sets) >= len(sets) - 1  # all but at most the last set mix 3 of them
    pieces = [p for s in sets for p in s]
    assert len(pieces) == len(set(pieces))  # every window in exactly one set: a pass covers everything
    assert r.reload_every == 400 // (len(sets) + 1)  # auto: every set within the run
    assert "up to 3 windows of different checkpoints per slot" in r.plan_summary()
    seen, states, batches, per_batch = set(), {}, [], []
    for call in range(400):
        states[call] = json.loads(json.dumps(r.state_dict()))
        batch = r.sample(24)
        batches.append(batch)
        ids = check_batch(batch, where, legal, 3, 0.99)
        seen |= set(ids.tolist())
        per_batch.append(len({where[int(i)][2] for i in ids}))
    expected = all_valid(where, 3, keep=lambda k, buf, i: i >= 3 and i + 3 < buf.C)
    assert seen == expected  # windows load their neighbours' edge frames: only the file ends are dropped
    assert np.mean(per_batch) > 2.5  # a batch of one game draws from ~3 checkpoints (one window: 1)
    report = r.plan_report(24, 400)
    assert "data seen over the run: 100.0%" in report and "windows per slot: 3" in report
    r.close()
    # across several swaps; a longer --total-steps on resume keeps the auto period the run started with
    r2 = replay.MultiGameReplay(tmp_path, games, reload_every=0, total_samples=900, windows_per_slot=3, **kw)
    assert r2.reload_every != r.reload_every
    r2.load_state_dict(states[150])
    assert r2.reload_every == r.reload_every
    for call in range(150, 260):
        for x, y in zip(r2.sample(24), batches[call], strict=True):
            assert np.array_equal(x, y)
    r2.close()
    one = replay.MultiGameReplay(tmp_path, games, reload_every=50, windows_per_slot=1, **kw)
    assert all(len(s) == 1 for s in one._sets[0])  # the old layout: one window per slot
    one.close()


def test_dry_run_plans_the_paper_presets_without_data():
    sub = replay.MultiGameReplay.dry_run(atari.TRAIN_GAMES, runs=(1,), checkpoints="suboptimal",
                                         reload_every=0, total_samples=10_000_000)  # fmt: skip
    report = sub.plan_report(512, 10_000_000)
    assert "10 checkpoints, 9,999,999 transitions per game (399,999,960 in all)" in report  # the paper's 400M
    assert "windows per slot: 5" in report and "data seen over the run: 100.0%" in report
    distinct = float(report.split("distinct checkpoints per batch: ")[1].split()[0])
    assert distinct > 150  # vs 40 with one window per slot
    old = replay.MultiGameReplay.dry_run(atari.TRAIN_GAMES, runs=(1, 2, 3, 4, 5), windows_per_slot=1,
                                         total_samples=10_000_000)  # fmt: skip
    old_report = old.plan_report(512, 10_000_000)  # the numbers: 50M per game, ~44% ever seen
    assert "data seen over the run: 44." in old_report and "distinct checkpoints per batch: 40 " in old_report
    with pytest.raises(replay.ReplayDataError, match="n_step 256 is above 255"):
        replay.MultiGameReplay.dry_run(["Pong"], n_step=256)


def test_distributed_ranks_get_disjoint_shares(tmp_path):
    where = make_dataset(tmp_path, games=("Pong",), num_ckpts=4, cases=("wrapped_cursor_mid",))
    shares = []
    for rank in range(3):
        r = replay.MultiGameReplay(
            tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal", rank=rank, world_size=3
        )
        shares.append({where[int(i)][2] for i in frame_id(r.sample(500).obs[:, -1])})
    assert shares == [{0, 3}, {1}, {2}]
    # fewer checkpoints than ranks: disjoint windows of them
    parts = []
    for rank in range(2):
        r = replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints=[1], rank=rank, world_size=2)
        parts.append({int(i) for i in frame_id(r.sample(500).obs[:, -1])})
    assert parts[0] and parts[1] and not parts[0] & parts[1]


def test_many_ranks_keep_the_global_equal_game_share():
    # one rank: the 1-process layout (batch // G per game, the batch % G extras rotating)
    for call in range(5):
        counts = np.bincount(replay.rank_batch_games(8, 3, call), minlength=3)
        assert counts.tolist() == np.roll([3, 3, 2], 2 * call).tolist()
    # more ranks than a batch holds games per rank: 512 over 40 games on 64 replicas, 8 over 6 on 4
    for B, G, W in [(512, 40, 64), (512, 40, 16), (8, 6, 4), (480, 40, 16), (12, 3, 2)]:
        period = G // np.gcd(B % G, G) * W
        per_rank = np.zeros((W, G), np.int64)
        for call in range(2 * period):
            rows = [replay.rank_batch_games(B, G, call, r, W) for r in range(W)]
            assert all(len(x) == B // W for x in rows)
            glob = np.bincount(np.concatenate(rows), minlength=G)
            assert glob.tolist() == np.bincount(replay.rank_batch_games(B, G, call), minlength=G).tolist()
            assert glob.min() == B // G and glob.max() <= B // G + 1
            for r in range(W):
                per_rank[r] += np.bincount(rows[r], minlength=G)
        # over full rotations every rank has drawn every game equally often: each rank's disjoint share
        # of a game's data is sampled at the same rate
        assert (per_rank == per_rank[0, 0]).all(), (B, G, W)


def test_ranks_sample_rotating_game_subsets_from_disjoint_shares(tmp_path):
    games = ("Pong", "Breakout", "Boxing", "Freeway", "Asterix", "Seaquest")
    where = make_dataset(tmp_path, games=games, num_ckpts=1, cases=("wrapped_cursor_mid",))
    ranks = [
        replay.MultiGameReplay(tmp_path, games, runs=(1,), checkpoints="nearoptimal", rank=r, world_size=4)
        for r in range(4)
    ]
    seen: list[dict[int, set]] = [{g: set() for g in range(6)} for _ in ranks]
    for call in range(60):
        batches = [r.sample(2) for r in ranks]  # 2 rows per rank, global batch 8 over 6 games
        for rank, b in enumerate(batches):
            assert b.game.tolist() == replay.rank_batch_games(8, 6, call, rank, 4).tolist()
            for g, i in zip(b.game, frame_id(b.obs[:, -1]), strict=True):
                assert where[int(i)][0] == g  # the row's frames are its game's
                seen[rank][int(g)].add(int(i))
        glob = np.bincount(np.concatenate([b.game for b in batches]), minlength=6)
        assert sorted(glob.tolist()) == [1, 1, 1, 1, 2, 2]
    for g in range(6):  # every rank drew every game, each from its own share
        assert all(seen[r][g] for r in range(4))
        assert all(not seen[a][g] & seen[b][g] for a in range(4) for b in range(a + 1, 4))
    with pytest.raises(ValueError, match="smaller than the 6 games"):
        ranks[0].sample(1)
    for r in ranks:
        r.close()


# ---------------------------------------------------------------------------------------------- bad input


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    else:  # flip bytes in the middle of the deflate stream
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 16]) + data[mid + 16 :])


BAD = {
    "missing_file": (
        lambda d: (d / "$store$_reward_ckpt.0.gz").unlink(),
        "lacks \\$store\\$_reward_ckpt.0.gz",
    ),
    "truncated_obs": (
        lambda d: corrupt(d / "$store$_observation_ckpt.0.gz", "truncate"),
        "truncated or corrupt",
    ),
    "corrupt_obs": (lambda d: corrupt(d / "$store$_observation_ckpt.0.gz", "flip"), "truncated or corrupt"),
    "truncated_small": (lambda d: corrupt(d / "add_count_ckpt.0.gz", "truncate"), "add_count_ckpt.0.gz"),
    "not_gzip": (lambda d: (d / "$store$_terminal_ckpt.0.gz").write_bytes(b"hello"), "terminal_ckpt.0.gz"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_stop_startup_with_one_sentence(tmp_path, case):
    make_dataset(tmp_path, games=("Pong",), num_ckpts=1, cases=("long_episodes_wrapped",))
    fn, match = BAD[case]
    fn(tmp_path / "Pong" / "1" / "replay_logs")
    with pytest.raises(replay.ReplayDataError, match=match) as e:
        replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence


@pytest.mark.parametrize(
    "override, match",
    [
        ({"$store$_action": np.zeros(49, np.int32)}, r"expected int32 of shape \(50,\)"),
        ({"$store$_action": np.zeros(50, np.int64)}, "holds a int64"),
        (
            {"$store$_observation": np.zeros((50, 80, 80), np.uint8)},
            r"expected uint8 of shape \(C, 84, 84\)",
        ),
        ({"$store$_terminal": np.zeros(50, bool)}, "holds a bool"),
        ({"invalid_range": np.arange(5)}, "does not match add_count"),
        ({"add_count": np.array(0)}, "holds no transitions"),
        ({"$store$_action": np.full(50, 9, np.int32)}, "outside Pong's 6 legal actions"),
    ],
)
def test_mismatched_arrays_are_named(tmp_path, override, match):
    buf = build("long_episodes_wrapped")
    plain_write(tmp_path / "Pong" / "1" / "replay_logs", 0, buf, **override)
    with pytest.raises(replay.ReplayDataError, match=match):
        replay.MultiGameReplay(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal")


def test_pickled_file_is_refused(tmp_path):
    buf = build("long_episodes_wrapped")
    d = tmp_path / "Pong" / "1" / "replay_logs"
    plain_write(d, 0, buf)
    with open(d / "invalid_range_ckpt.0.gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as g:
        np.save(g, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(replay.ReplayDataError, match="object"):
        replay.read_checkpoint(d, 0)


@pytest.mark.filterwarnings("ignore:.*lacks sub-optimal checkpoints")  # 2 checkpoints, default "suboptimal"
def test_bad_paths_and_selections(tmp_path):
    new = replay.MultiGameReplay
    with pytest.raises(replay.ReplayDataError, match="does not exist: download DQN-Replay with `gsutil"):
        new(tmp_path / "nope", ["Pong"])
    (tmp_path / "a_file.gz").write_bytes(b"")
    with pytest.raises(replay.ReplayDataError, match="is a file, not a folder"):  # not "does not exist"
        new(tmp_path / "a_file.gz", ["Pong"])
    (tmp_path / "a_file.gz").unlink()
    with pytest.raises(replay.ReplayDataError, match="is empty: .*python record.py"):
        new(tmp_path, ["Pong"])
    make_dataset(tmp_path, games=("Pong",), num_ckpts=2, cases=("wrapped_cursor_mid",))
    with pytest.raises(
        replay.ReplayDataError, match="no data for game Breakout .*gs://atari-replay-datasets/dqn/Breakout"
    ):
        new(tmp_path, ["Pong", "Breakout"], runs=(1,))
    with pytest.raises(replay.ReplayDataError, match="no checkpoints in .*Pong/2/replay_logs"):
        new(tmp_path, ["Pong"], runs=(1, 2))
    with pytest.raises(replay.ReplayDataError, match=r"suffixes \[3\] are not in"):
        new(tmp_path, ["Pong"], runs=(1,), checkpoints=[0, 3])
    with pytest.raises(replay.ReplayDataError, match="nothing left to sample for Pong"):
        new(tmp_path, ["Pong"], runs=(1,), checkpoints=[0], fraction=0.05)
    with pytest.raises(replay.ReplayDataError, match="fraction"):
        new(tmp_path, ["Pong"], runs=(1,), fraction=0.0)
    with pytest.raises(replay.ReplayDataError, match="memory_budget_gb is too small"):
        new(tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal", memory_budget_gb=1e-6)
    with pytest.raises(ValueError, match="Pong"):
        new(tmp_path, ["Pongg"], runs=(1,))
    with pytest.raises(replay.ReplayDataError, match="lacks"):
        replay.read_checkpoint(tmp_path, 0)


def test_corrupt_checkpoint_in_background_is_excluded_and_training_goes_on(tmp_path):
    where = make_dataset(tmp_path, games=("Pong",), num_ckpts=4, cases=("long_episodes_wrapped",))
    budget = 60 * 2 * replay._ROW_BYTES / 2**30  # one whole checkpoint per set (no mixing)
    r = replay.MultiGameReplay(
        tmp_path, ["Pong"], runs=(1,), checkpoints="nearoptimal", memory_budget_gb=budget, reload_every=5,
        windows_per_slot=1,
    )  # fmt: skip
    r._job.done.wait()
    busy = {p.suffix for p in r._loaded[0] + (r._job.result or [])}
    bad = sorted({0, 1, 2, 3} - busy)[0]
    corrupt(tmp_path / "Pong" / "1" / "replay_logs" / f"$store$_observation_ckpt.{bad}.gz", "truncate")
    suffixes = set()
    with pytest.warns(UserWarning, match=f"truncated or corrupt.*Excluding Pong run 1 checkpoint {bad}"):
        for _ in range(80):
            suffixes |= {where[int(i)][2] for i in frame_id(r.sample(16).obs[:, -1])}
    assert suffixes == {0, 1, 2, 3} - {bad}
    assert r.stats()["excluded_checkpoints"] == 1 and r.stats()["reloads"] > 5
    r.close()


# ---------------------------------------------------------------------------------------------- recorder


def test_recorder_writes_valid_dqn_replay(tmp_path):
    dirs = record.record(
        tmp_path,
        ["Breakout"],
        runs=(1, 2),
        num_checkpoints=2,
        capacity=150,
        max_episode_steps=15,
        num_workers=1,
        progress=False,
    )
    assert dirs == [tmp_path / "Breakout" / str(r) / "replay_logs" for r in (1, 2)]
    legal = atari.legal_actions("Breakout")
    for d in dirs:
        assert replay.list_checkpoints(d) == [0, 1]
        for k in (0, 1):
            data = replay.read_checkpoint(d, k)  # also checks invalid_range against add_count
            add, term = int(data["add_count"]), data["terminal"]
            assert add > (k + 1) * 150 and add % 150 != 0  # padding moves the cursor mid-buffer
            cursor = add % 150
            ends = np.flatnonzero(term)
            gaps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True) if not a < cursor <= b]
            # a random Breakout game lasts far longer than 15 steps: every episode is cut by the time
            # limit and stored as 15 steps + 3 padding transitions between terminals
            assert len(gaps) >= 5 and set(gaps) == {15 + 3}
            assert set(np.unique(data["reward"])) <= {-1.0, 0.0, 1.0}
            assert data["action"].max() < len(legal)
            for i in ends:  # 3 zero paddings follow every terminal
                pad = [(i + j) % 150 for j in (1, 2, 3)]
                if cursor not in [*pad, (i + 1) % 150]:
                    assert not data["observation"][pad].any() and not data["action"][pad].any()
            fb = replay.FrameBuffer.from_checkpoint(d, k, n_step=3)
            ref = RefBuffer(150)
            ref.terminal, ref.add_count = data["terminal"], add
            assert fb.valid_indices().tolist() == ref.valid(3)
    a = replay.read_checkpoint(dirs[0], 0)["observation"]
    b = replay.read_checkpoint(dirs[1], 0)["observation"]
    assert not np.array_equal(a, b)  # runs are independent streams
    r = replay.MultiGameReplay(tmp_path, ["Breakout"], runs=(1, 2), checkpoints="nearoptimal")
    batch = r.sample(32)
    assert set(batch.action.tolist()) <= set(legal) and batch.obs[:, -1].any()
    with pytest.raises(replay.ReplayDataError, match="already holds checkpoints"):
        record.record(tmp_path, ["Breakout"], runs=(1,), capacity=150, progress=False)


def test_recorder_with_a_q_network_policy(tmp_path):
    torch = pytest.importorskip("torch")
    import resnet

    net = resnet.QNetwork(num_games=2, arch="tiny")
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "net_config": net.config(),
            "games": ["Pong", "Boxing"],
            "args": {"v_min": -10.0, "v_max": 10.0},
        },
        path,
    )
    (d,) = record.record(
        tmp_path / "data",
        ["Boxing"],
        capacity=60,
        policy=str(path),
        epsilon=0.0,
        num_workers=1,
        progress=False,
    )
    data = replay.read_checkpoint(d, 0)
    assert data["action"].max() < len(atari.legal_actions("Boxing"))
    with pytest.raises(replay.ReplayDataError, match="has no head for Breakout"):
        record.record(tmp_path / "data", ["Breakout"], capacity=60, policy=str(path), progress=False)


def test_cli_help_and_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "record.py", "--help"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0
    for flag in (
        "--out-dir",
        "--games",
        "--runs",
        "--num-checkpoints",
        "--capacity",
        "--policy",
        "--epsilon",
        "--sticky-actions",
        "--max-episode-steps",
    ):
        assert flag in out.stdout
    out = subprocess.run(
        [sys.executable, "record.py", "--out-dir", str(tmp_path), "--games", "Pong", "--capacity", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "capacity 3" in out.stderr
