"""The desktop app: classify photos with models from the MLflow Model Registry."""
