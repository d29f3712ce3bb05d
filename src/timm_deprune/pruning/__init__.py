"""The pruning engine: from a dense timm model to a DEPrune-pruned one and the plan that reproduces it.

- :mod:`.groups`: which channels belong together (a block's internal channels and every module carrying them).
- :mod:`.importance`: per-tap (depth-wise) and per-filter (point-wise) scores.
- :mod:`.select`: DCP / BWT / HSR tap selection and point-wise filter selection.
- :mod:`.surgery`: removing channels from every module that carries them; folding dead channels.
- :mod:`.plan`: :class:`PrunePlan`, every decision, and :func:`apply_plan`.
- :mod:`.obs`: Hessians, OBS tap selection and least-squares refits from calibration statistics.
- :mod:`.calibrator`: runs the pruned network and its dense twin layer by layer on calibration data.
- :mod:`.prune`: :func:`prune`, the whole pass; :mod:`.report`: what it changed (MACs, parameters, per layer).
"""
from .plan import PrunePlan, apply_plan
from .prune import PruneResult, UnsupportedModelError, prune
from .report import PruneReport

__all__ = ["prune", "PruneResult", "UnsupportedModelError", "PrunePlan", "apply_plan", "PruneReport"]
