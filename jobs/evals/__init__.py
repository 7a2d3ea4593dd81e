"""Evaluation library for vitpipe's eval stages: few-shot linear probes on frozen features and the ViT paper's
analysis figures (§4.5, Figure 7). Pure torch / numpy / matplotlib: no Ray, MLflow or DeepSpeed here; the stages in
``vitpipe.jobs.stages`` call these functions and report what they return through the tracker.

Modules: ``ridge`` (closed-form ridge probe), ``features`` (embedding functions, feature cache), ``fewshot``
(sampling and the evaluator), ``analysis`` (figures).
"""
