"""qam_ray: offline→online RL agents of the QAM paper in PyTorch, trained and swept with Ray RLlib / Tune.

Importing the package sets the library's CPU threading defaults (``CPU_THREADING_ENV``) before torch is loaded.
"""

import os

# torch's CPU wheel runs its intra-op threads on GNU libgomp, whose default lets a thread that finished its share
# of a kernel spin-wait for its siblings.  An update is ~1,000 short kernels, so when another process holds one of
# the cores the spinning thread burns the time slices its descheduled sibling needs, and the loop collapses
# (full-size QAM on 2 cores under load: 3.4 s per update by default, 1.4 s with PASSIVE; issue 17 saw 11×).
# PASSIVE makes a waiting thread sleep at once.  libgomp reads the variable once, when torch loads it, so it must be
# in the environment before ``import torch``: every entry point imports qam_ray first, the Ray workers of a local
# cluster inherit the driver's environment, and a worker elsewhere imports this package before any of its modules
# imports torch.  A value the user set is kept (OMP_WAIT_POLICY=ACTIVE restores libgomp's default).
CPU_THREADING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in CPU_THREADING_ENV.items():
    os.environ.setdefault(_name, _value)

