"""orchestrator: launch and track jobs on AWS ECS, AWS Batch or local subprocesses."""

__version__ = "0.1.0"
