"""``python -m experiments.bench``: see :mod:`experiments.bench.cli`."""

from absl import app

from experiments.bench import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main)
