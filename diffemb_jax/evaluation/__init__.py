"""Evaluation: retrieval search and metrics, and the retrieval tasks they are run on."""
