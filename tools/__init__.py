"""Command-line tools around the pipeline (metrics, checks); each module is runnable with python -m."""
