"""The planner: picks and places DP x TP x PP for a farm (see docs/planner.md).

``make_plan`` returns the fastest layout that fits memory, ``search`` the best few, ``replan`` the
best layout on the nodes that survive a failure with the same global batch.
"""

from farm.plan.costmodel import CostParams
from farm.plan.layout import Plan, RankPlacement
from farm.plan.replan import replan
from farm.plan.search import make_plan, search

__all__ = ["CostParams", "Plan", "RankPlacement", "make_plan", "replan", "search"]
