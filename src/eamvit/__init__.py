"""eamvit: read the information in a Vision Transformer's attention, and make the model cheaper with it."""
from .attention import instrument
from .calibrate import EntropyMaps, compute_entropy_maps
from .errors import EamError
from .freeze import FreezeConfig, FreezeReport, freeze_, unfreeze_
from .models import create_model, data_config

__version__ = "0.1.0"
__all__ = ["instrument", "create_model", "data_config", "compute_entropy_maps", "EntropyMaps",
           "FreezeConfig", "FreezeReport", "freeze_", "unfreeze_", "EamError"]
