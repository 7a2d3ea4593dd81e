"""What every layer of ``vitpipe.jobs`` uses: the typed-config machinery (``configtools``), the run store on any
fsspec URL (``store``: stage folders, ``result.json``, ``run.json``), experiment tracking behind one protocol
(``tracking``: MLflow or nothing), secret redaction (``secrets``), starting or joining Ray (``raytools``) and the
pretrained model in the MLflow registry (``model_registry``). Imports nothing else from ``vitpipe.jobs``."""
