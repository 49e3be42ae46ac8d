"""Run a plan in this process, without the service or a store: what scripts and benchmarks use.

    from twinioc.studies.runner import PlanRunner
    runner = PlanRunner("mls")
    analysis = runner.run("orm", {"steerers": ["HS1P2K1RP"]})
"""

from __future__ import annotations

from bluesky import RunEngine

from .analysis import Analysis
from .context import Envelope, Instruments, PlanContext, Restorer, serves_seed
from .machine import MachineLayout
from .plans import check_names, plan_of
from .requests import parse


class PlanRunner:
    """A RunEngine and one machine's instruments; ``run`` checks a request like the service and runs it."""

    def __init__(self, machine: str, prefix: str | None = None, allow_machine: bool = False):
        self.layout = MachineLayout.load(machine, prefix)
        self.engine = RunEngine(context_managers=[])
        self.is_twin = serves_seed(self.layout, self.engine.loop)
        if not (self.is_twin or allow_machine):
            raise RuntimeError(f"the target does not serve {self.layout.seed_pv}: not a twin (allow_machine=False)")
        self.instruments = Instruments(self.layout, self.is_twin)

    def run(self, kind: str, params: dict | None = None, measured: dict | None = None) -> Analysis:
        """Run one measurement (*measured*: an ORM result, for an orbit correction) and return its analysis."""
        kind, params = parse({"kind": kind} | (params or {}))
        check_names(self.layout, kind, params)
        ctx = PlanContext(self.instruments, Restorer(None if self.is_twin else Envelope.of(self.layout)))
        produced = {}

        def plan():
            produced["analysis"] = yield from plan_of(kind, ctx, params, measured)

        self.engine(plan())
        return produced["analysis"]
