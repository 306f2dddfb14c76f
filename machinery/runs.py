"""The run folder and the life of a run: logs, evaluations' records, checkpoints, locks, signals, exits.

`Run` is one run folder as the training loop writes it: TensorBoard scalars and metrics.jsonl, the
evaluations' tables, checkpoint.pt and the line an interruption prints. `RunLock` gives a folder one
writer; `StopSignals` turns SIGINT/SIGTERM/SIGHUP into a checkpoint and a clean stop (all processes, and
all hosts of an SPMD run, agree on the step); `run_script` turns a user's mistake into one line instead
of a traceback.

Machinery: what a real run needs and the paper does not describe. A reader of the paper may skip it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from machinery.checkpoints import DiskWriteError, checkpoint_state, save_checkpoint
from machinery.devices import BatchStream, Processes, spmd_any, to_cpu, xla_metrics_line
from machinery.dqn_files import ReplayDataError, open_no_follow, remove_stale_temp_files, write_file
from machinery.flags import ConfigError, flat_dict

TRAIN_SCALARS = (
    ("td_loss", "losses/td_loss"),
    ("cql_term", "losses/cql_term"),
    ("loss", "losses/total_loss"),
    ("q_data", "q/data_action"),
    ("q_max", "q/max"),
)


NO_RESUME = "this script has no --resume; rerun with another --run-name to start over"


@dataclass
class Run:
    """One run folder as `train` writes it: TensorBoard scalars and metrics.jsonl (`log`), evaluations
    (`evaluate`, `final_evaluation`), checkpoint.pt (`save`) and the line an interruption prints. Only the
    first process logs and writes the checkpoint; the others save their sampler state beside it."""

    args: Any  # the script's Args: cadence, evaluation flags, seed (the checkpoint records all of it)
    run_dir: Path
    games: list[str]  # the heads, in order: what evaluations play and checkpoints record
    processes: Processes = dataclasses.field(default_factory=lambda: Processes())
    resume_cmd: str | None = None  # the command that continues this run (None: the script has no --resume)
    report: Callable[[dict[str, Any], int], str] | None = None  # an evaluation's text (None: format_summary)
    # the evaluation: play(net, games, support, device, args, seed) -> result (cql_multigame.evaluate_games)
    play: Callable[..., dict[str, Any]] | None = None
    # set by open():
    writer: Any = dataclasses.field(default=None, init=False)  # TensorBoard SummaryWriter, first process
    progress: Any = dataclasses.field(default=None, init=False)  # tqdm bar, first process
    last_good: int | None = dataclasses.field(default=None, init=False)  # step of the newest good checkpoint
    xla_metrics: bool = dataclasses.field(default=False, init=False)  # print XLA compile counts at each log
    # time, step and the stream's total data wait at the last log
    _last_log: tuple[float, int, float] = dataclasses.field(default=(0.0, 0, 0.0), init=False)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def open(
        self, step: int = 0, resumed: bool = False, xla_metrics: bool = False, desc: str | None = None
    ) -> Run:
        """TensorBoard (after a resume: events and metrics.jsonl past `step` dropped), the hyperparameter
        table and the progress bar, on the first process."""
        self.xla_metrics, self._last_log = xla_metrics, (time.perf_counter(), step, 0.0)
        self.last_good = step if resumed else None
        if not self.processes.is_first:
            return self
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run drops what was logged past its checkpoint; a new one what an earlier attempt that died
        # before its first checkpoint logged (TensorBoard: purge_step; metrics.jsonl: drop_history_after)
        self.writer = SummaryWriter(str(self.run_dir), purge_step=step + 1)
        drop_history_after(self.run_dir / "metrics.jsonl", step)  # step 0 when not resumed
        write_hyperparameters(self.writer, self.args)
        self.progress = tqdm(
            total=self.args.total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
            mininterval=1.0,
        )  # fmt: skip
        return self

    def stepped(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def log(self, step: int, metrics: dict[str, torch.Tensor], stream: BatchStream, optimizer: Any) -> None:
        """A log interval: the metrics, as means over the global batch (mean_over_processes), to floats on
        every process (a non-finite loss stops every process), then TensorBoard, metrics.jsonl and the
        progress bar on the first."""
        lr_hint = " (--resume applies it to the restored Adam)" if self.resume_cmd else ""
        values = fetch_metrics(
            mean_over_processes(metrics, self.processes), f"at step {step}",
            f"{self.last_good_text()}; lower --lr{lr_hint} or check the data.",
        )  # fmt: skip
        if self.processes.is_first:
            now = time.perf_counter()
            last_time, last_step, last_wait = self._last_log
            sps = (step - last_step) * self.args.batch_size / max(now - last_time, 1e-9)
            wait = (stream.wait_time - last_wait) / max(now - last_time, 1e-9)
            self._last_log = (now, step, stream.wait_time)
            log_training(self.writer, values, step, sps, self.run_dir / "metrics.jsonl")
            self.writer.add_scalar("charts/data_wait_fraction", wait, step)
            self.writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
            for k, v in stream.data.stats().items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"replay/{k}", v, step)
            self.progress.set_postfix(
                loss=f"{values['loss']:.3f}", q=f"{values['q_data']:.2f}", sps=f"{sps:.0f}"
            )
        if self.xla_metrics:
            (self.progress.write if self.progress is not None else print)(
                xla_metrics_line(step, self.processes.rank)
            )

    def clip_dir(self, step: int) -> Path | None:
        """--capture-video: where the evaluation at `step` writes its clips (None without the flag)."""
        return self.run_dir / "videos" / f"step{step}" if getattr(self.args, "capture_video", False) else None

    def _play(self, learner: Any, step: int, stop: StopSignals) -> dict[str, Any] | None:
        """self.play (evaluate_games) with seed + step (and the clips' folder with --capture-video); None
        when a signal dropped it. SPMD over several hosts: every host runs the evaluation's graphs, so a first
        signal does not drop it on one host alone (the others would wait for that host); it finishes, and the
        hosts agree on the stop right after."""
        hosts_in_step = self.processes.spmd and self.processes.world_size > 1
        clips = {"video_dir": self.clip_dir(step)} if self.clip_dir(step) is not None else {}
        try:
            with stop.deferred() if hosts_in_step else stop.abandonable():  # not the training
                return self.play(
                    learner.net, self.games, learner.support, learner.support.device, self.args,
                    seed=self.args.seed + step, **clips,
                )  # fmt: skip
        except Exception:  # Interrupted, or an env worker killed by the same SIGTERM
            if stop.signum is None:
                raise
            return None

    def evaluate(self, learner: Any, step: int, stop: StopSignals) -> None:
        """A periodic evaluation: logged and printed on the first process; every process waits for it."""
        if self.processes.is_first or self.processes.spmd:  # SPMD: every host runs the same graphs
            result = self._play(learner, step, stop)
            if result is not None and self.processes.is_first:
                log_evaluation(self.writer, result, step)
                log_clips(self.writer, self.clip_dir(step), step)
                self.progress.write((self.report or format_summary)(result, step))
        self.processes.barrier()

    def final_evaluation(self, learner: Any, step: int, stop: StopSignals) -> dict[str, Any] | None:
        """The evaluation after the last step, logged on the first process (None on the others). A signal
        during it stops the run with RunInterrupted (the checkpoint of the last step is kept)."""
        if not (self.processes.is_first or self.processes.spmd):
            return None
        result = self._play(learner, step, stop)
        if result is None:
            raise RunInterrupted(
                f"interrupted by {stop.name} during the final evaluation; {self.last_good_text()}; "
                f"{self.how_to_go_on('evaluate it with')}",
                stop.signum,
            )
        if self.processes.is_first:
            log_evaluation(self.writer, result, step)
            log_clips(self.writer, self.clip_dir(step), step)
        return result

    def save(self, learner: Any, step: int, replay_state: dict[str, Any]) -> bool:
        """checkpoint.pt on the first process, each other process's sampler state beside it. A network with
        a non-finite weight is not saved (False): the last good checkpoint stays."""
        if not all_finite(learner.net, step):  # one small graph and one host sync
            return False
        if not self.processes.is_first:
            rank_state = {"step": step, "replay": replay_state}
            save_checkpoint(self.run_dir / f"replay_state_rank{self.processes.rank}.pt", rank_state)
        else:
            state = checkpoint_state(
                learner.net, learner.target_net, learner.optimizer, step, flat_dict(self.args),
                self.games, replay_state, learner.support,
            )  # fmt: skip
            save_checkpoint(self.checkpoint, state)
        self.last_good = step
        return True

    def stop_with_checkpoint(
        self, learner: Any, step: int, replay_state: dict[str, Any], stop: StopSignals
    ) -> None:
        """After a stop request: save this step (unless saved already) and raise RunInterrupted."""
        saved = self.last_good == step or self.save(learner, step, replay_state)
        what = (
            f"checkpoint saved to {self.checkpoint}" if saved
            else f"the network is not finite, not saved; {self.last_good_text()}"
        )  # fmt: skip
        raise RunInterrupted(
            f"interrupted by {stop.name} at step {step:,} of {self.args.total_steps:,}: {what}; "
            f"{self.how_to_go_on('resume with')}",
            stop.signum,
        )

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.checkpoint} (step {self.last_good:,})"

    def how_to_go_on(self, verb: str) -> str:
        return f"{verb}: {self.resume_cmd}" if self.resume_cmd else NO_RESUME

    def flush(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any], result: dict[str, Any], step: int) -> None:
        """The end of a cql_multigame.py run: summary.json, the evaluation table, where everything is."""
        self.close()
        write_file(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        print(format_summary(result, step))
        if self.xla_metrics:
            print(xla_metrics_line(step) + " (after the final evaluation)", flush=True)
        print(
            f"\nTensorBoard: tensorboard --logdir {self.args.runs_dir}\ncheckpoint:  {self.checkpoint}\n"
            f"summary:     {self.run_dir / 'summary.json'}"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fetch_metrics(metrics: dict[str, torch.Tensor], where: str, advice: str) -> dict[str, float]:
    """The training loop's only host sync (at log intervals): metric tensors -> floats. A non-finite loss
    stops the run with `where` (e.g. "at step 6"), the last metrics and `advice`."""
    values = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the loss became {values['loss']} {where} (last metrics {values}); {advice}"
        )
    return values


def mean_over_processes(metrics: dict[str, torch.Tensor], processes: Processes) -> dict[str, torch.Tensor]:
    """The metrics over the global batch. Each is a mean over a process's rows, and every process has as
    many rows, so under DDP their mean over processes is the global batch's: one all-reduce of the stacked
    values, at log steps only. SPMD computes on the global batch already; XLA multiprocess
    (--xla-multiprocess) keeps the first process's own rows."""
    if processes.world_size == 1 or processes.xla:
        return metrics
    keys = list(metrics)
    stacked = torch.stack([metrics[k].detach().float() for k in keys])  # [M]
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)  # SUM: gloo has no AVG
    return dict(zip(keys, stacked / processes.world_size, strict=True))


def log_training(
    writer, values: dict[str, float], step: int, samples_per_second: float, history: Path
) -> None:
    """One log interval: the TRAIN_SCALARS and samples/s to TensorBoard, and a line of metrics.jsonl."""
    for k, tag in TRAIN_SCALARS:
        writer.add_scalar(tag, values[k], step)
    writer.add_scalar("charts/samples_per_second", samples_per_second, step)
    with open_no_follow(history, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def write_hyperparameters(writer, args: Any) -> None:
    """The run's flags as a TensorBoard text table (CleanRL's convention)."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in flat_dict(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + rows)


def drop_history_after(path: Path, step: int) -> None:
    """--resume after a kill: metrics.jsonl may hold lines past the checkpoint's step, which the resumed run
    writes again; keep only lines up to `step` (TensorBoard's events get purge_step for the same reason). A
    new run (step 0) in a folder where an earlier attempt died before its first checkpoint starts it empty.
    A partial last line (a write cut by a full disk or a kill) is dropped with one warning; a broken line
    elsewhere is one sentence."""
    if not path.is_file():
        return
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))) as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ConfigError(
                    f"{path} line {i + 1} is not JSON; delete that line, then rerun with --resume."
                ) from None
            print(f"warning: dropped the partial last line of {path} (a cut write): {line[:60]!r}",
                  file=sys.stderr, flush=True)  # fmt: skip
            continue
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        write_file(path, "".join(keep))


def all_finite(net: torch.nn.Module, step: int) -> bool:
    """Whether every parameter is finite (one small graph and one host sync); if not, warn that the save at
    `step` is skipped, so that the last good checkpoint is kept and the user knows why it is older."""
    if torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all():
        return True
    print(
        f"warning: non-finite weights at step {step}: checkpoint not saved, the last good one stays in place",
        file=sys.stderr,
        flush=True,
    )
    return False


IQM_CI_KIND = "evaluation-episode noise of one training seed (episodes resampled within games)"


def format_summary(result: dict[str, Any], step: int) -> str:
    """A markdown table of one evaluation."""
    lines = [
        f"evaluation at step {step:,}",
        "",
        "| game | mean return | human-normalized |",
        "|---|---:|---:|",
    ]
    for game, r in result["games"].items():
        hns = "n/a (no human score)" if r["hns"] is None else f"{r['hns']:.3f}"
        lines.append(f"| {game} | {r['mean_return']:.1f} | {hns} |")
    if result["iqm_hns"] is not None:
        lo, hi = result["iqm_ci"]
        lines.append(
            f"| **IQM** | | **{result['iqm_hns']:.3f}** (95% CI {lo:.3f} .. {hi:.3f}, evaluation episodes) |"
        )
        lines += ["", f"IQM over the games' mean HNS; CI: {IQM_CI_KIND}, not an across-seed CI."]
    return "\n".join(lines)


def log_evaluation(writer, result: dict[str, Any], step: int) -> None:
    for game, r in result["games"].items():
        writer.add_scalar(f"eval/{game}/return", r["mean_return"], step)
        if r["hns"] is not None:
            writer.add_scalar(f"eval/{game}/hns", r["hns"], step)
    if result["iqm_hns"] is None:
        return
    writer.add_scalar("eval/iqm_hns", result["iqm_hns"], step)
    writer.add_scalar("eval/iqm_hns_ci_low", result["iqm_ci"][0], step)
    writer.add_scalar("eval/iqm_hns_ci_high", result["iqm_ci"][1], step)


def eval_progress(game: str, every_s: float = 10.0) -> Callable[[int, int, int], None]:
    """atari.evaluate's progress callback for one game: a line every `every_s` seconds and one at the end
    (episodes finished, agent steps, elapsed), through tqdm so that an open training bar stays intact. On
    the console only: metrics.jsonl and TensorBoard do not get it."""
    from tqdm import tqdm

    start = last = time.perf_counter()

    def report(done: int, total: int, steps: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == total or now - last >= every_s:
            last = now
            elapsed = now - start
            tqdm.write(f"evaluating {game}: {done}/{total} episodes, {steps:,} agent steps, {elapsed:.0f}s")

    return report


def log_clips(writer: Any, clip_dir: Path | None, step: int, max_frames: int = 900) -> None:
    """--capture-video: each clip of `clip_dir` ({Game}_return{R}.mp4) to TensorBoard as an animated GIF
    image summary (tag videos/{Game}; its first `max_frames` frames, 60 s at the decision rate, so that a
    27,000-step episode does not make a GIF of gigabytes), built with OpenCV and Pillow: TensorBoard's
    add_video needs moviepy, a heavy dependency. Without Pillow the MP4 files are the only copy."""
    if writer is None or clip_dir is None or not clip_dir.is_dir():
        return
    try:
        from PIL import Image
    except ImportError:
        return
    import io

    import cv2
    from tensorboard.compat.proto.summary_pb2 import Summary

    for path in sorted(clip_dir.glob("*.mp4")):
        capture, frames = cv2.VideoCapture(str(path)), []
        fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
        ok, frame = capture.read()
        while ok and len(frames) < max_frames:
            frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
            ok, frame = capture.read()
        capture.release()
        if not frames:
            continue
        gif = io.BytesIO()
        frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0)  # fmt: skip
        image = Summary.Image(height=frames[0].height, width=frames[0].width, colorspace=3,
                              encoded_image_string=gif.getvalue())  # fmt: skip
        game = path.stem.split("_return")[0]
        summary = Summary(value=[Summary.Value(tag=f"videos/{game}", image=image)])
        writer._get_file_writer().add_summary(summary, step)


def save_rank_debug(run_dir: Path, net: torch.nn.Module, stream: BatchStream, rank: int) -> None:
    """--save-all-ranks: this process's final parameters and the games of every batch it trained on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(to_cpu(net.state_dict()), run_dir / f"params_rank{rank}.pt")
    games_seen = torch.from_numpy(np.stack(stream.games_seen))  # [steps, per-rank batch]
    torch.save({"games": games_seen}, run_dir / f"batch_games_rank{rank}.pt")


def refuse_links(run_dir: Path, flag: str = "--run-name") -> None:
    """A run folder (or anything in it) that is a symbolic link is refused in one sentence: every file a run
    writes stays inside its folder, whoever else can write in the runs folder (see docs/reliability.md on
    shared runs folders). Its files are also opened with O_NOFOLLOW (dqn_files.open_no_follow), for links
    planted while the run goes on."""
    if run_dir.is_symlink():
        links = [run_dir]
    else:
        links = []
        for top, dirs, files in os.walk(run_dir) if run_dir.is_dir() else ():
            links += [Path(top, n) for n in dirs + files if Path(top, n).is_symlink()]
    if links:
        target = os.readlink(links[0])
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise ConfigError(
            f"the run folder {run_dir} holds a symbolic link {links[0]} -> {target}{more}; a run never "
            f"writes through links: remove it, or pass another {flag}."
        )


class RunLock:
    """One run folder, one writer: an exclusive flock on <run_dir>/run.lock, held for the whole run.

    The file holds the owner's pid, host and command (for the message a second process prints); the kernel
    drops the flock when its owner exits or is killed, so a lock file left by a dead process never blocks
    (no pid guessing, also on a shared filesystem with working locks). Taking the lock is also the check
    that the run folder is writable, before any data is loaded. release() deletes the file while still
    holding the lock, and acquire() retries if the file it locked was deleted meanwhile, so two processes
    can never both believe they hold it.
    """

    NAME = "run.lock"

    def __init__(self, run_dir: str | Path, flag: str = "--run-name", name: str = NAME):
        self.run_dir, self.path, self.flag = Path(run_dir), Path(run_dir) / name, flag
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        import fcntl

        refuse_links(self.run_dir, self.flag)
        try:
            self._created_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.read(fd, 4096).decode(errors="replace")
                    os.close(fd)
                    raise ConfigError(
                        f"{self.run_dir} is in use by another process ({self._describe(owner)}); wait for it "
                        f"to finish, or pass another {self.flag}."
                    ) from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # released and deleted while we waited for it: take the new file
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                     "command": " ".join(sys.argv)}  # fmt: skip
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(owner).encode())
            # this process is the folder's one writer now: every other writer's temporary file is a leftover
            # of a killed save (they would pile up, ~one checkpoint each)
            remove_stale_temp_files(self.run_dir, any_host=True)
        except OSError as e:
            raise DiskWriteError(
                f"cannot write in the run folder {self.run_dir} ({e.strerror or type(e).__name__}); pass a "
                "writable --runs-dir."
            ) from None
        self._fd = fd
        return self

    @staticmethod
    def _describe(owner: str) -> str:
        try:
            o = json.loads(owner)
            return f"pid {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
        except (ValueError, KeyError, TypeError):
            return "its lock file is being written"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self._created_dir and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run that stopped before writing anything leaves no empty folder
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def rank_lock_name(rank: int) -> str:
    """The lock file of process `rank` in a run folder: run.lock for the first, run.rank<r>.lock for the
    others (which write their own sampler state there), so no process of a second launch can write into a
    running run's folder."""
    return RunLock.NAME if rank == 0 else f"run.rank{rank}.lock"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived where the work can be dropped (data load, evaluation, a second signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM; the message is the one line to print (what was saved, how to go
    on). The scripts' run() prints it and exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def stopped_at_once(e: Interrupted, where: str, what_next: str) -> RunInterrupted:
    """The line of a second SIGINT/SIGTERM, which stops a training loop at once: the step or save it cut
    is not saved. `where`: "at step 7"; `what_next`: the last good save and how to go on."""
    return RunInterrupted(
        f"stopped at once by a second {signal.Signals(e.signum).name} ({where}), without saving; {what_next}",
        e.signum,
    )


# SIGINT (Ctrl-C), SIGTERM (what schedulers and `kill` send) and SIGHUP (the terminal or ssh session that
# started the run closed, e.g. Ctrl-C on `gcloud ... ssh --worker=all`): the same stop request.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (what schedulers send) and SIGHUP as a stop request, inside
    `with StopSignals()`.

    While `abandon` is True (start-up, data load, evaluation) a signal raises Interrupted at once: that work
    is dropped. In the training loop the scripts set abandon False: the signal only sets `signum`, the
    current step finishes, and the loop saves a checkpoint and stops. A second signal always raises at once
    (the step it cuts is not saved). Outside the main thread (e.g. torch_xla's launcher threads) nothing is
    installed and `signum` stays None. A SIGHUP the process was started to ignore (`nohup`) stays ignored.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.abandon = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if s == getattr(signal, "SIGHUP", None) and signal.getsignal(s) is signal.SIG_IGN:
                    continue  # started under nohup: a closed terminal or ssh session must not stop the run
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if self.abandon or not first:
            raise Interrupted(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @contextlib.contextmanager
    def deferred(self):
        """Work inside finishes on a first signal (only `signum` is set); a second one still stops at once."""
        previous, self.abandon = self.abandon, False
        try:
            yield
        finally:
            self.abandon = previous

    @contextlib.contextmanager
    def abandonable(self):
        """Work inside may be dropped by a signal (evaluation): it raises Interrupted, also if one came
        before."""
        previous, self.abandon = self.abandon, True
        try:
            if self.signum is not None:
                raise Interrupted(self.signum)
            yield
        finally:
            self.abandon = previous


def agree_to_stop(processes: Processes, requested: bool) -> bool:
    """Every process stops at the same step: True if any process got a signal. One process: no
    communication. DDP: a MAX all-reduce of one integer over a gloo group (host memory, no GPU sync);
    XLA SPMD (one process per host): a MAX over the devices of all hosts (devices.spmd_any; xr.world_size()
    is 1 there, so mesh_reduce would only see this host); XLA multiprocess: torch_xla's mesh_reduce."""
    if processes.world_size == 1:
        return requested
    if processes.spmd:
        return spmd_any(requested, processes.mesh)
    if processes.xla:
        import torch_xla.core.xla_model as xm

        return bool(xm.mesh_reduce("stop_signal", int(requested), max))
    global _STOP_GROUP
    if _STOP_GROUP is None:
        _STOP_GROUP = dist.new_group(backend="gloo")
    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP_GROUP)
    return bool(flag.item())


_STOP_GROUP = None
STOP_AGREE_EVERY = 10  # steps between the processes' agreement on a stop request (DDP/XLA only)


def stop_requested(stop: StopSignals, processes: Processes, step: int, evaluated: bool) -> bool:
    """After a finished step: stop now? One process: as soon as a signal came. Several: all agree every
    STOP_AGREE_EVERY steps and after every evaluation (where they all wait anyway), so that they all stop
    at the same step and no one waits for a peer that left."""
    if processes.world_size == 1:
        return stop.signum is not None
    if step % STOP_AGREE_EVERY and not evaluated:
        return False
    if agree_to_stop(processes, stop.signum is not None):
        stop.signum = stop.signum or signal.SIGTERM  # a peer got it (torchrun forwards to every process)
        return True
    return False


def run_folder(runs_dir: str, run_name: str, base: str, resume: bool) -> Path:
    """<runs_dir>/<run_name>. Without a run name: <base>, then <base>_2, _3, ... so that running the same
    command again starts a new run instead of touching an old one; with `resume`, the newest of those that
    holds a checkpoint. Every process computes the same name (nothing is created yet)."""
    root = Path(runs_dir)
    if run_name:
        return root / run_name
    names = [base]
    while (root / names[-1] / "checkpoint.pt").exists():
        names.append(f"{base}_{len(names) + 1}")
    if resume and len(names) > 1:
        return root / names[-2]  # the newest run with a checkpoint
    return root / names[-1]


def resume_command(run_dir: Path, script: str, spmd_hosts: int = 1) -> str:
    """The command that continues `run_dir`: this process's own command line with --resume and --run-name,
    behind the launcher that started it (`launcher`: torchrun and its flags, or python; `python script ...`
    when it was started another way, e.g. from a test). An SPMD run over several hosts: the same line on
    every host."""
    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == script else ["..."]
    if "--resume" not in argv:
        argv = [*argv, "--resume"]
    if "--run-name" not in argv and not any(a.startswith("--run-name=") for a in argv):
        argv = [*argv, "--run-name", run_dir.name]
    start, where = launcher()
    line = " ".join([*start, script, *(shlex.quote(a) if a != "..." else a for a in argv)])
    if spmd_hosts > 1:
        where = f" (on each of the {spmd_hosts} hosts)"
    return line + where


def launcher() -> tuple[list[str], str]:
    """How this process was started, as the start of a command line, and where else it must run: torchrun
    with the node and process counts it was given (several nodes: the first node's line, with the
    rendezvous address; the others run it with their own --node_rank), otherwise python."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env:  # set by torchrun only
        return ["python"], ""
    nodes, per_node = env.get("GROUP_WORLD_SIZE", "1"), env["LOCAL_WORLD_SIZE"]
    if nodes == "1":
        return ["torchrun", "--standalone", "--nproc_per_node", per_node], ""
    address = ["--master_addr", env.get("MASTER_ADDR", "?"), "--master_port", env.get("MASTER_PORT", "29500")]
    start = ["torchrun", "--nnodes", nodes, "--nproc_per_node", per_node, "--node_rank", "0", *address]
    return start, f" (and on the other nodes the same with --node_rank 1 .. {int(nodes) - 1})"


def run_script(main: Callable[[Any], Any], args: Any, user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Run a training script's `main(args)` (all three scripts): a user mistake (a flag, a file, a game, a
    non-finite loss) prints one line and exits 1, an interrupted run prints what was saved and how to go on
    and exits 128 + the signal, a refused write prints one line; no traceback for any of them. `user_errors`:
    more exception types that are user mistakes (atari.AtariConfigError)."""
    try:
        main(args)
    except (ConfigError, ReplayDataError, FloatingPointError, *user_errors) as e:
        sys.exit(f"error: {e}")
    except (RunInterrupted, Interrupted) as e:
        exit_interrupted(e)
    except OSError as e:
        exit_on_disk_error(e)


def exit_on_disk_error(e: OSError) -> None:
    """A write outside the checkpoint save (logs, summary) that the disk refused: one line, not a
    traceback. Other OSErrors are bugs or unexpected: they keep their traceback."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        raise e
    sys.exit(f"error: could not write {e.filename or 'a file'} ({e.strerror}); free space or pass a writable "
             "--runs-dir, then rerun (with --resume if a checkpoint was written).")  # fmt: skip


def exit_interrupted(e: RunInterrupted | Interrupted) -> None:
    """The one line of an interrupted run on stderr, then exit with 128 + the signal number (130 for
    SIGINT, 143 for SIGTERM, as a shell reports a process killed by it)."""
    if isinstance(e, Interrupted):  # outside the training loop (data load, set-up): nothing to save
        e = RunInterrupted(
            f"interrupted by {e} outside the training steps; checkpoints written so far are kept.", e.signum
        )
    sys.stderr.flush()
    print(f"\n{e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
