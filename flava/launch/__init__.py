"""Launchers for the heavy stages: ``k8s`` (the joint stage as an Indexed Kubernetes Job running torchrun),
``sweep`` (Optuna over the joint sampling ratios and warm-up), ``config`` (the typed ``launch:`` section).
Nothing here imports Prefect; the flows in ``flows/`` call these functions."""
