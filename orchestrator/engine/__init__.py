"""The engine: every decision the daemon makes about a job, as plain code with no I/O.

Nothing here awaits, reads a clock or draws a random number by itself: callers pass `now` and an
rng, and carry out what comes back (launch this job, look at that attempt again, stop this one,
record this transition, describe these jobs, wake at T). The async shells — `dispatcher.py` and
`poller.py` — do the I/O and decide nothing; so every decision is reachable from a unit test with
a manual clock and a seeded rng (`tests/unit/engine/`).

- `lanes.py`: a backend's queue of jobs to launch — ready, waiting for a retry or a deadline, in
  flight — behind methods that keep its invariants (a freed slot always wakes the lane).
- `starts.py`: what follows a launch: retry or fail a start, settle an attempt whose outcome is
  unknown.
- `recovery.py`: what a restarted daemon does with each unfinished job.
- `tracking.py`: when to describe which job (back-off, deadlines, batches, fill-ahead) and what an
  observation means (a transition, nothing new, a job gone missing, a stop's outcome).
"""
