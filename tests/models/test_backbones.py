"""ResNet backbones: stage shapes and strides, torchvision names, weight loading, freezing."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from wsseg.errors import UserError
from wsseg.models import backbones
from wsseg.models.backbones import ResNet, fold_batchnorm, load_weights, resnet

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run ~50x slower with 2 threads on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_shapes(depth: int) -> OrderedDict[str, tuple[int, ...]]:
    """Every key of torchvision's resnet{depth}() state dict with its shape, written
    from the published structure (not from wsseg's module)."""
    bottleneck = depth >= 50
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def conv(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)

    def bn(name, c):
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{field}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_c = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        out_c = planes * 4 if bottleneck else planes
        for unit in range(UNITS[depth][layer - 1]):
            p = f"layer{layer}.{unit}"
            if bottleneck:
                conv(f"{p}.conv1", planes, in_c, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", out_c, planes, 1)
                bn(f"{p}.bn3", out_c)
            else:
                conv(f"{p}.conv1", planes, in_c, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            # torchvision adds a projection where the stride or the channel count changes.
            if unit == 0 and (layer > 1 or in_c != out_c):
                conv(f"{p}.downsample.0", out_c, in_c, 1)
                bn(f"{p}.downsample.1", out_c)
            in_c = out_c
    shapes["fc.weight"] = (1000, in_c)
    shapes["fc.bias"] = (1000,)
    return shapes


def random_state(depth: int, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in torchvision_shapes(depth).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


def halve(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def reference_forward(state, x, depth, strides, dilations):
    """torchvision's ResNet v1.5 forward (eval BN) written with functional ops only."""
    def bn(t, name):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    outputs = {"stem": x}
    for layer in range(1, 5):
        d = dilations[layer - 1]
        for unit in range(UNITS[depth][layer - 1]):
            p = f"layer{layer}.{unit}"
            s = strides[layer - 1] if unit == 0 else 1
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            if depth >= 50:  # the stride sits in the 3x3 conv (v1.5)
                y = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
                y = F.relu(bn(F.conv2d(y, state[f"{p}.conv2.weight"], stride=s, padding=d, dilation=d), f"{p}.bn2"))
                y = bn(F.conv2d(y, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                y = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=s, padding=d, dilation=d), f"{p}.bn1"))
                y = bn(F.conv2d(y, state[f"{p}.conv2.weight"], padding=d, dilation=d), f"{p}.bn2")
            x = F.relu(y + shortcut)
        outputs[f"layer{layer}"] = x
    return outputs


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_stage_shapes_and_strides_on_odd_input(depth, output_stride):
    torch.manual_seed(0)
    model = resnet(depth, output_stride=output_stride, width=0.25).eval()  # channels: test_channels
    expected_strides = {"stem": 4, "layer1": 4, "layer2": 8,
                        "layer3": min(16, output_stride), "layer4": output_stride}
    assert model.strides_of == expected_strides
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 67, 53))
    assert list(outputs) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    for name, out in outputs.items():
        steps = int(math.log2(expected_strides[name]))
        assert out.shape == (2, model.channels[name], halve(67, steps), halve(53, steps)), name


def test_channels():
    expected = {
        18: {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
        50: {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    }
    for depth, channels in expected.items():
        with torch.device("meta"):  # structure only: skip the initialisation's cost
            model = ResNet(depth)
        assert model.channels == channels
        with torch.device("meta"):
            outputs = model(torch.empty(1, 3, 64, 64))
        assert {k: v.shape[1] for k, v in outputs.items()} == channels
    assert ResNet(18, width=0.5).channels == {"stem": 32, "layer1": 32, "layer2": 64, "layer3": 128, "layer4": 256}
    assert ResNet(50, width=0.25).channels == {"stem": 16, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    # Never fewer than 8 channels per stage.
    assert ResNet(18, width=0.01).channels == {"stem": 8, "layer1": 8, "layer2": 8, "layer3": 8, "layer4": 8}


def test_irn_cam_layout_is_output_stride_16_without_dilation():
    with torch.device("meta"):  # structure only
        model = ResNet(50, strides=(1, 2, 2, 1))
    assert model.strides_of["layer4"] == 16
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    # v1.5: the stride is in the bottleneck's 3x3 conv and the projection, not its first 1x1.
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer4[0].downsample[0].stride == (1, 1)  # still a projection 1024 -> 2048


def test_multi_grid_dilations():
    with torch.device("meta"):  # structure only: skip the initialisation's cost
        check_multi_grid_dilations()


def check_multi_grid_dilations():
    model = resnet(50, output_stride=16, multi_grid=(1, 2, 4))
    assert [u.conv2.dilation for u in model.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert [u.conv2.padding for u in model.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert {u.conv2.dilation for u in model.layer3} == {(1, 1)}
    model = resnet(50, output_stride=8, multi_grid=(1, 2, 4))
    assert [u.conv2.dilation for u in model.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert {u.conv2.dilation for u in model.layer3} == {(2, 2)}
    # ResNet-18's layer4 has two units: the multipliers are taken in order.
    model = resnet(18, output_stride=16, multi_grid=(1, 2, 4))
    assert [(u.conv1.dilation, u.conv2.dilation) for u in model.layer4] == [((2, 2), (2, 2)), ((4, 4), (4, 4))]
    # IRN's CAM network: OS16 without dilation.
    model = resnet(50, output_stride=16, dilate=False)
    assert {u.conv2.dilation for u in model.layer4} == {(1, 1)}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_names_are_torchvision_names(depth):
    expected = {k: v for k, v in torchvision_shapes(depth).items() if not k.startswith("fc.")}
    with torch.device("meta"):
        model = ResNet(depth)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_file_round_trip(tmp_path, depth):
    state = random_state(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)
    model = ResNet(depth, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    load_weights(model, path)
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # The module computes torchvision's function of those weights.
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        outputs = model.eval()(x)
        expected = reference_forward(state, x, depth, (1, 2, 2, 1), (1, 1, 1, 2))
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], rtol=1e-4, atol=1e-4)


def test_wrapped_and_prefixed_and_old_files_load(tmp_path):
    state = random_state(18, seed=1)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    model = ResNet(18)
    load_weights(model, tmp_path / "wrapped.pth")
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])

    # A whole saved model (e.g. the CAM network): only its backbone.* keys are used.
    whole = {"model": {**{f"backbone.{k}": v for k, v in state.items()},
                       "classifier.weight": torch.randn(20, 512, 1, 1)}}
    torch.save(whole, tmp_path / "whole.pth")
    model = ResNet(18)
    load_weights(model, str(tmp_path / "whole.pth"))
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])

    # Pre-1.0 torchvision files have no num_batches_tracked buffers.
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = ResNet(18)
    load_weights(model, tmp_path / "old.pth")
    assert torch.equal(model.layer1[0].bn2.weight, state["layer1.0.bn2.weight"])


def test_none_keeps_random_init():
    torch.manual_seed(0)
    model = ResNet(18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_files_raise_user_error_naming_the_file(tmp_path):
    path = tmp_path / "resnet18_for_a_50.pth"
    torch.save(random_state(18), path)
    with pytest.raises(UserError, match="resnet18_for_a_50.pth") as error:
        with torch.device("meta"):
            resnet50 = ResNet(50)
        load_weights(resnet50, path)
    assert "ResNet-18" in str(error.value) and "\n" not in str(error.value)

    with pytest.raises(UserError, match=r"resnet18_for_a_50\.pth.*width") as error:
        load_weights(ResNet(18, width=0.5), path)

    stride_changed = tmp_path / "layer1_stride.pth"
    torch.save(random_state(18), stride_changed)
    with pytest.raises(UserError, match="downsample"):
        load_weights(ResNet(18, strides=(2, 2, 2, 2)), stride_changed)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        load_weights(ResNet(18), garbage)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(UserError, match="list.pth.*not a state dict"):
        load_weights(ResNet(18), not_a_state_dict)

    with pytest.raises(UserError, match="missing.pth.*not found"):
        load_weights(ResNet(18), tmp_path / "missing.pth")


def test_imagenet_offline_is_a_one_line_user_error(monkeypatch):
    calls = []

    def offline(url, **kwargs):
        calls.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="backbone.weights") as error:
        load_weights(ResNet(18), "imagenet")
    assert calls == [backbones.TORCHVISION_URLS[18]]
    message = str(error.value)
    assert "\n" not in message and "resnet18-f37072fd.pth" in message and "path" in message

    with pytest.raises(UserError, match="width"):
        load_weights(ResNet(18, width=0.5), "imagenet")
    assert len(calls) == 1  # no download attempted for a model that cannot take the file


def test_imagenet_download_is_loaded(monkeypatch):
    state = random_state(18, seed=2)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: state)
    model = ResNet(18)
    load_weights(model, "imagenet")
    assert torch.equal(model.layer4[1].conv1.weight, state["layer4.1.conv1.weight"])


def test_torchvision_initialisation():
    torch.manual_seed(0)
    model = ResNet(50)
    weight = model.layer3[0].conv2.weight  # fan_out = 256 * 3 * 3
    assert abs(weight.std().item() - math.sqrt(2 / (256 * 9))) < 0.05 * math.sqrt(2 / (256 * 9))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_frozen_bn_uses_running_statistics_in_train_mode():
    torch.manual_seed(0)
    model = ResNet(18, width=0.25, frozen_bn=True)
    with torch.no_grad():  # non-trivial running statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)["layer4"]
    model.train()  # must not switch the BatchNorms back to batch statistics
    train_out = model(x)["layer4"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(train_out, eval_out)
    # Affine parameters still learn.
    train_out.sum().backward()
    assert model.layer2[0].bn1.weight.grad is not None and model.bn1.bias.grad is not None

    live = ResNet(18, width=0.25)
    live.train()
    live(x)
    assert not torch.equal(live.bn1.running_mean, torch.zeros_like(live.bn1.running_mean))


def test_frozen_stages_get_no_gradient_and_keep_statistics():
    torch.manual_seed(0)
    model = ResNet(18, width=0.25, trainable=("layer3", "layer4"))  # IRN's train-cam setting
    frozen_stats = model.layer2[0].bn1.running_mean.clone()
    live_stats = model.layer3[0].bn1.running_mean.clone()
    model.train()
    outputs = model(torch.randn(2, 3, 48, 48))
    assert not outputs["layer2"].requires_grad  # detached after the frozen prefix
    outputs["layer4"].sum().backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("conv1", "bn1", "layer1", "layer2")):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.requires_grad and parameter.grad is not None, name
    assert torch.equal(model.layer2[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(model.layer3[0].bn1.running_mean, live_stats)

    # A frozen stage after a trainable one still passes gradients to the earlier stages.
    model = ResNet(18, width=0.25, trainable=("stem", "layer1", "layer2", "layer3"))
    model(torch.randn(2, 3, 48, 48))["layer4"].sum().backward()
    assert model.layer4[0].conv1.weight.grad is None and model.conv1.weight.grad is not None


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ResNet(152)
    with pytest.raises(ValueError):
        ResNet(18, trainable=("layer5",))
    with pytest.raises(ValueError):
        resnet(18, output_stride=4)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fold_batchnorm_matches_eval_mode(depth, channels_last, monkeypatch):
    torch.manual_seed(0)
    model = ResNet(depth, width=0.25, strides=(1, 2, 2, 1), frozen_bn=True, trainable=("layer3", "layer4"))
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model, channels_last=channels_last)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 45, 38)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fused = folded(x)
        monkeypatch.setattr(backbones, "_use_onednn_fusion", lambda x, weight: False)
        plain = folded(x)
    for outputs in (fused, plain):
        assert outputs.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(outputs[name], value, rtol=1e-4, atol=1e-4)
            assert outputs[name].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert folded.channels == model.channels and folded.strides_of == model.strides_of
