"""The segmenter registry: every name builds, trains a step and predicts; errors for people."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from wsseg.config import load_config
from wsseg.errors import UserError
from wsseg.models.backbones import ResNet
from wsseg.models.segmenters import SEGMENTERS, build_segmenter, model_options, option_types
from wsseg.stages.train_segmenter import build_network

NUM_CLASSES = 4
DOCS = Path(__file__).resolve().parents[3] / "docs" / "models"
# The FCN family shares one page; every other model has docs/models/<name>.md.
FAMILY_PAGES = {"fcn32s": "fcn.md", "fcn16s": "fcn.md", "fcn8s": "fcn.md", "fcn-d8": "fcn.md"}
# Models with an encoder of their own instead of a ResNet `backbone` (train-segmenter refuses ResNet
# weights for them: tests/models/segmenters/test_lednet.py, test_dfanet.py).
OWN_ENCODERS = {"lednet", "dfanet"}


def test_registry_names():
    assert list(SEGMENTERS) == ["fcn32s", "fcn16s", "fcn8s", "fcn-d8", "deeplab-v1", "deeplab-v2",
                                "deeplab-v3", "deeplab-v3plus", "pspnet", "encnet", "mcibi", "refinenet",
                                "dilated-context", "danet", "fastfcn", "bisenet", "lednet", "acnet", "dfanet",
                                "dupsampling", "maxdeeplab"]


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_every_model_builds_trains_and_predicts(name):
    torch.manual_seed(0)
    model = build_segmenter(name, NUM_CLASSES, depth=18, width=0.25)
    assert isinstance(model, SEGMENTERS[name])
    assert isinstance(model.backbone, ResNet) == (name not in OWN_ENCODERS)
    # One training step through the contract (an RGB-D model's input has a fourth channel: depth).
    images = torch.randn(2, model.input_channels, 48, 40)
    labels = torch.randint(0, NUM_CLASSES, (2, 48, 40))
    labels[:, :4] = 255
    outputs = model(images)
    assert outputs["out"].shape[:2] == (2, NUM_CLASSES)
    terms = model.loss(outputs, labels)
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    backbone, heads = model.param_groups()
    assert backbone and heads
    assert len({id(p) for p in backbone + heads}) == len(backbone) + len(heads)
    assert {id(p) for p in backbone + heads} == {id(p) for p in model.parameters() if p.requires_grad}
    if hasattr(model, "after_step"):
        with torch.no_grad():
            model.after_step(outputs, labels, step=0, max_steps=10)
    # Eval: logits at the (odd) input size, deterministic.
    model.eval()
    x = torch.randn(1, model.input_channels, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", sorted(OWN_ENCODERS))
def test_own_encoder_ignores_the_resnet_depth_and_refuses_resnet_weights(name):
    """A model with its own encoder: segmenter.depth changes nothing (same parameters, same outputs),
    and train-segmenter, which loads segmenter.weights into model.backbone, refuses anything but null
    with one line naming the key, before any download."""
    torch.manual_seed(0)
    model = build_segmenter(name, NUM_CLASSES, depth=18, width=0.25).eval()
    other = build_segmenter(name, NUM_CLASSES, depth=101, width=0.25).eval()
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, model.input_channels, 65, 49)
    with torch.no_grad():
        torch.testing.assert_close(other.predict(x), model.predict(x))
    config = load_config(["pipelines/demo.yaml"], [f"segmenter.model={name}", "segmenter.weights=imagenet"])
    with pytest.raises(UserError) as error:
        build_network(config)
    message = str(error.value)
    assert message.startswith(f"segmenter.weights: {name} has its own encoder, not a ResNet")
    assert "segmenter.weights: null" in message and "\n" not in message
    assert isinstance(build_network(load_config(["pipelines/demo.yaml"], [f"segmenter.model={name}"])), SEGMENTERS[name])


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_every_model_has_a_doc_page(name):
    page = DOCS / FAMILY_PAGES.get(name, f"{name}.md")
    assert page.is_file(), page
    assert "## Measured on the demo data" in page.read_text(encoding="utf-8")


def test_unknown_name_names_the_key_the_closest_match_and_the_choices():
    with pytest.raises(UserError) as error:
        build_segmenter("deeplabv3plus", NUM_CLASSES)
    message = str(error.value)
    assert message.startswith("segmenter.model: unknown model 'deeplabv3plus'")
    assert "did you mean 'deeplab-v3plus'?" in message
    assert all(name in message for name in SEGMENTERS)
    assert "\n" not in message
    with pytest.raises(UserError, match="unknown model 'unet'"):
        build_segmenter("unet", NUM_CLASSES)


def test_unknown_option_names_the_key_and_the_options():
    with pytest.raises(UserError) as error:
        build_segmenter("fcn8s", NUM_CLASSES, depth=18, width=0.25, options={"msc": True})
    message = str(error.value)
    assert message.startswith("segmenter.options.fcn8s: model 'fcn8s' has no option 'msc'")
    assert "its options are output_stride, aux" in message
    model = build_segmenter("deeplab-v2", NUM_CLASSES, depth=18, width=0.25, options={"msc": True})
    assert model.msc


def test_options_are_typed_by_the_constructor_and_impossible_values_name_the_key():
    with pytest.raises(UserError, match=r"segmenter.options.pspnet.bins: 'x' is not an integer"):
        build_segmenter("pspnet", NUM_CLASSES, depth=18, width=0.25, options={"bins": [1, "x"]})
    with pytest.raises(UserError, match=r"segmenter.options.deeplab-v2.depth: set it with segmenter.depth"):
        build_segmenter("deeplab-v2", NUM_CLASSES, options={"depth": 18})
    with pytest.raises(UserError, match=r"^segmenter.options.maxdeeplab: .*output_stride must be 8 or 16"):
        build_segmenter("maxdeeplab", NUM_CLASSES, depth=18, width=0.25, options={"output_stride": 32})
    model = build_segmenter("pspnet", NUM_CLASSES, depth=18, width=0.25, options={"bins": [1, 2]})
    assert len(model.pyramid.branches) == 2


def test_a_models_options_may_set_its_own_width():
    """segmenter.width shrinks every model; `width` in one model's options replaces it for that model
    (a model with its own light encoder at its paper's width beside ResNets at a quarter)."""
    def parameters(model):
        return sum(p.numel() for p in model.parameters())

    shared = build_segmenter("lednet", NUM_CLASSES, depth=18, width=0.25)
    own = build_segmenter("lednet", NUM_CLASSES, depth=18, width=0.25, options={"width": 1.0})
    assert parameters(own) == parameters(build_segmenter("lednet", NUM_CLASSES, depth=18, width=1.0)) > 4 * parameters(shared)
    with pytest.raises(UserError, match=r"segmenter.options.lednet.width: must be a positive"):
        build_segmenter("lednet", NUM_CLASSES, options={"width": 0})
    with pytest.raises(UserError, match=r"segmenter.options.lednet.width: 'wide' is not a number"):
        build_segmenter("lednet", NUM_CLASSES, options={"width": "wide"})


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_every_option_is_keyword_only_and_its_default_passes_its_own_check(name):
    """What `segmenter.options.<name>` may hold is read from the constructor: every option must be
    keyword-only (so the registry sees it) and its default must pass the same type check a user's
    value does (so the annotations say what the model really takes)."""
    parameters = list(inspect.signature(SEGMENTERS[name]).parameters.values())
    assert parameters[0].name == "num_classes"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])
    defaults = {key: default for key, (_, default) in option_types(name).items()}
    assert model_options(name, defaults) == {k: (tuple(v) if isinstance(v, list) else v) for k, v in defaults.items()}
