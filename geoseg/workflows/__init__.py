"""Workflows: YAML files that describe a whole job (AOI, imagery, models, outputs) and the runner."""

from geoseg.workflows.spec import Workflow, load_workflow

__all__ = ["Workflow", "load_workflow"]
