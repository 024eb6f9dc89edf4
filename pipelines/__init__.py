"""Diffusers pipelines onto the sampler core, the default model and the CLI."""

from .common import GuidedPipelineOutput, UNetBranches
from .stable_diffusion import GuidedStableDiffusionPipeline
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline

__all__ = ["GuidedPipelineOutput", "GuidedStableDiffusionPipeline", "GuidedStableDiffusionXLPipeline",
           "UNetBranches"]
