"""Run-time machinery shared by the stages: stage manifests and the run lock (``manifest``), the
Ray bootstrap (``ray``)."""
