"""Test harnesses shared by several layers: real worker processes (:mod:`.worker`) and
waiting on a condition with a deadline (:func:`.worker.wait_until`)."""
