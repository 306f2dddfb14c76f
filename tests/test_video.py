"""Pictures of play: evaluate(video=...) writes the first episode as a readable clip at the decision rate."""

from __future__ import annotations

import cv2
import numpy as np

import atari

UP = 2


def count_frames(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def always(action: int):
    def q_fn(obs: np.ndarray) -> np.ndarray:
        q = np.zeros((len(obs), atari.NUM_ACTIONS))
        q[:, action] = 1.0
        return q

    return q_fn


def test_video_has_one_frame_per_decision_and_the_return_in_its_name(tmp_path):
    steps = 150  # Freeway's chicken crosses at least once in 150 UP steps: a non-zero return to name
    calls = []
    returns = atari.evaluate(
        always(UP), "Freeway", num_episodes=2, num_envs=2, epsilon=0.0, seed=3, max_episode_steps=steps,
        video=tmp_path / "clips" / "Freeway_step0", progress=lambda *a: calls.append(a),
    )  # fmt: skip
    files = list((tmp_path / "clips").glob("*.mp4"))
    assert len(files) == 1
    assert returns[0] > 0
    assert files[0].name == f"Freeway_step0_return{returns[0]:g}.mp4"
    assert count_frames(files[0]) == steps + 1  # the frame after the reset, then one per agent step
    assert calls[-1] == (2, 2, 2 * steps)  # the final progress call: every episode and agent step


def test_replayed_episode_is_the_evaluated_one():
    """The clip re-plays slot 0's episode from its env seed and actions: same seed, same actions, same
    return, sticky actions included (evaluate seeds slot 0 with the first state of SeedSequence(seed))."""
    seed, steps = 5, 200
    evaluated = atari.evaluate(always(UP), "Freeway", num_episodes=1, num_envs=1, epsilon=0.0, seed=seed,
                               max_episode_steps=steps)  # fmt: skip
    slot0 = int(np.random.SeedSequence(seed).generate_state(2)[0])
    kwargs = dict(game="Freeway", mode=None, difficulty=None, sticky_actions=0.25, max_episode_steps=steps)
    frames, total = atari.replay_episode_frames(kwargs, seed=slot0, actions=[UP] * steps)
    assert len(frames) == steps + 1 and frames[0].shape == (210, 160, 3)
    assert total == evaluated[0] and total >= 1
    _, other = atari.replay_episode_frames(kwargs, seed=slot0, actions=[0] * steps)
    assert other == 0  # the return comes from the actions, not from the seed alone


def test_no_video_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atari.evaluate(always(UP), "Freeway", num_episodes=1, num_envs=1, max_episode_steps=5)
    assert not list(tmp_path.rglob("*.mp4"))


def test_gif(tmp_path):
    frames = [np.full((10, 8, 3), i * 20, np.uint8) for i in range(5)]
    path = atari.write_gif(frames, tmp_path / "a.gif", scale=2.0)
    from PIL import Image

    im = Image.open(path)
    assert im.size == (16, 20) and im.n_frames == 5
