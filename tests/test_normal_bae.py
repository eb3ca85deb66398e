"""normal_bae without controlnet_aux (`models/normal_bae.py`, `pipeline/bae_normals.py`): the network against the
extension's `annotator/normalbae` (`NNET`, its decoder in test mode and `norm_normalize`) written out, on
transformers' EfficientNet-B5 with the same random weights; the map against its `NormalBaeDetector` and
`legacy/processor.py` written out, from a file in an annotator folder."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EfficientNetModel

from latent_diffusion.models.normal_bae import NormalBae
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_anime_annotators import drawing, random_weights
from test_dsine import COUNTS, b5_config, with_our_weights
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

from conftest import seeded

# ---- annotator/normalbae, written out (the encoder: transformers') --------------------------------------------------


class RefUpSampleBN(nn.Module):
    def __init__(self, skip_input, output_features):
        super().__init__()
        self._net = nn.Sequential(nn.Conv2d(skip_input, output_features, kernel_size=3, stride=1, padding=1),
                                  nn.BatchNorm2d(output_features), nn.LeakyReLU(),
                                  nn.Conv2d(output_features, output_features, kernel_size=3, stride=1, padding=1),
                                  nn.BatchNorm2d(output_features), nn.LeakyReLU())  # fmt: skip

    def forward(self, x, concat_with):
        up_x = F.interpolate(x, size=[concat_with.size(2), concat_with.size(3)], mode="bilinear", align_corners=True)
        return self._net(torch.cat([up_x, concat_with], dim=1))


def ref_norm_normalize(norm_out):
    min_kappa = 0.01
    norm_x, norm_y, norm_z, kappa = torch.split(norm_out, 1, dim=1)
    norm = torch.sqrt(norm_x**2.0 + norm_y**2.0 + norm_z**2.0) + 1e-10
    kappa = F.elu(kappa) + 1.0 + min_kappa
    return torch.cat([norm_x / norm, norm_y / norm, norm_z / norm, kappa], dim=1)


def ref_mlp(inputs):
    return nn.Sequential(nn.Conv1d(inputs, 128, kernel_size=1), nn.ReLU(), nn.Conv1d(128, 128, kernel_size=1), nn.ReLU(),
                         nn.Conv1d(128, 128, kernel_size=1), nn.ReLU(), nn.Conv1d(128, 4, kernel_size=1))  # fmt: skip


class RefDecoder(nn.Module):  # architecture "BN", mode "test"
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048, 2048, kernel_size=1, stride=1, padding=0)
        self.up1 = RefUpSampleBN(skip_input=2048 + 176, output_features=1024)
        self.up2 = RefUpSampleBN(skip_input=1024 + 64, output_features=512)
        self.up3 = RefUpSampleBN(skip_input=512 + 40, output_features=256)
        self.up4 = RefUpSampleBN(skip_input=256 + 24, output_features=128)
        self.out_conv_res8 = nn.Conv2d(512, 4, kernel_size=3, stride=1, padding=1)
        self.out_conv_res4, self.out_conv_res2, self.out_conv_res1 = (
            ref_mlp(512 + 4),
            ref_mlp(256 + 4),
            ref_mlp(128 + 4),
        )

    def forward(self, features):
        x_block0, x_block1, x_block2, x_block3, x_block4 = features
        x_d0 = self.conv2(x_block4)
        x_d1 = self.up1(x_d0, x_block3)
        x_d2 = self.up2(x_d1, x_block2)
        x_d3 = self.up3(x_d2, x_block1)
        x_d4 = self.up4(x_d3, x_block0)
        out_res8 = ref_norm_normalize(self.out_conv_res8(x_d2))
        feat_map = F.interpolate(x_d2, scale_factor=2, mode="bilinear", align_corners=True)
        init_pred = F.interpolate(out_res8, scale_factor=2, mode="bilinear", align_corners=True)
        feat_map = torch.cat([feat_map, init_pred], dim=1)
        B, _, H, W = feat_map.shape
        out_res4 = ref_norm_normalize(self.out_conv_res4(feat_map.view(B, 512 + 4, -1))).view(B, 4, H, W)
        feat_map = F.interpolate(x_d3, scale_factor=2, mode="bilinear", align_corners=True)
        init_pred = F.interpolate(out_res4, scale_factor=2, mode="bilinear", align_corners=True)
        feat_map = torch.cat([feat_map, init_pred], dim=1)
        B, _, H, W = feat_map.shape
        out_res2 = ref_norm_normalize(self.out_conv_res2(feat_map.view(B, 256 + 4, -1))).view(B, 4, H, W)
        feat_map = F.interpolate(x_d4, scale_factor=2, mode="bilinear", align_corners=True)
        init_pred = F.interpolate(out_res2, scale_factor=2, mode="bilinear", align_corners=True)
        feat_map = torch.cat([feat_map, init_pred], dim=1)
        B, _, H, W = feat_map.shape
        out_res1 = ref_norm_normalize(self.out_conv_res1(feat_map.view(B, 128 + 4, -1))).view(B, 4, H, W)
        return [out_res8, out_res4, out_res2, out_res1]


class RefNNET(nn.Module):
    def __init__(self):
        super().__init__()
        self.efficientnet = EfficientNetModel(b5_config())
        self.decoder = RefDecoder()

    def forward(self, img):
        hidden = self.efficientnet(img, output_hidden_states=True).hidden_states
        ends = np.cumsum(COUNTS)  # features[4], [5], [6], [8] and [11]: stages 0, 1, 2, 4 and conv_head
        top = self.efficientnet.encoder.top_conv(hidden[ends[6]])
        return [self.decoder([hidden[ends[0]], hidden[ends[1]], hidden[ends[2]], hidden[ends[4]], top])]


def ref_normal_bae(model, img, res):  # legacy/processor.py normal_bae, NormalBaeDetector.__call__
    img, remove_pad = ref_resize_image_with_pad(img, res)
    with torch.no_grad():
        image_normal = torch.from_numpy(img).float() / 255.0
        image_normal = image_normal.permute(2, 0, 1)[None]
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        image_normal = (image_normal - mean[:, None, None]) / std[:, None, None]  # transforms.Normalize
        normal = model(image_normal)[0][-1][:, :3]
        normal = ((normal + 1) * 0.5).clip(0, 1)
        normal = normal[0].permute(1, 2, 0).cpu().numpy()
        return ref_hwc3(remove_pad((normal * 255.0).clip(0, 255).astype(np.uint8)))


# ---- the tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def networks():
    with seeded(0):
        return with_our_weights(random_weights(NormalBae(), 1), RefNNET().eval())


def test_the_network_is_the_extensions(networks):
    ours, theirs = networks
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(x)[0][-1]
        found = ours(x)
    assert found.shape == (1, 4, 64, 96)
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)
    assert expected[:, :3].std(dim=(2, 3)).min() > 0.05  # (normals that vary over the image)


def test_the_normal_bae_map_is_the_extensions(networks, tmp_path):
    ours, theirs = networks
    (tmp_path / "normal_bae").mkdir()
    state = {"model": {f"module.{k}": v for k, v in ours.state_dict().items()}}
    torch.save(state, tmp_path / "normal_bae" / "scannet.pt")
    found = detect(drawing(), "normal_bae", 128, annotator_folder=tmp_path)
    expected = ref_normal_bae(theirs, drawing(), 128)
    assert found.shape == expected.shape == (128, 196, 3)
    assert np.abs(found.astype(int) - expected).max() <= 1  # (the encoders are two implementations: float rounding)
    assert (found == expected).mean() > 0.99 and len(np.unique(found.reshape(-1, 3), axis=0)) > 100
    assert module_list(annotator_folder=tmp_path)["module_detail"]["normal_bae"]["available"]


def test_a_file_that_is_not_bae_is_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'normal_bae' needs scannet.pt: no folder named"):
        detect(drawing(), "normal_bae")
    torch.save({"model": {"decoder.conv2.weight": torch.zeros(2048, 2048, 1, 1)}}, tmp_path / "scannet.pt")
    with pytest.raises(
        PreprocessorError, match=r"^ControlNet module 'normal_bae': scannet.pt: not a BAE normal model: "
    ):
        detect(drawing(), "normal_bae", annotator_folder=tmp_path)
