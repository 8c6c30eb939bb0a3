"""``python -m kdwrap demo`` and ``python -m kdwrap compare``, and the offline datasets behind them; kdwrap's core
never imports this package. One idea per module:

``data``: offline datasets as in-memory tensors (the shipped CIFAR-10 JPEG pack, Fashion-MNIST's idx files,
scikit-learn's digits), used by the demo, the examples and the benchmarks. ``tensors``: the tensor helpers (uint8 to
float, normalisation, mini-batches). ``image_folder``: the user's images in ImageFolder layout. ``sources``:
``--data`` resolved and loaded. ``networks``: ``--model`` as a timm, torchvision or user-defined network.
``recipes``: plain, the free controls and kdwrap's methods as one table. ``training``: one (recipe, seed) training.
``job_pool``: the trainings in parallel processes. ``run_store``: ``--out`` as the record a comparison resumes from.
``seed_statistics``: mean ± std and paired differences over seeds. ``comparison_report``: compare's table, JSON,
Markdown and curves. ``compare``: ``kdwrap compare``. ``run``: ``kdwrap demo`` and its table.
"""
# Nothing is imported here: the examples and benchmarks that only need kdwrap.demo.data do not load the demo.
