"""Benchmarks of outbox against raw baselines measured in the same run: ``python -m bench``.

Each figure is printed beside the rate of a plain client (pika or redis-py) doing the same
transfer, and their ratio. ``python -m bench --help`` lists the options; docs/benchmarks.md
has the figures of a real run and what each baseline does.
"""
