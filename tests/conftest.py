"""Test-session settings: one torch thread (tiny models on a shared 2-core machine run
~10x faster single-threaded than with threads fighting other processes)."""

import torch

torch.set_num_threads(1)
