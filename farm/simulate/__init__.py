"""``farm.simulate``: a discrete-event simulation of a months-long run's goodput under published
failure rates, driving the controller's own failure-policy objects (docs/simulator.md)."""

from farm.simulate.config import RecoveryConfig, SimConfig, sim_config
from farm.simulate.study import Inputs, Study, simulate

__all__ = ["Inputs", "RecoveryConfig", "SimConfig", "Study", "sim_config", "simulate"]
