"""The one column vocabulary of eamvit's results rows (torch-free): every row starts with :data:`HEAD`,
then names only columns of :data:`COLUMNS`, blank where a setting does not apply."""
from __future__ import annotations

# timm validate.py's fields, then the rest of the data config the images were built with.
HEAD = ("model", "top1", "top1_err", "top5", "top5_err", "num_images", "skipped_images", "param_count",
        "img_size", "crop_pct", "interpolation", "crop_mode", "mean", "std", "data_config_source", "weights")

COLUMNS: dict[str, str] = {
    # -- every row
    "model": "model name (timm name or the checkpoint's)",
    "top1": "top-1 accuracy (%), the mean over seeds",
    "top1_err": "100 − top1",
    "top5": "top-5 accuracy (%), the mean over seeds",
    "top5_err": "100 − top5",
    "num_images": "images scored (per seed)",
    "skipped_images": "unreadable images skipped",
    "param_count": "parameters, millions",
    "img_size": "input side (px)",
    "crop_pct": "centre-crop fraction of the preprocessing",
    "interpolation": "resize interpolation (blank where nothing is resized)",
    "crop_mode": "crop mode of the preprocessing",
    "mean": "normalisation mean per channel, comma-joined",
    "std": "normalisation std per channel, comma-joined",
    "data_config_source": "where the preprocessing came from: checkpoint, timm, digits, overrides, maps, ...",
    "weights": "the checkpoint or pretrained weights loaded",
    "top1_std": "population standard deviation of top1 over seeds (0 for one seed)",
    "top5_std": "population standard deviation of top5 over seeds",
    "seeds": "evaluations averaged",
    "calib_excluded": "calibration images left out of the scored split",
    # -- what was applied (blank where a step does not apply)
    "label": "a free description of the row: the sweep's label, the export table's configuration",
    "method": "display name of a row in a presentation table (Table 1), never a setting",
    "quant": "quantization method: fp (the full-precision baseline), repq, adfq or pmq",
    "bits": "quantization bits as W/A or W/A/P (PMQ), e.g. 4/4, 8/8/4(MP); 32/32 in full precision",
    "w_bits": "weight bits",
    "a_bits": "activation bits",
    "state": "the compressed-model file (--state) the model was rebuilt from",
    "tau": "freezing sparsity τ (fraction of attention entries, rows or heads frozen)",
    "selection": "freezing selection: entropy (lowest-entropy units) or random",
    "scope": "freezing scope: head, layer or global",
    "granularity": "freezing unit: entry, row or head",
    "maps": "which model the entropy maps were computed on: fp or quant",
    "value_bits": "bits of the frozen attention values (32: fp32)",
    "frozen": "the frozen-maps file (--frozen) loaded",
    "prune": "token-pruning method: shannon, renyi, evit or random",
    "alpha": "Rényi order of the token-entropy score: --prune renyi's or --merge entropy's (inf for min-entropy; "
             "blank for Shannon); one per pruning block comma-joined where they differ",
    "keep_rate": "token-pruning keep rate κ; one per pruning block comma-joined where they differ (as --keep-rate "
                 "takes them)",
    "tokens": "patch tokens entering the first pruning or merging block, then leaving each (EViT's fused token "
              "included), dash-joined",
    "blocks": "pruning or merging blocks, dash-joined (0-based)",
    "placement": "where the pruning step sits in its block",
    "fuse": "whether pruned tokens are fused into one",
    "merge": "token-merging selection: tome (ToMe's bipartite soft matching) or entropy (entropy-guided merging)",
    "merge_r": "patch tokens each merging block merges (after ToMe's cap): one number where every block merges "
               "as many, else dash-joined per block",
    "prop_attn": "whether merged tokens' sizes weigh the attention (ToMe's proportional attention)",
    "matched_keep_rate": "a sweep's merging rows: the pruning keep rate κ whose executed GMACs merge_r was chosen "
                         "to match",
    "onnx": "the exported file evaluated (ONNX, or an OpenVINO .xml)",
    "export": "export scheme of the file: fp32, qdq or weight-only (eamvit), nncf (NNCF's int8 OpenVINO model)",
    "target": "deployment target the quantizers were calibrated for: qdq (+ sym. act., softmax fp32), openvino, weight-only or torch",
    "runtime": "what ran the model: PyTorch, ONNX Runtime or OpenVINO",
    # -- what was measured
    "frozen_fraction": "fraction of attention entries frozen",
    "frozen_window_masked": "frozen entries that Swin's window mask hides anyway",
    "frozen_layers": "attention layers with frozen maps",
    "unfrozen_layers": "frozen layers undone because pruning or merging changes their token count",
    "gmacs": "executed multiply-accumulates per image, billions (the cost model)",
    "gmacs_skippable": "of them, MACs a sparse kernel could skip, billions",
    "predicted_speedup": "unmodified MACs / executed MACs (the cost model)",
    "speedup": "measured speed-up over the unmodified model: median of per-repetition time ratios",
    "speedup_p25": "25th percentile of those ratios",
    "speedup_p75": "75th percentile of those ratios",
    "images_per_s": "measured throughput, images per second (median)",
    "images_per_s_p25": "25th percentile of images per second",
    "images_per_s_p75": "75th percentile of images per second",
    "reference_images_per_s": "the unmodified reference's images per second, timed in the same repetitions",
    "model_bytes": "bytes to store the model at its bit widths (eamvit.experiments.size.model_size)",
    "weight_bytes": "of them, the quantized weights packed at their bits",
    "fp32_param_bytes": "of them, every other parameter at 32 bits",
    "quant_param_bytes": "of them, quantizer scales and zero points at 32 bits",
    "frozen_map_bytes": "bytes of the frozen maps: one mask bit per entry plus the values at value_bits",
    "total_bytes": "model_bytes + frozen_map_bytes",
    "attention_entries": "attention entries per image",
    "entries_skipped": "frozen attention entries per image",
    "qk_macs_skipped": "q·k multiply-adds per image the frozen entries save",
    "pmq_weight_mb": "PMQ's chosen allocation: its quantized weights at their bits, MB (10^6 bytes), "
                     "the quantity --pmq-budget-mb bounds",
    "file_bytes": "bytes of the file that holds the model",
    "calib_seconds": "seconds of quantization calibration",
    "top1_delta": "top1 − the full-precision row's top1",
    "top1_finetuned": "top-1 (%) after fine-tuning",
    "epochs": "fine-tuning epochs",
    "finetune_epochs": "optimize's fine-tuned points (`+ft`): the epochs their weights were fine-tuned for, with "
                       "their token reduction applied; empty for a post-training point",
    "lr": "fine-tuning peak learning rate",
    "seconds": "wall-clock seconds of the row's work",
    # -- eamvit optimize
    "stage": "optimize: reference (the unmodified model), single (one technique) or stack (several)",
    "within_budget": "optimize: top-1 within --max-drop of the reference",
    "on_front": "optimize: on the Pareto front of top-1 against measured speed-up",
    "chosen": "optimize: the fastest point within the budget (best.safetensors, best.onnx); per-block pruning "
              "sweep: the configuration the search chose",
    # -- per-block pruning sweep (sweep --prune --per-block)
    "search_step": "per-block pruning sweep: the search step that scored the row (0: the start)",
    "search_phase": "per-block pruning sweep: start (κ = 1), descend (one block's κ one grid step down), order "
                    "(one block's Rényi order), uniform (the budget's config), final (on the evaluation images)",
    "scored_on": "per-block pruning sweep: the images top-1 was measured on: calibration (the search) or "
                 "evaluation",
    "top1_torch": "optimize: top-1 of the chosen best.safetensors in PyTorch (`eval --state`)",
    "error": "optimize: why a point could not be built or exported (never chosen)",
}
