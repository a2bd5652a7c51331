"""The HiAP library (layer 1): gates, gated timm ViT, architecture spec, exact cost, losses, budget
control, extraction, the pruned model, export, fair timing, `optimize_for_inference`, baselines and
`Pruner`. It imports nothing from the study layer (`hiap_core.train`, `hiap_core.measure`,
`hiap_core.report`); a test keeps it so. The public names are re-exported by `hiap_core` itself."""
