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
from machinery.dqn_files import temp_path
from machinery.flags import ConfigError, flag_name


def checkpoint_state(
    net: torch.nn.Module,
    target_net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    args: dict[str, Any],
    games: list[str],
    replay_state: dict[str, Any],
) -> dict[str, Any]:
    """What every checkpoint of this repo holds (load_checkpoint and network_from_checkpoint read it)."""
    return {
        "model": net.state_dict(),
        "target": target_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": args,
        "net_config": net.config(),
        "games": list(games),
        "rng": {"torch": torch.get_rng_state()},
        "replay": replay_state,
    }


def make_optimizer(params, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel: one pass per tensor instead of ~8 (the same result to
    rounding; its speed-up is in the README's Performance section). torch_xla's optimizer_step needs the
    default implementation."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a killed process leaves the previous checkpoint intact. Tensors are saved on the
    CPU (as xm.save does on XLA), so a checkpoint loads anywhere, also without torch_xla or a GPU.

    The temporary file is unique to this writer (temp_path). A write that fails (full disk, read-only
    folder, permission) or is interrupted removes it; a failed one raises DiskWriteError, one sentence with
    the path and the space needed, and the previous checkpoint stays."""
    state = to_cpu(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # every process creates the folder it writes into
    tmp = temp_path(path)
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _WriteRecorder(f)
            torch.save(state, out)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer turns a failed write (ENOSPC) into an opaque RuntimeError: use the OSError
        error = out.error if out is not None and out.error is not None else e
        if isinstance(error, OSError):
            raise disk_error(path, error, _tensor_bytes(state) + 2**20) from None
        raise


class _WriteRecorder:
    """A binary file for torch.save that keeps the first OSError of a write (torch reports it only as
    "enforce fail ... unexpected pos")."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
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
    return ckpt


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
    "total_steps", "lr", "adam_eps", "log_every", "save_every", "save_all_ranks", "xla_metrics",
    "eval_every", "eval_episodes", "eval_envs", "eval_workers", "eval_epsilon", "eval_max_steps",
    "channels_last", "compile",
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
    default. Fields in RESUME_MAY_CHANGE are not compared."""
    diffs = []
    for field in dataclasses.fields(args):
        if field.name in RESUME_MAY_CHANGE:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        old, new = saved.get(field.name, default), getattr(args, field.name)
        if not _same(old, new):
            diffs.append(f"{flag_name(field.name)} {_show(new)} (the run used {_show(old)})")
    return diffs


def check_resume(ckpt: dict[str, Any], args: Any, run_dir: Path) -> None:
    """--resume continues the same experiment: one sentence naming every run-defining flag that differs
    from the checkpoint's, and a --total-steps the run has already passed."""
    diffs = compare_resume_args(ckpt["args"], args)
    if diffs:
        raise ConfigError(
            f"--resume would change the run {run_dir}: {', '.join(diffs)}; pass the run's values (only "
            "where the run lives, its length, --lr/--adam-eps, speed, logging, saving and evaluation flags "
            "may change, see the README), or start a new run with another --run-name."
        )
    if args.total_steps < int(ckpt["step"]):
        raise ConfigError(
            f"--total-steps {args.total_steps:,} is below the step the run {run_dir} has reached "
            f"({int(ckpt['step']):,}); pass --total-steps {int(ckpt['step']):,} or more."
        )


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
