"""recsys: a two-stage recommender with a fine-tuned language model.

OpenMP threads (LightGBM's, torch's) sleep rather than spin while they wait, unless
`OMP_WAIT_POLICY` says otherwise: on a machine whose cores other jobs also use,
spinning threads take the CPU from the threads that have work, and the ranker's
training ran 3 to 7 times slower for it (benchmarks/README.md, "Fit time"). OpenMP
reads the variable once, when it is loaded, so it is set before anything imports it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
