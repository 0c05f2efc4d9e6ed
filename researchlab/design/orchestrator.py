"""The Loop under the name the API reference gives it: `researchlab.design.orchestrator`.

The Loop is written in `nbs/09_loop.ipynb` and exported to `researchlab.design.loop`; this module
re-exports the same objects (not copies), so `orchestrator.Loop is loop.Loop`. It is written by hand;
nbdev leaves it alone.
"""

from researchlab.design.loop import Callback, ClockAccessor, Loop

__all__ = ["Callback", "ClockAccessor", "Loop"]
