"""eamvit: read the information in a Vision Transformer's attention, and make the model cheaper with it.

``import eamvit`` is light: the public names below are imported on first use (PEP 562), so neither
torch nor timm nor the quantization code is loaded until a name that needs them is touched.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

# module -> the public names it defines
_API = {name: module for module, names in {
    "eamvit.errors": ("EamError",),
    "eamvit.modules.attention": ("instrument", "observe"),
    "eamvit.methods.models": ("create_model", "data_config", "save_checkpoint", "BUNDLED_MODEL"),
    "eamvit.methods.data": ("build_dataset", "build_splits"),
    "eamvit.methods.calibrate": ("compute_entropy_maps", "EntropyMaps", "CalibOptions"),
    "eamvit.methods.freeze": ("FreezeConfig", "FreezeReport", "freeze_", "unfreeze_", "save_frozen", "load_frozen"),
    "eamvit.methods.evaluate": ("evaluate",),
    "eamvit.methods.cost": ("cost_account", "count_gflops"),
    "eamvit.methods.prune": ("PruneConfig", "prune_", "unprune_"),
    "eamvit.methods.merge": ("MergeConfig", "merge_", "unmerge_"),
    "eamvit.methods.quantize": ("quantize_", "save_quantized", "load_quantized"),
    "eamvit.methods.recipe": ("Recipe", "apply_", "save_compressed", "load"),
    "eamvit.methods.train": ("TrainConfig", "train"),
    "eamvit.methods.finetune": ("FinetuneConfig", "finetune"),
    "eamvit.methods.repq": ("RepQConfig",),
    "eamvit.methods.adfq": ("ADFQConfig",),
    "eamvit.methods.pmq": ("PMQConfig",),
    "eamvit.methods.export": ("ExportConfig", "export_onnx", "prepare_export_"),
    "eamvit.methods.export_runtime": ("OnnxClassifier",),
    "eamvit.experiments.runner": ("run_sweep", "Point", "Applied", "EvalData", "Timing", "measure_throughput"),
    "eamvit.experiments.freeze_sweep": ("freeze_sweep",),
    "eamvit.experiments.results": ("ResultRow", "Column", "write_table"),
    "eamvit.experiments.size": ("model_size",),
}.items() for name in names}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'eamvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
