"""The distillation methods, one module each."""
