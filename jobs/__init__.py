"""``vitpipe.jobs``: everything that orchestrates — the CLI, configs and recipes, the stage graph and its runner,
the stages, training and evaluation, Ray clusters, tracking. The rooms, highest layer first (a room imports its own
modules and lower rooms only; ``tests/test_import_graph.py`` checks it):

- ``cli``      the ``vitpipe`` command: parsing and printing only (verbs by audience: local, cluster, plan, sweep)
- ``cluster``  Ray jobs: submit a run, judge, follow, stop and diagnose it
- ``run``      the stage graph and plan, the runner (run, resume, rerun), sweeps, the concurrent stage scheduler
- ``config``   ``PipelineConfig``, named recipes, ``build_config``, the resolved (serialised, redacted) config
- ``stages``   one file per stage (``run(cfg, ctx) -> StageResult``), the stage protocol and the cache-key rule
- ``train``    the pretraining ``Trainer`` and its Ray Train worker, DeepSpeed config, checkpoints, fine-tuning,
               compute planning
- ``evals``    evaluators over an embedding function (few-shot, kNN, linear probe), figures, task specs
- ``core``     what every room uses: config machinery, the run store, tracking, secrets, Ray start, the registry

``vitpipe.models`` and ``vitpipe.pipeline`` sit below all of them and import none of them.
"""
