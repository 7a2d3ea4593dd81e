"""ImageBank: the images the task's own batches give, in the order asked (duplicates too), decoded once while they fit
the budget and decoded again (never wrong) beyond it."""

import numpy as np
import torch

from vitpipe.jobs.evals.image_bank import ImageBank
from vitpipe.jobs.evals.taskspec import make_task
from vitpipe.pipeline import ImageTransform


def test_images_match_the_task_batches_and_respect_the_budget():
    task = make_task("digits")
    row_bytes = 3 * 32 * 32 * 4
    bank = ImageBank(task, 32, budget_bytes=5 * row_bytes, batch_size=4)
    idx = np.array([7, 3, 7, 11, 0, 2, 9, 3])
    got = bank.images("train", idx)
    ref = torch.cat([x for x, _ in task.batches("train", idx, ImageTransform(img_size=32, train=False), 4)])
    assert torch.equal(got, ref)
    assert len(bank.rows) == 5 and bank.used == 5 * row_bytes  # 6 distinct images, room for 5
    calls = []
    orig = task.batches
    task.batches = lambda *a, **k: (calls.append(a[1].tolist()), orig(*a, **k))[1]
    assert torch.equal(bank.images("train", idx), ref)
    assert calls == [[9]]  # only the one that did not fit (the sixth distinct) is decoded again
