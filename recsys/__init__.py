"""recsys: a two-stage recommender with a fine-tuned language model.

OpenMP threads (LightGBM's, torch's) sleep rather than spin while they wait, unless
`OMP_WAIT_POLICY` says otherwise: on a machine whose cores other jobs also use,
spinning threads take the CPU from the threads that have work: the ranker's training
ran 5.5 times slower beside two busy processes, and no faster on a quiet machine
(benchmarks/README.md, "OpenMP wait policy"). OpenMP reads the variable once, when it
is loaded, so it is set before anything imports it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
