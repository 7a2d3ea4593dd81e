"""Task specs (name[@resolution]=where), metric-safe labels, and probing a photo task at a higher resolution."""

import re
import shutil

import numpy as np
import pytest
import torch

from vitpipe.jobs.evals.taskspec import TaskSpec, make_task, model_at_resolution, parse_task, parse_task_spec
from vitpipe.models import create

MLFLOW_METRIC = re.compile(r"^[/\w.\- :]*$")  # mlflow's own rule for metric names


def test_spec_grammar_keeps_old_specs_and_adds_resolution():
    assert parse_task("cifar10=../data/cifar10") == ("cifar10", "../data/cifar10")
    assert parse_task("digits") == ("digits", None)
    s = parse_task_spec("hymenoptera@64=../shared/data/hymenoptera")
    assert s == TaskSpec(name="hymenoptera", where="../shared/data/hymenoptera", resolution=64)
    assert s.label == "hymenoptera_64px" and MLFLOW_METRIC.match(s.label + ".val/10shot/mean")
    assert parse_task("c10@48=shards:s3://b/tr/manifest.json,s3://b/te/manifest.json") == (
        "c10_48px", "shards:s3://b/tr/manifest.json,s3://b/te/manifest.json")
    assert parse_task_spec("x=s3://bucket/a=b@c").where == "s3://bucket/a=b@c"  # only the name part is parsed
    for bad, msg in (("hy@0=p", "positive integer resolution"), ("hy@x=p", "positive integer"),
                     ("a/b=p", "the name must be"), ("=p", "the name must be"), ("hy=", "nothing after")):
        with pytest.raises(ValueError, match=msg):
            parse_task_spec(bad)


def test_make_task_names_resolution_and_held_out_splits(tmp_path, hymenoptera_root):
    t = make_task(f"hymenoptera@64={hymenoptera_root}")
    assert (t.name, t.resolution, t.num_train, t.num_test, t.classes) == ("hymenoptera_64px", 64, 245, 153,
                                                                         ["ants", "bees"])
    assert make_task(f"hymenoptera={hymenoptera_root}").resolution is None
    d = make_task("digits@48")
    assert (d.name, d.resolution, d.load("test", [0])[0].size) == ("digits_48px", 48, (48, 48))
    train_only = tmp_path / "ants_only"
    shutil.copytree(hymenoptera_root / "train", train_only / "train")  # a photo folder without a test split
    carved = make_task(f"ab={train_only}", test_fraction=0.25, split_seed=3)
    assert (carved.num_train, carved.num_test) == (184, 61) and carved.split_info()["seed"] == 3
    with pytest.raises(FileNotFoundError, match="task 'nope': no such folder"):
        make_task(f"nope={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="expected s=shards:<train manifest>"):
        make_task("s=shards:a.json,")


def test_model_at_resolution_interpolates_position_embeddings():
    from scipy.ndimage import zoom

    torch.manual_seed(0)
    cfg = create("mu/8", img_size=32, num_classes=0).cfg
    model = create(cfg).eval()
    assert model_at_resolution(model, cfg, 32) is model
    big = model_at_resolution(model, cfg, 64)
    assert big.cfg.img_hw == (64, 64) and not big.training
    # Independent reference: the original code's scipy.ndimage.zoom(order=1) of the 4x4 grid to 8x8.
    grid = model.pos_embed[0, 1:].detach().numpy().reshape(4, 4, -1)
    ref = zoom(grid, (2, 2, 1), order=1).reshape(64, -1)
    np.testing.assert_allclose(big.pos_embed[0, 1:].detach().numpy(), ref, atol=1e-6)
    assert torch.equal(big.pos_embed[0, 0], model.pos_embed[0, 0])  # class-token row kept
    sd_small, sd_big = model.state_dict(), big.state_dict()
    assert all(torch.equal(sd_small[k], sd_big[k]) for k in sd_small if k != "pos_embed")
    with torch.inference_mode():
        assert big.pre_logits(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(ValueError, match="not a multiple of patch_size=8"):
        model_at_resolution(model, cfg, 60)


@pytest.mark.slow
def test_hymenoptera_probed_at_model_and_higher_resolution(hymenoptera_root):
    """The out-of-domain photo task end to end: kNN and few-shot on validation and test, at 32 and at 64 px."""
    from vitpipe.jobs.evals.features import make_embed_fn
    from vitpipe.jobs.evals.registry import FeatureMemo, run_evaluators

    torch.manual_seed(0)
    cfg = create("mu/8", img_size=32, num_classes=0).cfg
    model = create(cfg).eval()
    evals = [("knn", {"ks": [5]}), ("fewshot", {"shots": [5], "seeds": [0]})]
    out = {}
    for spec in (f"hymenoptera={hymenoptera_root}", f"hymenoptera@64={hymenoptera_root}"):
        task = make_task(spec)
        size = task.resolution or cfg.img_hw[0]
        m = model_at_resolution(model, cfg, size)
        embed = make_embed_fn(m, task, img_size=size, batch_size=64)
        memo = FeatureMemo()
        for t in (task.validation(), task):
            out.update(run_evaluators(evals, make_embed_fn(m, t, img_size=size, batch_size=64) if t is not task
                                      else embed, t, model_key="mu", resolution=size, memo=memo))
    assert set(out) == {f"{n}/{m}" for n in ("hymenoptera", "hymenoptera.val", "hymenoptera_64px",
                                             "hymenoptera_64px.val") for m in ("knn/k5", "5shot/seed0", "5shot/mean",
                                                                               "5shot/std")}
    assert all(0.0 <= v <= 1.0 for v in out.values()) and all(MLFLOW_METRIC.match(k) for k in out)
    assert out["hymenoptera/knn/k5"] != out["hymenoptera_64px/knn/k5"]  # another resolution, other features
