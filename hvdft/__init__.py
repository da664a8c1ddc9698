"""hvdft: data-parallel fine-tuning of transformers on Horovod over MPI."""

__version__ = "0.1.0"
