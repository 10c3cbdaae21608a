"""Side-by-side benchmark of offload against huey and dramatiq: `python -m bench.run`."""
