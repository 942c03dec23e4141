"""fer_jax's command line from the repository: python main.py [--config=...]
[--workdir=...] [--mode=...] (installed: fer-jax). See fer_jax/cli.py."""

from fer_jax import cli

if __name__ == '__main__':
  cli.run()
