"""Online fine-tuning of the multi-game network on a game variant (Scaled QL, Kumar et al. 2023, Sec. 5.4).

The paper's online transfer experiment: take the network that cql_multigame.py trained offline on 40 games,
and keep learning online on a *variant* of a training game (an ALE mode or difficulty the data never showed,
e.g. Freeway, Hero or Breakout variants), against the same learner started from a random init
(`--from-scratch`). This script is that learner:

* network: the checkpoint's trunk, spatial embedding and shared MLP, and the game's own head when the
  checkpoint has one (a game without a head gets a fresh one, resnet.transfer); one head, game index 0;
* acting: `--num-envs` copies of the variant (atari.make_vec_env) stepped together, ONE batched forward of
  the online network per step, epsilon-greedy over the game's legal actions on expected Q-values;
* replay: one replay.FrameBuffer per env (each env is its own stream of episodes), so stacking, episode-start
  padding and n-step targets follow exactly the DQN-Replay / Dopamine rules that the offline data uses;
* learning: cql_multigame.update, the offline scripts' training step (n-step C51 from a target network, the
  CQL term optional, Adam), and hard target updates;
* periodic evaluation on the variant with atari.evaluate (sticky actions, epsilon 0.001), TensorBoard, a
  final table, a summary JSON and a checkpoint in cql_multigame.py's format (one head: this game).

It can also make DQN-Replay data: `--log-replay-dir` writes every env's replay the way batch_rl's logged
replay buffer wrote DQN-Replay (`ReplayLogger`), and `--resume` continues an interrupted run (everything but
the emulator states is restored; see `save_state` in `train_online`).

Left out: the paper's exact online budget and fine-tuning hyperparameters (our sources do not state them;
every such default is marked "ours"), prioritized replay, and data-parallel acting/learning over several
devices (one process, one device).

Read top to bottom: `Args`, the network set-up, the replay helpers (`add_to_buffers`, `collect`,
`sample_batch`), acting, evaluation and the report, then `main` and its loop `train_online`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import atari
import cql_multigame
import replay
import resnet
from cql_multigame import ConfigError, EvalArgs, Interrupted, RunInterrupted, RunLock, StopSignals
from machinery.runs import eval_progress, log_clips

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class Args(EvalArgs):
    """Online fine-tuning on an ALE game variant (Scaled QL, Sec. 5.4). "ours" marks values the paper
    does not state; they follow Dopamine's DQN/Rainbow Atari agents where one exists. The evaluation
    flags (--eval-episodes, ...) come from cql_multigame.EvalArgs."""

    # --- what to fine-tune, and on what ---
    checkpoint: str = ""
    """checkpoint.pt of a cql_multigame.py run (also needed with --from-scratch: it gives the architecture)"""
    game: str = "Breakout"
    """the game to play; its head in the checkpoint is the start (a game without one gets a fresh head)"""
    mode: int | None = None
    """ALE game mode of the variant (default: the game's default mode); a wrong one lists the valid modes"""
    difficulty: int | None = None
    """ALE difficulty of the variant (default: the game's default difficulty)"""
    from_scratch: bool = False
    """the baseline: the same architecture and settings, randomly initialized (nothing pretrained)"""
    freeze_trunk: bool = False
    """train only the head: trunk, spatial embedding and shared MLP (the shared representation) stay fixed"""

    # --- run ---
    run_name: str = ""
    """run folder under `runs_dir` (default: online_<game>_m<mode>_d<difficulty>_<init>_seed<seed>)"""
    runs_dir: str = "runs"
    """where TensorBoard logs, the summary and the fine-tuned checkpoint go"""
    seed: int = 1
    """seed of the envs, exploration, replay sampling, a fresh head/network init, and evaluation"""
    device: str = "auto"
    """auto (XLA, else CUDA, else MPS, else CPU) or cpu, cuda, cuda:1, mps, xla"""
    resume: bool = False
    """continue the run `run_name` from its last save (network, optimizer, replay, counters; `save_every`)"""
    save_every: int = 500_000
    """agent steps between saves of everything --resume needs (the replay is saved too: ~7 KB per
    stored transition, gzip level 1); a save also happens at the end"""
    log_replay_dir: str = ""
    """if set, log every env's replay in the DQN-Replay format as batch_rl's logged replay buffer wrote it:
    <dir>/<Game>/<env + 1>/replay_logs/, checkpoint k each time that env's buffer fills, the final partial
    buffer at the end, and the episode returns of each checkpoint beside it (see ReplayLogger). A folder that
    already holds logs of the game is refused unless this is a --resume of the run that wrote them"""
    log_replay_overwrite: bool = False
    """start a new run's --log-replay-dir over: delete the game's logs already there first"""

    # --- environment (atari.py; Dopamine's protocol) ---
    total_env_steps: int = 3_000_000
    """budget of agent steps (4 frames each), summed over all envs (ours: a short online budget)"""
    num_envs: int = 8
    """envs stepped together with one batched forward per step"""
    sticky_actions: float = 0.25
    """sticky-action probability (DQN-Replay / Dopamine protocol)"""
    max_episode_steps: int = 27_000
    """agent steps per training episode before a time-limit cut (Dopamine: 27,000 = 108k frames)"""

    # --- exploration (ours: Dopamine's linearly decaying epsilon, with a low start, see `epsilon_at`) ---
    epsilon_start: float = 0.1
    """epsilon until learning starts (ours: low, so the pretrained head's policy collects the first data;
    pass 1.0 for Dopamine's from-scratch schedule)"""
    epsilon_end: float = 0.01
    """final training epsilon (Dopamine's DQN/Rainbow value)"""
    epsilon_decay_steps: int = 250_000
    """agent steps after learning starts over which epsilon decays linearly (Dopamine: 250k)"""

    # --- replay (replay.FrameBuffer, one per env) ---
    buffer_size: int = 1_000_000
    """transitions kept in total, split evenly over the envs' buffers (Dopamine: 1M; 84x84 bytes each)"""
    learning_starts: int = 20_000
    """agent steps collected before the first gradient step (Dopamine's min_replay_history: 20k)"""

    # --- learning (cql_multigame.compute_loss) ---
    train_every: int = 4
    """agent steps (summed over envs) per gradient step (Dopamine's update_period: 4)"""
    batch_size: int = 32
    """transitions per gradient step, split evenly over the envs' buffers (Dopamine: 32)"""
    lr: float = 5e-5
    """Adam learning rate (ours: the paper's single-game 5e-5, from which its 2e-4 at batch 512 was scaled)"""
    adam_eps: float = 3.125e-4
    """Adam epsilon (ours: Dopamine's C51/Rainbow value, 0.01/32)"""
    gamma: float = 0.99
    """discount (ours: the DQN-Replay agents' value, as in cql_multigame.py)"""
    n_step: int = 3
    """n-step return length (ours: the paper's offline value; Dopamine's Rainbow uses 3 too)"""
    target_update_every: int = 2000
    """gradient steps between hard target-network updates (ours: the paper's offline value; = Dopamine's
    8000 agent steps at train_every 4)"""
    # ours: 0. Online, the replay holds the agent's own recent epsilon-greedy actions, so the target's argmax
    # and the learned Q-values are corrected by the data the agent itself collects: the out-of-distribution
    # overestimation that CQL guards against offline is what online exploration fixes. A positive alpha would
    # keep pushing down the actions the current policy rarely takes, slowing the very adaptation to the
    # variant that the experiment measures, and would make --from-scratch a conservative learner with no
    # offline data to be conservative about. Pass --cql-alpha 0.1 (the offline value) to keep the term,
    # e.g. to soften the early dip in Q-values that some offline-to-online methods see.
    cql_alpha: float = 0.0
    """weight of the CQL term online (ours: 0 = plain n-step C51, as the agent's own data covers its actions;
    0.1 = the offline value)"""

    # --- evaluation and logging ---
    eval_every: int = 250_000
    """agent steps between evaluations on the variant (also one before training and one at the end;
    0: only at the end)"""
    log_every: int = 10_000
    """agent steps between TensorBoard loss/throughput scalars (the only host syncs of the update)"""


# ----------------------------------------------------------------------------------------------------
# Checks and the network
# ----------------------------------------------------------------------------------------------------

MIN_BUFFER_PER_ENV = 100  # far above stack + n_step, so every env's buffer always has valid indices


def check_args(args: Args) -> str:
    """Flag checks that need no files (cql_multigame.check_flags and the buffer split); returns the
    canonical game name."""
    game = cql_multigame.check_game(args.game)
    cql_multigame.check_flags(args)
    if args.buffer_size // args.num_envs < MIN_BUFFER_PER_ENV:
        raise ConfigError(
            f"--buffer-size {args.buffer_size} gives each of the {args.num_envs} envs fewer than "
            f"{MIN_BUFFER_PER_ENV} transitions; use at least {MIN_BUFFER_PER_ENV * args.num_envs}."
        )
    if not args.checkpoint:
        raise ConfigError(
            "--checkpoint is required (the checkpoint.pt of a cql_multigame.py run; with --from-scratch "
            "it gives the architecture)."
        )
    return game


def check_resume(
    saved: dict[str, Any], args: Args, net: resnet.QNetwork, ckpt: dict[str, Any], run_dir: Path
) -> None:
    """--resume continues the same run: cql_multigame's checker (one sentence naming every run-defining flag
    that differs: --game, --n-step, --buffer-size, --num-envs, ...), plus the network and the C51 support
    that --checkpoint gives now against the run's, and --total-env-steps not below the steps it reached."""
    other = cql_multigame.compare_network_configs(saved["net_config"], net.config(), "--checkpoint")
    now, then = cql_multigame.support_bounds(ckpt)[:2], cql_multigame.support_bounds(saved)[:2]
    if now != then:
        other.append(
            f"the C51 support [{now[0]}, {now[1]}] of --checkpoint (the run used [{then[0]}, {then[1]}])"
        )
    cql_multigame.check_resume(
        saved, args, run_dir, other, length="total_env_steps", reached=int(saved["online"]["env_steps"])
    )


def build_network(
    ckpt: dict[str, Any], path: str, game: str, from_scratch: bool, seed: int
) -> tuple[resnet.QNetwork, str]:
    """A one-head QNetwork for `game` and a line saying where its weights come from.

    Pretrained: trunk, spatial embedding and shared MLP of the checkpoint; the game's head copied when the
    checkpoint has one, else a fresh head (resnet.transfer). From scratch: the same architecture, random.
    """
    pretrained = cql_multigame.network_from_checkpoint(ckpt, path=path)  # one sentence if it doesn't fit
    games = list(ckpt["games"])
    torch.manual_seed(seed)  # the fresh head or the from-scratch network
    if from_scratch:
        net = resnet.QNetwork(**{**pretrained.config(), "num_games": 1})
        return net, f"random init of the checkpoint's {net.arch} architecture (--from-scratch)"
    net = resnet.transfer(pretrained, 1)
    if game not in games:
        return net, (
            f"pretrained representation of {path}; {game} has no head there (it knows "
            f"{', '.join(games)}), so its head is fresh"
        )
    resnet.copy_head(net, 0, pretrained, games.index(game))
    return net, f"pretrained network of {path} with its {game} head"


# ----------------------------------------------------------------------------------------------------
# Replay: one FrameBuffer per env
# ----------------------------------------------------------------------------------------------------


class ReplayLogger:
    """batch_rl's logged replay buffer (OutOfGraphLoggedReplayBuffer, the writer of DQN-Replay) applied to the
    agent's own replay: one stream per env, written to <root>/<Game>/<env + 1>/replay_logs/.

    - After every real add (after its padding), when add_count % capacity == capacity - 1, the whole buffer is
      written as checkpoint k = 0, 1, 2, ... of that env. So checkpoint 0 has add_count capacity - 1 (its last
      row never written), the cursor of every snapshot sits at capacity - 1, and, as in batch_rl, a fill whose
      capacity - 1 falls on a padding row is not logged.
    - `final()` writes the buffer once more as the next checkpoint with add_count = cursor (batch_rl's
      log_final_buffer), so readers see a never-wrapped buffer holding only the newest, partial fill. Ours:
      it is skipped when that fill holds no transition a reader could sample (batch_rl would write a
      checkpoint that neither Dopamine nor this project's reader can sample).
    - invalid_range is Dopamine's for this agent's update horizon (n_step), as the logged buffer writes it.
    - episode_returns_ckpt.k.json beside checkpoint k: the unclipped returns of the episodes that ended while
      checkpoint k was being filled (plain JSON, no pickle; replay.read_episode_returns reads it).
    """

    def __init__(self, root: str | Path, game: str, buffers: list[replay.FrameBuffer], n_step: int):
        self.dirs = [Path(root) / game / str(i + 1) / "replay_logs" for i in range(len(buffers))]
        self.buffers, self.n_step = buffers, n_step
        self.log_count = [0] * len(buffers)  # the next checkpoint suffix of every env
        self.returns: list[list[float]] = [[] for _ in buffers]  # episodes ended in the current fill
        self.unwritten: list[int] = []  # envs whose snapshot is due at the current add_count, not yet written

    def _write(self, i: int, add_count: int) -> None:
        buf = self.buffers[i]
        invalid = replay.dopamine_invalid_range(add_count % buf.capacity, buf.capacity, self.n_step)
        arrays = (buf.frames, buf.action, buf.reward, buf.terminal)
        replay.write_checkpoint(self.dirs[i], self.log_count[i], *arrays, add_count, invalid)
        replay.write_episode_returns(self.dirs[i], self.log_count[i], self.returns[i])
        self.log_count[i] += 1
        self.returns[i] = []

    def after_step(self, finished: dict[int, float]) -> None:
        """Call after every vector step (one real add per env); `finished`: env -> return of an episode that
        ended with this step."""
        for i, r in finished.items():
            self.returns[i].append(float(r))
        self.unwritten = [i for i, b in enumerate(self.buffers) if b.add_count % b.capacity == b.capacity - 1]
        self.write_unwritten()

    def write_unwritten(self) -> None:
        """Write the due snapshots. One whose write fails stays due and is saved with the run, so the resume
        writes it first (from the saved buffer, whose cut episode the resume marks terminal) and the log has
        no gap."""
        while self.unwritten:
            i = self.unwritten[0]
            self._write(i, self.buffers[i].add_count)
            self.unwritten.pop(0)

    def final(self) -> None:
        for i, buf in enumerate(self.buffers):
            if replay.valid_mask(buf.terminal, buf.cursor, self.n_step).any():
                self._write(i, buf.cursor)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_count": list(self.log_count), "returns": [list(r) for r in self.returns],
            "unwritten": list(self.unwritten),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_count = [int(c) for c in state["log_count"]]
        self.returns = [[float(r) for r in rs] for rs in state["returns"]]
        self.unwritten = [int(i) for i in state.get("unwritten", [])]  # absent in a run saved before it


def prepare_log_replay_dir(root: Path, game: str, num_envs: int, resuming: bool, overwrite: bool) -> None:
    """Before any acting: --log-replay-dir holds no earlier logs of `game` (one run's data is one agent's),
    unless this run is resuming the run that wrote them, or --log-replay-overwrite deletes them; and every
    env's log folder can be written (found now, not at the first snapshot a million steps in)."""
    replay.remove_stale_temp_files(root / game)  # of killed writers on this host
    dirs = sorted(d for d in (root / game).glob("*/replay_logs") if d.is_dir())
    held = [d for d in dirs if any(d.glob("*_ckpt.*"))]
    if held and not resuming:
        if not overwrite:
            names = ", ".join(str(d.parent.name) for d in held)
            raise ConfigError(
                f"--log-replay-dir {root} already holds {game} logs (run folders {names}); pass another "
                "--log-replay-dir, --resume to continue the run that wrote them, or --log-replay-overwrite "
                "to delete them first."
            )
        for d in held:  # the replay files only; anything else a user put there stays
            for f in d.glob("*_ckpt.*"):
                f.unlink()
    probe = root / game / "1" / "replay_logs" / ".write_test"
    try:
        for i in range(num_envs):
            (root / game / str(i + 1) / "replay_logs").mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write in --log-replay-dir {root} ({e.strerror or type(e).__name__}); pass a writable "
            "folder."
        ) from None


def log_write_failed(error: Exception, save: Any, when: str, resume_with: str) -> ConfigError:
    """A replay log write failed (full disk, permission): save the run with `save` (unless None: already
    saved), and return the one sentence to stop with."""
    what = str(error).rstrip(".")
    if save is not None:
        try:
            save()
        except cql_multigame.DiskWriteError as e:
            return ConfigError(f"{what}; saving the run {when} failed too: {str(e).rstrip('.')}.")
    return ConfigError(
        f"{what}; the run was saved {when} (the resume writes the snapshot that failed first); free space, "
        f"then {resume_with}"
    )


def save_buffers(buffers: list[replay.FrameBuffer], directory: Path, suffix: int, n_step: int) -> None:
    """Every env's buffer as DQN-Replay checkpoint `suffix` of <directory>/env<i>/ (gzip level 1: fast)."""
    for i, buf in enumerate(buffers):
        invalid = replay.dopamine_invalid_range(buf.cursor, buf.capacity, n_step)
        buf.save(directory / f"env{i}", suffix, invalid_range=invalid, compresslevel=1)


def load_buffers(args: Args, legal: list[int], directory: Path, suffix: int) -> list[replay.FrameBuffer]:
    """The buffers save_buffers wrote. Each env's unfinished episode was cut by the interruption: its last
    stored transition is marked terminal (as DQN-Replay marks time-limit cuts), so the next add starts a new
    episode with its padding, as the envs do after the reset that follows a resume."""
    buffers = []
    for i in range(args.num_envs):
        buf = replay.FrameBuffer.from_checkpoint(
            directory / f"env{i}", suffix, n_step=args.n_step, gamma=args.gamma, action_map=legal, game=0
        )
        buf.terminal = buf.terminal.copy()
        if buf.add_count:
            buf.terminal[buf.cursor - 1] = 1
        buffers.append(buf)
    return buffers


def make_buffers(args: Args, legal: list[int]) -> list[replay.FrameBuffer]:
    """One replay.FrameBuffer per env; each stores minimal-set action indices and maps them to full-set ids
    when sampling (the DQN-Replay convention, as in the offline data)."""
    capacity = args.buffer_size // args.num_envs
    return [
        replay.FrameBuffer(capacity, n_step=args.n_step, gamma=args.gamma, action_map=legal, game=0)
        for _ in range(args.num_envs)
    ]


def add_to_buffers(
    buffers: list[replay.FrameBuffer],
    obs: np.ndarray,
    action_index: np.ndarray,
    reward: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
) -> None:
    """Store one vector step: env i's transition goes to buffers[i].

    obs uint8 [N, 4, 84, 84]: the observations the actions were TAKEN in (not the ones the step returned);
    only the newest frame obs[i, -1] is stored, the buffer rebuilds the stack (zero-padded at episode starts,
    exactly like the env's own stack after a reset). action_index int [N]: minimal-set indices. reward [N]:
    unclipped, clipped here to [-1, 1]. The episode ends with this step on a game over or a time-limit cut
    (terminal = terminated or truncated, as DQN-Replay marks time-limit cuts).
    """
    clipped = np.clip(reward, -1.0, 1.0)
    done = np.logical_or(terminated, truncated)
    for i, buf in enumerate(buffers):
        buf.add(obs[i, -1], int(action_index[i]), float(clipped[i]), bool(done[i]))


def collect(
    envs: Any, obs: np.ndarray, action_index: np.ndarray, legal: np.ndarray, buffers: list[replay.FrameBuffer]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step every env once and store the transitions; returns (next obs [N, 4, 84, 84], reward [N]
    unclipped, done [N] bool).

    atari.make_vec_env autoresets SAME_STEP: when env i ends on this step, next_obs[i] is already the first
    observation [0, 0, 0, f0] of its next episode. So next_obs is exactly what the agent acts on next, the
    transition just stored is marked terminal, and the next add() to buffers[i] starts a new episode (with
    its padding) from f0. The final observation (info["final_obs"]) is never stored, as in DQN-Replay: a
    terminal transition's bootstrap has discount 0.
    """
    next_obs, reward, terminated, truncated, _ = envs.step(legal[action_index])
    add_to_buffers(buffers, obs, action_index, reward, terminated, truncated)
    return next_obs, np.asarray(reward, np.float64), np.logical_or(terminated, truncated)


def sample_batch(
    buffers: list[replay.FrameBuffer], batch_size: int, rng: np.random.Generator, call: int
) -> replay.Batch:
    """Equal shares: batch_size // N from every env's buffer, the batch_size % N extra slots to buffers in
    a rotating order (by `call`, the number of earlier batches), concatenated env by env.

    Every env adds one transition per vector step, so the buffers hold (nearly) equally many transitions
    and equal shares are (nearly) uniform sampling over all stored transitions, with static shares.
    """
    n = len(buffers)
    shares = [batch_size // n + int((i - call) % n < batch_size % n) for i in range(n)]
    parts = [buf.sample(k, rng) for buf, k in zip(buffers, shares, strict=True) if k > 0]
    return replay.Batch(*(np.concatenate(field) for field in zip(*parts, strict=True)))


# ----------------------------------------------------------------------------------------------------
# Acting
# ----------------------------------------------------------------------------------------------------


def epsilon_at(args: Args, env_steps: int) -> float:
    """Dopamine's linearly_decaying_epsilon: epsilon_start until learning starts, then linear to
    epsilon_end over epsilon_decay_steps agent steps, then epsilon_end."""
    if args.epsilon_decay_steps == 0:
        return args.epsilon_end if env_steps >= args.learning_starts else args.epsilon_start
    frac = min(max(env_steps - args.learning_starts, 0) / args.epsilon_decay_steps, 1.0)
    return args.epsilon_start + frac * (args.epsilon_end - args.epsilon_start)


@torch.no_grad()
def act(
    net: resnet.QNetwork,
    obs: np.ndarray,
    support: torch.Tensor,
    legal_t: torch.Tensor,
    epsilon: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Epsilon-greedy minimal-set action indices [N] for obs uint8 [N, 4, 84, 84]: one batched forward."""
    device = support.device
    x = torch.from_numpy(obs).to(device)  # [N, 4, 84, 84]
    logits = net(x, torch.zeros(len(obs), dtype=torch.int64, device=device))  # [N, 18, K]
    q = cql_multigame.expected_q(logits, support)[:, legal_t]  # [N, L]
    return atari.epsilon_greedy(q.cpu().numpy(), epsilon, rng)


# ----------------------------------------------------------------------------------------------------
# Evaluation and the report
# ----------------------------------------------------------------------------------------------------


def evaluate_variant(
    net: resnet.QNetwork,
    game: str,
    support: torch.Tensor,
    args: Args,
    seed: int,
    video_dir: Path | None = None,
) -> dict[str, Any]:
    """Play the variant with atari.evaluate; mean return and the base game's human-normalized score.
    video_dir (--capture-video): the first episode goes to <video_dir>/<Game>_return<R>.mp4."""
    returns = atari.evaluate(
        cql_multigame.make_q_fn(net, 0, support, support.device, False),
        game,
        num_episodes=args.eval_episodes,
        num_envs=args.eval_envs,
        num_workers=args.eval_workers,
        epsilon=args.eval_epsilon,
        seed=seed,
        mode=args.mode,
        difficulty=args.difficulty,
        sticky_actions=args.sticky_actions,
        max_episode_steps=args.eval_max_steps,
        video=None if video_dir is None else video_dir / game,
        progress=eval_progress(game),  # a line on the console only
    )
    mean = float(np.mean(returns))
    hns = float(atari.human_normalized_score(game, mean)) if cql_multigame.has_human_score(game) else None
    return {"returns": [float(r) for r in returns], "mean_return": mean, "hns": hns}


def _or_default(value: int | None) -> str:
    """A --mode or --difficulty as written in names and tables: its number, or "default"."""
    return "default" if value is None else str(value)


def format_table(game: str, args: Args, evaluations: list[dict[str, Any]]) -> str:
    """Markdown table, one row per evaluation. The human-normalized score uses the base game's human and
    random scores (variants have none of their own)."""
    lines = [
        "| game | mode | difficulty | env steps | mean return | human-normalized (base game) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in evaluations:
        hns = "n/a (no human score)" if e["hns"] is None else f"{e['hns']:.3f}"
        lines.append(
            f"| {game} | {_or_default(args.mode)} | {_or_default(args.difficulty)} | {e['env_steps']:,} | "
            f"{e['mean_return']:.1f} | {hns} |"
        )
    return "\n".join(lines)


def default_run_name(args: Args, game: str) -> str:
    init = "scratch" if args.from_scratch else "pretrained"
    frozen = "_frozen" if args.freeze_trunk else ""
    variant = f"m{_or_default(args.mode)}_d{_or_default(args.difficulty)}"
    return args.run_name or f"online_{game}_{variant}_{init}{frozen}_seed{args.seed}"


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    """Fine-tune online on the variant; returns the summary (also <run_dir>/summary.json). SIGINT/SIGTERM
    stop the run with a saved checkpoint (RunInterrupted); the run folder's lock (RunLock) is released and
    the envs are closed however it ends."""
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        game = check_args(args)
        args = dataclasses.replace(args, game=game)  # the canonical name, as the checkpoint records it
        device = cql_multigame.select_device(args.device)
        envs = atari.make_vec_env(  # checks --mode/--difficulty (the error lists the valid ones)
            game,
            args.num_envs,
            mode=args.mode,
            difficulty=args.difficulty,
            sticky_actions=args.sticky_actions,
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
        )
        cleanup.callback(envs.close)
        return train_online(args, game, device, envs, stop, cleanup)


def train_online(
    args: Args, game: str, device: torch.device, envs: Any, stop: StopSignals, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    """Act, store, learn, evaluate and save until --total-env-steps, inside main's signal handlers and
    cleanup."""
    ckpt = cql_multigame.load_checkpoint(args.checkpoint)
    net, origin = build_network(ckpt, args.checkpoint, game, args.from_scratch, args.seed)
    run_dir = Path(args.runs_dir) / default_run_name(args, game)
    state_path = run_dir / "checkpoint.pt"
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; pass another --run-name or --seed.")
    cleanup.enter_context(RunLock(run_dir, "--run-name or --seed"))  # one writer; a writable --runs-dir
    resume = None
    if args.resume:
        if not state_path.is_file():
            raise ConfigError(f"--resume found no saved run at {state_path}; start it without --resume.")
        resume = cql_multigame.load_checkpoint(state_path)
        if "online" not in resume:
            raise ConfigError(f"{state_path} was not saved by finetune_online.py; it cannot be resumed here.")
        check_resume(resume, args, net, ckpt, run_dir)
    elif state_path.exists():
        raise ConfigError(
            f"{run_dir} holds an unfinished run; pass --resume to continue it or another --run-name."
        )
    support = cql_multigame.support_from_checkpoint(
        ckpt, device
    )  # [K], recorded in this run's checkpoint too

    net = net.to(device)
    if args.freeze_trunk:
        resnet.freeze_trunk(net)
    target_net = resnet.target_network(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = cql_multigame.make_optimizer(params, args.lr, args.adam_eps, device)  # ours: fresh Adam state
    legal = np.asarray(atari.legal_actions(game))  # [L] full-set ids
    legal_t = torch.as_tensor(legal, device=device)
    legal_table = cql_multigame.legal_action_table([game]).to(device)  # [1, 18]
    learner = cql_multigame.Learner(net, target_net, optimizer, support, legal_table, args.cql_alpha)
    rng = np.random.default_rng(args.seed)
    if resume is None:
        buffers = make_buffers(args, legal.tolist())
    else:
        online_state = resume["online"]
        net.load_state_dict(resume["model"])
        target_net.load_state_dict(resume["target"])
        optimizer.load_state_dict(resume["optimizer"])
        changed = cql_multigame.apply_optimizer_settings(optimizer, args.lr, args.adam_eps)  # as recorded
        if changed:
            print(f"resuming with {', '.join(changed)}: applied to the restored Adam")
        torch.set_rng_state(resume["rng"]["torch"])
        rng.bit_generator.state = online_state["numpy_rng"]
        buffers = load_buffers(args, legal.tolist(), run_dir / "replay_state", online_state["buffer_suffix"])
    if args.log_replay_dir:
        prepare_log_replay_dir(Path(args.log_replay_dir), game, args.num_envs, resume is not None,
                               args.log_replay_overwrite)  # fmt: skip
    logger = ReplayLogger(args.log_replay_dir, game, buffers, args.n_step) if args.log_replay_dir else None
    if logger is not None and resume is not None:
        logger.load_state_dict(resume["online"]["logger"])

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    cql_multigame.write_hyperparameters(writer, args)
    counts = resnet.count_parameters(net)
    trainable = sum(p.numel() for p in params)
    print(
        f"{game} mode {_or_default(args.mode)} difficulty {_or_default(args.difficulty)}: {origin}\n"
        f"device {device}, {net.arch}: {counts['total'] / 1e6:.2f}M parameters "
        f"({trainable / 1e6:.2f}M trained), {args.num_envs} envs, "
        f"{args.buffer_size // args.num_envs:,} transitions per env buffer; logs in {run_dir}"
    )

    evaluations: list[dict[str, Any]] = [] if resume is None else list(resume["online"]["evaluations"])

    def run_eval(at: int) -> bool:
        """Evaluate the network at `at` env steps; False when a signal dropped it (the run then stops, and
        the evaluation is redone on resume: run_dropped_eval)."""
        clips = run_dir / "videos" / f"step{at}" if args.capture_video else None
        try:
            with stop.abandonable():  # a signal drops the evaluation, not the training
                result = evaluate_variant(net, game, support, args, seed=args.seed + at, video_dir=clips)
        except Exception:  # Interrupted, or an env worker killed by the same SIGTERM
            if stop.signum is None:
                raise
            return False
        result["env_steps"] = at
        evaluations.append(result)
        writer.add_scalar(f"eval/{game}/return", result["mean_return"], at)
        log_clips(writer, clips, at)
        if result["hns"] is not None:
            writer.add_scalar(f"eval/{game}/hns", result["hns"], at)
        hns = "" if result["hns"] is None else f", human-normalized {result['hns']:.3f}"
        progress.write(f"evaluation at {at:,} env steps: mean return {result['mean_return']:.1f}{hns}")
        return True

    env_steps = vec_steps = updates = resumes = 0
    next_eval, next_save = args.eval_every, args.save_every
    if resume is not None:
        env_steps, vec_steps, updates, next_eval, next_save = (
            resume["online"][k] for k in ("env_steps", "vec_steps", "updates", "next_eval", "next_save")
        )
        resumes = resume["online"]["resumes"] + 1
        print(f"resumed {run_dir} at {env_steps:,} env steps, {updates:,} updates (resume {resumes})")
    progress = tqdm(
        total=args.total_env_steps, initial=env_steps, unit="step", dynamic_ncols=True, mininterval=1.0
    )
    eval_time = 0.0  # seconds spent in evaluations inside the loop (left out of the throughput)
    metrics: dict[str, torch.Tensor] = {}
    episode_return = np.zeros(args.num_envs)
    episode_length = np.zeros(args.num_envs, np.int64)
    recent_returns: list[float] = []
    saves = 0 if resume is None else resume["online"]["buffer_suffix"] + 1

    def save_state() -> None:
        """Everything --resume needs: buffers first (a new suffix), then the checkpoint that names them,
        atomically; older buffer files go only after that, so a kill at any moment leaves a loadable pair."""
        nonlocal saves
        save_buffers(buffers, run_dir / "replay_state", saves, args.n_step)
        online = {
            "env_steps": env_steps, "vec_steps": vec_steps, "updates": updates, "next_eval": next_eval,
            "next_save": next_save, "resumes": resumes, "evaluations": evaluations, "buffer_suffix": saves,
            "numpy_rng": rng.bit_generator.state, "logger": logger.state_dict() if logger else None,
        }  # fmt: skip
        saved = dataclasses.asdict(args)
        state = cql_multigame.checkpoint_state(
            net, target_net, optimizer, updates, saved, [game], {}, support
        )
        cql_multigame.save_checkpoint(state_path, {**state, "online": online})
        for old in (run_dir / "replay_state").glob(f"env*/*_ckpt.{saves - 1}.gz"):
            old.unlink()
        saves += 1

    resume_with = f"resume with: {cql_multigame.resume_command(run_dir, 'finetune_online.py')}"
    if logger is not None and logger.unwritten:  # the snapshots whose write stopped the run before it
        try:
            logger.write_unwritten()
        except replay.ReplayWriteError as e:  # the saved run is unchanged
            raise log_write_failed(e, None, f"at {env_steps:,} env steps", resume_with) from None

    try:
        if args.eval_every and resume is None and not run_eval(0):  # the zero-shot score on the variant
            raise RunInterrupted(
                f"interrupted by {stop.name} during the zero-shot evaluation, before any training: nothing "
                "was saved; start the run again with the same command (without --resume)",
                stop.signum,
            )
        if args.eval_every and next_eval <= env_steps < args.total_env_steps:  # one a signal dropped
            progress.write(f"redoing the evaluation at {env_steps:,} env steps that the interruption dropped")
            if not run_eval(env_steps):
                raise RunInterrupted(
                    f"interrupted by {stop.name} during the evaluation at {env_steps:,} env steps: "
                    f"{state_path} is unchanged; {resume_with}",
                    stop.signum,
                )
            while next_eval <= env_steps:
                next_eval += args.eval_every
        stop.abandon = False  # a signal lets the current vector step finish; the loop then saves and stops
        # [N, 4, 84, 84]; env i seeded with seed + i by make_vec_env (after a resume: new seeds, new episodes)
        obs, _ = envs.reset(seed=None if resume is None else args.seed + 100_003 * resumes)
        loop_start = time.perf_counter()
        last_log = (loop_start, env_steps, updates, 0.0)  # time, env steps, updates, eval time
        while env_steps < args.total_env_steps:
            epsilon = epsilon_at(args, env_steps)
            action_index = act(net, obs, support, legal_t, epsilon, rng)  # [N] minimal-set indices
            obs, reward, done = collect(envs, obs, action_index, legal, buffers)
            env_steps += args.num_envs
            vec_steps += 1
            progress.update(args.num_envs)
            episode_return += reward
            episode_length += 1
            finished = {}
            for i in np.flatnonzero(done):
                writer.add_scalar("charts/episodic_return", episode_return[i], env_steps)
                writer.add_scalar("charts/episodic_length", episode_length[i], env_steps)
                recent_returns = (recent_returns + [float(episode_return[i])])[-20:]
                finished[int(i)] = float(episode_return[i])
                episode_return[i], episode_length[i] = 0.0, 0
            if logger is not None:
                try:
                    logger.after_step(finished)
                except replay.ReplayWriteError as e:  # the run is saved first, then it stops
                    raise log_write_failed(
                        e, save_state, f"at {env_steps:,} env steps", resume_with
                    ) from None

            # One gradient step per train_every agent steps after learning_starts. Every buffer can be
            # sampled once each env has added more than n_step transitions (vec_steps > n_step).
            due = max(env_steps - args.learning_starts, 0) // args.train_every
            while updates < due and vec_steps > args.n_step:
                sampled = sample_batch(buffers, args.batch_size, rng, updates)
                batch = {k: torch.from_numpy(v).to(device) for k, v in sampled._asdict().items()}
                metrics = cql_multigame.update(learner, batch)
                updates += 1
                if updates % args.target_update_every == 0:
                    target_net.load_state_dict(net.state_dict())
                cql_multigame.sync_device(device)

            if env_steps // args.log_every != (env_steps - args.num_envs) // args.log_every:
                now = time.perf_counter()
                span = max(now - last_log[0] - (eval_time - last_log[3]), 1e-9)
                sps, ups = (env_steps - last_log[1]) / span, (updates - last_log[2]) / span
                last_log = (now, env_steps, updates, eval_time)
                writer.add_scalar("charts/epsilon", epsilon, env_steps)
                writer.add_scalar("charts/env_steps_per_second", sps, env_steps)
                writer.add_scalar("charts/updates_per_second", ups, env_steps)
                writer.add_scalar("charts/samples_per_second", ups * args.batch_size, env_steps)
                postfix = {"eps": f"{epsilon:.3f}", "sps": f"{sps:.0f}", "ups": f"{ups:.1f}"}
                if recent_returns:
                    postfix["return"] = f"{np.mean(recent_returns):.1f}"
                if metrics:
                    where = f"after {updates} updates ({env_steps:,} env steps)"
                    values = cql_multigame.fetch_metrics(metrics, where, "lower --lr.")
                    for k, tag in cql_multigame.TRAIN_SCALARS:
                        writer.add_scalar(tag, values[k], env_steps)
                    postfix.update(loss=f"{values['loss']:.3f}", q=f"{values['q_data']:.2f}")
                progress.set_postfix(postfix)

            if args.eval_every and env_steps >= next_eval and env_steps < args.total_env_steps:
                start = time.perf_counter()
                if run_eval(env_steps):  # else dropped by a signal: saved as due, redone on resume
                    while next_eval <= env_steps:
                        next_eval += args.eval_every
                eval_time += time.perf_counter() - start
            if args.save_every and env_steps >= next_save and env_steps < args.total_env_steps:
                while next_save <= env_steps:
                    next_save += args.save_every
                save_state()
            if stop.signum is not None:
                save_state()
                raise RunInterrupted(
                    f"interrupted by {stop.name} at {env_steps:,} of {args.total_env_steps:,} env steps: "
                    f"saved to {state_path} (network, replay, counters); {resume_with}",
                    stop.signum,
                )
        train_time = max(time.perf_counter() - loop_start - eval_time, 1e-9)
        # the final network (a cql_multigame.py checkpoint with one head) and its replay, saved before the
        # final evaluation so that an interrupt there keeps it (--resume goes straight to that evaluation);
        # a first signal during this save lets it finish, a second stops at once
        save_state()
        stop.abandon = True
        run_eval(env_steps)
        if stop.signum is not None:
            raise RunInterrupted(
                f"interrupted by {stop.name} during the final evaluation: {state_path} holds the network "
                f"after {updates:,} updates, not evaluated; {resume_with}",
                stop.signum,
            )
        if logger is not None:
            try:
                logger.final()
            except replay.ReplayWriteError as e:  # the final save is done: a resume writes it again
                raise log_write_failed(e, None, "at the end", resume_with) from None
    except Interrupted as e:  # a second signal inside a step (or a save): what it cut is not saved
        what_next = f"the last save is {state_path} if it exists; {resume_with}"
        raise cql_multigame.stopped_at_once(e, f"at {env_steps:,} env steps", what_next) from None
    finally:
        stop.abandon = True
        progress.close()
        writer.flush()
    summary = {
        "game": game,
        "mode": args.mode,
        "difficulty": args.difficulty,
        "init": "scratch" if args.from_scratch else "pretrained",
        "freeze_trunk": args.freeze_trunk,
        "checkpoint": args.checkpoint,
        "env_steps": env_steps,
        "updates": updates,
        "final_return": evaluations[-1]["mean_return"],
        "final_hns": evaluations[-1]["hns"],
        "evaluations": evaluations,
        "env_steps_per_second": env_steps / train_time,
        "updates_per_second": updates / train_time,
        "run_dir": str(run_dir),
    }
    writer.close()
    replay.write_file(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(format_table(game, args, evaluations))
    print(
        f"\n{env_steps:,} env steps, {updates:,} updates: {summary['env_steps_per_second']:.0f} env steps/s, "
        f"{summary['updates_per_second']:.1f} updates/s (evaluation time excluded)\n"
        f"TensorBoard: tensorboard --logdir {args.runs_dir}\ncheckpoint:  {run_dir / 'checkpoint.pt'}\n"
        f"summary:     {run_dir / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    import tyro

    cql_multigame.run_script(main, tyro.cli(Args))
