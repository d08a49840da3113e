"""The pipeline steps as plain functions: config and input paths in, a StepResult out."""
