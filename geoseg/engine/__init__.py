"""The engine: the Dask graph from raster windows to stitched class masks, and its writer."""

from geoseg.engine.cluster import scheduler
from geoseg.engine.graph import predict
from geoseg.engine.job import Job, job_from
from geoseg.engine.write import write

__all__ = ["Job", "job_from", "predict", "scheduler", "write"]
