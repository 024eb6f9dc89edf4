"""The guidance methods, one file each; importing this package registers them all."""

from .ag import AdaptiveGuidance
from .apg import APG
from .apg_mix import APGMix
from .autoguidance import AutoGuidance
from .cfg import CFG
from .cfg_norm import CFGNorm
from .cfg_renorm import CFGRenorm
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .dual_cfg import DualCFG
from .dynamic_thresholding import DynamicThresholding
from .fdg import FDG
from .fresca import FreSca
from .linear_ag import LinearAG
from .mambo_g import MAMBOG
from .nag import NAG
from .perp_neg import PerpNeg
from .rectified_cfgpp import RectifiedCFGPlusPlus
from .renorm_cfg import RenormCFG
from .swg import SWG
from .tcfg import TCFG
from .tpg import TPG
from .tsg import TSG
from .fkc import FKC
from .gfcg import GFCG
from .icg import ICG
from .pag import PAG
from .sag import SAG
from .seg import SEG
from .slg import SLG

__all__ = ["AdaptiveGuidance", "APG", "APGMix", "AutoGuidance", "CFG", "CFGNorm", "CFGPlusPlus", "CFGRenorm", "CFGZeroStar", "DualCFG",
           "DynamicThresholding", "FDG", "FKC", "FreSca", "GFCG", "ICG", "LinearAG",
           "MAMBOG", "NAG", "PAG", "PerpNeg", "RectifiedCFGPlusPlus", "RenormCFG", "SAG", "SEG", "SLG", "SWG", "TCFG",
           "TPG", "TSG"]
