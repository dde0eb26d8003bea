"""topopack: fast, exact Sparse Topo-Pack Attention for whole-slide images."""
from .attention import TopoPackAttention, topo_pack_attention
from .layout import LayoutError, TopoLayout
from .rules import BIDIRECTIONAL, PAPER, RULES_BY_NAME, TopoRules

__all__ = ["BIDIRECTIONAL", "PAPER", "RULES_BY_NAME", "LayoutError", "TopoLayout", "TopoPackAttention",
           "TopoRules", "topo_pack_attention"]
__version__ = "0.1.0"
