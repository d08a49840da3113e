"""The evaluate step as a KFP component; its inputs, outputs and parameters are declared in captioning.workflow."""

from components.factory import step_component

evaluate = step_component("evaluate")
