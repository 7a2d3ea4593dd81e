"""Hybrid stem pieces: weight standardisation and TF/flax 'SAME' padding."""

import pytest
import torch
import torch.nn.functional as F

from vitpipe.models.resnet import StdConv2d, _same_pad_amounts, pad_same


def test_std_conv_is_invariant_to_per_channel_affine_kernel_changes():
    torch.manual_seed(0)
    conv = StdConv2d(8, 4, 3)
    torch.nn.init.normal_(conv.weight)  # std ≈ 1, so the 1e-5 eps is negligible relative to it
    x = torch.randn(2, 8, 9, 9)
    ref = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([3.0, 0.5, 7.0, 2.0]).view(4, 1, 1, 1)).add_(0.25)
    torch.testing.assert_close(conv(x), ref, atol=2e-3, rtol=1e-3)
    # Standardised kernel: zero mean, unit (biased) std per output channel.
    w = conv.weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(conv(x), F.conv2d(x, ws, padding=1))


@pytest.mark.parametrize(
    "size, k, s, expected", [(224, 7, 2, (2, 3)), (56, 3, 2, (0, 1)), (112, 3, 2, (0, 1)), (57, 3, 2, (1, 1)), (14, 1, 1, (0, 0))]
)
def test_same_padding_matches_tensorflow_rule(size, k, s, expected):
    assert _same_pad_amounts(size, k, s) == expected
    out = F.conv2d(pad_same(torch.zeros(1, 1, size, size), k, s), torch.zeros(1, 1, k, k), stride=s)
    assert out.shape[-1] == -(-size // s)  # ceil(size / s)


def test_strided_std_conv_output_size_and_max_pool_pads_with_minus_inf():
    conv = StdConv2d(3, 16, 7, stride=2)
    assert conv(torch.randn(1, 3, 224, 224)).shape == (1, 16, 112, 112)
    x = -torch.rand(1, 1, 4, 4) - 1.0  # all values < -1: zero padding would leak 0 into the max
    y = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)
    assert y.shape == (1, 1, 2, 2) and (y < -1).all()
