"""Fuzzing the readers of untrusted files: any bytes give a result or one of the project's own errors (one clear
line), never another exception, and quickly. hypothesis draws the bytes; its examples are fixed by the seed."""

import contextlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from latent_diffusion import CheckpointError, load_model
from latent_diffusion.pipeline.images import load_image
from latent_diffusion.weights.checkpoint import read_state_dict

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def safetensors_bytes(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@seed(0)
@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".safetensors", ".ckpt", ".pt"]))
def test_any_bytes_as_a_checkpoint(tmp_path, data, suffix):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_model(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@seed(0)
@FUZZ
@given(config=json_values, tensor_header=st.dictionaries(st.text(max_size=6), json_values, max_size=3))
def test_any_metadata_and_header_in_a_safetensors_file(tmp_path, config, tensor_header):
    """A well-formed length prefix and JSON header whose tensor entries and config metadata are arbitrary."""
    header = {**tensor_header, "__metadata__": {"latent_diffusion.config": json.dumps(config)}}
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode()))  # no tensor data: only the header is read
    with contextlib.suppress(CheckpointError):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_model(path)


@seed(0)
@FUZZ
@given(
    data=st.binary(max_size=512),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM"]),
)
def test_any_bytes_as_an_image(tmp_path, data, prefix):
    path = tmp_path / "x.png"
    path.write_bytes(prefix + data)
    try:
        image = load_image(path)
    except ValueError as e:
        assert str(e).startswith(str(path))
    else:
        assert image.ndim == 4 and image.shape[1] == 3


@seed(0)
@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(["unet", "autoencoder", "text", None]), st.text(max_size=3),
                                  json_values), min_size=1, max_size=3),
       field_index=st.integers(0, 20))  # fmt: skip
def test_a_valid_config_with_arbitrary_values_in_its_fields(tmp_path, tiny_models, changes, field_index):
    """The tiny model's config, with fields (existing ones, picked by index, or new names) set to arbitrary JSON:
    loading gives the model or a CheckpointError naming the file, and never allocates for absurd sizes."""
    config = json.loads(tiny_models["sd1"].cfg.to_json())
    for section, name, value in changes:
        target = config if section is None else config[section]
        if not isinstance(target, dict) or not target:  # an earlier change replaced this section
            continue
        keys = sorted(target)
        target[keys[field_index % len(keys)] if name == "" else name] = value
    header = {"__metadata__": {"latent_diffusion.config": json.dumps(config)}}
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode()))
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_model(path)  # no tensors in the file: at best the config is valid and the weights are missing
