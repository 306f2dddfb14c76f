"""Flag checks of every script: the allowed range of each numeric flag, --checkpoints, ConfigError.

Machinery: one table (FLAG_RANGES) for cql_multigame.py, finetune_offline.py, finetune_online.py and
record.py, so that a user meets the same one-sentence error everywhere, before any long work starts. A
reader of the paper may skip this file. No torch here (the recorder checks its flags without it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A mistake in the flags or files a user gave; printed as one sentence, without a traceback."""


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


def flag_name(field: str) -> str:
    """Args field -> its command-line flag (tyro's spelling): total_steps -> --total-steps."""
    return "--" + field.replace("_", "-")


def check_ranges(args: Any) -> None:
    """The one range check of every numeric flag (FLAG_RANGES) that `args` has, for all three training
    scripts and the recorder, run before any data load, recording or network build. Raises ConfigError with
    one sentence naming the flag and its allowed range."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name not in FLAG_RANGES or value is None or isinstance(value, bool):
            continue
        allowed, ok = FLAG_RANGES[field.name]
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and ok(value)):
            flag = flag_name(field.name)
            raise ConfigError(f"{flag} must be {allowed}, got {flag} {value}.")
    if getattr(args, "cql_alpha", None) == 0 and getattr(args, "td_weight", None) == 0:
        raise ConfigError(
            "--cql-alpha and --td-weight are both 0, so the loss is 0 and nothing trains; set at least one "
            "above 0 (--td-weight 0 --cql-alpha 1 is behavior cloning)."
        )


# Flags that may differ on --resume: where things are and how the run is watched, speed switches that do not
