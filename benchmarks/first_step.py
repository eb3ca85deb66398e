"""How long after a process starts its first U-Net step begins: runs `ldm` in this process with the U-Net's forward
wrapped to note the moment of its first call, counted from the process's start as the kernel records it
(/proc/self/stat; Linux), and prints that beside the import and the load.

    python benchmarks/first_step.py txt2img --ckpt sd15.safetensors --unet-weights-dtype q8_0 --prompt x --steps 1
"""

import os
import sys


def since_start() -> float:
    """Seconds since this process started (its start time in clock ticks after boot, against the uptime)."""
    with open("/proc/self/stat") as f:
        started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


def main():
    import latent_diffusion.cli as cli
    from latent_diffusion.models.unet import UNetModel

    print(f"imported at {since_start():.2f} s", file=sys.stderr)
    forward, seen = UNetModel.forward, []

    def first_noted(self, *args, **kwargs):
        if not seen:
            seen.append(True)
            print(f"first U-Net step started at {since_start():.2f} s", file=sys.stderr)
        return forward(self, *args, **kwargs)

    UNetModel.forward = first_noted
    sys.argv = ["ldm", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
