"""Plan before spending: the memory and time a run needs, from the model's config alone (``ebft plan``).

Nothing here loads a weight. The package in the order a plan is made:

- :mod:`.shape` — exact parameter counts and widths of the model, built on the ``meta`` device;
- :mod:`.memory` — the run's sizes (:class:`RunSizes`, from its :class:`~ebft.config.RunConfig` and
  its methods' declarations) and the bytes of weights, activations and each phase's working memory;
- :mod:`.placement` — where the activations go, whether the run fits, what to reduce
  (:func:`plan_resources` → :class:`ResourcePlan`); the run itself places its activations this way;
- :mod:`.timing` — one random block timed with the recovery's real training step, extrapolated;
- :mod:`.render` — the plan as a table and as JSON.
"""
from .memory import RunSizes, typical_eval_windows
from .placement import (ACCELERATOR, HOST, PINNED, REDUCE, UNKNOWN, Placement, Reduction, ResourcePlan, place,
                        plan_resources)
from .render import plan_to_dict, render_plan
from .shape import ModelShape, load_config, model_shape
from .timing import TimeEstimate, estimate_time

__all__ = ["RunSizes", "typical_eval_windows", "ACCELERATOR", "HOST", "PINNED", "REDUCE", "UNKNOWN", "Placement",
           "Reduction", "ResourcePlan", "place", "plan_resources", "plan_to_dict", "render_plan", "ModelShape",
           "load_config", "model_shape", "TimeEstimate", "estimate_time"]
