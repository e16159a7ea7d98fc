"""Sweeps: a grid of training runs (variants x grid points x seeds), the evaluations of each
finished run, and one table of the results.

    dinospec sweep configs/sweeps/specialization_cpu.yaml [--parallel N]
    dinospec sweep SWEEP.yaml --slurm --partition gpu [resource options]
    dinospec sweep SWEEP.yaml --dry-run | --report

`spec` reads the sweep file and expands it into cells, `check` validates every config
before anything runs, `stages` runs one cell (train, evaluate, record; each step skipped
when already done), `local` runs the cells on this machine, `slurm` submits them as a job
array, `report` writes the table and the plot.
"""
