"""Checkpoint files: atomic saves, one-sentence load errors, resume checks, full-disk messages.

A checkpoint (`checkpoint_state`) holds the online and target weights, Adam's state, the step, the run's
flags, the network's config, the games, the torch RNG and the sampler's state, so that `--resume` gives the
same next batches and losses. Saves are atomic (a temporary file, then a rename); a failed write is one
sentence with the path and the space it needs (DiskWriteError). `--resume` compares every run-defining flag
with the checkpoint's (`compare_resume_args`; RESUME_MAY_CHANGE lists those that may differ).

Machinery: a reader of the paper may skip it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from machinery.devices import to_cpu
from machinery.dqn_files import open_no_follow, remove_stale_temp_files, temp_path
from machinery.flags import ConfigError, flag_name, flat_fields


def checkpoint_state(
    net: torch.nn.Module,
    target_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    args: dict[str, Any],
    games: list[str],
    replay_state: dict[str, Any],
    support: torch.Tensor,
) -> dict[str, Any]:
    """What every checkpoint of this repo holds (load_checkpoint and network_from_checkpoint read it),
    with the full C51 support the network was trained on ([K] atoms: v_min, v_max, num_atoms)."""
    return {
        "model": net.state_dict(),
        "target": target_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": args,
        "net_config": net.config(),
        "games": list(games),
        "support": support_record(support),
        "rng": {"torch": torch.get_rng_state()},
        "replay": replay_state,
    }


def support_record(support: torch.Tensor) -> dict[str, Any]:
    """A [K] linspace support as a checkpoint keeps it: its ends and its size (linspace rebuilds it)."""
    return {"v_min": float(support[0]), "v_max": float(support[-1]), "num_atoms": int(support.numel())}


def make_optimizer(params, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel: one pass per tensor instead of ~8 (the same result to
    rounding; its speed-up is in docs/performance.md). torch_xla's optimizer_step needs the
    default implementation."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a killed process leaves the previous checkpoint intact. Tensors are saved on the
    CPU (as xm.save does on XLA), so a checkpoint loads anywhere, also without torch_xla or a GPU.

    The temporary file is unique to this writer (temp_path). A write that fails (full disk, read-only
    folder, permission) or is interrupted removes it; a failed one raises DiskWriteError, one sentence with
    the path and the space needed, and the previous checkpoint stays. An exception raised inside a write
    (Interrupted: a second signal during the save) is raised as itself, not as the RuntimeError torch's zip
    writer turns it into, so that the loop prints its one line."""
    state = to_cpu(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # every process creates the folder it writes into
    tmp = temp_path(path)
    out = None
    try:
        with open_no_follow(tmp, "wb") as f:  # a link planted at this name is not followed
            out = _WriteRecorder(f)
            torch.save(state, out)
        os.replace(tmp, path)
        # the temporary files of earlier, killed writers of this file (one writer per file: the run lock)
        remove_stale_temp_files(path.parent, names=[path.name], any_host=True, recursive=False)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer turns what a write raised (ENOSPC, Interrupted) into an opaque RuntimeError, or
        # raises one while closing after an exception elsewhere in torch.save: use the first exception
        error = out.error if out is not None and out.error is not None else _first_exception(e)
        if isinstance(error, OSError):
            raise disk_error(path, error, _tensor_bytes(state) + 2**20) from None
        if error is not e:
            raise error from None
        raise


def _first_exception(e: BaseException) -> BaseException:
    """For torch's RuntimeError raised while handling an OSError or a signal's exception (runs.Interrupted,
    which carries .signum) inside torch.save, that one (the nearest in e.__context__); otherwise e itself."""
    c, seen = e.__context__, 0
    while isinstance(e, RuntimeError) and c is not None and seen < 8:
        if isinstance(c, OSError) or hasattr(c, "signum"):
            return c
        c, seen = c.__context__, seen + 1
    return e


class _WriteRecorder:
    """A binary file for torch.save that keeps the first exception of a write: an OSError (full disk) or
    Interrupted (a signal handler runs inside the write); torch reports either only as "enforce fail ...
    unexpected pos"."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except BaseException as e:
            self.error = self.error or e
            raise


RESUME_KEYS = ("model", "target", "optimizer", "step", "args", "net_config", "games", "rng", "replay")


def load_checkpoint(path: str | Path, require: tuple[str, ...] = (), purpose: str = "") -> dict[str, Any]:
    """Load a checkpoint written by this script (weights only, no pickle), with one-sentence errors.
    `require`: keys needed beyond model, net_config and games (e.g. RESUME_KEYS for --resume), named
    in the error with `purpose` ("--resume")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} does not exist; pass the checkpoint.pt of a cql_multigame.py run."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(e).__name__}); "
            "use another checkpoint."
        ) from e
    missing = {"model", "net_config", "games"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)}; it was not written by cql_multigame.py."
        )
    missing = set(require) - set(ckpt)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)}, which {purpose or 'this script'} needs; use a "
            "checkpoint written by cql_multigame.py's training loop, or start a new run."
        )
    checkpoint_support(ckpt, path)  # every reader needs the full C51 support: refused here if it is missing
    return ckpt


def checkpoint_support(ckpt: dict[str, Any], path: str | Path = "the checkpoint") -> tuple[float, float, int]:
    """(v_min, v_max, num_atoms) of a checkpoint: its "support" record, or, in a checkpoint written before
    that record existed, its args' v_min/v_max with its net_config's num_atoms (cql_multigame.py's and
    finetune_online.py's recorded them). A checkpoint with neither is refused in one sentence rather than
    guessed (resnet.support_bounds reads it through this)."""
    record = ckpt.get("support")
    if not isinstance(record, dict):
        run_args, net_config = ckpt.get("args") or {}, ckpt.get("net_config") or {}
        record = {"v_min": run_args.get("v_min"), "v_max": run_args.get("v_max"),
                  "num_atoms": net_config.get("num_atoms")}  # fmt: skip
    if any(record.get(k) is None for k in ("v_min", "v_max", "num_atoms")):
        raise ConfigError(
            f"checkpoint {path} does not record its C51 support (v_min, v_max, num_atoms), so its Q-values "
            "cannot be read; use a checkpoint written by this version (older finetune_offline.py checkpoints "
            "lack it), or fine-tune again."
        )
    return float(record["v_min"]), float(record["v_max"]), int(record["num_atoms"])


def check_rank_state(run_dir: Path, rank: int, resume: bool) -> None:
    """Processes > 0 (other torchrun ranks, other hosts of a pod) keep only their sampler state in the run
    folder (replay_state_rank<r>.pt). Without --resume they must not overwrite an earlier run's; with it they
    must see the checkpoint that process 0 wrote, i.e. the same shared --runs-dir."""
    if rank == 0:
        return
    state = run_dir / f"replay_state_rank{rank}.pt"
    if not resume and state.exists():
        raise ConfigError(
            f"{run_dir} already holds process {rank}'s sampler state ({state.name}) of an earlier run; pass "
            "--resume to continue it or another --run-name to start a new run."
        )
    if resume and not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(
            f"--resume: process {rank} sees no checkpoint at {run_dir / 'checkpoint.pt'}; every process "
            "(every host of a pod, every torchrun node) must use the same shared --runs-dir."
        )


def load_rank_replay_state(run_dir: Path, rank: int, step: int) -> dict:
    """The sampler state a rank > 0 saved beside the checkpoint of `step`."""
    path = run_dir / f"replay_state_rank{rank}.pt"
    state = torch.load(path, weights_only=True) if path.is_file() else None
    if state is None or state["step"] != step:
        raise ConfigError(
            f"{path} is missing or not from step {step}; resume with the same number of processes."
        )
    return state["replay"]


RESUME_MAY_CHANGE = frozenset({
    "resume", "run_name", "runs_dir", "data_dir", "device", "xla_multiprocess", "prefetch", "record_missing",
    "total_steps", "total_env_steps", "log_replay_overwrite", "lr", "adam_eps", "log_every", "save_every",
    "save_all_ranks", "xla_metrics", "eval_every", "eval_episodes", "eval_envs", "eval_workers",
    "eval_epsilon", "eval_max_steps", "channels_last", "compile",
})  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def compare_resume_args(saved: dict[str, Any], args: Any) -> list[str]:
    """The run-defining flags of `args` that differ from the checkpoint's `saved` args, as
    "--flag new (the run used old)". A field the checkpoint lacks (a flag added later) counts as its
    default. Fields in RESUME_MAY_CHANGE are not compared. A nested group of flags (MachineryArgs) is
    compared flat, as checkpoints record it (flat_fields), so older checkpoints resume too."""
    diffs = []
    for field, new in flat_fields(args):
        if field.name in RESUME_MAY_CHANGE:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        old = saved.get(field.name, default)
        if not _same(old, new):
            diffs.append(f"{flag_name(field.name)} {_show(new)} (the run used {_show(old)})")
    return diffs


def compare_network_configs(saved: dict[str, Any], built: dict[str, Any], source: str) -> list[str]:
    """The network settings (net_config keys: arch, num_atoms, widths, ...) of the network `source` gives
    now that differ from the run's `saved` one, as "the network's num_atoms 21 from --checkpoint (the run
    used 51)"."""
    return [
        f"the network's {k} {built.get(k)} from {source} (the run used {saved.get(k)})"
        for k in sorted(set(saved) | set(built))
        if saved.get(k) != built.get(k)
    ]


def check_resume(
    ckpt: dict[str, Any],
    args: Any,
    run_dir: Path,
    other_diffs: list[str] | None = None,
    length: str = "total_steps",
    reached: int | None = None,
) -> None:
    """--resume continues the same experiment (every script with --resume): one sentence naming every
    run-defining flag that differs from the checkpoint's, plus `other_diffs` (what the flags do not show,
    e.g. the network another --checkpoint gives), and a run length (`length`, the flag's field) below the
    point the run has `reached` (default: the checkpoint's step)."""
    diffs = compare_resume_args(ckpt["args"], args) + list(other_diffs or [])
    if diffs:
        raise ConfigError(
            f"--resume would change the run {run_dir}: {', '.join(diffs)}; pass the run's values (only "
            "where the run lives, its length, --lr/--adam-eps, speed, logging, saving and evaluation flags "
            "may change, see docs/reliability.md), or start a new run with another --run-name."
        )
    reached = int(ckpt["step"]) if reached is None else int(reached)
    if getattr(args, length) < reached:
        flag = flag_name(length)
        raise ConfigError(
            f"{flag} {getattr(args, length):,} is below the step the run {run_dir} has reached "
            f"({reached:,}); pass {flag} {reached:,} or more."
        )


def checkpoint_to_resume(run_dir: Path, args: Any) -> dict[str, Any] | None:
    """With args.resume: the run's checkpoint, checked against the flags (one sentence for each mismatch:
    --arch, --games, then check_resume). Without: None, after checking that the run folder holds no
    checkpoint that a new run would overwrite."""
    ckpt_path = run_dir / "checkpoint.pt"
    if not args.resume:
        if ckpt_path.exists():
            raise ConfigError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it or another "
                "--run-name to start a new run."
            )
        return None
    if not ckpt_path.is_file():
        raise ConfigError(
            f"--resume found no checkpoint at {ckpt_path}; start the run without --resume "
            "or pass the --run-name of an earlier run."
        )
    ckpt = load_checkpoint(ckpt_path, require=RESUME_KEYS, purpose="--resume")
    if ckpt["net_config"]["arch"] != args.arch:
        raise ConfigError(
            f"{ckpt_path} holds a {ckpt['net_config']['arch']} network but --arch is "
            f"{args.arch}; resume with --arch {ckpt['net_config']['arch']}."
        )
    if list(ckpt["games"]) != list(args.games):
        raise ConfigError(f"{ckpt_path} was trained on other --games; resume with the same games.")
    check_resume(ckpt, args, run_dir)
    return ckpt


def restore(
    ckpt: dict[str, Any], net: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Any, lr: float,
    adam_eps: float, rank: int, run_dir: Path,
) -> int:  # fmt: skip
    """--resume: the checkpoint's weights, Adam state (with this run's `lr`/`adam_eps`), this process's
    sampler state (rank 0's in the checkpoint, the others' beside it) and the torch RNG; returns the
    checkpoint's step."""
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step = int(ckpt["step"])
    changed = apply_optimizer_settings(optimizer, lr, adam_eps)  # train with what is recorded
    if changed and rank == 0:
        print(f"resuming at step {step:,} with {', '.join(changed)}: applied to the restored Adam")
    sampler.load_state_dict(ckpt["replay"] if rank == 0 else load_rank_replay_state(run_dir, rank, step))
    torch.set_rng_state(ckpt["rng"]["torch"])
    return step


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, lr: float, eps: float) -> list[str]:
    """Set lr and eps of a restored optimizer (load_state_dict brings back the saved ones), so that the run
    trains with the values it records. Returns what changed, as "--lr new (was old)"."""
    changed = []
    for key, flag, value in (("lr", "--lr", lr), ("eps", "--adam-eps", eps)):
        old = optimizer.param_groups[0][key]
        if old != value:
            changed.append(f"{flag} {value} (was {old})")
        for group in optimizer.param_groups:
            group[key] = value
    return changed


class DiskWriteError(ConfigError):
    """A write that failed (full disk, read-only folder, missing permission): one sentence with the path and
    the space it needs; the partial temporary file is gone and the previous file is unchanged."""


def _tensor_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def disk_error(path: Path, error: OSError, need_bytes: int | None) -> DiskWriteError:
    """One sentence for a failed write of `path`: the reason, the space needed and free, what is kept."""
    reason = error.strerror or type(error).__name__
    space = ""
    if need_bytes is not None:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free"
        except OSError:
            free = "no free space we could read"
        space = f" it needs about {need_bytes / 2**20:,.1f} MB and {path.parent} has {free};"
    kept = f"{path} is unchanged" if path.exists() else f"no {path.name} was written"
    return DiskWriteError(
        f"could not write {path} ({reason}):{space} {kept}; free space or pass a writable folder, then rerun."
    )
