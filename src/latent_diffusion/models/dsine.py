"""DSINE (Bae & Davison 2024, "Rethinking Inductive Biases for Surface Normal Estimation"), the network behind the
ControlNet extension's normal_dsine, in the layout of its file `dsine.pt` (`encoder.original_model.*`, `decoder.*`,
`gru.*`, the heads), so it loads without key mapping.

An EfficientNet-B5 encoder (`efficientnet.py`); a decoder from 1/32 to 1/8 of the image whose every input carries
the camera rays' (u, v) there ("ray direction encoding"), giving a first normal n, a feature map and a hidden state
at 1/8. Then `iterations` refinements: a convolutional GRU updates the hidden state, and each pixel's normal becomes
a weighted sum of its 5×5 neighbours' normals, each rotated by an angle the network predicts about an axis in the
neighbour's tangent plane, the one towards the ray of the neighbour's pixel offset by a (du, dv) the network
predicts; normals facing away from the camera are bent back ("ray ReLU"). A learnt convex combination of each 3×3
neighbourhood upsamples the normals 8×.

Camera: intrinsics (fu, fv, cu, cv) in pixels of the image the network sees, the top-left pixel's centre at (0, 0)
(DSINE's convention; the network moves the centre by 0.5 to its own pixel grid, centres at x + 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet import Encoder
from .exact_load import load_exactly

PATCH = 5  # the refinement's neighbourhood
RATIO = 8  # the decoder's scale: 1/8


def head(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    """DSINE's prediction head: 3×3 conv, ReLU, 1×1, ReLU, 1×1."""
    layers = [nn.Conv2d(inputs, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(hidden, outputs, 1))


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose weight is standardized per output channel before use: (w - mean) / (std + 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class UpSample(nn.Module):
    """x scaled (bilinear) to the skip's size, joined to it, then twice a standardized 3×3 conv, GroupNorm(8) and
    leaky ReLU."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self._net = nn.Sequential(
            StandardizedConv2d(inputs, outputs, 3, padding=1),
            nn.GroupNorm(8, outputs),
            nn.LeakyReLU(),
            StandardizedConv2d(outputs, outputs, 3, padding=1),
            nn.GroupNorm(8, outputs),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self._net(torch.cat([x, skip], dim=1))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048 + 2, 2048, 1)
        self.up1 = UpSample(2048 + 176 + 2, 1024)
        self.up2 = UpSample(1024 + 64 + 2, 512)
        self.normal_head, self.feature_head, self.hidden_head = (
            head(514, 3, 128),
            head(514, 64, 128),
            head(514, 64, 128),
        )

    def forward(self, stages: list[torch.Tensor], uv_32, uv_16, uv_8) -> tuple[torch.Tensor, ...]:
        """The encoder's outputs and the rays' (u, v) at 1/32, 1/16, 1/8 -> (unit normals, features, hidden) at 1/8."""
        x = self.conv2(torch.cat([stages[-1], uv_32], dim=1))  # conv_head's output, (b, 2048, H/32, W/32)
        x = self.up1(x, torch.cat([stages[4], uv_16], dim=1))  # stage 4: (b, 176, H/16, W/16)
        x = self.up2(x, torch.cat([stages[2], uv_8], dim=1))  # stage 2: (b, 64, H/8, W/8)
        x = torch.cat([x, uv_8], dim=1)  # (b, 514, H/8, W/8)
        return F.normalize(self.normal_head(x), dim=1), self.feature_head(x), self.hidden_head(x)


class ConvGRU(nn.Module):
    def __init__(self, hidden: int, inputs: int, kernel: int):
        super().__init__()
        gate = [nn.Conv2d(hidden + inputs, hidden, kernel, padding=kernel // 2) for _ in range(3)]
        self.convz, self.convr, self.convq = gate

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z, r = self.convz(hx).sigmoid(), self.convr(hx).sigmoid()
        q = self.convq(torch.cat([r * h, x], dim=1)).tanh()
        return (1 - z) * h + z * q


def ray_relu(normal: torch.Tensor, ray: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Normals (b, 3, ...) bent so that their cosine with the (unit) ray is at least eps, then made unit again."""
    cos = torch.cosine_similarity(normal, ray, dim=1).unsqueeze(1)
    return F.normalize(normal + ray * ((cos - eps).relu() + eps - cos), dim=1)


def neighbours(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, c, h, w) -> (b, c, size², h, w): each pixel's size × size neighbourhood, the border replicated."""
    b, c, h, w = x.shape
    padded = F.pad(x, [size // 2] * 4, mode="replicate")
    return F.unfold(padded, [size, size]).view(b, c, size * size, h, w)


def rotate(v: torch.Tensor, axis_angle: torch.Tensor) -> torch.Tensor:
    """Vectors v (b, 3, ...) rotated by axis-angle vectors a (b, 3, ...), Rodrigues' formula with k = a / |a| and
    θ = |a|: v cos θ + (k × v) sin θ + k (k · v)(1 - cos θ); |a| under 1e-6 leaves v as it is."""
    angle = axis_angle.norm(dim=1, keepdim=True)
    k = torch.where(angle < 1e-6, 0.0, axis_angle / angle.clamp_min(1e-6))
    cos, sin = angle.cos(), angle.sin()
    return v * cos + torch.cross(k, v, dim=1) * sin + k * (k * v).sum(1, keepdim=True) * (1 - cos)


def convex_upsample(x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, h, w) -> (b, c, kh, kw): each of the k × k output pixels of an input pixel a softmax-weighted sum of
    that pixel's 3×3 neighbourhood (mask: (b, 9·k·k, h, w) logits)."""
    b, c, h, w = x.shape
    weights = mask.view(b, 1, 9, k, k, h, w).softmax(dim=2)
    up = (weights * neighbours(x, 3).view(b, c, 9, 1, 1, h, w)).sum(dim=2)  # (b, c, k, k, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(b, c, k * h, k * w)


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w): x + 0.5 and y + 0.5 of each pixel."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([xs, ys])[None]


class DSINE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(), Decoder()
        self.gru = ConvGRU(64, 64 + 2, PATCH)
        self.prob_head, self.xy_head = head(66, PATCH**2, 64), head(66, 2 * PATCH**2, 64)
        self.angle_head, self.up_prob_head = head(66, PATCH**2, 64), head(66, 9 * RATIO**2, 64)

    def forward(self, image: torch.Tensor, intrinsics: torch.Tensor, iterations: int = 5) -> torch.Tensor:
        """image (b, 3, H, W) normalized with ImageNet's statistics, sides multiples of 32; intrinsics (b, 4): fu,
        fv, cu, cv in its pixels (the top-left pixel's centre at (0, 0)) -> unit normals (b, 3, H, W) after
        `iterations` refinements."""
        stages = self.encoder(image)
        h, w = image.shape[2:]
        camera = intrinsics + torch.tensor([0.0, 0.0, 0.5, 0.5])  # (to the network's grid: centres at x + 0.5)
        uv_32, uv_16, uv_8 = (self.rays(camera, h // s, w // s, h, w) for s in (32, 16, 8))
        ray_8 = F.normalize(torch.cat([uv_8, torch.ones_like(uv_8[:, :1])], dim=1), dim=1)  # (b, 3, H/8, W/8)
        normal, features, hidden = self.decoder(stages, uv_32, uv_16, uv_8)
        normal, features = ray_relu(normal, ray_8), torch.cat([features, uv_8], dim=1)
        if iterations == 0:
            return F.normalize(convex_upsample(normal, self.up_prob_head(torch.cat([hidden, uv_8], 1)), RATIO), dim=1)
        # what every refinement reads: the camera at 1/8 (fu, fv, cu, cv each (b, 1, 1, 1)), each pixel's neighbours'
        # centres (1, 2, 25, H/8, W/8)
        h8, w8 = uv_8.shape[2:]
        camera_8 = (camera * torch.tensor([w8 / w, h8 / h] * 2))[:, :, None, None, None].unbind(1)
        centres = neighbours(pixel_centres(h8, w8), PATCH)
        for _ in range(iterations):
            hidden, normal, upsampled = self.refine(hidden, features, normal, camera_8, centres, uv_8, ray_8)
        return upsampled

    @staticmethod
    def rays(camera: torch.Tensor, h: int, w: int, full_h: int, full_w: int) -> torch.Tensor:
        """(b, 2, h, w): ((x + 0.5 - cu) / fu, (y + 0.5 - cv) / fv) at a scale of the image (the intrinsics scaled
        by w / full_w and h / full_h)."""
        scale = torch.tensor([w / full_w, h / full_h, w / full_w, h / full_h])
        fu, fv, cu, cv = (camera * scale)[:, :, None, None].unbind(1)  # each (b, 1, 1)
        centres = pixel_centres(h, w)
        return torch.stack([(centres[:, 0] - cu) / fu, (centres[:, 1] - cv) / fv], dim=1)

    def refine(self, hidden, features, normal, camera_8, centre, uv_8, ray_8) -> tuple[torch.Tensor, ...]:
        """One refinement at 1/8: (hidden, normals, normals upsampled 8×)."""
        b, _, h, w = normal.shape
        fu, fv, cu, cv = camera_8
        hidden = self.gru(hidden, features)
        state = torch.cat([hidden, uv_8], dim=1)
        weight = self.prob_head(state).sigmoid().unsqueeze(1)  # (b, 1, 25, h, w)
        offset = F.normalize(self.xy_head(state).view(b, 2, PATCH**2, h, w), dim=1)  # (b, 2, 25, h, w): (du, dv)
        angle = self.angle_head(state).sigmoid().unsqueeze(1) * torch.pi  # (b, 1, 25, h, w)
        n = neighbours(normal, PATCH)  # (b, 3, 25, h, w)
        # The rotation axis: the direction from the neighbour's 3D point, on the plane of its normal, towards the ray
        # of the point offset by (du, dv) (DSINE's eq. 5), in camera coordinates.
        du, dv = offset[:, 0] / fu, offset[:, 1] / fv  # (b, 25, h, w)
        tu, tv = (centre[:, 0] + offset[:, 0] - cu) / fu, (centre[:, 1] + offset[:, 1] - cv) / fv
        denominator = tu * n[:, 0] + tv * n[:, 1] + n[:, 2]
        tiny = denominator.abs() < 1e-8
        denominator = torch.where(tiny, 1e-8 * denominator.sign(), denominator)
        dz = -(du * n[:, 0] + dv * n[:, 1]) / denominator
        axis = F.normalize(torch.stack([du + dz * tu, dv + dz * tv, dz], dim=1), dim=1)  # (b, 3, 25, h, w)
        axis = torch.where(axis.isfinite().all(dim=1, keepdim=True), axis, 0.0)
        rotated = ray_relu(F.normalize(rotate(n, axis * angle), dim=1), ray_8[:, :, None])
        normal = F.normalize((weight * rotated).sum(dim=2), dim=1)  # (b, 3, h, w)
        upsampled = F.normalize(convex_upsample(normal, self.up_prob_head(state), RATIO), dim=1)
        return hidden, normal, upsampled


def dsine_from_state_dict(state_dict: dict[str, torch.Tensor]) -> DSINE:
    """The network of a file's tensors: DSINE's checkpoint keeps them under `model` (read as `model.` keys), maybe
    with a DataParallel `module.` prefix; both dropped (ValueError naming what does not fit)."""
    state_dict = {k.removeprefix("model.").removeprefix("module."): v for k, v in state_dict.items()}
    return load_exactly(DSINE, state_dict, "a DSINE model")
