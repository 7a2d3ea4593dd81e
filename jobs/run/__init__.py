"""Running a pipeline: the stage graph and its plan (``graph``, ``planning``), and the runner that executes it,
reusing cached stages and tracking one MLflow parent run per pipeline run (``runner``)."""
