"""The annotators with weights that run here without controlnet_aux, at full size with random weights (their time does
not depend on the weights): Depth Anything's network (ViT-L, 518×518) beside transformers' DepthAnythingForDepthEstimation
with the same weights, in one process; and the whole map of each module at the default processor resolution (512,
a 512×768 picture), from files written to a temporary annotator folder. Medians of `--repeats` runs after one warm-up.

    python benchmarks/annotators.py --repeats 3
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from machine import machine  # benchmarks/machine.py: run as a script, this folder is on sys.path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def median_seconds(work, repeats: int) -> float:
    work()  # (warm-up)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from latent_diffusion.models.anime_face_unet import AnimeFaceUNet
    from latent_diffusion.models.depth_anything import DepthAnything, DepthAnythingConfig
    from latent_diffusion.models.dsine import DSINE
    from latent_diffusion.models.hed import HED
    from latent_diffusion.models.lineart import LineartGenerator, UnetGenerator
    from latent_diffusion.models.manga_line import MangaLineNetwork
    from latent_diffusion.models.mlsd import MLSD
    from latent_diffusion.models.normal_bae import NormalBae
    from latent_diffusion.models.pidinet import PiDiNet
    from latent_diffusion.models.teed import TEED
    from latent_diffusion.models.uniformer import UniFormerConfig, UperNetUniFormer
    from latent_diffusion.pipeline.preprocessors import detect
    from test_depth_anything import to_transformers, transformers_model

    torch.manual_seed(0)
    vitl = DepthAnythingConfig()
    ours = DepthAnything(vitl).eval()
    theirs = transformers_model(vitl)
    theirs.load_state_dict(to_transformers(ours.state_dict()))
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        print(f"machine: {machine()}")
        a = median_seconds(lambda: ours(x), args.repeats)
        b = median_seconds(lambda: theirs(pixel_values=x), args.repeats)
        print(f"Depth Anything ViT-L network, 518x518: ours {a:.2f} s, transformers {b:.2f} s, ratio {a / b:.3f}")

    picture = np.random.RandomState(0).randint(0, 256, (512, 768, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        save_file(ours.state_dict(), Path(folder) / "depth_anything_v2_vitl.safetensors")
        torch.save(
            {"state_dict": UperNetUniFormer(UniFormerConfig()).state_dict()}, Path(folder) / "upernet_global_small.pth"
        )
        torch.save(TEED().state_dict(), Path(folder) / "7_model.pth")
        torch.save(AnimeFaceUNet().state_dict(), Path(folder) / "UNet.pth")
        torch.save(MangaLineNetwork().state_dict(), Path(folder) / "erika.pth")
        torch.save({"model": DSINE().state_dict()}, Path(folder) / "dsine.pt")
        torch.save(HED().state_dict(), Path(folder) / "ControlNetHED.pth")
        torch.save(LineartGenerator().state_dict(), Path(folder) / "sk_model.pth")
        torch.save(UnetGenerator().state_dict(), Path(folder) / "netG.pth")
        torch.save(PiDiNet().state_dict(), Path(folder) / "table5_pidinet.pth")
        torch.save({"model": NormalBae().state_dict()}, Path(folder) / "scannet.pt")
        torch.save(MLSD().state_dict(), Path(folder) / "mlsd_large_512_fp32.pth")
        modules = ["depth_anything_v2", "seg_ufade20k", "softedge_teed", "seg_anime_face", "lineart_anime_denoise"]
        modules += ["normal_dsine", "softedge_hed", "lineart_realistic", "lineart_anime", "softedge_pidinet"]
        for module in [*modules, "normal_bae", "mlsd"]:
            seconds = median_seconds(lambda m=module: detect(picture, m, 512, annotator_folder=folder), args.repeats)
            print(f"{module} map of a 768x512 picture at 512: {seconds:.2f} s")


if __name__ == "__main__":
    main()
