"""Ray jobs on a cluster: ``submit`` (ship the code and a resolved config, run the pipeline or a sweep as a job),
``status`` (judge a job by Ray's status and the store's evidence; logs, stop), ``diagnose`` (why a job or its
workers wait), ``links`` (the MLflow side: closing runs, links a person follows)."""
