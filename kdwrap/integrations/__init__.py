"""Adapters between kdwrap and training loops of other libraries.

Each submodule imports its library when it is itself imported, never from ``import kdwrap``, so kdwrap keeps
depending on torch, torchvision and timm only:

- ``kdwrap.integrations.hf``: :class:`KDTrainer`, a Hugging Face ``Trainer`` that trains with a kdwrap loss
  (``pip install kdwrap[hf]``).
- ``kdwrap.integrations.lightning``: :class:`ExportAtFitEnd`, a PyTorch Lightning callback that exports the
  deployable model when ``fit`` ends (``pip install kdwrap[lightning]``).
- ``kdwrap.integrations.timm``: :class:`KDTask`, a task of timm's task API (``timm.task``, what timm's train.py
  drives) that trains any kdwrap method; timm >= 1.0.27, no extra.
- ``kdwrap.integrations.timm_train``: what ``examples/timm_train_py.patch`` adds to timm's own train.py (the
  ``--kdwrap`` flags, their checks, the task, the logs).

Accelerate needs no adapter: ``accelerator.prepare`` takes the kdwrap model as it takes any model (see
docs/integrations.md).
"""
