"""Process exit codes that launchers act on: Kubernetes ``podFailurePolicy`` rules and Prefect retries.

A config or data error cannot be fixed by running the same command again, so it must not burn retries; a
preempted process saved a checkpoint and its retry resumes from it.
"""
NON_RETRYABLE = 2  # bad config, missing input, busy workspace: the CLI's error exit (argparse's usage exit too)
PREEMPTED = 143  # 128 + SIGTERM: the trainer saved a checkpoint before exiting; a retry resumes there
