"""The trainer: the only package that imports Composer (run.py's `run(recipe)` is the entry point).

Read top to bottom: shims.py (library workarounds) <- module.py (model wrapper, optimizer, schedule),
parallel.py (FSDP settings) <- callbacks.py, reliability.py (Composer callbacks) <- run.py.
"""
