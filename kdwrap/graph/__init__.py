"""Reading and cutting a model: kdwrap's internals for the methods that change a network's layout (ONE, OKDDip,
PCL, BYOT). Not part of kdwrap's public surface; its names may change between versions.

Modules, each importing only those above it:

* :mod:`.inputs`: the input size a model declares, a random example input, the mode of a trial forward.
* :mod:`.concrete_tracer`: tracing with values, for models plain torch.fx cannot trace.
* :mod:`.tracing`: a model traced into an fx graph whose nodes know their module.
* :mod:`.cut`: cutting a traced graph at a module into trunk and tail, the pieces that hold them, parameter use.
* :mod:`.outputs`: the logits among a graph's outputs, and values read besides them (classifier input, stage ends).
* :mod:`.channels`: the channel count and axis of the values crossing a cut.
* :mod:`.stages`: the one rule that finds a model's stages: the default split and BYOT's exits.
* :mod:`.split`: the split itself, :func:`split_model`.
* :mod:`.cost`: forward FLOPs.
* :mod:`.split_summary`: the cuts near a split (read from its :class:`SplitRecord`) and their FLOP shares, for
  ``summary()``.
"""
from .split_summary import Candidate, candidates, describe_split, flop_input_size, not_measured_line
from .channels import producer_channels, run_trunk
from .cost import forward_flops
from .cut import Piece, check_split_name
from .inputs import example_input, trial_mode
from .outputs import (
    classifier_input, classifier_name, found_classifier, graph_with_outputs, select_output, stage_end, stage_input,
    with_classifier_input,
)
from .split import SplitRecord, SplitResult, split_model
from .stages import SplitChoice, auto_split, stage_starts
from .tracing import trace

# What the methods use (and the documented internals: auto_split, SplitChoice, candidates, Candidate).
__all__ = [
    "split_model", "SplitRecord", "SplitResult", "auto_split", "SplitChoice", "stage_starts",
    "candidates", "Candidate", "describe_split", "flop_input_size", "not_measured_line",
    "trace", "select_output", "check_split_name", "Piece",
    "classifier_name", "found_classifier", "classifier_input", "graph_with_outputs", "with_classifier_input",
    "stage_input", "stage_end",
    "example_input", "trial_mode", "producer_channels", "run_trunk", "forward_flops",
]
