"""The process_data step as a KFP component; its inputs, outputs and parameters are declared in captioning.workflow."""

from components.factory import step_component

process_data = step_component("process_data")
