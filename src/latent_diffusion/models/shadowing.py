"""Modules whose forward is replaced for a while, as control units that read or change the U-Net's inner state
(reference units' attention banks, IP-Adapters' image tokens) need: on the instances, so the module tree and its
keys stay as they are."""

import contextlib
from collections.abc import Callable

import torch
from torch import nn


@contextlib.contextmanager
def shadowed(forwards: dict[nn.Module, Callable]):
    """Each module's forward replaced by its callable while this lasts. A compiled model runs eagerly meanwhile: the
    replacements hold Python state that changes at every call, which would break its graph and recompile the
    shadowed modules until dynamo's limit."""
    for module, forward in forwards.items():
        module.forward = forward
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for module in forwards:
            del module.forward
