"""The objectives a model trains with (`diffusion.objective`), and their samplers.

  ddpm  `gaussian.GaussianDiffusion`: ADM's Gaussian diffusion (SPEC §4), the default
  flow  `flow.FlowMatching`: SiT's interpolants (paths linear, gvp, vp; predictions
        velocity, noise, score)

Every objective offers training what it needs (`sample_times`, `training_losses`,
`task_rows`, `snr_table`, `cluster_boundaries`) and the samplers (`samplers.py`, one
registry over both) what they need (`noise_level`, `model_task`, the path or schedule).
The model knows nothing of them: it sees the time t the objective gives it and, where the
objective names one, the routing row `task` (T = `num_tasks` rows).

`OBJECTIVES` maps each name to how its config section is checked (`problems`), what its
spec records (`model_spec`: what the params mean) and how it is built (`create`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dtr_jax.diffusion import flow, samplers
from dtr_jax.diffusion.gaussian import (
    SCHEDULES,
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    get_betas,
    mean_flat,
    normal_kl,
    space_timesteps,
)
from dtr_jax.diffusion.gaussian import problems as gaussian_problems
from dtr_jax.errors import integer_problems
from dtr_jax.registry import Registry

FLOW_NUM_TASKS = 1000  # the flow objective's T when model.routing.num_tasks is None


@dataclasses.dataclass(frozen=True)
class Objective:
    problems: Callable  # (diffusion section) -> problems of its fields
    spec: Callable  # (diffusion section, T) -> what the params mean (JSON types)
    create: Callable  # (spec, learn_sigma, training fields of the section or None) -> objective


def _ddpm_spec(d, num_tasks: int) -> dict:
    del num_tasks  # T is num_timesteps
    return dict(schedule=str(d.schedule), num_timesteps=int(d.num_timesteps))


def _ddpm(spec: dict, learn_sigma: bool, section=None) -> GaussianDiffusion:
    del section  # no field changes ddpm's training beyond the spec
    return GaussianDiffusion.create(spec["schedule"], spec["num_timesteps"], learn_sigma)


def _flow_problems(d) -> list[str]:
    return flow.problems(
        d.path, d.prediction, d.loss_weight, d.time_sampling, d.logit_normal_std, d.train_eps
    )


def _flow_spec(d, num_tasks: int) -> dict:
    return dict(
        objective="flow", path=str(d.path), prediction=str(d.prediction), num_tasks=num_tasks
    )


# The flow fields that change training, not what the params mean (not in the spec).
FLOW_TRAINING = (
    "loss_weight",
    "time_sampling",
    "logit_normal_mean",
    "logit_normal_std",
    "train_eps",
)


def _flow(spec: dict, learn_sigma: bool, section=None) -> flow.FlowMatching:
    training = {} if section is None else {f: section[f] for f in FLOW_TRAINING}
    return flow.FlowMatching(
        spec["path"], spec["prediction"], spec["num_tasks"], learn_sigma, **training
    )


OBJECTIVES: Registry[Objective] = Registry("diffusion.objective")
OBJECTIVES.register(
    "ddpm", Objective(lambda d: gaussian_problems(d.schedule, d.num_timesteps), _ddpm_spec, _ddpm)
)
OBJECTIVES.register("flow", Objective(_flow_problems, _flow_spec, _flow))


def objective_of(spec: dict) -> str:
    """The objective of a model spec's diffusion section (specs of ddpm models, as every
    earlier version wrote them, name none)."""
    return spec.get("objective", "ddpm")


def create(spec: dict, learn_sigma: bool, section=None):
    """The objective of a model spec's diffusion section; `section` (a config's
    `diffusion`) adds the fields that change training only."""
    return OBJECTIVES.get(objective_of(spec)).create(spec, learn_sigma, section)


def num_tasks(d, requested) -> int:
    """T, the rows of the routing tables, for diffusion section `d` and
    `model.routing.num_tasks` = `requested`: ddpm's timesteps, or the flow's `requested`
    (None: FLOW_NUM_TASKS)."""
    if d.objective == "ddpm":
        return int(d.num_timesteps)
    return FLOW_NUM_TASKS if requested is None else int(requested)


def spec_num_tasks(spec: dict) -> int:
    """T of a model spec's diffusion section."""
    return spec["num_timesteps"] if objective_of(spec) == "ddpm" else spec["num_tasks"]


def spec(d, requested_num_tasks) -> dict:
    """The diffusion section of a model spec (`config.model_spec`)."""
    return OBJECTIVES.get(d.objective).spec(d, num_tasks(d, requested_num_tasks))


def problems(d) -> list[str]:
    """Problems with a diffusion section: the objective, and the fields it reads."""
    found = OBJECTIVES.problems(d.objective)
    return found or OBJECTIVES.get(d.objective).problems(d)


def num_tasks_problems(num_tasks_field, d) -> list[str]:
    """Problems with `model.routing.num_tasks` (named `num_tasks`) for diffusion section
    `d`: None or a positive integer; with ddpm, None or diffusion.num_timesteps (each
    timestep is a task)."""
    if num_tasks_field is None:
        return []
    found = integer_problems("num_tasks", num_tasks_field)
    if not found and d.objective == "ddpm" and num_tasks_field != d.num_timesteps:
        found.append(
            f"num_tasks={num_tasks_field} differs from diffusion.num_timesteps="
            f"{d.num_timesteps}: the ddpm objective's tasks are its timesteps (leave "
            "num_tasks None)"
        )
    return found


__all__ = [
    "FLOW_NUM_TASKS",
    "OBJECTIVES",
    "SCHEDULES",
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "create",
    "discretized_gaussian_log_likelihood",
    "flow",
    "get_betas",
    "mean_flat",
    "normal_kl",
    "num_tasks",
    "num_tasks_problems",
    "objective_of",
    "problems",
    "samplers",
    "space_timesteps",
    "spec",
    "spec_num_tasks",
]
