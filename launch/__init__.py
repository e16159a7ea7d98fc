"""Running jobs: SLURM through submitit (multi-node, requeue on preemption) and local processes.

`python -m launch.submit JOB CONFIG ...` submits to SLURM, `python -m launch.local JOB CONFIG
--nproc N ...` runs the same job on this machine. Job types live in `launch.jobs`.
"""
