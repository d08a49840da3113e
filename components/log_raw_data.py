"""The log_raw_data step as a KFP component; its inputs, outputs and parameters are declared in captioning.workflow."""

from components.factory import step_component

log_raw_data = step_component("log_raw_data")
