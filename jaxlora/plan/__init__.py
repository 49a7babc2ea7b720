"""`jaxlora plan`: ahead-of-time compilation of what `jaxlora train` runs, for a TPU topology, without the chips."""

from jaxlora.plan.planner import *  # noqa: F401,F403
from jaxlora.plan.planner import GiB, LIBTPU_PIP, PlanError, add_plan_arguments, plan, resolve_target, \
    run_plan_command, table  # noqa: F401
