"""A training run's directory: its layout (`layout.RunDir`, the one place its file names are
spelled), the teacher exports written there and read from it (`exports`), and the lock
that keeps a second writer out (`lock`). Training, launchers, sweeps, analysis and
evaluation all reach a run through these modules."""
