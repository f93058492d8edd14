"""Whole modules and state dicts saved by earlier versions of the package load into this one."""

import io
import pickle

import pytest
import torch

from dsc_kernels.nn import ConvSparseCoding2d, DeepSparseCoding2d, SoftThreshold


def _pickled_by_an_earlier_version(module: torch.nn.Module) -> bytes:
    """``module`` pickled as a version before SoftThreshold and DeepSparseCoding2d left nn.sparse_coding did (protocol
    2 writes each class as the text 'module\\nname')."""
    blob = pickle.dumps(module, protocol=2)
    for home in ("soft_threshold", "deep"):
        blob = blob.replace(f"dsc_kernels.nn.{home}\n".encode(), b"dsc_kernels.nn.sparse_coding\n")
    return blob


def test_soft_threshold_and_deep_stacks_pickled_before_they_left_sparse_coding_load():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "deep": DeepSparseCoding2d([1, 4, 8], 3, n_iter=3, backend="reference"),
            "soft": SoftThreshold(0.1, num_channels=4, learnable=True),
        }
    ).eval()
    blob = _pickled_by_an_earlier_version(model)
    assert b"dsc_kernels.nn.sparse_coding\nSoftThreshold" in blob
    assert b"dsc_kernels.nn.sparse_coding\nDeepSparseCoding2d" in blob
    loaded = pickle.loads(blob)  # raised AttributeError: Can't get attribute 'SoftThreshold' on ... sparse_coding
    assert type(loaded["deep"]) is DeepSparseCoding2d and type(loaded["soft"]) is SoftThreshold
    x, s = torch.randn(2, 1, 10, 10), torch.randn(2, 4, 5)
    for got, want in zip(loaded["deep"](x), model["deep"](x)):
        assert torch.equal(got, want)
    assert torch.equal(loaded["soft"](s), model["soft"](s))


def test_unknown_names_in_sparse_coding_still_raise():
    from dsc_kernels.nn import sparse_coding

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sparse_coding.Nope  # noqa: B018


def test_a_module_pickled_before_the_step_floor_was_a_buffer_loads_under_another_default_device():
    """Its floor, an attribute then, was made a buffer on the default device: a load under ``torch.device("meta")``
    raised 'Cannot copy out of meta tensor'."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 6, 3, n_iter=4, learn_step=True, backend="reference")
    floor = float(layer.step_floor)
    del layer._buffers["step_floor"]
    layer.__dict__["_step_floor"] = floor  # what such a pickle holds
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    with torch.device("meta"):
        loaded = torch.load(buffer, weights_only=False)
    assert loaded.step_floor.device.type == "cpu" and float(loaded.step_floor) == floor
    assert loaded.constraints()[-1][1] == floor
