"""Evaluation library for vitpipe's eval stages: probes on frozen features and the ViT paper's analysis figures
(§4.5, Figure 7). Pure torch / numpy / scipy / matplotlib: no Ray, MLflow or DeepSpeed here; the stages in
``vitpipe.jobs.stages`` call these functions and report what they return through the tracker.

Modules: ``features`` (embedding functions, feature cache), ``registry`` (evaluators by ``type``: ``fewshot``,
``knn``, ``linear``; one call runs them over a shared feature memo), ``fewshot`` + ``ridge`` (few-shot closed-form
ridge probe), ``knn`` (DINO's weighted kNN), ``linear_probe`` (full-data logistic regression, λ chosen on a held-out
slice of train), ``transfer`` (validation vs test roles, transfer score), ``image_bank`` (decoded images kept across
evaluations of a changing model: in-training evaluation), ``analysis`` (figures).
"""
