"""Architecture knowledge: the family table and what it says about one checkpoint."""

from surgery.arch.model import MoEModel, TensorRole, find_spec
from surgery.arch.table import BY_ARCHITECTURE, TABLE, ArchSpec, Routing

__all__ = ["MoEModel", "TensorRole", "find_spec", "BY_ARCHITECTURE", "TABLE", "ArchSpec", "Routing"]
