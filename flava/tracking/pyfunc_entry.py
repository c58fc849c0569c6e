"""The code MLflow runs to build our logged embedding model ("models from code").

``StageRun.log_model`` hands MLflow this file instead of a pickled ``FlavaEmbedder``: the logged model holds no
pickle, and loading it imports ``flava`` (a pip requirement of the model) like any other code.
"""
import mlflow

from flava.tracking.runs import FlavaEmbedder

mlflow.models.set_model(FlavaEmbedder())
