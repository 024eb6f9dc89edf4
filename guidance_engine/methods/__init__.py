"""The guidance methods, one file each; importing this package registers them all."""

from .apg import APG
from .cfg import CFG
from .cfgpp import CFGPlusPlus

__all__ = ["APG", "CFG", "CFGPlusPlus"]
