"""``python -m kdwrap demo`` and the offline datasets behind it; kdwrap's core never imports this package.

``kdwrap.demo.run``: the demo (``run_demo``) (plain, ONE and OSAKD over several seeds, the table and the curves).
``kdwrap.demo.data``: offline datasets as in-memory tensors (the shipped CIFAR-10 JPEG pack, Fashion-MNIST's idx
files, scikit-learn's digits) and tensor helpers for training on the device, used by the demo, the examples and
the benchmarks.
"""
# Nothing is imported here: the examples and benchmarks that only need kdwrap.demo.data do not load the demo.
