import torch

from vitpipe.models import create
from vitpipe.models.mpp import MaskedPatchPrediction, corruption_plan, mean_colour_targets


def test_corruption_plan_proportions():
    g = torch.Generator().manual_seed(0)
    corrupted, use_mask, use_random = corruption_plan(64, 196, generator=g)
    assert (corrupted.sum(1) == 98).all()  # exactly 50% of the patches of every image
    n = corrupted.sum().item()
    assert abs(use_mask.sum().item() / n - 0.8) < 0.02
    assert abs(use_random.sum().item() / n - 0.1) < 0.02
    assert not (use_mask & use_random).any() and not (use_mask & ~corrupted).any()


def test_mean_colour_targets():
    img = torch.full((1, 3, 8, 8), -1.0)  # black
    img[:, 0, :4, :4] = 1.0  # top-left patch pure red
    t = mean_colour_targets(img, patch=4, bits=3)
    assert t.shape == (1, 4)
    assert t[0, 0].item() == 7 * 64 and t[0, 1].item() == 0


def test_mpp_trains_and_is_deterministic_given_generator():
    torch.manual_seed(0)
    model = MaskedPatchPrediction(create("mu/4", img_size=16, num_classes=0))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    l1, _ = model(x, torch.Generator().manual_seed(1))
    l2, _ = model(x, torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2)
    assert abs(l1.item() - torch.log(torch.tensor(512.0)).item()) < 1e-4  # zero-init head: uniform over 512
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = model(x, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < l1.item() * 0.5
    assert model.mask_token.grad is not None
