"""kdwrap.graph.outputs: finding the logits among what a traced model returns (tensor, tuple, dict, namedtuple; the
clear errors otherwise), the network's classifier and its input, and reading values at stage boundaries as extra
outputs of the graph, each checked against the same values computed by hand from the model's own modules."""
import collections

import pytest
import torch
from torch import fx, nn

from conftest import ConvHeadNet, DictTinyNet, TinyNet
from kdwrap.errors import SplitError
from kdwrap.graph.outputs import (
    classifier_input, classifier_name, found_classifier, graph_with_outputs, select_output, stage_end, stage_input,
)
from kdwrap.graph.outputs import with_classifier_input
from kdwrap.graph.split import split_model
from kdwrap.graph.tracing import trace


def features(net: TinyNet, x: torch.Tensor) -> torch.Tensor:
    """TinyNet's pooled feature vector, by hand."""
    return net.pool(net.stage2(net.stage1(net.stem(x)))).flatten(1)


class TupleNet(TinyNet):
    def forward(self, x):
        f = features(self, x)
        return f, self.fc(f)


Out = collections.namedtuple("Out", "logits feats")


class NamedTupleNet(TinyNet):
    def forward(self, x):
        f = features(self, x)
        return Out(self.fc(f), f)


class AuxNet(TinyNet):
    """An auxiliary head on stage1 besides the main logits (GoogLeNet/Inception style)."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stage1(self.stem(x))
        return self.fc(self.pool(self.stage2(h)).flatten(1)), self.aux(h.mean((2, 3)))


class TwiceFc(TinyNet):
    def forward(self, x):
        return self.fc(features(self, x)) + self.fc(features(self, x))


class NormAfterFc(TinyNet):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.norm(self.fc(features(self, x)))


def run(net: nn.Module, graph: fx.Graph, x: torch.Tensor):
    net.eval()
    with torch.no_grad():
        return fx.GraphModule(net, graph)(x)


@pytest.mark.parametrize("make, output, pick", [
    (TupleNet, 1, lambda out: out[1]),
    (DictTinyNet, "logits", lambda out: out["logits"]),
    (NamedTupleNet, "logits", lambda out: out.logits),
    (NamedTupleNet, 0, lambda out: out.logits),  # a namedtuple's field by index
])
def test_select_output_makes_the_graph_return_the_named_value(make, output, pick):
    net = make()
    traced = trace(net, training=False)
    select_output(traced, net, output, training=False)
    x = torch.randn(2, 3, 16, 16)
    got = run(net, traced.graph, x)
    with torch.no_grad():
        expected = pick(net(x))
    assert isinstance(got, torch.Tensor)
    assert torch.equal(got, expected)


def test_a_plain_tensor_output_needs_no_name():
    net = TinyNet()
    traced = trace(net, training=False)
    select_output(traced, net, None, training=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(run(net, traced.graph, x), net(x))


@pytest.mark.parametrize("make, match", [
    (TupleNet, r"TupleNet returns a tuple in eval mode.*valid: 0, 1\), e\.g\. kdwrap\.one\(net, output=0\)"),
    (DictTinyNet, r"returns a dict in eval mode.*valid: 'logits'\), e\.g\. kdwrap\.one\(net, output='logits'\)"),
    (NamedTupleNet, r"returns a namedtuple Out in eval mode.*valid: 0, 1, 'logits', 'feats'"),
])
def test_a_container_output_without_a_name_is_a_clear_error(make, match):
    net = make()
    traced = trace(net, training=False)
    with pytest.raises(SplitError, match=match):
        select_output(traced, net, None, training=False)


@pytest.mark.parametrize("make, output, valid", [(TupleNet, 5, "valid: 0, 1"), (DictTinyNet, "x", "valid: 'logits'")])
def test_a_name_that_is_not_an_output_is_a_clear_error(make, output, valid):
    net = make()
    traced = trace(net, training=True)
    with pytest.raises(SplitError, match=f"output={output!r} does not name a tensor .* training mode; {valid}"):
        select_output(traced, net, output, training=True)


@pytest.mark.parametrize("make, output, dropped", [(AuxNet, 0, "aux"), (TupleNet, 0, "fc")])
def test_dropping_an_output_computed_by_weights_is_refused(make, output, dropped):
    """An auxiliary head (or, naming the features, the classifier itself) would no longer be trained."""
    net = make()
    traced = trace(net, training=False)
    match = f"drops the other outputs of {make.__name__} .* the modules {dropped}, whose parameters"
    with pytest.raises(SplitError, match=match):
        select_output(traced, net, output, training=False)


def test_the_classifier_is_the_last_linear_and_its_input_the_feature_vector():
    net = TinyNet()
    traced = trace(net, training=False)
    assert classifier_name(net, [traced.graph], None, "okddip") == "fc"
    assert classifier_name(net, [traced.graph], "fc", "okddip") == "fc"
    assert found_classifier(net, [traced.graph]) == ("fc", "")
    node = classifier_input(traced.graph, "fc")
    x = torch.randn(3, 3, 16, 16)
    logits, feats = run(net, graph_with_outputs(traced.graph, [node]), x)
    with torch.no_grad():
        assert torch.equal(feats, features(net, x))  # by hand: what goes into fc
        assert torch.equal(logits, net(x))  # the graph's own output comes first, unchanged


@pytest.mark.parametrize("training", [True, False])
def test_a_tail_that_also_returns_its_classifier_input(training):
    net = TinyNet().train(training)
    tail = split_model(net, "stage2", input_size=(3, 16, 16)).tail
    piece = with_classifier_input(tail, "fc")
    assert piece.training is training
    assert piece.state_dict().keys() == tail.state_dict().keys()
    assert dict(piece.named_parameters())["fc.weight"] is net.fc.weight  # the same tensors, not copies
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        logits, feats = piece(h)
        by_hand = net.pool(net.stage2(h)).flatten(1)
        assert torch.allclose(feats, by_hand, atol=1e-6)
        assert torch.allclose(logits, net.fc(by_hand), atol=1e-6)


def test_no_classifier_to_find():
    net = ConvHeadNet()  # a 1x1 convolution makes the logits
    traced = trace(net, training=False)
    name, why = found_classifier(net, [traced.graph])
    assert name is None and "calls no nn.Linear" in why
    with pytest.raises(SplitError, match="classifier=<module"):
        classifier_name(net, [traced.graph], None, "okddip")


def test_a_classifier_called_twice_or_followed_by_weights_is_not_one():
    twice = TwiceFc()
    traced = trace(twice, training=False)
    name, why = found_classifier(twice, [traced.graph])
    assert name is None and "'fc' is called 2 times" in why
    with pytest.raises(SplitError, match="classifier='fc' is called 2 times"):
        classifier_name(twice, [traced.graph], None, "okddip")
    normed = NormAfterFc()
    name, why = found_classifier(normed, [trace(normed, training=False).graph])
    assert name is None and "followed by 'norm'" in why


def test_stage_input_and_stage_end_are_the_values_at_the_boundary():
    net = TinyNet()
    traced = trace(net, training=False)
    extra = [stage_input(traced, "stage2"), stage_end(traced, "stage1"), stage_end(traced, "stage2")]
    x = torch.randn(2, 3, 16, 16)
    logits, into_stage2, end1, end2 = run(net, graph_with_outputs(traced.graph, extra), x)
    with torch.no_grad():
        h1 = net.stage1(net.stem(x))
        assert torch.equal(into_stage2, h1)
        assert torch.equal(end1, h1)
        assert torch.equal(end2, net.stage2(h1))
        assert torch.equal(logits, net(x))
        assert torch.equal(run(net, traced.graph, x), logits)  # the original graph is left as it was
    with pytest.raises(SplitError, match="computes nothing"):
        stage_end(traced, "nonexistent")
