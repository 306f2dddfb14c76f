"""--capture-video and the evaluation's progress lines, end to end on a tiny cql_multigame.py run: one
readable MP4 per game per evaluation (return in its name), the clips in TensorBoard as GIF image summaries,
a progress line per game on the console and nothing of either in metrics.jsonl."""

import dataclasses
import json

import cv2
import pytest
from conftest import GAMES
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cql_multigame import PRESETS, cli, main


def test_capture_video_flag_parses():
    assert cli(["smoke", "--capture-video"]).capture_video
    assert not cli(["smoke"]).capture_video


def test_capture_video_writes_a_clip_per_game_per_evaluation(data_dir, tmp_path, capsys):
    args = dataclasses.replace(
        PRESETS["smoke"][1], data_dir=str(data_dir), runs_dir=str(tmp_path), run_name="clips",
        record_missing=0, total_steps=4, eval_every=2, batch_size=12, log_every=1, save_every=4,
        eval_episodes=1, eval_envs=1, eval_max_steps=15, capture_video=True,
    )  # fmt: skip
    main(args)
    run_dir = tmp_path / "clips"
    summary = json.loads((run_dir / "summary.json").read_text())
    for step in (2, 4):  # the evaluation at step 2 and the final one
        for game in GAMES:
            clips = list((run_dir / "videos" / f"step{step}").glob(f"{game}_return*.mp4"))
            assert len(clips) == 1, (step, game, clips)
            capture = cv2.VideoCapture(str(clips[0]))
            frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            ok, frame = capture.read()
            capture.release()
            assert ok and frame.shape == (210, 160, 3) and 2 <= frames <= 16  # <= 15 decisions + the reset
        final = summary["games"][game]["returns"][0]
        assert (run_dir / "videos" / "step4" / f"{game}_return{final:g}.mp4").is_file()
    pytest.importorskip("PIL")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    for game in GAMES:
        images = events.Images(f"videos/{game}")
        assert [i.step for i in images] == [2, 4]
        assert images[0].encoded_image_string[:6] in (b"GIF87a", b"GIF89a")
    out = capsys.readouterr()
    assert all(f"evaluating {game}: 1/1 episodes" in out.out + out.err for game in GAMES)
    assert "evaluating" not in (run_dir / "metrics.jsonl").read_text()


def test_no_capture_video_writes_no_clips(data_dir, tmp_path):
    args = dataclasses.replace(
        PRESETS["smoke"][1], data_dir=str(data_dir), runs_dir=str(tmp_path), run_name="plain",
        record_missing=0, total_steps=2, batch_size=12, log_every=1, save_every=2,
        eval_episodes=1, eval_envs=1, eval_max_steps=5,
    )  # fmt: skip
    main(args)
    assert not (tmp_path / "plain" / "videos").exists()
