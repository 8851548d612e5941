"""eamvit: read the information in a Vision Transformer's attention, and make the model cheaper with it.

``import eamvit`` is light: the public names below are imported on first use (PEP 562), so neither
torch nor timm nor the quantization code is loaded until a name that needs them is touched.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

# public name -> module that defines it
_API = {
    "EamError": "eamvit.errors",
    "instrument": "eamvit.modules.attention",
    "observe": "eamvit.modules.attention",
    "create_model": "eamvit.methods.models",
    "data_config": "eamvit.methods.models",
    "save_checkpoint": "eamvit.methods.models",
    "BUNDLED_MODEL": "eamvit.methods.models",
    "build_dataset": "eamvit.methods.data",
    "build_splits": "eamvit.methods.data",
    "compute_entropy_maps": "eamvit.methods.calibrate",
    "EntropyMaps": "eamvit.methods.calibrate",
    "CalibOptions": "eamvit.methods.calibrate",
    "FreezeConfig": "eamvit.methods.freeze",
    "FreezeReport": "eamvit.methods.freeze",
    "freeze_": "eamvit.methods.freeze",
    "unfreeze_": "eamvit.methods.freeze",
    "save_frozen": "eamvit.methods.freeze",
    "load_frozen": "eamvit.methods.freeze",
    "evaluate": "eamvit.methods.evaluate",
    "cost_account": "eamvit.methods.cost",
    "count_gflops": "eamvit.methods.cost",
    "PruneConfig": "eamvit.methods.prune",
    "prune_": "eamvit.methods.prune",
    "unprune_": "eamvit.methods.prune",
    "MergeConfig": "eamvit.methods.merge",
    "merge_": "eamvit.methods.merge",
    "unmerge_": "eamvit.methods.merge",
    "quantize_": "eamvit.methods.quantize",
    "save_quantized": "eamvit.methods.quantize",
    "load_quantized": "eamvit.methods.quantize",
    "Recipe": "eamvit.methods.recipe",
    "apply_": "eamvit.methods.recipe",
    "save_compressed": "eamvit.methods.recipe",
    "load": "eamvit.methods.recipe",
    "TrainConfig": "eamvit.methods.train",
    "train": "eamvit.methods.train",
    "FinetuneConfig": "eamvit.methods.finetune",
    "finetune": "eamvit.methods.finetune",
    "RepQConfig": "eamvit.methods.repq",
    "ADFQConfig": "eamvit.methods.adfq",
    "PMQConfig": "eamvit.methods.pmq",
    "ExportConfig": "eamvit.methods.export",
    "export_onnx": "eamvit.methods.export",
    "prepare_export_": "eamvit.methods.export",
    "OnnxClassifier": "eamvit.methods.export_runtime",
    "run_sweep": "eamvit.experiments.runner",
    "Point": "eamvit.experiments.runner",
    "Applied": "eamvit.experiments.runner",
    "EvalData": "eamvit.experiments.runner",
    "Timing": "eamvit.experiments.runner",
    "measure_throughput": "eamvit.experiments.runner",
    "freeze_sweep": "eamvit.experiments.freeze_sweep",
    "ResultRow": "eamvit.experiments.results",
    "Column": "eamvit.experiments.results",
    "write_table": "eamvit.experiments.results",
    "model_size": "eamvit.experiments.size",
}

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
