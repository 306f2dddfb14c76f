"""Flag checks of every script: the allowed range of each numeric flag, --checkpoints, ConfigError.

Machinery: one table (FLAG_RANGES) for cql_multigame.py, finetune_offline.py, finetune_online.py and
record.py, so that a user meets the same one-sentence error everywhere, before any long work starts. A
reader of the paper may skip this file. No torch here (the recorder checks its flags without it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A mistake in the flags or files a user gave; printed as one sentence, without a traceback."""


@dataclass
class MachineryArgs:
    """cql_multigame.py's flags that are not the paper's: a test hook and the older TPU launcher. Its Args
    holds them in one field whose prefix tyro omits (tyro.conf.OmitArgPrefixes), so the command line keeps
    --save-all-ranks and --xla-multiprocess, and checkpoints record them flat (flat_fields)."""

    xla_multiprocess: bool = False
    """on TPU: start one process per TPU device with torch_xla's launcher (data parallel over cores);
    prefer --xla-spmd"""
    save_all_ranks: bool = False
    """debug: every process writes its final parameters to params_rank<r>.pt and the games of its batches
    to batch_games_rank<r>.pt (the data-parallel tests use them)"""


def flat_fields(args: Any) -> list[tuple[dataclasses.Field, Any]]:
    """(field, value) of every flag of a dataclass of flags, the fields of a nested dataclass (MachineryArgs)
    in its place: one level, as the command line spells them and as checkpoints record them."""
    fields = []
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        fields += flat_fields(value) if dataclasses.is_dataclass(value) else [(field, value)]
    return fields


def flat_dict(args: Any) -> dict[str, Any]:
    """The flags as one flat dict (a checkpoint's "args", the hyperparameters table)."""
    return {field.name: value for field, value in flat_fields(args)}


def parse_checkpoints(spec: str) -> str | list[int]:
    spec = spec.strip()
    if spec in ("suboptimal", "nearoptimal"):
        return spec
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(
            f"--checkpoints {spec!r} is not suboptimal, nearoptimal or a list of suffixes like 0,1,2."
        ) from e


# flag (Args field) -> (the allowed range in words, the test). Every script checks the fields it has.
FLAG_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{
        name: ("at least 1", lambda v: v >= 1)
        for name in (
            "total_steps total_env_steps batch_size n_step target_update_every log_every save_every "
            "eval_episodes eval_envs eval_max_steps num_envs train_every max_episode_steps "
            "num_checkpoints buffer_size windows_per_slot"
        ).split()
    },
    **{name: ("0 or more", lambda v: v >= 0) for name in ("learning_starts", "epsilon_decay_steps")},
    "eval_every": ("0 (evaluate only at the end) or more", lambda v: v >= 0),
    "reload_every": ("0 (chosen from --total-steps) or more", lambda v: v >= 0),
    "eval_workers": ("0 (in this process) or more", lambda v: v >= 0),
    "num_workers": ("0 (one per game and run) or more", lambda v: v >= 0),
    "prefetch": ("0 (sample inside the loop) or more", lambda v: v >= 0),
    "record_missing": ("0 (record nothing) or at least 8 (two 4-frame stacks)", lambda v: v == 0 or v >= 8),
    "capacity": ("at least 8 (two 4-frame stacks)", lambda v: v >= 8),
    "seed": ("between 0 and 2**31 - 1", lambda v: 0 <= v < 2**31),
    "num_atoms": ("at least 2", lambda v: v >= 2),
    **{name: ("above 0", lambda v: v > 0) for name in ("lr", "adam_eps", "memory_budget_gb")},
    **{name: ("0 or more", lambda v: v >= 0) for name in ("cql_alpha", "td_weight")},
    "gamma": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    **{
        name: ("a probability in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("eval_epsilon", "epsilon", "epsilon_start", "epsilon_end", "sticky_actions")
    },
}


LR_WARN_ABOVE = 0.01  # ours: a learning rate above this gets a warning (the paper's is 2e-4)


def flag_name(field: str) -> str:
    """Args field -> its command-line flag (tyro's spelling): total_steps -> --total-steps."""
    return "--" + field.replace("_", "-")


def check_ranges(args: Any) -> None:
    """The one range check of every numeric flag (FLAG_RANGES) that `args` has, for all three training
    scripts and the recorder, run before any data load, recording or network build. Raises ConfigError with
    one sentence naming the flag and its allowed range."""
    for field, value in flat_fields(args):
        if field.name not in FLAG_RANGES or value is None or isinstance(value, bool):
            continue
        allowed, ok = FLAG_RANGES[field.name]
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and ok(value)):
            flag = flag_name(field.name)
            raise ConfigError(f"{flag} must be {allowed}, got {flag} {value}.")
    lr = getattr(args, "lr", None)
    if lr is not None and lr > LR_WARN_ABOVE:  # allowed (a fork may want it), but almost surely a typo
        warnings.warn(
            f"--lr {lr} is over {LR_WARN_ABOVE:g}, 50x the paper's 2e-4: Adam on these networks usually "
            "diverges to non-finite weights (then no checkpoint is saved); did you mean a smaller value?",
            stacklevel=2,
        )
    if getattr(args, "cql_alpha", None) == 0 and getattr(args, "td_weight", None) == 0:
        raise ConfigError(
            "--cql-alpha and --td-weight are both 0, so the loss is 0 and nothing trains; set at least one "
            "above 0 (--td-weight 0 --cql-alpha 1 is behavior cloning)."
        )


# Flags that may differ on --resume: where things are and how the run is watched, speed switches that do not


def check_support(v_min: float, v_max: float) -> None:
    """The C51 support: finite float32 bounds with --v-min < --v-max and a finite atom spacing."""
    with np.errstate(over="ignore", invalid="ignore"):  # -1e39 becomes -inf as float32: refused below
        lo, hi = np.float32(v_min), np.float32(v_max)
        ok = bool(np.isfinite(lo) and np.isfinite(hi) and lo < hi and np.isfinite(hi - lo))
    if not ok:
        raise ConfigError(
            f"--v-min and --v-max must be finite (as float32) with --v-min below --v-max, got --v-min "
            f"{v_min} --v-max {v_max}; C51's default for clipped rewards is --v-min -10 --v-max 10."
        )


def physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_sizes(
    batch_size: int | None, num_atoms: int | None, buffer_size: int | None, memory: int | None = None
) -> None:
    """Sizes no machine can hold, refused before any work with the memory they would need: the C51
    projection's two [batch, atoms, atoms] float32 tensors, a batch's frames (obs and next_obs, uint8
    [batch, 4, 84, 84] each) and an online replay buffer (84x84 bytes and ~10 bytes per transition).
    `memory`: the limit in bytes (default: this machine's memory)."""
    memory = physical_memory_bytes() if memory is None else memory
    if not memory:
        return
    needs = []  # checked in this order: a batch too big by itself is named as such
    if batch_size is not None:
        needs.append((2 * batch_size * 4 * 84 * 84, f"--batch-size {batch_size}",
                      "the frames of one batch", "--batch-size"))  # fmt: skip
    if batch_size is not None and num_atoms is not None:
        what = f"--num-atoms {num_atoms} with --batch-size {batch_size}"
        projection = "the C51 projection (two [batch, atoms, atoms] float32 tensors)"
        needs.append((8 * batch_size * num_atoms**2, what, projection, "--num-atoms (C51: 51)"))
    if buffer_size is not None:
        needs.append((buffer_size * (84 * 84 + 10), f"--buffer-size {buffer_size}",
                      "the replay buffer", "--buffer-size (Dopamine: 1,000,000)"))  # fmt: skip
    for need, what, where, fix in needs:
        if need > memory:
            raise ConfigError(
                f"{what} needs about {need / 2**30:,.0f} GiB for {where} alone, more than this machine's "
                f"{memory / 2**30:,.0f} GiB of memory; lower {fix}."
            )


def check_flags(args: Any, archs: Any = ()) -> None:
    """The checks every training script runs first, on whichever of these flags `args` has: --arch (one
    of `archs`, when set), every numeric flag's range (check_ranges), the C51 support, sizes no machine
    holds (check_sizes) and --checkpoints."""
    arch = getattr(args, "arch", "")
    if arch and arch not in archs:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(archs)}.")
    check_ranges(args)
    if hasattr(args, "v_min"):
        check_support(args.v_min, args.v_max)
    check_sizes(getattr(args, "batch_size", None), getattr(args, "num_atoms", None),
                getattr(args, "buffer_size", None))  # fmt: skip
    if hasattr(args, "checkpoints"):
        parse_checkpoints(args.checkpoints)


def check_games(
    given: tuple[str, ...] | list[str], canonical_name: Callable[[str], str], flag: str = "--games"
) -> tuple[str, ...]:
    """The canonical names of the games a user gave (`canonical_name`: atari.check_game, a ValueError for
    an unknown game); an unknown game, or one listed twice under any spelling, is one sentence (every game
    gets one head and one data folder)."""
    try:
        canonical = tuple(canonical_name(g) for g in given)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    for i, game in enumerate(canonical):
        if game in canonical[:i]:
            first = given[canonical.index(game)]
            spelled = f" (as {first} and {given[i]})" if first != given[i] else ""
            raise ConfigError(
                f"{flag} lists {game} twice{spelled}; every game gets one head and one data folder, list "
                "each once."
            )
    return canonical


def check_batch(batch_size: int, world_size: int, num_games: int) -> None:
    """The global batch splits evenly over the processes and holds every game."""
    if batch_size % world_size:
        raise ConfigError(
            f"--batch-size {batch_size} does not split over {world_size} processes; "
            f"use a multiple of {world_size}."
        )
    if batch_size < num_games:  # each process samples a rotating subset of the games
        raise ConfigError(
            f"--batch-size {batch_size} is smaller than the {num_games} games; every global "
            f"batch needs each game, use at least {num_games}."
        )
