"""normal_dsine (`models/efficientnet.py`, `models/dsine.py`, `pipeline/dsine_normals.py`): the encoder against
transformers' EfficientNet-B5 (the same random weights, gen-efficientnet's keys mapped here); the whole network
against DSINE's `models/dsine.py` and `models/submodules.py` written out (with PyTorch3D's axis-angle rotation it
uses) on that encoder; the map against the extension's `annotator/normaldsine` written out, from files in an
annotator folder."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EfficientNetConfig, EfficientNetModel

from latent_diffusion.models.dsine import DSINE
from latent_diffusion.models.efficientnet import STAGES
from latent_diffusion.pipeline.control_modules import PreprocessorError
from latent_diffusion.pipeline.preprocessors import detect, module_list
from test_anime_annotators import drawing, random_weights
from test_preprocessors import ref_hwc3, ref_resize_image_with_pad

from conftest import seeded

COUNTS = [count for *_, count in STAGES]  # blocks per stage: 3, 5, 5, 7, 7, 9, 3


def b5_config():
    return EfficientNetConfig(width_coefficient=1.6, depth_coefficient=2.2, hidden_dim=2048, image_size=456)


def transformers_key(key: str) -> str:
    """gen-efficientnet's key (ours) -> transformers' EfficientNetModel's."""
    top = {"conv_stem": "embeddings.convolution", "bn1": "embeddings.batchnorm"}
    top |= {"conv_head": "encoder.top_conv", "bn2": "encoder.top_bn"}
    name, leaf = key.rsplit(".", 1)
    if name in top:
        return f"{top[name]}.{leaf}"
    _, stage, block, layer = name.split(".", 3)
    flat = sum(COUNTS[: int(stage)]) + int(block)
    se = {"se.conv_reduce": "squeeze_excite.reduce", "se.conv_expand": "squeeze_excite.expand"}
    if stage == "0":  # depthwise-separable
        names = se | {"conv_dw": "depthwise_conv.depthwise_conv", "bn1": "depthwise_conv.depthwise_norm",
                      "conv_pw": "projection.project_conv", "bn2": "projection.project_bn"}  # fmt: skip
    else:
        names = se | {"conv_pw": "expansion.expand_conv", "bn1": "expansion.expand_bn",
                      "conv_dw": "depthwise_conv.depthwise_conv", "bn2": "depthwise_conv.depthwise_norm",
                      "conv_pwl": "projection.project_conv", "bn3": "projection.project_bn"}  # fmt: skip
    return f"encoder.blocks.{flat}.{names[layer]}.{leaf}"


def transformers_stages(model: EfficientNetModel, x):
    """transformers' EfficientNet-B5 -> DSINE's encoder features: stage 2's and stage 4's outputs, conv_head's."""
    hidden = model(x, output_hidden_states=True).hidden_states  # the stem's output, then each of the 39 blocks'
    ends = np.cumsum(COUNTS)
    return hidden[ends[2]], hidden[ends[4]], model.encoder.top_conv(hidden[ends[6]])


# ---- DSINE's models/dsine.py and models/submodules.py, written out (the encoder: transformers') --------------------


def ref_prediction_head(input_dim, hidden_dim, output_dim):
    return nn.Sequential(nn.Conv2d(input_dim, hidden_dim, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, output_dim, 1))  # fmt: skip


class RefConv2dWS(nn.Conv2d):
    def forward(self, x):
        weight = self.weight
        weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        weight = weight - weight_mean
        std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        weight = weight / std.expand_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RefUpSampleGN(nn.Module):
    def __init__(self, skip_input, output_features):
        super().__init__()
        self._net = nn.Sequential(RefConv2dWS(skip_input, output_features, kernel_size=3, stride=1, padding=1),
                                  nn.GroupNorm(8, output_features), nn.LeakyReLU(),
                                  RefConv2dWS(output_features, output_features, kernel_size=3, stride=1, padding=1),
                                  nn.GroupNorm(8, output_features), nn.LeakyReLU())  # fmt: skip

    def forward(self, x, concat_with):
        up_x = F.interpolate(x, size=[concat_with.size(2), concat_with.size(3)], mode="bilinear", align_corners=False)
        return self._net(torch.cat([up_x, concat_with], dim=1))


class RefDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        features = 2048
        self.conv2 = nn.Conv2d(features + 2, features, kernel_size=1, stride=1, padding=0)
        self.up1 = RefUpSampleGN(skip_input=features // 1 + 176 + 2, output_features=features // 2)
        self.up2 = RefUpSampleGN(skip_input=features // 2 + 64 + 2, output_features=features // 4)
        i_dim, h_dim = features // 4, 128
        self.normal_head = ref_prediction_head(i_dim + 2, h_dim, 3)
        self.feature_head = ref_prediction_head(i_dim + 2, h_dim, 64)
        self.hidden_head = ref_prediction_head(i_dim + 2, h_dim, 64)

    def forward(self, features, uvs):
        x_block2, x_block3, x_block4 = features
        uv_32, uv_16, uv_8 = uvs
        x_d0 = self.conv2(torch.cat([x_block4, uv_32], dim=1))
        x_d1 = self.up1(x_d0, torch.cat([x_block3, uv_16], dim=1))
        x_feat = self.up2(x_d1, torch.cat([x_block2, uv_8], dim=1))
        x_feat = torch.cat([x_feat, uv_8], dim=1)
        normal = F.normalize(self.normal_head(x_feat), dim=1)
        return normal, self.feature_head(x_feat), self.hidden_head(x_feat)


class RefConvGRU(nn.Module):
    def __init__(self, hidden_dim, input_dim, ks=3):
        super().__init__()
        p = (ks - 1) // 2
        self.convz = nn.Conv2d(hidden_dim + input_dim, hidden_dim, ks, padding=p)
        self.convr = nn.Conv2d(hidden_dim + input_dim, hidden_dim, ks, padding=p)
        self.convq = nn.Conv2d(hidden_dim + input_dim, hidden_dim, ks, padding=p)

    def forward(self, h, x):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


def ref_ray_relu(pred_norm, ray, eps=1e-2):
    cos = torch.cosine_similarity(pred_norm, ray, dim=1).unsqueeze(1)
    norm_along_view = ray * cos
    norm_along_view_relu = ray * (torch.relu(cos - eps) + eps)
    return F.normalize(pred_norm + (norm_along_view_relu - norm_along_view), dim=1)


def ref_convex_upsampling(out, up_mask, k):
    B, C, H, W = out.shape
    up_mask = torch.softmax(up_mask.view(B, 1, 9, k, k, H, W), dim=2)
    out = F.pad(out, pad=(1, 1, 1, 1), mode="replicate")
    up_out = F.unfold(out, [3, 3], padding=0).view(B, C, 9, 1, 1, H, W)
    up_out = torch.sum(up_mask * up_out, dim=2).permute(0, 1, 4, 2, 5, 3)
    return up_out.reshape(B, C, k * H, k * W)


def ref_get_unfold(pred_norm, ps, pad):
    B, C, H, W = pred_norm.shape
    pred_norm = F.pad(pred_norm, pad=(pad, pad, pad, pad), mode="replicate")
    return F.unfold(pred_norm, [ps, ps], padding=0).view(B, C, ps * ps, H, W)


def ref_axis_angle_to_matrix(axis_angle):  # PyTorch3D's, as DSINE's utils/rotation.py carries it
    angles = torch.norm(axis_angle, p=2, dim=-1, keepdim=True)
    half_angles = angles * 0.5
    small_angles = angles.abs() < 1e-6
    sin_half_angles_over_angles = torch.empty_like(angles)
    sin_half_angles_over_angles[~small_angles] = torch.sin(half_angles[~small_angles]) / angles[~small_angles]
    sin_half_angles_over_angles[small_angles] = 0.5 - (angles[small_angles] * angles[small_angles]) / 48
    quaternions = torch.cat([torch.cos(half_angles), axis_angle * sin_half_angles_over_angles], dim=-1)
    r, i, j, k = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    o = torch.stack((1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
                     two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
                     two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j)), -1)  # fmt: skip
    return o.reshape((*quaternions.shape[:-1], 3, 3))


class RefDSINE(nn.Module):
    def __init__(self):
        super().__init__()
        self.downsample_ratio, self.ps, self.num_iter = 8, 5, 5
        self.efficientnet = EfficientNetModel(b5_config())
        self.decoder = RefDecoder()
        h = w = 256  # (the original's 2000: only the top-left corner is read)
        pixel_coords = np.ones((3, h, w)).astype(np.float32)
        pixel_coords[0, :, :] = np.concatenate([np.arange(w).reshape(1, w)] * h, axis=0) + 0.5
        pixel_coords[1, :, :] = np.concatenate([np.arange(h).reshape(h, 1)] * w, axis=1) + 0.5
        self.pixel_coords = torch.from_numpy(pixel_coords).unsqueeze(0)
        self.gru = RefConvGRU(hidden_dim=64, input_dim=64 + 2, ks=self.ps)
        self.pad = (self.ps - 1) // 2
        self.prob_head = ref_prediction_head(64 + 2, 64, self.ps * self.ps)
        self.xy_head = ref_prediction_head(64 + 2, 64, self.ps * self.ps * 2)
        self.angle_head = ref_prediction_head(64 + 2, 64, self.ps * self.ps)
        self.up_prob_head = ref_prediction_head(64 + 2, 64, 9 * self.downsample_ratio * self.downsample_ratio)

    def get_ray(self, intrins, H, W, orig_H, orig_W, return_uv=False):
        B, _, _ = intrins.shape
        fu = intrins[:, 0, 0][:, None, None] * (W / orig_W)
        cu = intrins[:, 0, 2][:, None, None] * (W / orig_W)
        fv = intrins[:, 1, 1][:, None, None] * (H / orig_H)
        cv = intrins[:, 1, 2][:, None, None] * (H / orig_H)
        ray = self.pixel_coords[:, :, :H, :W].repeat(B, 1, 1, 1)
        ray[:, 0, :, :] = (ray[:, 0, :, :] - cu) / fu
        ray[:, 1, :, :] = (ray[:, 1, :, :] - cv) / fv
        return ray[:, :2, :, :] if return_uv else F.normalize(ray, dim=1)

    def refine(self, h, feat_map, pred_norm, intrins, orig_H, orig_W, uv_8, ray_8):
        B, _, H, W = pred_norm.shape
        fu = intrins[:, 0, 0][:, None, None, None] * (W / orig_W)
        cu = intrins[:, 0, 2][:, None, None, None] * (W / orig_W)
        fv = intrins[:, 1, 1][:, None, None, None] * (H / orig_H)
        cv = intrins[:, 1, 2][:, None, None, None] * (H / orig_H)
        h_new = self.gru(h, feat_map)
        nghbr_prob = torch.sigmoid(self.prob_head(torch.cat([h_new, uv_8], dim=1)).unsqueeze(1))
        nghbr_normals = ref_get_unfold(pred_norm, ps=self.ps, pad=self.pad)
        nghbr_xys = self.xy_head(torch.cat([h_new, uv_8], dim=1))
        nghbr_xs, nghbr_ys = torch.split(nghbr_xys, [self.ps * self.ps, self.ps * self.ps], dim=1)
        nghbr_xys = F.normalize(torch.cat([nghbr_xs.unsqueeze(1), nghbr_ys.unsqueeze(1)], dim=1), dim=1)
        nghbr_angle = torch.sigmoid(self.angle_head(torch.cat([h_new, uv_8], dim=1)).unsqueeze(1)) * np.pi
        nghbr_pixel_coord = ref_get_unfold(self.pixel_coords[:, :, :H, :W], ps=self.ps, pad=self.pad)
        nghbr_axes = torch.zeros_like(nghbr_normals)
        du_over_fu = nghbr_xys[:, 0, ...] / fu
        dv_over_fv = nghbr_xys[:, 1, ...] / fv
        term_u = (nghbr_pixel_coord[:, 0, ...] + nghbr_xys[:, 0, ...] - cu) / fu
        term_v = (nghbr_pixel_coord[:, 1, ...] + nghbr_xys[:, 1, ...] - cv) / fv
        nx, ny, nz = nghbr_normals[:, 0, ...], nghbr_normals[:, 1, ...], nghbr_normals[:, 2, ...]
        nghbr_delta_z_num = -(du_over_fu * nx + dv_over_fv * ny)
        nghbr_delta_z_denom = term_u * nx + term_v * ny + nz
        small = torch.abs(nghbr_delta_z_denom) < 1e-8
        nghbr_delta_z_denom[small] = 1e-8 * torch.sign(nghbr_delta_z_denom[small])
        nghbr_delta_z = nghbr_delta_z_num / nghbr_delta_z_denom
        nghbr_axes[:, 0, ...] = du_over_fu + nghbr_delta_z * term_u
        nghbr_axes[:, 1, ...] = dv_over_fv + nghbr_delta_z * term_v
        nghbr_axes[:, 2, ...] = nghbr_delta_z
        nghbr_axes = F.normalize(nghbr_axes, dim=1)
        invalid = torch.sum(torch.logical_or(torch.isnan(nghbr_axes), torch.isinf(nghbr_axes)).float(), dim=1) > 0.5
        nghbr_axes[:, 0, ...][invalid] = 0.0
        nghbr_axes[:, 1, ...][invalid] = 0.0
        nghbr_axes[:, 2, ...][invalid] = 0.0
        nghbr_axes_angle = (nghbr_axes * nghbr_angle).permute(0, 2, 3, 4, 1)
        nghbr_R = ref_axis_angle_to_matrix(nghbr_axes_angle)
        nghbr_normals_rot = (
            torch.bmm(
                nghbr_R.reshape(B * self.ps * self.ps * H * W, 3, 3),
                nghbr_normals.permute(0, 2, 3, 4, 1).reshape(B * self.ps * self.ps * H * W, 3).unsqueeze(-1),
            )
            .reshape(B, self.ps * self.ps, H, W, 3, 1)
            .squeeze(-1)
            .permute(0, 4, 1, 2, 3)
        )
        nghbr_normals_rot = F.normalize(nghbr_normals_rot, dim=1)
        nghbr_normals_rot = torch.cat(
            [
                ref_ray_relu(nghbr_normals_rot[:, :, i, :, :], ray_8).unsqueeze(2)
                for i in range(nghbr_normals_rot.size(2))
            ],
            dim=2,
        )
        pred_norm = F.normalize(torch.sum(nghbr_prob * nghbr_normals_rot, dim=2), dim=1)
        up_mask = self.up_prob_head(torch.cat([h_new, uv_8], dim=1))
        up_pred_norm = F.normalize(ref_convex_upsampling(pred_norm, up_mask, self.downsample_ratio), dim=1)
        return h_new, pred_norm, up_pred_norm

    def forward(self, img, intrins=None):
        features = transformers_stages(self.efficientnet, img)
        _, _, orig_H, orig_W = img.shape
        intrins[:, 0, 2] += 0.5
        intrins[:, 1, 2] += 0.5
        uv_32 = self.get_ray(intrins, orig_H // 32, orig_W // 32, orig_H, orig_W, return_uv=True)
        uv_16 = self.get_ray(intrins, orig_H // 16, orig_W // 16, orig_H, orig_W, return_uv=True)
        uv_8 = self.get_ray(intrins, orig_H // 8, orig_W // 8, orig_H, orig_W, return_uv=True)
        ray_8 = self.get_ray(intrins, orig_H // 8, orig_W // 8, orig_H, orig_W)
        pred_norm, feat_map, h = self.decoder(features, uvs=(uv_32, uv_16, uv_8))
        pred_norm = ref_ray_relu(pred_norm, ray_8)
        feat_map = torch.cat([feat_map, uv_8], dim=1)
        up_mask = self.up_prob_head(torch.cat([h, uv_8], dim=1))
        pred_list = [F.normalize(ref_convex_upsampling(pred_norm, up_mask, self.downsample_ratio), dim=1)]
        for _ in range(self.num_iter):
            h, pred_norm, up_pred_norm = self.refine(h, feat_map, pred_norm, intrins, orig_H, orig_W, uv_8, ray_8)
            pred_list.append(up_pred_norm)
        return pred_list


def ref_intrins_from_fov(new_fov, H, W):  # the extension's dsine.utils.utils.get_intrins_from_fov
    side = W if W >= H else H
    new_fu = new_fv = (side / 2.0) / np.tan(np.deg2rad(new_fov / 2.0))
    return torch.tensor([[new_fu, 0, (W / 2.0) - 0.5], [0, new_fv, (H / 2.0) - 0.5], [0, 0, 1]], dtype=torch.float32)


def ref_pad_input(orig_H, orig_W):  # dsine.utils.utils.pad_input
    l = r = t = b = 0  # noqa: E741
    if orig_W % 32 != 0:
        new_W = 32 * ((orig_W // 32) + 1)
        l, r = (new_W - orig_W) // 2, (new_W - orig_W) - (new_W - orig_W) // 2  # noqa: E741
    if orig_H % 32 != 0:
        new_H = 32 * ((orig_H // 32) + 1)
        t, b = (new_H - orig_H) // 2, (new_H - orig_H) - (new_H - orig_H) // 2
    return l, r, t, b


def ref_normal_dsine(model, input_image, new_fov=60.0, iterations=5, resolution=512):  # NormalDsineDetector.__call__
    model.num_iter = iterations
    orig_H, orig_W = input_image.shape[:2]
    l, _, t, _ = ref_pad_input(orig_H, orig_W)  # noqa: E741
    input_image, remove_pad = ref_resize_image_with_pad(input_image, resolution)
    with torch.no_grad():
        image_normal = torch.from_numpy(input_image).float() / 255.0
        image_normal = image_normal.permute(2, 0, 1)[None]
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        image_normal = (image_normal - mean[:, None, None]) / std[:, None, None]  # transforms.Normalize
        intrins = ref_intrins_from_fov(new_fov=new_fov, H=orig_H, W=orig_W).unsqueeze(0)
        intrins[:, 0, 2] += l
        intrins[:, 1, 2] += t
        normal = model(image_normal, intrins=intrins)[-1]
        normal = normal[:, :, t : t + orig_H, l : l + orig_W]
        normal = ((normal + 1) * 0.5).clip(0, 1)
        normal = normal[0].permute(1, 2, 0).cpu().numpy()
        return ref_hwc3(remove_pad((normal * 255.0).clip(0, 255).astype(np.uint8)))


# ---- the tests -------------------------------------------------------------------------------------------------------


def with_our_weights(ours: nn.Module, theirs: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`theirs` (its encoder transformers' EfficientNet, as `efficientnet`) given `ours`'s weights, every key."""
    state = {}
    for k, v in ours.state_dict().items():
        inner = k.removeprefix("encoder.original_model.")
        state[f"efficientnet.{transformers_key(inner)}" if inner != k else k] = v
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and missing == []
    return ours, theirs


@pytest.fixture(scope="module")
def networks():
    """Ours with random weights (batch-norm statistics too) and the reference with the same weights."""
    with seeded(0):
        return with_our_weights(random_weights(DSINE(), 1), RefDSINE().eval())


def test_the_encoder_is_transformers_efficientnet_b5(networks):
    ours, theirs = networks
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.encoder(x)
        expected = transformers_stages(theirs.efficientnet, x)
    assert [tuple(t.shape[1:]) for t in mine] == [(24, 32, 48), (40, 16, 24), (64, 8, 12), (128, 4, 6), (176, 4, 6), (304, 2, 3), (512, 2, 3), (2048, 2, 3)]  # fmt: skip
    for a, b in zip([mine[2], mine[4], mine[-1]], expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_network_is_dsines(networks):
    ours, theirs = networks
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    intrins = torch.tensor([[[70.0, 0, 47.5], [0, 70.0, 31.5], [0, 0, 1]]])
    for iterations in (0, 2):
        theirs.num_iter = iterations
        with torch.no_grad():
            expected = theirs(x, intrins.clone())[-1]
            found = ours(x, torch.tensor([[70.0, 70.0, 47.5, 31.5]]), iterations)
        assert found.shape == (1, 3, 64, 96)
        torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)
        assert expected.std(dim=(2, 3)).min() > 0.05  # (normals that vary over the image)


def test_the_normal_dsine_map_is_the_extensions(networks, tmp_path):
    """At an image of the processor's size whose sides are multiples of 64 (where the extension's handling of the
    size, below, makes no difference), with two FOVs and iteration counts: the extension's map, to within 1 of 255
    (the rotation is Rodrigues' formula here, PyTorch3D's quaternions there: equal to about 1e-6, which can move a
    value across an 8-bit step)."""
    ours, theirs = networks
    (tmp_path / "normal_dsine").mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in ours.state_dict().items()}, "iter": 1}, tmp_path / "normal_dsine" / "dsine.pt")  # fmt: skip
    image = drawing(128, 192)
    for fov, iterations in [(60.0, 1), (90.0, 2)]:
        found = detect(image, "normal_dsine", 128, fov, iterations, annotator_folder=tmp_path)
        expected = ref_normal_dsine(theirs, image, fov, iterations, 128)
        assert found.shape == expected.shape == (128, 192, 3)
        assert np.abs(found.astype(int) - expected).max() <= 1
        assert (found == expected).mean() > 0.99
    assert module_list(annotator_folder=tmp_path)["module_detail"]["normal_dsine"]["available"]


def test_normal_dsine_sees_the_image_at_the_processor_resolution(networks, tmp_path):
    """The deliberate difference: the camera is that of the image the network sees (the FOV over its longer side
    once scaled, its centre the scaled image's), and the map is that image's, cut back. The extension takes the
    camera of the image as it came and cuts a window of that size out of the map, at DSINE's centring offsets,
    which the scaled image does not have: a map of part of the image."""
    ours, theirs = networks
    torch.save(ours.state_dict(), tmp_path / "dsine.pt")
    image = drawing(150, 230)
    found = detect(image, "normal_dsine", 128, 60.0, 1, annotator_folder=tmp_path)
    padded, remove_pad = ref_resize_image_with_pad(image, 128)  # (128, 256), the image (128, 196) in it
    x = (torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]  # fmt: skip
    theirs.num_iter = 1
    with torch.no_grad():
        normal = theirs(x, ref_intrins_from_fov(60.0, 128, 196)[None])[-1]
    expected = remove_pad((((normal + 1) * 0.5).clip(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert found.shape == (128, 196, 3)
    assert np.abs(found.astype(int) - expected).max() <= 1
    assert ref_normal_dsine(theirs, image, 60.0, 1, 128).shape == (123, 196, 3)  # the extension's: a window


def test_files_that_are_not_dsine_are_refused(tmp_path):
    with pytest.raises(PreprocessorError, match=r"'normal_dsine' needs dsine.pt: no folder named"):
        detect(drawing(), "normal_dsine")
    torch.save({"model": {"decoder.conv2.weight": torch.zeros(2048, 2050, 1, 1)}}, tmp_path / "dsine.pt")
    with pytest.raises(PreprocessorError, match=r"^ControlNet module 'normal_dsine': dsine.pt: not a DSINE model: "):
        detect(drawing(), "normal_dsine", annotator_folder=tmp_path)
