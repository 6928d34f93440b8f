"""Run-time machinery shared by the stages and the jobs (stage manifests, the Ray bootstrap, seeded
random draws, ...)."""
