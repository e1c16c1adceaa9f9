"""Benchmarks of the relay: ``python -m bench`` (or ``make bench``) writes bench/results.json.

A real ``strelay`` process is measured from outside: load comes from separate client
processes, the relay's CPU time from ``/proc/<pid>/stat`` and its memory from
``/proc/<pid>/status``. Every figure is reported beside its floor, measured in the same run.
"""
