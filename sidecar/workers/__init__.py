"""Data-plane worker processes behind one control plane (``workers`` > 1).

``pool.py`` (in the control process) starts, watches and restarts the workers and is the control plane's
:class:`~sidecar.planes.DataSide`; ``worker.py`` is a worker's main: one :class:`~sidecar.dataplane.DataPlane`
on ports shared with the others. ``channel.py`` carries the messages between them; ``merge.py`` folds the
workers' reports and metrics into the pod's.
"""
