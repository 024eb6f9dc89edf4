"""guidance-engine: diffusion guidance methods as pluggable hooks of one sampler core.

The methods (CFG, CFG++, APG, ...) live here; the sampler core is ``guidance_engine.samplers``,
the diffusers pipelines and the CLI ``guidance_engine.pipelines``.
"""

from .guidance import Guidance, GuidedPrediction, StepInfo
from .methods import APG, CFG, AdaptiveGuidance, CFGPlusPlus, LinearAG
from .prediction import Prediction
from .registry import method_class, method_names, register, resolve_guidance

__version__ = "0.1.0"

__all__ = [
    "APG", "AdaptiveGuidance", "CFG", "CFGPlusPlus", "Guidance", "GuidedPrediction", "LinearAG", "Prediction", "StepInfo",
    "method_class", "method_names", "register", "resolve_guidance", "__version__",
]
