"""torch.compile: the model traces as one graph (no graph breaks) and inductor output matches eager on CPU."""

import pytest
import torch

from vitpipe.models import create


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_and_training_graph_traces():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create("mu/4", img_size=16, num_classes=3, depth=1, drop_path=0.1, classifier_bias_init=0.5).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = torch.compile(model, fullgraph=True)  # inductor (C++ codegen on CPU); raises on any graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)

    # Training mode (drop-path sampling, SDPA backward) as one graph too; aot_eager keeps this test fast.
    torch._dynamo.reset()
    model.train()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
