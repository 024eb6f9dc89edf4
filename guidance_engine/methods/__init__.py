"""The guidance methods, one file each; importing this package registers them all."""

from .ag import AdaptiveGuidance
from .apg import APG
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .linear_ag import LinearAG
from .tsg import TSG
from .fkc import FKC
from .icg import ICG

__all__ = ["AdaptiveGuidance", "APG", "CFG", "CFGPlusPlus", "CFGZeroStar", "FKC", "ICG", "LinearAG", "TSG"]
